// What a DFlash round needs beyond the model's own kernels: the drafter's context feature of a
// token (the target's hidden states after its target layers, side by side), and greedy
// acceptance of a verified block, both on the device so that neither crosses to the host.
// packages/speculative/src/dflash/model.ts (features) and acceptance.ts (verifyGreedy) are the
// readable specification.
#include "common.cuh"
#include "kernels.h"

namespace moeflash {
namespace {

constexpr int kFeatThreads = 256;

// Row t of the feature matrix, columns col0 .. col0 + H - 1: x + mlp_out (the residual stream after
// the layer), through the target's final RMSNorm when norm_weight is set (a target layer id of
// the last layer reads HF's hidden_states[L], which is after the final norm).
__global__ void __launch_bounds__(kFeatThreads) dflash_feature_kernel(const float* __restrict__ x, const float* __restrict__ mlp,
                                                                      int H, const bf16_bits* __restrict__ norm_weight, float eps,
                                                                      float* __restrict__ out, int stride, int col0) {
  pdl_prologue();
  __shared__ float red[kFeatThreads / 32];
  const int t = blockIdx.x;
  const float* xr = x + static_cast<int64_t>(t) * H;
  const float* mr = mlp + static_cast<int64_t>(t) * H;
  float* o = out + static_cast<int64_t>(t) * stride + col0;
  float scale = 1.f;
  if (norm_weight != nullptr) {
    float ss = 0.f;
    for (int d = threadIdx.x; d < H; d += kFeatThreads) {
      const float v = xr[d] + mr[d];
      ss = fmaf(v, v, ss);
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < kFeatThreads / 32; ++w) total += red[w];
    scale = rsqrtf(total / H + eps);
  }
  for (int d = threadIdx.x; d < H; d += kFeatThreads) {
    const float v = xr[d] + mr[d];
    o[d] = norm_weight != nullptr ? v * scale * bf16_to_f32(norm_weight[d]) : v;
  }
}

// A thread a speculating sequence: the longest prefix of its drafts that equals the target's
// argmax at the same rows, then the target's token after it (correction or bonus).
__global__ void dflash_accept_greedy_kernel(DflashAcceptArgs a) {
  pdl_prologue();
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= a.seqs) return;
  const int row0 = a.verify_row0[s], logit0 = a.logit_row0[s], b = a.block[s];
  int32_t* out = a.emitted + static_cast<int64_t>(s) * a.stride;
  int n = 0;
  while (n < b && a.tokens[row0 + 1 + n] == a.target_ids[logit0 + n]) {
    out[n] = a.tokens[row0 + 1 + n];
    ++n;
  }
  out[n] = a.target_ids[logit0 + n];
  a.accepted[s] = n;
}

}  // namespace

cudaError_t dflash_feature(const float* x, const float* mlp_out, int tokens, int hidden, const bf16_bits* norm_weight, float eps,
                           float* out, int stride, int col0, cudaStream_t stream) {
  if (tokens <= 0) return cudaSuccess;
  return launch_pdl(dflash_feature_kernel, tokens, kFeatThreads, 0, stream, x, mlp_out, hidden, norm_weight, eps, out, stride,
                    col0);
}

cudaError_t dflash_accept_greedy(const DflashAcceptArgs& a, cudaStream_t stream) {
  if (a.seqs <= 0) return cudaSuccess;
  return launch_pdl(dflash_accept_greedy_kernel, ceil_div(a.seqs, 128), 128, 0, stream, a);
}

}  // namespace moeflash
