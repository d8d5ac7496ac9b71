// Host-callable entry points of the kernels: the one interface between native/*.cc (built by the
// host compiler) and kernels/*.cu (built by nvcc). Every pointer is a device pointer. Each function
// launches on `stream`, returns the launch status (cudaGetLastError right after the launch) and
// never synchronizes; argument checking is the caller's job (native/ops.cc does it for tests).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#ifdef __CUDACC__
#define MOEFLASH_HOST_DEVICE __host__ __device__
#else
#define MOEFLASH_HOST_DEVICE
#endif

namespace moeflash {

// bf16 crosses this boundary as raw bits: the top 16 bits of the float32 it stands for.
using bf16_bits = uint16_t;

// ---------------------------------------------------------------- embedding.cu
// out[t, :] = float(table[ids[t], :]). hidden % 8 == 0.
cudaError_t embedding_bf16(const bf16_bits* table, const int32_t* ids, int tokens, int hidden,
                           float* out, cudaStream_t stream);

// ---------------------------------------------------------------- norm.cu
// Per row: if residual, x += residual (x is updated in place: it is the residual stream);
// out = x * rsqrt(mean(x^2) + eps) * weight, float32 arithmetic. hidden % 4 == 0; out must not
// alias x or residual.
cudaError_t rmsnorm_residual(float* x, const float* residual, const bf16_bits* weight, float eps,
                             int rows, int hidden, float* out, cudaStream_t stream);

// ---------------------------------------------------------------- rope.cu
// In place, rotate-half convention (dim i pairs with i + rotary_dim/2) on q [tokens, num_heads,
// head_dim] and k [tokens, num_kv_heads, head_dim] (k may be null). angle = float(pos) * inv_freq[i]
// rounded to float32; cos and sin are multiplied by attention_factor (YaRN; 1 for plain RoPE).
cudaError_t rope_rotate_half(float* q, float* k, const int32_t* positions, const float* inv_freq,
                             double attention_factor, int tokens, int num_heads, int num_kv_heads,
                             int head_dim, int rotary_dim, cudaStream_t stream);

// ---------------------------------------------------------------- gemv_bf16.cu
// y[t, r] = sum_c w[r, c] * x[t, c] (+ bias[r]) for t < tokens, w row-major bf16 [rows, cols],
// float32 accumulation. cols % 8 == 0, w 16-byte aligned. Up to kGemmMinTokens - 1 tokens run the
// GEMV (8 tokens a launch); more run gemm_bf16. Within each of the two the result for a token does
// not depend on `tokens`; between them it differs in the last bits.
// 64: a full token tile. Below it the GEMM's grid is one token tile by rows / 64 blocks, too few to
// keep the memory bus busy (H100, gpt-oss-20b batch 32 decode at 16: 15.75 -> 16.79 ms a step; the
// 32-row router's GEMM is one block), while 8-token GEMV passes still stream at full speed.
constexpr int kGemmMinTokens = 64;
cudaError_t gemv_bf16(const bf16_bits* w, const bf16_bits* bias, const float* x, float* y, int rows,
                      int cols, int tokens, cudaStream_t stream);
// The RMSNorm that precedes a projection, fused into it: v[t] = x[t] + residual[t] (residual may
// be null), y[t] = W (v[t] * rsqrt(mean(v[t]^2) + eps) * norm_weight) (+ bias). Every block
// normalizes for itself; block 0 writes v to x_out (the next residual stream; it must not alias x
// or residual) and the normalized vectors to normed_out when they are set. cols % 8 == 0.
cudaError_t gemv_bf16_prenorm(const bf16_bits* w, const bf16_bits* bias, const float* x, const float* residual,
                              const bf16_bits* norm_weight, float eps, float* x_out, float* normed_out, float* y,
                              int rows, int cols, int tokens, cudaStream_t stream);

// ---------------------------------------------------------------- gemm_bf16.cu
// The same product on tensor cores for many tokens: x enters as two bf16 parts (hi + lo, ~16 bits),
// products exact and sums float32, so it stays within ~1e-5 relative of the GEMV. A token's result
// does not depend on the other tokens of the launch.
cudaError_t gemm_bf16(const bf16_bits* w, const bf16_bits* bias, const float* x, float* y, int rows, int cols,
                      int tokens, cudaStream_t stream);

// ---------------------------------------------------------------- experts_mxfp4.cu
enum class ExpertActivation : int {
  // gate rows [0, inter), up rows [inter, 2*inter): y = silu(g) * u
  SwiGLU = 0,
  // gpt-oss: gate rows even, up rows odd; g = min(g, limit), u = clamp(u, -limit, limit),
  // y = (u + 1) * g * sigmoid(alpha * g)
  GptOssClamped = 1,
};

struct MoeDims {
  int tokens;       // 1..8
  int top_k;        // 1..8; a token's expert ids must be distinct (the router guarantees it)
  int num_experts;
  int hidden;       // % 32 == 0
  int inter;        // % 32 == 0
};

// MXFP4 expert weights exactly as gpt-oss stores them:
//   blocks uint8 [E, rows, cols/32, 16]: E2M1 codes, element 2i in the low nibble of byte i
//   scales uint8 [E, rows, cols/32]: E8M0, 2^(s - 127), 0xFF = NaN
//   bias   bf16  [E, rows] or null
struct Mxfp4Experts {
  const uint8_t* blocks;
  const uint8_t* scales;
  const bf16_bits* bias;
};

// The expert activations travel between the two kernels in a blocked layout that lets the down
// kernel read them with coalesced 16-byte loads: for each (token, slot) a vector of `inter` floats
// where element i = 32*b + 4*s + c is stored at float index (s * (inter/32) + b) * 4 + c.
// These two convert one such vector (host or device code; used by tests).
MOEFLASH_HOST_DEVICE inline size_t moe_act_blocked_index(int i, int inter) {
  const int b = i >> 5, s = (i >> 2) & 7, c = i & 3;
  return (static_cast<size_t>(s) * (inter >> 5) + b) * 4 + c;
}

// act[t, k, :] (blocked) = activation(W_gate_up[e] x[t] + bias) for e = expert_ids[t, k].
// x [tokens, hidden] float32; act [tokens, top_k, inter] float32 (blocked layout).
cudaError_t moe_gate_up_mxfp4(const Mxfp4Experts& w, const float* x, const int32_t* expert_ids,
                              const MoeDims& dims, ExpertActivation act, float limit, float alpha,
                              float* act_out, cudaStream_t stream);

// y[t, :] = sum over k in slot order of expert_weights[t, k] * (W_down[e] act[t, k] + bias[e]).
// Each thread block owns a slice of output rows for every token, so no atomics are used and the
// result is deterministic. y [tokens, hidden] float32 (overwritten).
cudaError_t moe_down_mxfp4(const Mxfp4Experts& w, const float* act, const int32_t* expert_ids,
                           const float* expert_weights, const MoeDims& dims, float* y,
                           cudaStream_t stream);

// ---------------------------------------------------------------- router.cu
enum class RoutingRule : int {
  TopkThenSoftmax = 0,  // Mixtral, gpt-oss
  SoftmaxThenTopk = 1,  // Qwen3-MoE (renormalize = norm_topk_prob)
};

// The router is two launches: gemv_bf16 for logits = W_r x + b_r, then this top-k with the
// weighting rule fused in.
// logits [tokens, num_experts] (the router GEMV's output, bias included) -> ids [tokens, top_k]
// (best first, ties to the lower index) and weights [tokens, top_k]. num_experts <= 1024,
// top_k <= 32.
cudaError_t router_topk(const float* logits, int tokens, int num_experts, int top_k,
                        RoutingRule rule, bool renormalize, int32_t* ids, float* weights,
                        cudaStream_t stream);

// ---------------------------------------------------------------- attention.cu
// Decode attention: one new query token per sequence over a paged bf16 (or float32) KV cache.
//   q        [num_seqs, num_heads, head_dim] float32 (RoPE applied)
//   k_cache, v_cache  bf16 [num_pages, page_size, num_kv_heads, head_dim]
//   k_cache_f32, v_cache_f32  the same as float32; when set they are read instead (the cache of a
//            model loaded with precision 'f32'; attention_decode and attention_generic take them)
//   block_table [num_seqs, max_pages_per_seq] int32: page of each page_size positions
//   seq_lens [num_seqs] int32: keys 0..len-1 are in the cache, the query is at position len-1
//   sinks    [num_heads] float32 or null: a logit that joins each head's softmax denominator
//   window   0 = full causal; else key p is visible while (len-1) - p < window
//   out      [num_seqs, num_heads, head_dim] float32
// head_dim % 8 == 0 and <= 128; num_heads % num_kv_heads == 0, group size <= 16.
struct AttentionDecodeArgs {
  const float* q;
  const bf16_bits* k_cache;
  const bf16_bits* v_cache;
  const float* k_cache_f32;
  const float* v_cache_f32;
  const int32_t* block_table;
  const int32_t* seq_lens;
  const float* sinks;
  float* out;
  void* workspace;  // attention_decode_workspace_bytes(...)
  int num_seqs, num_heads, num_kv_heads, head_dim;
  int page_size, max_pages_per_seq;
  int max_seq_len;  // upper bound of seq_lens (sizes the split grid)
  int window;
  float scale;
};
size_t attention_decode_workspace_bytes(int num_seqs, int num_heads, int head_dim, int max_seq_len);
cudaError_t attention_decode(const AttentionDecodeArgs& a, cudaStream_t stream);

// ---------------------------------------------------------------- sample.cu
// Greedy: the index of the largest logit of each row, lowest index among equals; NaN ranks below
// every number (an all-NaN row gives 0), as core's sampling/sample.ts argmax.
size_t argmax_workspace_bytes(int rows, int vocab);
cudaError_t argmax_rows(const float* logits, int rows, int vocab, int32_t* out, void* workspace,
                        cudaStream_t stream);

// One token per row, the same as core's sampleToken(row, params, {seed, seq, position, purpose})
// bit for bit: temperature, then top-k, top-p, min-p, then the inverse-CDF draw with the Philox
// uniform of rng.ts (key (seed_lo, seed_hi), counter (position, seq, 0, purpose)). Each row has
// its own settings, so one launch serves a batch of requests. A row with temperature <= 0 is
// greedy and gets argmax_rows' answer. Where core would throw (a sampled row with a NaN or +Inf
// logit, or only -Inf), out is -1. Settings are taken as given; validate them as core's
// validateSamplingParams does (top_p in (0, 1], min_p in [0, 1], top_k >= 0).
// One block of 1024 threads a row; needs no allocation beyond the workspace.
struct SampleArgs {
  const float* logits;  // [rows, vocab]
  int rows, vocab;
  // Per row [rows]; doubles because the reference computes with the JS numbers themselves.
  const double* temperature;  // <= 0: greedy
  const int32_t* top_k;       // 0 or >= vocab: off; null: off for every row
  const double* top_p;        // >= 1: off; null: off for every row
  const double* min_p;        // 0: off; null: off for every row
  const uint32_t* seed_lo;    // [rows]: the seed's low and high 32-bit words (rng.ts seedKey)
  const uint32_t* seed_hi;
  const uint32_t* seqs;       // [rows]
  const uint32_t* positions;  // [rows]
  const uint32_t* purposes;   // [rows]; null: RngPurpose.Sample (0) for every row
  int32_t* out;               // [rows]
  void* workspace;            // sample_workspace_bytes(rows, vocab)
};
size_t sample_workspace_bytes(int rows, int vocab);
cudaError_t sample_rows(const SampleArgs& a, cudaStream_t stream);

// Uniforms exactly as sample_rows draws them (tests compare them with rng.ts).
cudaError_t philox_uniforms(uint32_t seed_lo, uint32_t seed_hi, const uint32_t* counters /*[n,4]*/,
                            int n, float* u, uint32_t* words /*[n,4]*/, cudaStream_t stream);

// ---------------------------------------------------------------- model.cu (executor only)
// The epilogue of the fused q/k/v projection of `tokens` tokens: per-head RMSNorm of q and k when
// q_norm/k_norm are set (Qwen3), rotate-half RoPE on both (as rope.cu), then q to q_out and k, v
// rounded to bf16 (or float32 into the f32 caches when set) into the cache rows slots[t] of this
// layer's caches [rows, num_kv_heads, head_dim].
struct QkvPrepareArgs {
  const float* qkv;  // [tokens, (num_heads + 2 num_kv_heads) * head_dim]: q | k | v
  const bf16_bits* q_norm;
  const bf16_bits* k_norm;
  float eps;
  const int32_t* positions;
  const float* inv_freq;  // [rotary_dim / 2]
  double attention_factor;
  int rotary_dim;
  const int32_t* slots;  // [tokens]: page * page_size + offset
  float* q_out;          // [tokens, num_heads * head_dim]
  bf16_bits* k_cache;
  bf16_bits* v_cache;
  float* k_cache_f32;  // set: k and v go there unrounded instead (qkv_prepare only, not the fused kernel)
  float* v_cache_f32;
  int tokens, num_heads, num_kv_heads, head_dim;
};
size_t qkv_prepare_smem_bytes(int num_heads, int num_kv_heads, int head_dim, int rotary_dim);
cudaError_t qkv_prepare(const QkvPrepareArgs& a, cudaStream_t stream);

// ---------------------------------------------------------------- attention_fused.cu
// Decode attention with qkv_prepare folded in (one launch instead of three): every row is its own
// sequence whose new key and value are at positions[t]; `a.q` is not read (the query comes from
// p.qkv) and `a.workspace` is the fused workspace, zeroed once (its counters reset themselves).
size_t attention_fused_workspace_bytes(int num_seqs, int num_heads, int head_dim);
bool attention_fused_supported(int num_heads, int num_kv_heads, int head_dim, int rotary_dim, int max_seq_len);
cudaError_t attention_decode_fused(const QkvPrepareArgs& p, const AttentionDecodeArgs& a, cudaStream_t stream);

// Whether attention_decode takes these shapes; attention_generic (same arguments, no workspace)
// takes any.
bool attention_decode_supported(int num_heads, int num_kv_heads, int head_dim);
cudaError_t attention_generic(const AttentionDecodeArgs& a, cudaStream_t stream);

// bf16 experts (or a dense MLP as one expert of weight 1): gate_up [E, 2 inter, hidden] (gate rows
// first, or interleaved gate/up rows for gpt-oss), down [E, hidden, inter]; act is scratch
// [tokens, top_k, inter]; y [tokens, hidden] = sum over k in slot order of weight * (down act + b).
struct MlpBf16Args {
  const bf16_bits* gate_up;
  const bf16_bits* gate_up_bias;
  const bf16_bits* down;
  const bf16_bits* down_bias;
  const float* x;
  const int32_t* expert_ids;
  const float* expert_weights;
  float* act;
  float* y;
  int tokens, top_k, hidden, inter;
  bool interleaved;
  ExpertActivation activation;
  float limit, alpha;
};
cudaError_t mlp_bf16(const MlpBf16Args& a, cudaStream_t stream);

// dst[i, :] = src[idx[i], :] for i < rows.
cudaError_t gather_rows(const float* src, const int32_t* idx, int rows, int cols, float* dst, cudaStream_t stream);
// out = a + b elementwise.
cudaError_t add_f32(const float* a, const float* b, size_t n, float* out, cudaStream_t stream);

// ---------------------------------------------------------------- fill.cu (benchmarks)
// Deterministic pseudo-random contents, generated on the device so large buffers need no upload.
cudaError_t fill_bf16_random(bf16_bits* p, size_t n, uint32_t seed, float scale, cudaStream_t stream);
cudaError_t fill_f32_random(float* p, size_t n, uint32_t seed, float scale, cudaStream_t stream);
// Bytes uniform in [lo, hi].
cudaError_t fill_u8_random(uint8_t* p, size_t n, uint32_t seed, int lo, int hi, cudaStream_t stream);
// Occupies the stream for about `nanoseconds`: a benchmark queues its timed launches behind it so
// that the device runs them back to back instead of waiting on the host between launches.
cudaError_t gpu_sleep(uint64_t nanoseconds, cudaStream_t stream);

// ---------------------------------------------------------------- gemv_fp8.cu
// y[t, r] = sum_c dequant(w[r, c]) * x[t, c] (+ bias[r]) for t < tokens, float32 accumulation,
// as gemv_bf16 but with FP8 weights as DeepSeek-V3 / Qwen3 FP8 checkpoints store them:
//   w      uint8 [rows, cols] row-major E4M3 codes (e4m3fn: no infinities, S.1111.111 is NaN)
//   scales float32 [ceil(rows / block_rows), ceil(cols / block_cols)] row-major, the checkpoint's
//          `weight_scale_inv` (a multiplier despite its name; edge blocks are partial)
//   dequant(w[r, c]) = e4m3(w[r, c]) * scales[r / block_rows, c / block_cols]
// The scale multiplies sums of 16 unscaled products (one 16-byte load), so the result differs
// from a dot product with core's per-element float32 dequantization by float32 rounding only.
// cols % 16 == 0, block_cols % 16 == 0, w 16-byte aligned; any tokens (split in launches of at
// most 8). The result for a token does not depend on `tokens`.
cudaError_t gemv_fp8(const uint8_t* w, const float* scales, int block_rows, int block_cols, const bf16_bits* bias,
                     const float* x, float* y, int rows, int cols, int tokens, cudaStream_t stream);
// As gemv_fp8, writing y[t * y_stride + r] (y_stride >= rows): matrices stacked in one output
// (q | k | v, gate | up) whose scale grids cannot be stacked run as one launch each.
cudaError_t gemv_fp8_strided(const uint8_t* w, const float* scales, int block_rows, int block_cols,
                             const bf16_bits* bias, const float* x, float* y, int y_stride, int rows, int cols,
                             int tokens, cudaStream_t stream);
// Dense MLP activation between FP8 projections: act[t, j] = silu(g) * u with g = gate_up[t, j],
// u = gate_up[t, inter + j] (gate_up [tokens, 2 inter], act [tokens, inter]), as mlp_bf16.
cudaError_t swiglu_f32(const float* gate_up, int tokens, int inter, float* act, cudaStream_t stream);

// ---------------------------------------------------------------- attention_prefill.cu
// Prefill / verify attention: many query rows over the paged bf16 KV cache, causal per row, the
// rows' own keys already in the cache. Same tensors and per-row conventions as attention_decode,
// with one row of `q`, `block_table` and `seq_lens` per query row instead of per sequence:
//   q, out      [rows, num_heads, head_dim] float32 (q with RoPE applied)
//   block_table [rows, max_pages_per_seq] int32
//   seq_lens    [rows] int32: the row's query is at position seq_lens[r] - 1 and sees keys
//               0..seq_lens[r]-1, and with window > 0 only those with (seq_lens[r]-1) - p < window
//   k_cache, v_cache, sinks, scale: as attention_decode
// Rows map to sequences through the tile list: tiles [num_tiles, 2] int32 holds (first row, row
// count) of each tile, rows [first, first + count). A tile's rows must be rows of one sequence,
// and the block-table row of its row with the largest seq_len (the first such) is the one read,
// so it must map every position that any row of the tile sees. count is 1..
// attention_prefill_tile_rows(); a row in no tile is not written. One thread block reads each
// K/V position once for all the rows of a tile and all the query heads of one kv head, so a
// sequence's rows should be cut into full tiles: attention_prefill_make_tiles does that when a
// sequence's rows are contiguous (the order of rows inside a tile does not matter).
// head_dim % 8 == 0 and <= 128; num_heads % num_kv_heads == 0 (any group size). No workspace;
// the result of a row does not depend on the other rows or on how they are tiled.
struct AttentionPrefillArgs {
  const float* q;
  const bf16_bits* k_cache;
  const bf16_bits* v_cache;
  const int32_t* block_table;
  const int32_t* seq_lens;
  const int32_t* tiles;
  const float* sinks;
  float* out;
  int num_tiles, num_heads, num_kv_heads, head_dim;
  int page_size, max_pages_per_seq;
  int window;
  float scale;
};
// A block holds kAttentionPrefillVectors (row, head) query vectors: up to 16 query heads of a kv
// head (larger groups take several blocks) times as many rows as fit.
constexpr int kAttentionPrefillVectors = 64;
constexpr int kAttentionPrefillMaxHeads = 16;
inline int attention_prefill_tile_rows(int num_heads, int num_kv_heads) {
  const int group = num_heads / num_kv_heads;
  return kAttentionPrefillVectors / (group < kAttentionPrefillMaxHeads ? group : kAttentionPrefillMaxHeads);
}
// Cuts the rows of each sequence s, [seq_starts[s], seq_starts[s + 1]), into tiles of tile_rows
// rows (the last one shorter) and returns the tile count; writes them when `tiles` is set
// (capacity: num_seqs + rows / tile_rows tiles).
inline int attention_prefill_make_tiles(const int32_t* seq_starts, int num_seqs, int tile_rows, int32_t* tiles) {
  int n = 0;
  for (int s = 0; s < num_seqs; ++s) {
    for (int r = seq_starts[s]; r < seq_starts[s + 1]; r += tile_rows, ++n) {
      if (tiles == nullptr) continue;
      tiles[2 * n] = r;
      tiles[2 * n + 1] = seq_starts[s + 1] - r < tile_rows ? seq_starts[s + 1] - r : tile_rows;
    }
  }
  return n;
}
bool attention_prefill_supported(int num_heads, int num_kv_heads, int head_dim);
cudaError_t attention_prefill(const AttentionPrefillArgs& a, cudaStream_t stream);

// ---------------------------------------------------------------- dflash.cu
// The DFlash drafter's context feature: feature row t, columns col0 .. col0 + hidden - 1, is
// x[t] + mlp_out[t] (the residual stream after a target layer), RMS-normalized with norm_weight
// when it is set (the target's final norm, for its last layer); rows are `stride` floats apart.
cudaError_t dflash_feature(const float* x, const float* mlp_out, int tokens, int hidden, const bf16_bits* norm_weight, float eps,
                           float* out, int stride, int col0, cudaStream_t stream);

// Greedy acceptance of verified blocks: sequence s verified [anchor, d_1 .. d_b] at rows
// verify_row0[s] .. + b of `tokens`, with the target's argmax of those rows at logit rows
// logit_row0[s] .. + b of `target_ids`. accepted[s] = the longest n with d_1..d_n equal to the
// target's first n argmax ids; emitted[s][0 .. n] = those drafts, then the target's id at row n.
struct DflashAcceptArgs {
  const int32_t* tokens;
  const int32_t* target_ids;
  const int32_t* verify_row0;
  const int32_t* logit_row0;
  const int32_t* block;
  int seqs;
  int stride;  // ints a sequence's emitted row holds (>= max block + 1)
  int32_t* emitted;
  int32_t* accepted;
};
cudaError_t dflash_accept_greedy(const DflashAcceptArgs& a, cudaStream_t stream);

// How many times the step launches the kernels of class `cls`: 1, or 0 when MOEFLASH_PROFILE_SKIP
// (a comma-separated list of classes) names it, 2 when MOEFLASH_PROFILE_TWICE does. A measurement
// leaves a class out, or runs it twice (every class is idempotent), to find its share of the
// step's time; the step's results are wrong when a class is left out. For benchmarks only
// (bench/step-profile.mjs).
int profile_times(const char* cls);

// The integer value of environment variable `name`, or `fallback` when it is unset or empty. The
// measurement knobs read it at launch, so a benchmark can capture a graph with each setting.
int env_int(const char* name, int fallback);

// ---------------------------------------------------------------- fault.cu (tests)
// Launches one thread that executes a trap: the stream's next synchronization fails with a sticky
// error (the process's CUDA context is unusable afterwards). Only for fault-injection tests.
cudaError_t launch_trap(cudaStream_t stream);

}  // namespace moeflash
