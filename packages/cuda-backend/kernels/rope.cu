// Rotary position embedding, rotate-half convention (HF's rotate_half: dim i pairs with
// i + rotary_dim/2). Frequencies arrive precomputed from the host, so plain RoPE and YaRN are the
// same kernel; YaRN's attention factor multiplies cos and sin.
#include "common.cuh"

namespace moeflash {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxHalf = 256;  // rotary_dim <= 512

__global__ void __launch_bounds__(kThreads) rope_kernel(float* __restrict__ q, float* __restrict__ k,
                                                        const int32_t* __restrict__ positions,
                                                        const float* __restrict__ inv_freq,
                                                        double attention_factor, int num_heads,
                                                        int num_kv_heads, int head_dim, int half) {
  __shared__ float cos_s[kMaxHalf];
  __shared__ float sin_s[kMaxHalf];
  const int t = blockIdx.x;
  const float pos = static_cast<float>(positions[t]);
  for (int i = threadIdx.x; i < half; i += kThreads) {
    // The angle is rounded to float32 as HF's float32 matmul leaves it; cos and sin are taken in
    // double so that they match the reference to the last float32 bit (one evaluation per
    // frequency per token, shared by all heads).
    const float angle = __fmul_rn(pos, inv_freq[i]);
    double s, c;
    sincos(static_cast<double>(angle), &s, &c);
    cos_s[i] = static_cast<float>(c * attention_factor);
    sin_s[i] = static_cast<float>(s * attention_factor);
  }
  __syncthreads();
  const int heads = num_heads + (k != nullptr ? num_kv_heads : 0);
  for (int j = threadIdx.x; j < heads * half; j += kThreads) {
    const int h = j / half;
    const int i = j - h * half;
    float* v = h < num_heads ? q + (static_cast<int64_t>(t) * num_heads + h) * head_dim
                             : k + (static_cast<int64_t>(t) * num_kv_heads + (h - num_heads)) * head_dim;
    const float x1 = v[i];
    const float x2 = v[i + half];
    const float c = cos_s[i];
    const float s = sin_s[i];
    v[i] = fmaf(x1, c, -x2 * s);
    v[i + half] = fmaf(x2, c, x1 * s);
  }
}

}  // namespace

cudaError_t rope_rotate_half(float* q, float* k, const int32_t* positions, const float* inv_freq,
                             double attention_factor, int tokens, int num_heads, int num_kv_heads,
                             int head_dim, int rotary_dim, cudaStream_t stream) {
  if (tokens <= 0) return cudaSuccess;
  if (rotary_dim % 2 != 0 || rotary_dim / 2 > kMaxHalf || rotary_dim > head_dim) return cudaErrorInvalidValue;
  rope_kernel<<<tokens, kThreads, 0, stream>>>(q, k, positions, inv_freq, attention_factor, num_heads,
                                               num_kv_heads, head_dim, rotary_dim / 2);
  return cudaGetLastError();
}

}  // namespace moeflash
