// Host-side helpers shared by the launchers.
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "common.cuh"

namespace moeflash {

// On unless MOEFLASH_PDL=0 (read at every launch, so a benchmark can capture graphs both ways).
// H100, gpt-oss-20b batch 1: 2.229 -> 2.207 ms a step replayed (bench/results/step-profile-*).
bool pdl_enabled() {
  const char* v = std::getenv("MOEFLASH_PDL");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

namespace {
bool listed(const char* var, const char* cls) {
  const char* list = std::getenv(var);
  if (list == nullptr || *list == 0) return false;
  const size_t n = std::strlen(cls);
  for (const char* p = list; *p != 0;) {
    const char* end = std::strchr(p, ',');
    const size_t len = end != nullptr ? static_cast<size_t>(end - p) : std::strlen(p);
    if (len == n && std::strncmp(p, cls, n) == 0) return true;
    if (end == nullptr) break;
    p = end + 1;
  }
  return false;
}
}  // namespace

int profile_times(const char* cls) {
  if (listed("MOEFLASH_PROFILE_SKIP", cls)) return 0;
  return listed("MOEFLASH_PROFILE_TWICE", cls) ? 2 : 1;
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != 0 ? std::atoi(v) : fallback;
}

int device_sm_count() {
  // Launchers size persistent grids from this on every call; the attribute query is cheap but
  // not free, so cache it per device.
  constexpr int kMaxDevices = 64;
  static int counts[kMaxDevices] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return 132;
  if (counts[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
    counts[dev] = n;
  }
  return counts[dev];
}

int resident_blocks(const void* kernel, int threads, size_t smem) {
  struct Entry {
    const void* kernel;
    int threads;
    size_t smem;
    int dev;
    int blocks;
  };
  static std::mutex mu;
  static Entry cache[256];
  static int used = 0;
  int dev = 0;
  cudaGetDevice(&dev);
  std::lock_guard<std::mutex> lock(mu);
  for (int i = 0; i < used; ++i) {
    const Entry& e = cache[i];
    if (e.kernel == kernel && e.threads == threads && e.smem == smem && e.dev == dev) return e.blocks;
  }
  if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem) != cudaSuccess || blocks <= 0) {
    cudaGetLastError();
    blocks = 1;
  }
  if (used < 256) cache[used++] = Entry{kernel, threads, smem, dev, blocks};
  return blocks;
}

}  // namespace moeflash
