// Host-side helpers shared by the launchers.
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "common.cuh"

namespace moeflash {

// Off unless MOEFLASH_PDL=1: measured on an H100 (gpt-oss-20b, batch 1) the early trigger made the
// step slower (3.10 ms against 2.90 ms): dependents parked at their wait hold the multiprocessor
// slots that the persistent grids (sized to fill the device) expect to have.
bool pdl_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("MOEFLASH_PDL");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
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
