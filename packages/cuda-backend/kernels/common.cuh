// Helpers shared by the kernel files: bf16 and E2M1 decoding, streaming loads, warp reductions.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

namespace moeflash {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// ------------------------------------------------------------------ bf16
__device__ __forceinline__ float bf16_to_f32(bf16_bits b) { return __uint_as_float(uint32_t(b) << 16); }
// A 32-bit word holds two bf16: element 0 in the low half (little-endian memory order).
__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// ------------------------------------------------------------------ loads
// Weights are read once per forward pass: keep them out of L1 so activations stay there.
__device__ __forceinline__ uint4 ld_stream_u4(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}
__device__ __forceinline__ uint32_t ld_stream_u8(const uint8_t* p) {
  uint16_t r;
  asm("ld.global.nc.L1::no_allocate.u8 %0, [%1];" : "=h"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ float4 ld_f4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }

// ------------------------------------------------------------------ MXFP4
// Two E2M1 codes of a 32-bit word of packed codes, nibbles p and p + 4 (element order of the
// word), as float32. The code bits are moved into an fp16's exponent and mantissa so that the
// fp16 value is exactly E2M1 * 2^-14 for every code, the 0.5 subnormal included; the caller
// multiplies block sums by 2^14. P is a compile-time nibble index 0..3.
template <int P>
__device__ __forceinline__ float2 e2m1_pair_scaled(uint32_t w) {
  static_assert(P >= 0 && P < 4, "nibble pair index");
  constexpr int kMag = 9 - 4 * P;    // bits 4P..4P+2 -> 9..11 (and 4P+16.. -> 25..27)
  constexpr int kSign = 12 - 4 * P;  // bit 4P+3 -> 15 (and 4P+19 -> 31)
  const uint32_t mag = (kMag >= 0 ? (w << (kMag & 31)) : (w >> ((-kMag) & 31))) & 0x0e000e00u;
  const uint32_t sgn = (w << kSign) & 0x80008000u;
  const uint32_t h2 = mag | sgn;
  return __half22float2(*reinterpret_cast<const __half2*>(&h2));
}
constexpr float kE2m1Unscale = 16384.0f;  // 2^14, undoes e2m1_pair_scaled's factor

// E8M0 scale code -> 2^(s-127) (exact for every code, 0 included), NaN for 0xFF.
__device__ __forceinline__ float e8m0_to_f32(uint32_t s) {
  if (s == 0xffu) return __uint_as_float(0x7fc00000u);
  return s == 0 ? __uint_as_float(0x00400000u) : __uint_as_float(s << 23);
}

// ------------------------------------------------------------------ programmatic dependent launch
// Unless MOEFLASH_PDL=0, the kernels of a step are launched with programmatic stream serialization
// (launch_pdl): a kernel may be scheduled while the previous one drains, so its launch, block
// scheduling and first weight loads overlap that kernel's tail. pdl_wait() returns once every
// earlier kernel has finished and its writes are visible: before it a kernel may read only what no
// kernel of the step writes (weights). pdl_trigger() lets the next kernel launch; it comes after the
// wait so that at most one kernel waits behind the running one (an earlier trigger let a chain of
// parked kernels hold the multiprocessor slots the running grid was sized for: H100, gpt-oss-20b
// batch 1, 2.90 -> 3.10 ms).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_prologue() {
  pdl_wait();
  pdl_trigger();
}

// ------------------------------------------------------------------ reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, m));
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

// Sums N values (a power of two <= 32) across the warp with N - 1 + 5 - log2(N) shuffles instead
// of 5 N: each butterfly step hands half of the values to the partner lane. Afterwards v[0] of
// lane l holds the warp total of value index (l >> (5 - log2 N)); lanes with
// (l & ((32 >> log2 N) - 1)) == 0 hold distinct indices. Every value goes through the same
// butterfly tree as warp_sum, so the totals do not depend on N (batch invariance).
// Written as template recursion so that every register index is a compile-time constant: a
// rolled loop here indexes the array at run time, which costs branch trees or local memory.
template <int N, int COUNT, int MASK>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[N], int lane) {
  if constexpr (COUNT > 1) {
    const bool upper = (lane & MASK) != 0;
#pragma unroll
    for (int i = 0; i < COUNT / 2; ++i) {
      const float send = upper ? v[i] : v[i + COUNT / 2];
      const float keep = upper ? v[i + COUNT / 2] : v[i];
      v[i] = keep + __shfl_xor_sync(kFullMask, send, MASK);
    }
    reduce_scatter_step<N, COUNT / 2, MASK / 2>(v, lane);
  } else if constexpr (MASK > 0) {
    v[0] += __shfl_xor_sync(kFullMask, v[0], MASK);
    reduce_scatter_step<N, 1, MASK / 2>(v, lane);
  }
}

template <int N>
__device__ __forceinline__ void warp_reduce_scatter(float (&v)[N], int lane) {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "N must be a power of two <= 32");
  reduce_scatter_step<N, N, 16>(v, lane);
}

constexpr int next_pow2(int n) { return n <= 1 ? 1 : 2 * next_pow2((n + 1) / 2); }

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Whether launch_pdl asks for programmatic stream serialization (on unless MOEFLASH_PDL=0).
bool pdl_enabled();

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialization; the
// kernel must begin with pdl_prologue().
template <typename... KArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
  return e != cudaSuccess ? e : cudaGetLastError();
}

// Multiprocessor count of the current device, read once per device.
int device_sm_count();

// Resident blocks per multiprocessor of `kernel` at `threads` threads and `smem` dynamic shared
// bytes on the current device (at least 1), cached: persistent grids are sized from it on every
// launch. Raises the kernel's dynamic shared-memory limit first when smem > 48 KiB.
int resident_blocks(const void* kernel, int threads, size_t smem);

}  // namespace moeflash
