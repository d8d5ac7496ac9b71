// The router's top-k with the weighting rule fused (router.cu), as a warp-level device function:
// one warp takes one token's logits; lane k < top_k writes pick k. Shared by the router kernel and
// the MoE kernels that route decode tokens themselves.
#pragma once

#include <cfloat>

#include "common.cuh"

namespace moeflash {

// Larger value wins, the lower index among equals. Indices are unique, so this is a total order.
__device__ __forceinline__ bool topk_beats(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

template <int PER_LANE>
__device__ __forceinline__ void topk_row(const float* __restrict__ row, int num_experts, int top_k, RoutingRule rule,
                                         bool renormalize, int lane, int32_t* __restrict__ ids,
                                         float* __restrict__ weights) {
  float score[PER_LANE];
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    const int e = lane + 32 * j;
    score[j] = e < num_experts ? row[e] : -FLT_MAX;
  }
  if (rule == RoutingRule::SoftmaxThenTopk) {
    float m = -FLT_MAX;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) m = fmaxf(m, score[j]);
    m = warp_max(m);
    double ex[PER_LANE];
    double s = 0.0;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      ex[j] = lane + 32 * j < num_experts ? exp(static_cast<double>(score[j]) - m) : 0.0;
      s += ex[j];
    }
    s = warp_sum(s);
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j)
      score[j] = lane + 32 * j < num_experts ? static_cast<float>(ex[j] / s) : -FLT_MAX;
  }

  // A NaN logit (a broken checkpoint) loses to every number, so the picks stay valid expert ids.
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j)
    if (score[j] != score[j]) score[j] = -INFINITY;

  // k rounds of a warp arg-max; the winner's lane marks it taken.
  float chosen_score = 0.f;  // lane k keeps the k-th pick
  int chosen_id = 0;
  uint32_t taken = 0;  // bit j: expert lane + 32 j already chosen
  for (int k = 0; k < top_k; ++k) {
    float bv = -INFINITY;
    int bi = 0x7fffffff;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      const int e = lane + 32 * j;
      if (e < num_experts && !(taken >> j & 1u) && topk_beats(score[j], e, bv, bi)) {
        bv = score[j];
        bi = e;
      }
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) {
      const float ov = __shfl_xor_sync(kFullMask, bv, m);
      const int oi = __shfl_xor_sync(kFullMask, bi, m);
      if (topk_beats(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (lane == k) {
      chosen_score = bv;
      chosen_id = bi;
    }
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j)
      if (lane + 32 * j == bi) taken |= 1u << j;
  }

  const float top = __shfl_sync(kFullMask, chosen_score, 0);  // the best pick
  double wk = 0.0;
  if (lane < top_k)
    wk = rule == RoutingRule::TopkThenSoftmax ? exp(static_cast<double>(chosen_score) - static_cast<double>(top))
                                              : static_cast<double>(chosen_score);
  const double sum = warp_sum(wk);
  if (lane < top_k) {
    const bool divide = rule == RoutingRule::TopkThenSoftmax || renormalize;
    ids[lane] = chosen_id;
    weights[lane] = static_cast<float>(divide ? wk / sum : wk);
  }
}

}  // namespace moeflash
