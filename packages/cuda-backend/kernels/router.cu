// Router top-k over the router GEMV's logits (gemv_bf16 computes logits = W_r x + b_r), fused
// with the two weighting rules:
//   TopkThenSoftmax: top-k of the logits, weights = softmax over those k (Mixtral, gpt-oss)
//   SoftmaxThenTopk: p = softmax over all experts, top-k of p, optionally divided by their sum
//                    (Qwen3-MoE)
// One warp a token; lane l holds experts l, l + 32, ... in registers. Exponentials and sums are
// taken in float64 and probabilities rounded to float32 where core's math/router.ts rounds them,
// so the chosen experts match the reference exactly; ties go to the lower expert index.
#include <cfloat>

#include "common.cuh"

namespace moeflash {
namespace {

constexpr int kWarpsPerBlock = 4;

// Larger value wins, the lower index among equals. Indices are unique, so this is a total order.
__device__ __forceinline__ bool beats(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

template <int PER_LANE>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) router_topk_kernel(const float* __restrict__ logits, int tokens,
                                                                         int num_experts, int top_k, RoutingRule rule,
                                                                         bool renormalize, int32_t* __restrict__ ids,
                                                                         float* __restrict__ weights) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (t >= tokens) return;
  const float* row = logits + static_cast<int64_t>(t) * num_experts;
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
      if (e < num_experts && !(taken >> j & 1u) && beats(score[j], e, bv, bi)) {
        bv = score[j];
        bi = e;
      }
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) {
      const float ov = __shfl_xor_sync(kFullMask, bv, m);
      const int oi = __shfl_xor_sync(kFullMask, bi, m);
      if (beats(ov, oi, bv, bi)) {
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
    ids[static_cast<int64_t>(t) * top_k + lane] = chosen_id;
    weights[static_cast<int64_t>(t) * top_k + lane] = static_cast<float>(divide ? wk / sum : wk);
  }
}

}  // namespace

cudaError_t router_topk(const float* logits, int tokens, int num_experts, int top_k, RoutingRule rule,
                        bool renormalize, int32_t* ids, float* weights, cudaStream_t stream) {
  if (tokens <= 0) return cudaSuccess;
  if (num_experts <= 0 || num_experts > 1024 || top_k <= 0 || top_k > 32 || top_k > num_experts)
    return cudaErrorInvalidValue;
  const int grid = ceil_div(tokens, kWarpsPerBlock);
  const int threads = kWarpsPerBlock * 32;
  cudaError_t e;
#define MOEFLASH_ROUTER_CASE(N)                                                                                  \
  e = launch_pdl(router_topk_kernel<N>, grid, threads, 0, stream, logits, tokens, num_experts, top_k, rule, \
                 renormalize, ids, weights)
  if (num_experts <= 32) MOEFLASH_ROUTER_CASE(1);
  else if (num_experts <= 64) MOEFLASH_ROUTER_CASE(2);
  else if (num_experts <= 128) MOEFLASH_ROUTER_CASE(4);
  else if (num_experts <= 256) MOEFLASH_ROUTER_CASE(8);
  else if (num_experts <= 512) MOEFLASH_ROUTER_CASE(16);
  else MOEFLASH_ROUTER_CASE(32);
#undef MOEFLASH_ROUTER_CASE
  return e;
}

}  // namespace moeflash
