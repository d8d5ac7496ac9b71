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
#include "router_topk.cuh"

namespace moeflash {
namespace {

constexpr int kWarpsPerBlock = 4;

template <int PER_LANE>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) router_topk_kernel(const float* __restrict__ logits, int tokens,
                                                                         int num_experts, int top_k, RoutingRule rule,
                                                                         bool renormalize, int32_t* __restrict__ ids,
                                                                         float* __restrict__ weights) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (t >= tokens) return;
  topk_row<PER_LANE>(logits + static_cast<int64_t>(t) * num_experts, num_experts, top_k, rule, renormalize, lane,
                     ids + static_cast<int64_t>(t) * top_k, weights + static_cast<int64_t>(t) * top_k);
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
