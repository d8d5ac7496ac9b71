// Embedding gather: one bf16 row of the table per token, widened to float32.
#include "common.cuh"

namespace moeflash {
namespace {

__global__ void embedding_kernel(const bf16_bits* __restrict__ table, const int32_t* __restrict__ ids,
                                 int hidden, float* __restrict__ out) {
  pdl_prologue();
  const int t = blockIdx.y;
  const int64_t row = ids[t];
  const uint4* src = reinterpret_cast<const uint4*>(table + row * hidden);
  float4* dst = reinterpret_cast<float4*>(out + static_cast<int64_t>(t) * hidden);
  const int chunks = hidden / 8;
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += gridDim.x * blockDim.x) {
    const uint4 w = ld_stream_u4(src + c);
    dst[2 * c] = make_float4(bf16_lo(w.x), bf16_hi(w.x), bf16_lo(w.y), bf16_hi(w.y));
    dst[2 * c + 1] = make_float4(bf16_lo(w.z), bf16_hi(w.z), bf16_lo(w.w), bf16_hi(w.w));
  }
}

}  // namespace

cudaError_t embedding_bf16(const bf16_bits* table, const int32_t* ids, int tokens, int hidden,
                           float* out, cudaStream_t stream) {
  if (tokens <= 0) return cudaSuccess;
  constexpr int kThreads = 128;
  const dim3 grid(ceil_div(hidden / 8, kThreads), tokens);
  return launch_pdl(embedding_kernel, grid, kThreads, 0, stream, table, ids, hidden, out);
}

}  // namespace moeflash
