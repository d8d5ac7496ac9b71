// RMSNorm fused with the residual add that precedes it in every decoder layer:
//   x = x + residual (written back: x is the residual stream), out = x * rsqrt(mean(x^2) + eps) * w
// float32 arithmetic, bf16 weight. The sum of squares is reduced in a fixed order, so the result of
// a row never depends on the other rows of the launch.
#include "common.cuh"

namespace moeflash {
namespace {

__device__ __forceinline__ float4 load_w4(const bf16_bits* w, int i) {
  const uint2 p = *reinterpret_cast<const uint2*>(w + i);
  return make_float4(bf16_lo(p.x), bf16_hi(p.x), bf16_lo(p.y), bf16_hi(p.y));
}

// Pass 1 of a row for the lanes/threads that own float4 chunks i = first, first + stride, ...
__device__ __forceinline__ float add_residual_sumsq(float* x, const float* residual, int n4, int first,
                                                    int stride) {
  float ss = 0.f;
  for (int i = first; i < n4; i += stride) {
    float4 v = reinterpret_cast<float4*>(x)[i];
    if (residual != nullptr) {
      const float4 r = reinterpret_cast<const float4*>(residual)[i];
      v.x += r.x;
      v.y += r.y;
      v.z += r.z;
      v.w += r.w;
      reinterpret_cast<float4*>(x)[i] = v;
    }
    ss = fmaf(v.x, v.x, ss);
    ss = fmaf(v.y, v.y, ss);
    ss = fmaf(v.z, v.z, ss);
    ss = fmaf(v.w, v.w, ss);
  }
  return ss;
}

// Pass 2 re-reads x: each thread reads back only what it wrote in pass 1, so no barrier is needed.
__device__ __forceinline__ void scale_row(const float* x, const bf16_bits* w, float inv, int n4, int first,
                                          int stride, float* out) {
  for (int i = first; i < n4; i += stride) {
    const float4 v = reinterpret_cast<const float4*>(x)[i];
    const float4 g = load_w4(w, 4 * i);
    reinterpret_cast<float4*>(out)[i] =
        make_float4((v.x * inv) * g.x, (v.y * inv) * g.y, (v.z * inv) * g.z, (v.w * inv) * g.w);
  }
}

// Short rows (per-head q/k norms, small models): one warp a row.
__global__ void rmsnorm_warp_kernel(float* __restrict__ x, const float* __restrict__ residual,
                                    const bf16_bits* __restrict__ w, float eps, int rows, int hidden,
                                    float* __restrict__ out) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int64_t off = static_cast<int64_t>(row) * hidden;
  const int n4 = hidden / 4;
  float ss = add_residual_sumsq(x + off, residual ? residual + off : nullptr, n4, lane, 32);
  ss = warp_sum(ss);
  const float inv = rsqrtf(ss / static_cast<float>(hidden) + eps);
  scale_row(x + off, w, inv, n4, lane, 32, out + off);
}

constexpr int kRowThreads = 256;

__global__ void __launch_bounds__(kRowThreads) rmsnorm_block_kernel(float* __restrict__ x,
                                                                    const float* __restrict__ residual,
                                                                    const bf16_bits* __restrict__ w,
                                                                    float eps, int hidden,
                                                                    float* __restrict__ out) {
  pdl_prologue();
  __shared__ float partial[kRowThreads / 32];
  const int row = blockIdx.x;
  const int64_t off = static_cast<int64_t>(row) * hidden;
  const int n4 = hidden / 4;
  float ss = add_residual_sumsq(x + off, residual ? residual + off : nullptr, n4, threadIdx.x, kRowThreads);
  ss = warp_sum(ss);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < kRowThreads / 32; ++i) total += partial[i];
  const float inv = rsqrtf(total / static_cast<float>(hidden) + eps);
  scale_row(x + off, w, inv, n4, threadIdx.x, kRowThreads, out + off);
}

}  // namespace

cudaError_t rmsnorm_residual(float* x, const float* residual, const bf16_bits* weight, float eps, int rows,
                             int hidden, float* out, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (hidden <= 1024) {
    constexpr int kWarps = 8;
    return launch_pdl(rmsnorm_warp_kernel, ceil_div(rows, kWarps), kWarps * 32, 0, stream, x, residual, weight, eps,
                      rows, hidden, out);
  }
  return launch_pdl(rmsnorm_block_kernel, rows, kRowThreads, 0, stream, x, residual, weight, eps, hidden, out);
}

}  // namespace moeflash
