// Pseudo-random buffer contents generated on the device, for benchmarks: gigabytes of weights
// need no host upload, and never zeros (zeros can run faster than real data).
#include <cuda_bf16.h>

#include "common.cuh"

namespace moeflash {
namespace {

__device__ __forceinline__ uint32_t mix(uint64_t i, uint32_t seed) {
  uint64_t z = i * 0x9e3779b97f4a7c15ull + seed * 0xbf58476d1ce4e5b9ull + 0x94d049bb133111ebull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return static_cast<uint32_t>((z ^ (z >> 31)) >> 32);
}

// Uniform in [-scale, scale), never exactly zero.
__device__ __forceinline__ float signed_uniform(uint64_t i, uint32_t seed, float scale) {
  const uint32_t h = mix(i, seed);
  const float u = (static_cast<float>(h >> 8) + 0.5f) * 0x1p-24f;  // (0, 1)
  return (2.0f * u - 1.0f) * scale;
}

__global__ void fill_bf16_kernel(bf16_bits* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const __nv_bfloat16 b = __float2bfloat16_rn(signed_uniform(i, seed, scale));
    p[i] = *reinterpret_cast<const bf16_bits*>(&b);
  }
}

__global__ void fill_f32_kernel(float* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    p[i] = signed_uniform(i, seed, scale);
}

__global__ void fill_u8_kernel(uint8_t* p, size_t n, uint32_t seed, int lo, int span) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    p[i] = static_cast<uint8_t>(lo + mix(i, seed) % static_cast<uint32_t>(span));
}

__global__ void sleep_kernel(uint64_t ns) {
  uint64_t start;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  for (;;) {
    uint64_t now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (now - start >= ns) break;
    __nanosleep(1000);
  }
}

int grid_for(size_t n) {
  const size_t blocks = (n + 255) / 256;
  const size_t cap = static_cast<size_t>(device_sm_count()) * 16;
  return static_cast<int>(blocks < cap ? (blocks == 0 ? 1 : blocks) : cap);
}

}  // namespace

cudaError_t fill_bf16_random(bf16_bits* p, size_t n, uint32_t seed, float scale, cudaStream_t stream) {
  fill_bf16_kernel<<<grid_for(n), 256, 0, stream>>>(p, n, seed, scale);
  return cudaGetLastError();
}

cudaError_t fill_f32_random(float* p, size_t n, uint32_t seed, float scale, cudaStream_t stream) {
  fill_f32_kernel<<<grid_for(n), 256, 0, stream>>>(p, n, seed, scale);
  return cudaGetLastError();
}

cudaError_t fill_u8_random(uint8_t* p, size_t n, uint32_t seed, int lo, int hi, cudaStream_t stream) {
  if (hi < lo || lo < 0 || hi > 255) return cudaErrorInvalidValue;
  fill_u8_kernel<<<grid_for(n), 256, 0, stream>>>(p, n, seed, lo, hi - lo + 1);
  return cudaGetLastError();
}

cudaError_t gpu_sleep(uint64_t nanoseconds, cudaStream_t stream) {
  sleep_kernel<<<1, 1, 0, stream>>>(nanoseconds);
  return cudaGetLastError();
}

}  // namespace moeflash
