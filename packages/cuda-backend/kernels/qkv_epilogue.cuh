// The per-head q/k epilogue shared by qkv_prepare (model.cu) and the fused decode attention
// (attention_fused.cu): both must produce the same bits, since either may write a key to the cache
// that the other path's steps later read.
#pragma once

#include "common.cuh"

namespace moeflash {

// cos/sin of RoPE frequency i at `pos`, as rope.cu evaluates them: the angle rounded to float32,
// sincos in double, times the attention factor.
__device__ __forceinline__ void rope_cos_sin(float pos, float inv_freq, double attention_factor, float* cos_out,
                                             float* sin_out) {
  const float angle = __fmul_rn(pos, inv_freq);
  double s, c;
  sincos(static_cast<double>(angle), &s, &c);
  *cos_out = static_cast<float>(c * attention_factor);
  *sin_out = static_cast<float>(s * attention_factor);
}

// One head (D values in shared memory) by one warp: Qwen3's per-head RMSNorm when `nw` is set,
// then rotate-half RoPE over the first 2 * half dimensions.
__device__ __forceinline__ void prepare_head(float* v, int D, const bf16_bits* nw, float eps, const float* cos_s,
                                             const float* sin_s, int half, int lane) {
  if (nw != nullptr) {
    float ss = 0.f;
    for (int i = lane; i < D; i += 32) ss = fmaf(v[i], v[i], ss);
    ss = warp_sum(ss);
    const float inv = rsqrtf(ss / static_cast<float>(D) + eps);
    __syncwarp();
    for (int i = lane; i < D; i += 32) v[i] = __fmul_rn(v[i], inv) * bf16_to_f32(nw[i]);
    __syncwarp();
  }
  for (int i = lane; i < half; i += 32) {
    const float x1 = v[i], x2 = v[i + half];
    v[i] = fmaf(x1, cos_s[i], -x2 * sin_s[i]);
    v[i + half] = fmaf(x2, cos_s[i], x1 * sin_s[i]);
  }
  __syncwarp();
}

}  // namespace moeflash
