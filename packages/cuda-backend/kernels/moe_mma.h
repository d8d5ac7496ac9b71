// The MoE layer on tensor cores: MXFP4 experts read once per step for any number of tokens.
//
// A step's (token, slot) pairs are grouped by expert (the plan); every group of up to 8 or 16
// pairs of one expert is an "item", and each thread block computes one row tile of one item with
// mma.sync m16n8k16 (f16 operands, f32 accumulation): the expert's 16 weight rows are the A
// operand, decoded from E2M1 in two integer operations per pair of weights, and the item's
// activation vectors are the n = 8 columns of B (in f16, each vector scaled by a power of two so
// that it cannot overflow). T = 1 and T = 8 cost the same instructions; a prefill chunk reads each
// expert once per 16 pairs instead of once per 8 tokens.
//
// The weights are permuted once at load (moe_repack_mxfp4) into 16-row x 64-column tiles whose
// 512 bytes are exactly the A fragments of a warp: lane l's 16-byte load is its registers.
#pragma once

#include "kernels.h"

namespace moeflash {

// How the gate/up rows of a checkpoint pair up: gate rows [0, I) then up rows [I, 2I) (Qwen3,
// Mixtral), or gate row 2o and up row 2o + 1 (gpt-oss).
enum class MoeRowMap : int { Identity = 0, GateUpHalves = 1, GateUpInterleaved = 2 };

// Whether the tensor-core path takes these shapes (else the per-token kernels of experts_mxfp4.cu
// run): hidden and inter multiples of 64, inter a multiple of 8.
bool moe_mma_supported(int hidden, int inter);

// Rewrites one MXFP4 expert tensor (blocks [E, rows, cols/32, 16], scales [E, rows, cols/32]) in
// place into the tile layout; `scratch` holds one expert (moe_repack_scratch_bytes). rows % 16 == 0
// and cols % 64 == 0. Synchronous on `stream` ordering only; the result is only read by this file.
size_t moe_repack_scratch_bytes(int rows, int cols);
cudaError_t moe_repack_mxfp4(uint8_t* blocks, uint8_t* scales, int experts, int rows, int cols, MoeRowMap map,
                             void* scratch, cudaStream_t stream);

// Device scratch of a MoE layer of `slots` = tokens * top_k pairs.
size_t moe_plan_ints(int slots, int num_experts);
int moe_counter_ints(int hidden);  // zeroed once at allocation; every launch leaves them zero

struct MoeMmaArgs {
  // Repacked MXFP4 (moe_repack_mxfp4): gate/up [E, 2 inter, hidden], down [E, hidden, inter].
  const uint8_t* gate_up_blocks;
  const uint8_t* gate_up_scales;
  const bf16_bits* gate_up_bias;  // [E, 2 inter] in the checkpoint's row order, or null
  const uint8_t* down_blocks;
  const uint8_t* down_scales;
  const bf16_bits* down_bias;  // [E, hidden] or null
  bool interleaved;            // gpt-oss gate/up row order (bias indexing)
  ExpertActivation activation;
  float limit, alpha;

  const float* x;               // [tokens, hidden]
  const int32_t* expert_ids;    // [tokens, top_k], distinct within a token
  const float* expert_weights;  // [tokens, top_k]
  // Routing inside the MoE launch (decode steps, <= 256 experts): when router_logits is set, the
  // gate/up kernel takes each token's top-k itself (router_topk's rule and arithmetic) and writes
  // them to route_ids / route_weights, which must be expert_ids / expert_weights.
  const float* router_logits;  // [tokens, num_experts] or null
  RoutingRule rule;
  bool renormalize;
  int32_t* route_ids;
  float* route_weights;
  int tokens, top_k, num_experts, hidden, inter;

  int32_t* plan;      // moe_plan_ints(tokens * top_k, num_experts)
  int32_t* counters;  // moe_counter_ints(hidden), all zero
  float* act;         // [tokens * top_k, inter] scratch
  float* part;        // [tokens * top_k, hidden] scratch
  float* y;           // [tokens, hidden]: sum over k in slot order of weight * (down act + bias)
  // Measurements only: when set, thread 0 of each of the first kMoeTraceBlocks blocks of the decode
  // kernels writes %globaltimer at up to kMoeTracePoints points (entry, wait passed, plan built,
  // staged, stream done, exit; down: combine done) to
  // trace[((down ? 1 : 0) * kMoeTraceBlocks + block) * kMoeTracePoints + point].
  unsigned long long* trace;
};
constexpr int kMoeTraceBlocks = 1024, kMoeTracePoints = 8;
constexpr size_t kMoeTraceEntries = 2 * static_cast<size_t>(kMoeTraceBlocks) * kMoeTracePoints;

// Whether moe_mxfp4_mma takes router_logits for a step of `tokens` (else run router_topk first).
bool moe_mma_routes(int tokens, int top_k, int num_experts);

// Two launches (gate/up + activation, down + combine), plus a plan kernel when the step has more
// than 8 tokens; decode steps build the plan in every block. Deterministic, no atomics on data; a
// token's result does not depend on the other tokens of the step.
cudaError_t moe_mxfp4_mma(const MoeMmaArgs& a, cudaStream_t stream);

}  // namespace moeflash
