// The model executor: a model's weights, paged KV cache and activation arena on one device, all
// reserved when it is created, and the forward pass of a step over them. src/model.ts owns the
// policy (which pages a sequence holds, how a plan is split into steps); this file runs a step
// as one call: inputs in, argmax ids (and sampled ids, logits, hidden states when asked) out.
//
// A decode step (one token a sequence) is replayed from a CUDA graph captured once per batch
// bucket (1, 2, 4, ... tokens, padded with rows that write to a scratch page); any other step
// is launched kernel by kernel.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "addon.h"
#include "kernels.h"
#include "moe_mma.h"

namespace moeflash {
namespace {

// Per-layer fields of the layout array from src/model.ts (offsets into the weights buffer in
// bytes, -1 when absent; the last five are numbers). Keep in step with LAYER_FIELDS there.
enum LayerField {
  kInNorm, kPostNorm, kQkvW, kQkvB, kOW, kOB, kQNorm, kKNorm, kSinks, kRouterW, kRouterB,
  kGateUp, kGateUpScales, kGateUpBias, kDown, kDownScales, kDownBias,
  kMlpKind, kExperts, kInter, kWindow, kInterleaved,
  kQkvScales, kOScales, kFp8BlockRows, kFp8BlockCols, kLayerFields
};
enum GlobalField { kEmbed, kLmHead, kFinalNorm, kInvFreq, kGlobalFields };
// kMlpDenseFp8: gate_up and down hold E4M3 codes and gate_up_scales / down_scales float32 block
// scales (gemv_fp8); gate_up stacks the gate rows, then the up rows.
enum MlpKind { kMlpBf16Experts = 0, kMlpMxfp4Experts = 1, kMlpDense = 2, kMlpDenseFp8 = 3 };

size_t align256(size_t n) { return (n + 255) & ~size_t{255}; }

class PinnedBuffer {
 public:
  PinnedBuffer(Napi::Env env, size_t bytes, const std::string& what) {
    const cudaError_t e = cudaHostAlloc(&p_, std::max<size_t>(bytes, 16), cudaHostAllocDefault);
    if (e == cudaErrorMemoryAllocation) {
      p_ = nullptr;
      throw_out_of_memory(env, "cudaHostAlloc(" + what + ")", bytes);
    }
    check_cuda(env, e, "cudaHostAlloc(" + what + ")");
  }
  ~PinnedBuffer() {
    if (p_ != nullptr) cudaFreeHost(p_);
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  template <typename T>
  T* get() const {
    return static_cast<T*>(p_);
  }

 private:
  void* p_ = nullptr;
};

struct Config {
  int hidden, vocab, layers, heads, kv_heads, head_dim, rotary_dim;
  double attention_factor;
  float eps, scale;
  int top_k, num_experts, rule, renormalize, activation;
  float limit, alpha;
  int max_tokens, max_logit_rows, page_size, num_pages, max_pages_per_seq, max_seq_len, max_inter, graph_tokens;
  int fp8_inter;  // widest FP8 dense MLP: sizes its scratch
  // Precision 'f32' (src/model.ts): the KV cache holds float32 (attention reads it through the split
  // or generic kernel, never the fused or tensor-core prefill ones, which take bf16), and MXFP4
  // experts stay on the CUDA-core kernels, whose activations are float32, instead of being
  // repacked for the tensor-core path, which rounds them to bf16.
  int kv_f32, expert_mma;
  size_t weights_bytes;
  size_t kv_elem_bytes() const { return kv_f32 ? 4 : 2; }
  int q_dim() const { return heads * head_dim; }
  int kv_dim() const { return kv_heads * head_dim; }
  int qkv_dim() const { return q_dim() + 2 * kv_dim(); }
  int slots() const { return std::max(top_k, 1); }
  int input_ints() const { return 5 * max_tokens + max_tokens * max_pages_per_seq; }
};

struct LayerPtrs {
  const bf16_bits *in_norm, *post_norm, *qkv_w, *qkv_b, *o_w, *o_b, *q_norm, *k_norm, *router_w, *router_b;
  const float* sinks;
  const uint8_t *gate_up, *gate_up_scales, *down, *down_scales;
  const bf16_bits *gate_up_bias, *down_bias;
  int mlp_kind, experts, inter, window;
  bool interleaved;
  bool mma;  // MXFP4 experts repacked for the tensor-core path (Model.prepare)
  // FP8 projections (null scales: the weights are bf16): q | k | v and o, block grid of both.
  const float *qkv_scales, *o_scales;
  int fp8_br, fp8_bc;
};

// Device sampling of a step's logits rows (sample_rows): per-row settings, the drawn ids and the
// kernel's workspace, for max_logit_rows rows. The settings part is also the host staging layout,
// uploaded in one copy. Fields of a row in Model.step's `sample` argument, in this order.
enum SampleField { kSTemperature, kSTopK, kSTopP, kSMinP, kSSeedLo, kSSeedHi, kSSeq, kSPosition, kSPurpose, kSampleFields };
struct SampleLayout {
  size_t temperature, top_p, min_p, top_k, seed_lo, seed_hi, seqs, positions, purposes, settings_bytes, ids, workspace, total;
  SampleLayout(int rows, int vocab) {
    const size_t L = static_cast<size_t>(rows);
    size_t off = 0;
    auto take = [&](size_t bytes) {
      const size_t at = off;
      off += align256(bytes);
      return at;
    };
    temperature = take(sizeof(double) * L), top_p = take(sizeof(double) * L), min_p = take(sizeof(double) * L);
    top_k = take(sizeof(int32_t) * L), seed_lo = take(sizeof(uint32_t) * L), seed_hi = take(sizeof(uint32_t) * L);
    seqs = take(sizeof(uint32_t) * L), positions = take(sizeof(uint32_t) * L), purposes = take(sizeof(uint32_t) * L);
    settings_bytes = off;
    ids = take(sizeof(int32_t) * L);
    workspace = take(sample_workspace_bytes(rows, vocab));
    total = off;
  }
};

// A DFlash drafter beside the model (attachDrafter): its own layers and KV cache, the model's
// embedding and LM head. Its cache has the model's pages and slots, a sequence's draft positions
// being its target positions, so one block table serves both and src/model.ts pages nothing more.
// packages/speculative/src/dflash/model.ts is the readable specification.
enum DraftGlobal { kDFc, kDHiddenNorm, kDNorm, kDInvFreq, kDraftGlobals };
enum DraftLayerField { kDInNorm, kDPostNorm, kDQkvW, kDQkvB, kDOW, kDOB, kDQNorm, kDKNorm, kDGateUp, kDDown, kDraftLayerFields };
constexpr int kMaxDraftBlock = 16;

struct DraftConfig {
  int layers, heads, kv_heads, head_dim, rotary_dim, inter, mask_token;
  double attention_factor;
  float eps, scale;
  std::vector<int> target_ids;  // target layers whose outputs, side by side, are the context feature
  bool norm_last;               // the last target layer's feature goes through the target's final norm
  size_t weights_bytes;
  int q_dim() const { return heads * head_dim; }
  int kv_dim() const { return kv_heads * head_dim; }
  int qkv_dim() const { return q_dim() + 2 * kv_dim(); }
  int feature_dim(int hidden) const { return static_cast<int>(target_ids.size()) * hidden; }
};

struct Drafter {
  DraftConfig d;
  DeviceBuffer weights, kv, arena;
  std::vector<LayerPtrs> layers;
  const bf16_bits *fc = nullptr, *hidden_norm = nullptr, *norm = nullptr;
  const float* inv_freq = nullptr;
  // Arena views: the draft block's inputs (the model's input layout), activations, the context
  // features of a step's rows, and acceptance.
  int32_t *in_tokens, *in_pos, *in_slots, *in_lens, *in_logit_rows, *in_tables;
  float *x, *normed, *qkv, *q, *attn, *proj, *mlp_out, *gate_up, *act, *feat, *fused, *ctx, *kvrow;
  void* att_ws;
  int32_t *spec, *emitted, *accepted;  // spec: [4][max_tokens] verify row0, logit row0, block, draft logit row0
  bool kv_f32 = false;
  size_t kv_layer_elems = 0;

  template <typename F>
  static size_t layout(const DraftConfig& d, int T, int H, int pages_per_seq, int max_seq_len, F&& part) {
    size_t off = 0;
    auto add = [&](size_t bytes, int id) {
      part(id, off);
      off += align256(bytes);
    };
    const size_t t = T;
    add(sizeof(int32_t) * (5 * t + t * pages_per_seq), 0);
    add(sizeof(float) * t * H, 1);                      // x
    add(sizeof(float) * t * H, 2);                      // normed
    add(sizeof(float) * t * d.qkv_dim(), 3);            // qkv
    add(sizeof(float) * t * d.q_dim(), 4);              // q
    add(sizeof(float) * t * d.q_dim(), 5);              // attn
    add(sizeof(float) * t * H, 6);                      // proj
    add(sizeof(float) * t * H, 7);                      // mlp_out
    add(sizeof(float) * t * d.inter, 8);                // act
    add(sizeof(float) * t * d.feature_dim(H), 9);       // feat
    add(sizeof(float) * t * H, 10);                     // fused
    add(sizeof(float) * t * H, 11);                     // ctx
    add(sizeof(float) * t * 2 * d.kv_dim(), 12);        // kvrow
    add(attention_decode_workspace_bytes(T, d.heads, d.head_dim, max_seq_len), 13);
    add(sizeof(int32_t) * 4 * t, 14);                   // spec
    add(sizeof(int32_t) * t * (kMaxDraftBlock + 1), 15);  // emitted
    add(sizeof(int32_t) * t, 16);                       // accepted
    add(sizeof(float) * t * 2 * d.inter, 17);           // gate | up
    return off;
  }

  Drafter(Napi::Env env, const DraftConfig& cfg, int T, int H, int pages_per_seq, int max_seq_len, size_t kv_rows, bool f32)
      : d(cfg),
        weights(env, cfg.weights_bytes, "drafter weights"),
        kv(env, 2 * static_cast<size_t>(cfg.layers) * kv_rows * cfg.kv_dim() * (f32 ? 4 : 2), "drafter KV cache"),
        arena(env, layout(cfg, T, H, pages_per_seq, max_seq_len, [](int, size_t) {}), "drafter arena"),
        kv_f32(f32),
        kv_layer_elems(kv_rows * cfg.kv_dim()) {
    char* base = arena.get<char>();
    layout(d, T, H, pages_per_seq, max_seq_len, [&](int id, size_t off) {
      void* p = base + off;
      float* f = static_cast<float*>(p);
      switch (id) {
        case 0: {
          auto* in = static_cast<int32_t*>(p);
          in_tokens = in, in_pos = in + T, in_slots = in + 2 * T, in_lens = in + 3 * T, in_logit_rows = in + 4 * T,
          in_tables = in + 5 * T;
          break;
        }
        case 1: x = f; break;
        case 2: normed = f; break;
        case 3: qkv = f; break;
        case 4: q = f; break;
        case 5: attn = f; break;
        case 6: proj = f; break;
        case 7: mlp_out = f; break;
        case 8: act = f; break;
        case 9: feat = f; break;
        case 10: fused = f; break;
        case 11: ctx = f; break;
        case 12: kvrow = f; break;
        case 13: att_ws = p; break;
        case 14: spec = static_cast<int32_t*>(p); break;
        case 15: emitted = static_cast<int32_t*>(p); break;
        case 16: accepted = static_cast<int32_t*>(p); break;
        case 17: gate_up = f; break;
      }
    });
    check_cuda(env, cudaMemset(kv.get(), 0xff, kv.bytes()), "cudaMemset (drafter KV cache)");
  }
  bf16_bits* k_cache(int l) const { return kv_f32 ? nullptr : kv.get<bf16_bits>() + static_cast<size_t>(2 * l) * kv_layer_elems; }
  bf16_bits* v_cache(int l) const { return kv_f32 ? nullptr : kv.get<bf16_bits>() + static_cast<size_t>(2 * l + 1) * kv_layer_elems; }
  float* k_cache_f32(int l) const { return kv_f32 ? kv.get<float>() + static_cast<size_t>(2 * l) * kv_layer_elems : nullptr; }
  float* v_cache_f32(int l) const { return kv_f32 ? kv.get<float>() + static_cast<size_t>(2 * l + 1) * kv_layer_elems : nullptr; }
};

// Everything the device holds for one model. Built whole or not at all: a failed allocation
// throws from the constructor, and the members already allocated free themselves.
struct State {
  Config c;
  DeviceBuffer weights, kv, arena;
  PinnedBuffer in_host, out_host;
  cudaStream_t stream = nullptr;
  std::map<int, cudaGraphExec_t> graphs;  // decode graphs by 4 * bucket + (absorbs ? 2 : 0) + (samples ? 1 : 0)
  std::map<int, cudaGraphExec_t> round_graphs;  // DFlash rounds of uniform layout by (sequences, block size, forced)
  bool prepared = false;
  int steps_run = 0;  // steps and rounds, counted only for MOEFLASH_FAULT_AFTER_STEPS
  // Sampling buffers (SampleLayout), reserved with everything else at load (a step allocates
  // nothing); `sampling` says whether the step being run samples (forward then runs sample_rows
  // after argmax_rows).
  DeviceBuffer sample_buf;
  std::vector<char> sample_host;
  bool sampling = false;
  std::vector<LayerPtrs> layers;
  std::unique_ptr<Drafter> drafter;
  // Whether the step being run leaves the context features of its rows in drafter->feat.
  bool capture_features = false;
  const bf16_bits *embed = nullptr, *lm_head = nullptr, *final_norm = nullptr;
  const float* inv_freq = nullptr;

  // Arena views.
  int32_t *in_tokens, *in_pos, *in_slots, *in_lens, *in_logit_rows, *in_tables;
  float *x, *normed, *qkv, *q, *attn, *proj, *mlp_out, *router_logits, *route_w, *act, *hid, *lm_in, *logits;
  int32_t *route_ids, *argmax_ids, *zero_ids, *moe_plan, *moe_counters;
  float *ones, *moe_part;
  float* fp8_mlp = nullptr;  // FP8 dense MLP: gate | up outputs [T, 2 inter], then act [T, inter]
  void *att_ws, *argmax_ws, *att_fused_ws;
  int32_t* att_tiles;     // attention_prefill's tile list, [2 max_tokens][2] at most
  float* x_alt;           // the other half of the residual stream's ping-pong (fused norms)
  int prefill_tiles = 0;  // tiles of this step's rows; 0 runs attention_decode (one row a sequence)
  // Routing trace of the step being run (null: none): router logits [layers][T][num_experts] and
  // the experts each token went to [layers][T][top_k], on the host.
  float* trace_logits = nullptr;
  int32_t* trace_ids = nullptr;
  size_t arena_bytes = 0;

  static size_t kv_bytes(const Config& c) {
    return 2 * static_cast<size_t>(c.layers) * (static_cast<size_t>(c.num_pages) + 1) * c.page_size * c.kv_dim() * c.kv_elem_bytes();
  }

  // The arena's parts, in order; `carve` walks the same list to hand out pointers.
  template <typename F>
  static size_t layout(const Config& c, F&& part) {
    const size_t T = c.max_tokens, H = c.hidden, L = c.max_logit_rows, K = c.slots();
    size_t off = 0;
    auto add = [&](size_t bytes, int id) {
      part(id, off);
      off += align256(bytes);
    };
    add(sizeof(int32_t) * c.input_ints(), 0);
    add(sizeof(float) * T * H, 1);                        // x
    add(sizeof(float) * T * H, 2);                        // normed
    add(sizeof(float) * T * c.qkv_dim(), 3);              // qkv
    add(sizeof(float) * T * c.q_dim(), 4);                // q
    add(sizeof(float) * T * c.q_dim(), 5);                // attn
    add(sizeof(float) * T * H, 6);                        // proj
    add(sizeof(float) * T * H, 7);                        // mlp_out
    add(sizeof(float) * T * std::max(c.num_experts, 1), 8);  // router logits
    add(sizeof(float) * T * K, 9);                        // route weights
    add(sizeof(int32_t) * T * K, 10);                     // route ids
    add(sizeof(float) * T * K * c.max_inter, 11);         // expert activations
    add(sizeof(float) * T * H, 12);                       // hidden copy
    add(sizeof(float) * L * H, 13);                       // lm head input rows
    add(sizeof(float) * L * static_cast<size_t>(c.vocab), 14);  // logits
    add(sizeof(int32_t) * L, 15);                         // argmax ids
    add(sizeof(int32_t) * T, 16);                         // zeros (dense MLP ids)
    add(sizeof(float) * T, 17);                           // ones (dense MLP weights)
    add(attention_decode_workspace_bytes(c.max_tokens, c.heads, c.head_dim, c.max_seq_len), 18);
    add(attention_fused_workspace_bytes(c.max_tokens, c.heads, c.head_dim), 26);
    add(argmax_workspace_bytes(c.max_logit_rows, c.vocab), 19);
    add(sizeof(int32_t) * moe_plan_ints(static_cast<int>(T * K), std::max(c.num_experts, 1)), 20);
    add(sizeof(int32_t) * moe_counter_ints(c.hidden), 21);
    add(sizeof(float) * T * K * H, 22);  // per-pair down projections (tensor-core MoE)
    add(sizeof(float) * T * 3 * c.fp8_inter, 23);  // FP8 dense MLP scratch
    add(sizeof(int32_t) * 4 * T, 24);    // attention_prefill tiles
    add(sizeof(float) * T * H, 25);      // residual stream, second buffer
    return off;
  }

  State(Napi::Env env, const Config& cfg)
      : c(cfg),
        weights(env, cfg.weights_bytes, "model weights"),
        kv(env, kv_bytes(cfg), "KV cache"),
        arena(env, layout(cfg, [](int, size_t) {}), "activation arena"),
        in_host(env, sizeof(int32_t) * cfg.input_ints(), "step inputs"),
        out_host(env, sizeof(float) * cfg.max_logit_rows * (static_cast<size_t>(cfg.vocab) + 1), "step outputs"),
        sample_buf(env, SampleLayout(cfg.max_logit_rows, cfg.vocab).total, "sampling buffers"),
        sample_host(SampleLayout(cfg.max_logit_rows, cfg.vocab).settings_bytes, 0) {
    arena_bytes = arena.bytes() + sample_buf.bytes();
    char* base = arena.get<char>();
    layout(c, [&](int id, size_t off) {
      void* p = base + off;
      switch (id) {
        case 0: {
          auto* in = static_cast<int32_t*>(p);
          const int T = c.max_tokens;
          in_tokens = in, in_pos = in + T, in_slots = in + 2 * T, in_lens = in + 3 * T, in_logit_rows = in + 4 * T,
          in_tables = in + 5 * T;
          break;
        }
        case 1: x = static_cast<float*>(p); break;
        case 2: normed = static_cast<float*>(p); break;
        case 3: qkv = static_cast<float*>(p); break;
        case 4: q = static_cast<float*>(p); break;
        case 5: attn = static_cast<float*>(p); break;
        case 6: proj = static_cast<float*>(p); break;
        case 7: mlp_out = static_cast<float*>(p); break;
        case 8: router_logits = static_cast<float*>(p); break;
        case 9: route_w = static_cast<float*>(p); break;
        case 10: route_ids = static_cast<int32_t*>(p); break;
        case 11: act = static_cast<float*>(p); break;
        case 12: hid = static_cast<float*>(p); break;
        case 13: lm_in = static_cast<float*>(p); break;
        case 14: logits = static_cast<float*>(p); break;
        case 15: argmax_ids = static_cast<int32_t*>(p); break;
        case 16: zero_ids = static_cast<int32_t*>(p); break;
        case 17: ones = static_cast<float*>(p); break;
        case 18: att_ws = p; break;
        case 19: argmax_ws = p; break;
        case 20: moe_plan = static_cast<int32_t*>(p); break;
        case 21: moe_counters = static_cast<int32_t*>(p); break;
        case 22: moe_part = static_cast<float*>(p); break;
        case 23: fp8_mlp = static_cast<float*>(p); break;
        case 24: att_tiles = static_cast<int32_t*>(p); break;
        case 25: x_alt = static_cast<float*>(p); break;
        case 26: att_fused_ws = p; break;
      }
    });
    check_cuda(env, cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate (model)");
    std::vector<float> one(c.max_tokens, 1.0f);
    check_cuda(env, cudaMemset(zero_ids, 0, sizeof(int32_t) * c.max_tokens), "cudaMemset (zero ids)");
    // The MoE down kernel's per-row-tile counters start at zero and every launch leaves them so.
    check_cuda(env, cudaMemset(moe_counters, 0, sizeof(int32_t) * moe_counter_ints(c.hidden)), "cudaMemset (MoE counters)");
    // The fused decode attention's merge counters, likewise.
    check_cuda(env, cudaMemset(att_fused_ws, 0, attention_fused_workspace_bytes(c.max_tokens, c.heads, c.head_dim)),
               "cudaMemset (attention counters)");
    check_cuda(env, cudaMemcpy(ones, one.data(), sizeof(float) * c.max_tokens, cudaMemcpyHostToDevice), "cudaMemcpy (ones)");
    // Unwritten cache rows are never read, but a NaN pattern would show it at once if they were.
    check_cuda(env, cudaMemset(kv.get(), 0xff, kv.bytes()), "cudaMemset (KV cache)");
  }
  ~State() {
    for (auto& g : graphs) cudaGraphExecDestroy(g.second);
    for (auto& g : round_graphs) cudaGraphExecDestroy(g.second);
    if (stream != nullptr) {
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    }
  }

  // A layer's K and V caches in the cache's own element type (the other one's pointers are null).
  bf16_bits* k_cache(int l) const { return c.kv_f32 ? nullptr : kv.get<bf16_bits>() + static_cast<size_t>(2 * l) * layer_kv_elems(); }
  bf16_bits* v_cache(int l) const { return c.kv_f32 ? nullptr : kv.get<bf16_bits>() + static_cast<size_t>(2 * l + 1) * layer_kv_elems(); }
  float* k_cache_f32(int l) const { return c.kv_f32 ? kv.get<float>() + static_cast<size_t>(2 * l) * layer_kv_elems() : nullptr; }
  float* v_cache_f32(int l) const { return c.kv_f32 ? kv.get<float>() + static_cast<size_t>(2 * l + 1) * layer_kv_elems() : nullptr; }
  size_t layer_kv_elems() const { return (static_cast<size_t>(c.num_pages) + 1) * c.page_size * c.kv_dim(); }
  int trash_page() const { return c.num_pages; }
};

struct Status {
  cudaError_t err = cudaSuccess;
  const char* what = nullptr;
  bool ok() const { return err == cudaSuccess; }
};
#define MF_TRY(call, name)              \
  do {                                  \
    const cudaError_t e_ = (call);      \
    if (e_ != cudaSuccess) return {e_, name}; \
  } while (0)

// Row-stacked FP8 matrices (codes one after another, scale grids one after another) into one
// output [T, sum of rows]: one launch when every part but the last fills whole row blocks, since
// the grids then stack into the grid of the whole matrix; else one launch per part at its offset.
cudaError_t gemv_fp8_stack(const uint8_t* w, const float* scales, const bf16_bits* bias, std::initializer_list<int> parts,
                           int cols, int br, int bc, const float* x, float* y, int T, cudaStream_t st) {
  int total = 0;
  bool whole = true;
  size_t i = 0;
  for (const int r : parts) {
    total += r;
    if (++i < parts.size() && r % br != 0) whole = false;
  }
  if (whole) return gemv_fp8(w, scales, br, bc, bias, x, y, total, cols, T, st);
  const size_t scale_cols = (static_cast<size_t>(cols) + bc - 1) / bc;
  size_t row0 = 0, grid0 = 0;
  for (const int r : parts) {
    const cudaError_t e = gemv_fp8_strided(w + row0 * cols, scales + grid0 * scale_cols, br, bc,
                                           bias != nullptr ? bias + row0 : nullptr, x, y + row0, total, r, cols, T, st);
    if (e != cudaSuccess) return e;
    row0 += r;
    grid0 += (r + br - 1) / br;
  }
  return cudaSuccess;
}

// The forward pass of T tokens whose inputs are already in the arena. Hidden states of the
// layers in `hidden` go to hidden_host ([hidden.size(), T, H]) when it is set.
Status forward(State& s, int T, int n_logit, int max_len, const std::vector<int>& hidden, float* hidden_host) {
  const Config& c = s.c;
  const int H = c.hidden;
  cudaStream_t st = s.stream;
  for (int rep = profile_times("embed"); rep > 0; --rep) MF_TRY(embedding_bf16(s.embed, s.in_tokens, T, H, s.x, st), "embedding_bf16");
  const bool tiled_attention = attention_decode_supported(c.heads, c.kv_heads, c.head_dim);
  // MOEFLASH_ATTENTION_FUSED=0 keeps the three-launch decode attention (for measurements).
  const bool fused_ok = env_int("MOEFLASH_ATTENTION_FUSED", 1) != 0;
  size_t hidden_done = 0;
  // The residual stream. A norm fused into the projection after it (gemv_bf16_prenorm) writes the
  // updated stream to the other buffer, since every block of that launch still reads this one.
  float* xc = s.x;
  float* xn = s.x_alt;
  // Each block of a fused launch normalizes every token for itself, which pays off only while the
  // tokens are few (H100, gpt-oss-20b: batch 1 2.71 -> 2.61 ms a step; batch 8 6.06 -> 6.45 ms,
  // batch 32 15.1 -> 17.4 ms when fused).
  const bool fuse_norms = T <= 2;
  for (int l = 0; l < c.layers; ++l) {
    const LayerPtrs& w = s.layers[l];
    const float* in_residual = l == 0 ? nullptr : s.mlp_out;
    if (w.qkv_scales != nullptr) {
      MF_TRY(rmsnorm_residual(xc, in_residual, w.in_norm, c.eps, T, H, s.normed, st), "rmsnorm (input)");
      MF_TRY(gemv_fp8_stack(reinterpret_cast<const uint8_t*>(w.qkv_w), w.qkv_scales, w.qkv_b, {c.q_dim(), c.kv_dim(), c.kv_dim()},
                            H, w.fp8_br, w.fp8_bc, s.normed, s.qkv, T, st),
             "gemv_fp8 (qkv)");
    } else if (fuse_norms) {
      const int times = profile_times("qkv");
      for (int rep = 0; rep < times; ++rep)
        MF_TRY(gemv_bf16_prenorm(w.qkv_w, w.qkv_b, xc, in_residual, w.in_norm, c.eps, xn, nullptr, s.qkv, c.qkv_dim(), H,
                                 T, st),
               "gemv_bf16 (input norm + qkv)");
      if (times > 0) std::swap(xc, xn);
    } else {
      MF_TRY(rmsnorm_residual(xc, in_residual, w.in_norm, c.eps, T, H, s.normed, st), "rmsnorm (input)");
      for (int rep = profile_times("qkv"); rep > 0; --rep)
        MF_TRY(gemv_bf16(w.qkv_w, w.qkv_b, s.normed, s.qkv, c.qkv_dim(), H, T, st), "gemv_bf16 (qkv)");
    }
    QkvPrepareArgs qa{};
    qa.qkv = s.qkv;
    qa.q_norm = w.q_norm;
    qa.k_norm = w.k_norm;
    qa.eps = c.eps;
    qa.positions = s.in_pos;
    qa.inv_freq = s.inv_freq;
    qa.attention_factor = c.attention_factor;
    qa.rotary_dim = c.rotary_dim;
    qa.slots = s.in_slots;
    qa.q_out = s.q;
    qa.k_cache = s.k_cache(l);
    qa.v_cache = s.v_cache(l);
    qa.k_cache_f32 = s.k_cache_f32(l);
    qa.v_cache_f32 = s.v_cache_f32(l);
    qa.tokens = T;
    qa.num_heads = c.heads;
    qa.num_kv_heads = c.kv_heads;
    qa.head_dim = c.head_dim;
    // Decode rows (each its own sequence) take one launch for the q/k/v epilogue and attention.
    const bool fused_attention = s.prefill_tiles == 0 && fused_ok && !c.kv_f32 &&
                                 attention_fused_supported(c.heads, c.kv_heads, c.head_dim, c.rotary_dim, max_len);
    if (!fused_attention)
      for (int rep = profile_times("prep"); rep > 0; --rep) MF_TRY(qkv_prepare(qa, st), "qkv_prepare");
    AttentionDecodeArgs aa{};
    aa.q = s.q;
    aa.k_cache = s.k_cache(l);
    aa.v_cache = s.v_cache(l);
    aa.k_cache_f32 = s.k_cache_f32(l);
    aa.v_cache_f32 = s.v_cache_f32(l);
    aa.block_table = s.in_tables;
    aa.seq_lens = s.in_lens;
    aa.sinks = w.sinks;
    aa.out = s.attn;
    aa.workspace = s.att_ws;
    aa.num_seqs = T;
    aa.num_heads = c.heads;
    aa.num_kv_heads = c.kv_heads;
    aa.head_dim = c.head_dim;
    aa.page_size = c.page_size;
    aa.max_pages_per_seq = c.max_pages_per_seq;
    aa.max_seq_len = max_len;
    aa.window = w.window;
    aa.scale = c.scale;
    if (s.prefill_tiles > 0) {
      AttentionPrefillArgs pa{};
      pa.q = aa.q, pa.k_cache = aa.k_cache, pa.v_cache = aa.v_cache, pa.block_table = aa.block_table;
      pa.seq_lens = aa.seq_lens, pa.tiles = s.att_tiles, pa.sinks = aa.sinks, pa.out = aa.out;
      pa.num_tiles = s.prefill_tiles, pa.num_heads = c.heads, pa.num_kv_heads = c.kv_heads, pa.head_dim = c.head_dim;
      pa.page_size = c.page_size, pa.max_pages_per_seq = c.max_pages_per_seq, pa.window = w.window, pa.scale = c.scale;
      for (int rep = profile_times("attn"); rep > 0; --rep) MF_TRY(attention_prefill(pa, st), "attention_prefill");
    } else if (fused_attention) {
      aa.workspace = s.att_fused_ws;
      for (int rep = profile_times("attn"); rep > 0; --rep) MF_TRY(attention_decode_fused(qa, aa, st), "attention_decode_fused");
    } else {
      for (int rep = profile_times("attn"); rep > 0; --rep)
        MF_TRY(tiled_attention ? attention_decode(aa, st) : attention_generic(aa, st), "attention");
    }
    if (w.o_scales != nullptr)
      MF_TRY(gemv_fp8(reinterpret_cast<const uint8_t*>(w.o_w), w.o_scales, w.fp8_br, w.fp8_bc, w.o_b, s.attn, s.proj, H,
                      c.q_dim(), T, st),
             "gemv_fp8 (o)");
    else
      for (int rep = profile_times("o"); rep > 0; --rep)
        MF_TRY(gemv_bf16(w.o_w, w.o_b, s.attn, s.proj, H, c.q_dim(), T, st), "gemv_bf16 (o)");
    const bool dense = w.mlp_kind == kMlpDense || w.mlp_kind == kMlpDenseFp8;
    const int K = dense ? 1 : c.top_k;
    const int32_t* ids = s.zero_ids;
    const float* rw = s.ones;
    if (dense || !fuse_norms)
      MF_TRY(rmsnorm_residual(xc, s.proj, w.post_norm, c.eps, T, H, s.normed, st), "rmsnorm (post-attention)");
    if (!dense) {
      if (fuse_norms) {
        // The router's launch does the norm too and leaves the normalized rows for the experts.
        const int times = profile_times("router");
        for (int rep = 0; rep < times; ++rep)
          MF_TRY(gemv_bf16_prenorm(w.router_w, w.router_b, xc, s.proj, w.post_norm, c.eps, xn, s.normed, s.router_logits,
                                   w.experts, H, T, st),
                 "gemv_bf16 (post-attention norm + router)");
        if (times > 0) std::swap(xc, xn);
      } else {
        for (int rep = profile_times("router"); rep > 0; --rep)
          MF_TRY(gemv_bf16(w.router_w, w.router_b, s.normed, s.router_logits, w.experts, H, T, st), "gemv_bf16 (router)");
      }
      // Decode steps on the tensor-core MoE path take their top-k inside the experts' launch.
      if (!(w.mlp_kind == kMlpMxfp4Experts && w.mma && moe_mma_routes(T, K, w.experts)))
        MF_TRY(router_topk(s.router_logits, T, w.experts, K, static_cast<RoutingRule>(c.rule), c.renormalize != 0,
                           s.route_ids, s.route_w, st),
               "router_topk");
      ids = s.route_ids;
      rw = s.route_w;
    }
    if (w.mlp_kind == kMlpDenseFp8) {
      float* gate_up = s.fp8_mlp;
      float* act = s.fp8_mlp + static_cast<size_t>(T) * 2 * w.inter;
      MF_TRY(gemv_fp8_stack(w.gate_up, reinterpret_cast<const float*>(w.gate_up_scales), w.gate_up_bias, {w.inter, w.inter},
                            H, w.fp8_br, w.fp8_bc, s.normed, gate_up, T, st),
             "gemv_fp8 (gate/up)");
      MF_TRY(swiglu_f32(gate_up, T, w.inter, act, st), "swiglu_f32");
      MF_TRY(gemv_fp8(w.down, reinterpret_cast<const float*>(w.down_scales), w.fp8_br, w.fp8_bc, w.down_bias, act,
                      s.mlp_out, H, w.inter, T, st),
             "gemv_fp8 (down)");
    } else if (w.mlp_kind == kMlpMxfp4Experts && w.mma) {
      MoeMmaArgs m{};
      m.gate_up_blocks = w.gate_up;
      m.gate_up_scales = w.gate_up_scales;
      m.gate_up_bias = w.gate_up_bias;
      m.down_blocks = w.down;
      m.down_scales = w.down_scales;
      m.down_bias = w.down_bias;
      m.activation = static_cast<ExpertActivation>(c.activation);
      m.interleaved = m.activation == ExpertActivation::GptOssClamped;
      m.limit = c.limit;
      m.alpha = c.alpha;
      m.x = s.normed;
      m.expert_ids = ids;
      m.expert_weights = rw;
      if (moe_mma_routes(T, K, w.experts)) {
        m.router_logits = s.router_logits;
        m.rule = static_cast<RoutingRule>(c.rule);
        m.renormalize = c.renormalize != 0;
        m.route_ids = s.route_ids;
        m.route_weights = s.route_w;
      }
      m.tokens = T, m.top_k = K, m.num_experts = w.experts, m.hidden = H, m.inter = w.inter;
      m.plan = s.moe_plan;
      m.counters = s.moe_counters;
      m.act = s.act;
      m.part = s.moe_part;
      m.y = s.mlp_out;
      for (int rep = profile_times("moe"); rep > 0; --rep) MF_TRY(moe_mxfp4_mma(m, st), "moe_mxfp4_mma");
    } else if (w.mlp_kind == kMlpMxfp4Experts) {
      for (int t0 = 0; t0 < T; t0 += 8) {
        MoeDims d{std::min(8, T - t0), K, w.experts, H, w.inter};
        const Mxfp4Experts gu{w.gate_up, w.gate_up_scales, w.gate_up_bias};
        const Mxfp4Experts dn{w.down, w.down_scales, w.down_bias};
        float* act = s.act + static_cast<size_t>(t0) * K * w.inter;
        MF_TRY(moe_gate_up_mxfp4(gu, s.normed + static_cast<size_t>(t0) * H, ids + t0 * K, d,
                                 static_cast<ExpertActivation>(c.activation), c.limit, c.alpha, act, st),
               "moe_gate_up_mxfp4");
        MF_TRY(moe_down_mxfp4(dn, act, ids + t0 * K, rw + t0 * K, d, s.mlp_out + static_cast<size_t>(t0) * H, st),
               "moe_down_mxfp4");
      }
    } else {
      MlpBf16Args m{};
      m.gate_up = reinterpret_cast<const bf16_bits*>(w.gate_up);
      m.gate_up_bias = w.gate_up_bias;
      m.down = reinterpret_cast<const bf16_bits*>(w.down);
      m.down_bias = w.down_bias;
      m.x = s.normed;
      m.expert_ids = ids;
      m.expert_weights = rw;
      m.act = s.act;
      m.y = s.mlp_out;
      m.tokens = T;
      m.top_k = K;
      m.hidden = H;
      m.inter = w.inter;
      m.interleaved = w.interleaved;
      m.activation = w.mlp_kind == kMlpDense ? ExpertActivation::SwiGLU : static_cast<ExpertActivation>(c.activation);
      m.limit = c.limit;
      m.alpha = c.alpha;
      MF_TRY(mlp_bf16(m, st), "mlp_bf16");
    }
    if (s.capture_features) {
      const Drafter& dr = *s.drafter;
      for (size_t j = 0; j < dr.d.target_ids.size(); ++j) {
        if (dr.d.target_ids[j] != l) continue;
        const bf16_bits* norm = dr.d.norm_last && l == c.layers - 1 ? s.final_norm : nullptr;
        MF_TRY(dflash_feature(xc, s.mlp_out, T, H, norm, c.eps, dr.feat, dr.d.feature_dim(H), static_cast<int>(j) * H, st),
               "dflash_feature");
      }
    }
    if (s.trace_logits != nullptr && !dense) {
      const size_t E = std::max(c.num_experts, 1), KS = c.slots();
      MF_TRY(cudaMemcpy2DAsync(s.trace_logits + static_cast<size_t>(l) * T * E, sizeof(float) * E, s.router_logits,
                               sizeof(float) * w.experts, sizeof(float) * w.experts, T, cudaMemcpyDeviceToHost, st),
             "cudaMemcpy2DAsync (routing trace logits)");
      MF_TRY(cudaMemcpyAsync(s.trace_ids + static_cast<size_t>(l) * T * KS, s.route_ids, sizeof(int32_t) * T * K,
                             cudaMemcpyDeviceToHost, st),
             "cudaMemcpyAsync (routing trace experts)");
    }
    if (hidden_host != nullptr && hidden_done < hidden.size() && std::find(hidden.begin(), hidden.end(), l) != hidden.end()) {
      // The residual stream after layer l: x still lacks this layer's MLP output, which the next
      // norm adds in place.
      MF_TRY(add_f32(xc, s.mlp_out, static_cast<size_t>(T) * H, s.hid, st), "add_f32 (hidden)");
      const size_t idx = std::find(hidden.begin(), hidden.end(), l) - hidden.begin();
      MF_TRY(cudaMemcpyAsync(hidden_host + idx * T * H, s.hid, sizeof(float) * T * H, cudaMemcpyDeviceToHost, st),
             "cudaMemcpyAsync (hidden)");
      ++hidden_done;
    }
  }
  for (int rep = profile_times("final"); rep > 0; --rep) MF_TRY(rmsnorm_residual(xc, s.mlp_out, s.final_norm, c.eps, T, H, s.normed, st), "rmsnorm (final)");
  if (n_logit > 0) {
    for (int rep = profile_times("gather"); rep > 0; --rep) MF_TRY(gather_rows(s.normed, s.in_logit_rows, n_logit, H, s.lm_in, st), "gather_rows");
    for (int rep = profile_times("lm"); rep > 0; --rep)
      MF_TRY(gemv_bf16(s.lm_head, nullptr, s.lm_in, s.logits, c.vocab, H, n_logit, st), "gemv_bf16 (lm head)");
    for (int rep = profile_times("argmax"); rep > 0; --rep)
      MF_TRY(argmax_rows(s.logits, n_logit, c.vocab, s.argmax_ids, s.argmax_ws, st), "argmax_rows");
    if (s.sampling) {
      const SampleLayout sl(c.max_logit_rows, c.vocab);
      char* b = s.sample_buf.get<char>();
      SampleArgs a{};
      a.logits = s.logits;
      a.rows = n_logit;
      a.vocab = c.vocab;
      a.temperature = reinterpret_cast<const double*>(b + sl.temperature);
      a.top_k = reinterpret_cast<const int32_t*>(b + sl.top_k);
      a.top_p = reinterpret_cast<const double*>(b + sl.top_p);
      a.min_p = reinterpret_cast<const double*>(b + sl.min_p);
      a.seed_lo = reinterpret_cast<const uint32_t*>(b + sl.seed_lo);
      a.seed_hi = reinterpret_cast<const uint32_t*>(b + sl.seed_hi);
      a.seqs = reinterpret_cast<const uint32_t*>(b + sl.seqs);
      a.positions = reinterpret_cast<const uint32_t*>(b + sl.positions);
      a.purposes = reinterpret_cast<const uint32_t*>(b + sl.purposes);
      a.out = reinterpret_cast<int32_t*>(b + sl.ids);
      a.workspace = b + sl.workspace;
      MF_TRY(sample_rows(a, st), "sample_rows");
    }
  }
  return {};
}

// The drafter's context keys and values of a step's T rows, from the features the step left in
// drafter->feat, at the rows' own positions and slots (the model's inputs): c = hidden_norm(fc f),
// then per draft layer k = RoPE(k_norm(W_k c)), v = W_v c into the draft cache. Rows whose
// position the request does not keep are overwritten by the next round's block before anything
// reads them.
Status draft_absorb(State& s, int T) {
  Drafter& dr = *s.drafter;
  const DraftConfig& d = dr.d;
  const int H = s.c.hidden;
  cudaStream_t st = s.stream;
  MF_TRY(gemv_bf16(dr.fc, nullptr, dr.feat, dr.fused, H, d.feature_dim(H), T, st), "gemv_bf16 (drafter fc)");
  MF_TRY(rmsnorm_residual(dr.fused, nullptr, dr.hidden_norm, d.eps, T, H, dr.ctx, st), "rmsnorm (drafter hidden_norm)");
  for (int l = 0; l < d.layers; ++l) {
    const LayerPtrs& w = dr.layers[l];
    const size_t q_rows = static_cast<size_t>(d.q_dim());
    MF_TRY(gemv_bf16(w.qkv_w + q_rows * H, w.qkv_b != nullptr ? w.qkv_b + q_rows : nullptr, dr.ctx, dr.kvrow, 2 * d.kv_dim(), H, T,
                     st),
           "gemv_bf16 (drafter context k/v)");
    QkvPrepareArgs qa{};
    qa.qkv = dr.kvrow;
    qa.k_norm = w.k_norm;
    qa.eps = d.eps;
    qa.positions = s.in_pos;
    qa.inv_freq = dr.inv_freq;
    qa.attention_factor = d.attention_factor;
    qa.rotary_dim = d.rotary_dim;
    qa.slots = s.in_slots;
    qa.k_cache = dr.k_cache(l), qa.v_cache = dr.v_cache(l);
    qa.k_cache_f32 = dr.k_cache_f32(l), qa.v_cache_f32 = dr.v_cache_f32(l);
    qa.tokens = T, qa.num_heads = 0, qa.num_kv_heads = d.kv_heads, qa.head_dim = d.head_dim;
    MF_TRY(qkv_prepare(qa, st), "qkv_prepare (drafter context)");
  }
  return {};
}

// The draft block's forward pass over the drafter's inputs (T rows: per speculating sequence its
// anchor and B masks, every row seeing the whole context and the whole block: seq_lens = L + B + 1),
// through the model's LM head for the n_logit mask rows; their argmax ids are left in argmax_ids.
Status draft_forward(State& s, int T, int n_logit, int max_len) {
  Drafter& dr = *s.drafter;
  const DraftConfig& d = dr.d;
  const Config& c = s.c;
  const int H = c.hidden;
  cudaStream_t st = s.stream;
  MF_TRY(embedding_bf16(s.embed, dr.in_tokens, T, H, dr.x, st), "embedding_bf16 (drafter)");
  const bool tiled = attention_decode_supported(d.heads, d.kv_heads, d.head_dim);
  for (int l = 0; l < d.layers; ++l) {
    const LayerPtrs& w = dr.layers[l];
    MF_TRY(rmsnorm_residual(dr.x, l == 0 ? nullptr : dr.mlp_out, w.in_norm, d.eps, T, H, dr.normed, st), "rmsnorm (drafter input)");
    MF_TRY(gemv_bf16(w.qkv_w, w.qkv_b, dr.normed, dr.qkv, d.qkv_dim(), H, T, st), "gemv_bf16 (drafter qkv)");
    QkvPrepareArgs qa{};
    qa.qkv = dr.qkv;
    qa.q_norm = w.q_norm, qa.k_norm = w.k_norm, qa.eps = d.eps;
    qa.positions = dr.in_pos, qa.inv_freq = dr.inv_freq, qa.attention_factor = d.attention_factor, qa.rotary_dim = d.rotary_dim;
    qa.slots = dr.in_slots, qa.q_out = dr.q;
    qa.k_cache = dr.k_cache(l), qa.v_cache = dr.v_cache(l);
    qa.k_cache_f32 = dr.k_cache_f32(l), qa.v_cache_f32 = dr.v_cache_f32(l);
    qa.tokens = T, qa.num_heads = d.heads, qa.num_kv_heads = d.kv_heads, qa.head_dim = d.head_dim;
    MF_TRY(qkv_prepare(qa, st), "qkv_prepare (drafter block)");
    AttentionDecodeArgs aa{};
    aa.q = dr.q;
    aa.k_cache = dr.k_cache(l), aa.v_cache = dr.v_cache(l);
    aa.k_cache_f32 = dr.k_cache_f32(l), aa.v_cache_f32 = dr.v_cache_f32(l);
    aa.block_table = dr.in_tables, aa.seq_lens = dr.in_lens, aa.sinks = nullptr, aa.out = dr.attn, aa.workspace = dr.att_ws;
    aa.num_seqs = T, aa.num_heads = d.heads, aa.num_kv_heads = d.kv_heads, aa.head_dim = d.head_dim;
    aa.page_size = c.page_size, aa.max_pages_per_seq = c.max_pages_per_seq, aa.max_seq_len = max_len, aa.window = 0;
    aa.scale = d.scale;
    MF_TRY(tiled ? attention_decode(aa, st) : attention_generic(aa, st), "attention (drafter)");
    MF_TRY(gemv_bf16(w.o_w, w.o_b, dr.attn, dr.proj, H, d.q_dim(), T, st), "gemv_bf16 (drafter o)");
    MF_TRY(rmsnorm_residual(dr.x, dr.proj, w.post_norm, d.eps, T, H, dr.normed, st), "rmsnorm (drafter post-attention)");
    // The dense SiLU MLP through the model's matrix kernels: gate | up in one product, then down.
    MF_TRY(gemv_bf16(reinterpret_cast<const bf16_bits*>(w.gate_up), nullptr, dr.normed, dr.gate_up, 2 * d.inter, H, T, st),
           "gemv_bf16 (drafter gate/up)");
    MF_TRY(swiglu_f32(dr.gate_up, T, d.inter, dr.act, st), "swiglu_f32 (drafter)");
    MF_TRY(gemv_bf16(reinterpret_cast<const bf16_bits*>(w.down), nullptr, dr.act, dr.mlp_out, H, d.inter, T, st),
           "gemv_bf16 (drafter down)");
  }
  MF_TRY(rmsnorm_residual(dr.x, dr.mlp_out, dr.norm, d.eps, T, H, dr.normed, st), "rmsnorm (drafter final)");
  MF_TRY(gather_rows(dr.normed, dr.in_logit_rows, n_logit, H, s.lm_in, st), "gather_rows (drafter)");
  MF_TRY(gemv_bf16(s.lm_head, nullptr, s.lm_in, s.logits, c.vocab, H, n_logit, st), "gemv_bf16 (drafter lm head)");
  MF_TRY(argmax_rows(s.logits, n_logit, c.vocab, s.argmax_ids, s.argmax_ws, st), "argmax_rows (drafter)");
  return {};
}

const bf16_bits* at_bf16(const State& s, double off) {
  return off < 0 ? nullptr : reinterpret_cast<const bf16_bits*>(s.weights.get<uint8_t>() + static_cast<size_t>(off));
}

// Replays the graph stored under `key`, or (first time) runs `body` eagerly and then records the
// same launches into a graph for the next calls. `body` must launch the same kernels with the
// same arguments every time; its inputs live in device buffers that the host refills.
template <typename F>
void replay_or_capture(Napi::Env env, State& s, std::map<int, cudaGraphExec_t>& graphs, int key, F&& body, const char* what) {
  cudaStream_t st = s.stream;
  auto g = graphs.find(key);
  if (g != graphs.end()) {
    check_cuda(env, cudaGraphLaunch(g->second, st), std::string("cudaGraphLaunch (") + what + ")");
    return;
  }
  Status stt = body();
  if (!stt.ok()) check_cuda(env, stt.err, std::string(what) + ": " + stt.what);
  check_cuda(env, cudaStreamBeginCapture(st, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
  stt = body();
  cudaGraph_t graph = nullptr;
  const cudaError_t end = cudaStreamEndCapture(st, &graph);
  if (!stt.ok()) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    check_cuda(env, stt.err, std::string(what) + " (graph capture): " + stt.what);
  }
  check_cuda(env, end, "cudaStreamEndCapture");
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  check_cuda(env, inst, "cudaGraphInstantiate");
  graphs[key] = exec;
}

// Every row's KV slot must lie inside the cache (the scratch page included).
void check_slots(const ArgReader& r, const State& s, const int32_t* inputs, int rows, const char* what) {
  const Config& c = s.c;
  for (int t = 0; t < rows; ++t) {
    const int slot = inputs[2 * c.max_tokens + t];
    if (slot < 0 || slot >= (c.num_pages + 1) * c.page_size) r.fail(std::string(what) + " KV slot is outside the cache");
  }
}

// A step's inputs and block tables in one copy: the tables follow the 5 maxTokens input rows on
// both sides, and only the first `rows` table rows are sent.
void upload_inputs(Napi::Env env, const State& s, int32_t* device, const int32_t* host, int rows, const char* what) {
  const Config& c = s.c;
  const size_t ints = 5 * static_cast<size_t>(c.max_tokens) + static_cast<size_t>(rows) * c.max_pages_per_seq;
  check_cuda(env, cudaMemcpyAsync(device, host, sizeof(int32_t) * ints, cudaMemcpyHostToDevice, s.stream), what);
}

// Sampling settings of a step's logits rows ([rows][9], SampleField order) into the device buffers.
void stage_sampling(const ArgReader& r, State& s, const Napi::Float64Array& sample_in, int n_logit) {
  const Config& c = s.c;
  const SampleLayout sl(c.max_logit_rows, c.vocab);
  // Padding rows of a graph bucket stay greedy (all zeros).
  std::fill(s.sample_host.begin(), s.sample_host.end(), 0);
  char* h = s.sample_host.data();
  const double* in_s = sample_in.Data();
  for (int j = 0; j < n_logit; ++j) {
    const double* f = in_s + static_cast<size_t>(j) * kSampleFields;
    const double temperature = f[kSTemperature], top_p = f[kSTopP], min_p = f[kSMinP];
    if (!(std::isfinite(temperature) && temperature >= 0) || !(top_p > 0 && top_p <= 1) || !(min_p >= 0 && min_p <= 1) ||
        !(f[kSTopK] >= 0 && f[kSTopK] <= 2147483647.0))
      r.fail("sample row " + std::to_string(j) + " has settings outside core's ranges");
    reinterpret_cast<double*>(h + sl.temperature)[j] = temperature;
    reinterpret_cast<double*>(h + sl.top_p)[j] = top_p;
    reinterpret_cast<double*>(h + sl.min_p)[j] = min_p;
    reinterpret_cast<int32_t*>(h + sl.top_k)[j] = static_cast<int32_t>(f[kSTopK]);
    reinterpret_cast<uint32_t*>(h + sl.seed_lo)[j] = static_cast<uint32_t>(f[kSSeedLo]);
    reinterpret_cast<uint32_t*>(h + sl.seed_hi)[j] = static_cast<uint32_t>(f[kSSeedHi]);
    reinterpret_cast<uint32_t*>(h + sl.seqs)[j] = static_cast<uint32_t>(f[kSSeq]);
    reinterpret_cast<uint32_t*>(h + sl.positions)[j] = static_cast<uint32_t>(f[kSPosition]);
    reinterpret_cast<uint32_t*>(h + sl.purposes)[j] = static_cast<uint32_t>(f[kSPurpose]);
  }
  check_cuda(r.info.Env(), cudaMemcpyAsync(s.sample_buf.get(), h, sl.settings_bytes, cudaMemcpyHostToDevice, s.stream),
             "cudaMemcpyAsync (sampling settings)");
}

// Several rows of one sequence in a step (a prefill chunk, a verify block) share their K/V reads
// through attention_prefill. src/model.ts lays a sequence's rows out consecutively; a row
// continues the previous row's sequence when it is the next position on the same pages. Sets
// s.prefill_tiles (0: every row takes decode attention) and uploads the tiles.
void plan_prefill_tiles(Napi::Env env, State& s, const int32_t* pin, int T) {
  const Config& c = s.c;
  s.prefill_tiles = 0;
  if (c.kv_f32 || !attention_prefill_supported(c.heads, c.kv_heads, c.head_dim)) return;
  const int MT = c.max_tokens;
  const int P = c.max_pages_per_seq;
  const int32_t* lens = pin + 3 * MT;
  const int32_t* tables = pin + 5 * MT;
  std::vector<int32_t> starts{0};
  for (int t = 1; t < T; ++t) {
    const int used = (lens[t - 1] + c.page_size - 1) / c.page_size;
    const bool same = lens[t] == lens[t - 1] + 1 &&
                      std::equal(tables + static_cast<size_t>(t - 1) * P, tables + static_cast<size_t>(t - 1) * P + used,
                                 tables + static_cast<size_t>(t) * P);
    if (!same) starts.push_back(t);
  }
  starts.push_back(T);
  const int seqs = static_cast<int>(starts.size()) - 1;
  if (seqs == T) return;
  std::vector<int32_t> tiles(4 * static_cast<size_t>(T));
  s.prefill_tiles = attention_prefill_make_tiles(starts.data(), seqs, attention_prefill_tile_rows(c.heads, c.kv_heads), tiles.data());
  // Pageable source: the call returns once the data is staged, so `tiles` may go.
  check_cuda(env, cudaMemcpyAsync(s.att_tiles, tiles.data(), sizeof(int32_t) * 2 * s.prefill_tiles, cudaMemcpyHostToDevice, s.stream),
             "cudaMemcpyAsync (attention tiles)");
}

// Fault injection for tests: MOEFLASH_FAULT_AFTER_STEPS=N (N >= 1) makes a model's Nth step or
// round launch a kernel that traps after its forward, so that the step fails with a real sticky
// CUDA error. Read once per process; unset or 0 it is off and costs one comparison a step.
void inject_fault(Napi::Env env, State& s) {
  static const int after = std::max(0, env_int("MOEFLASH_FAULT_AFTER_STEPS", 0));
  if (after == 0 || ++s.steps_run != after) return;
  check_cuda(env, launch_trap(s.stream), "fault injection (launch_trap)");
}

class Model : public Napi::ObjectWrap<Model> {
 public:
  static Napi::Function Class(Napi::Env env) {
    return DefineClass(env, "Model",
                       {InstanceMethod("upload", &Model::Upload), InstanceMethod("prepare", &Model::Prepare),
                        InstanceMethod("step", &Model::Step), InstanceMethod("timeGraphs", &Model::TimeGraphs),
                        InstanceMethod("dropGraphs", &Model::DropGraphs),
                        InstanceMethod("dispose", &Model::Dispose), InstanceMethod("info", &Model::Info),
                        InstanceMethod("attachDrafter", &Model::AttachDrafter),
                        InstanceMethod("uploadDrafter", &Model::UploadDrafter), InstanceMethod("round", &Model::Round)});
  }

  // new Model(config, layout: Float64Array [kGlobalFields + layers * kLayerFields])
  explicit Model(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Model>(info) {
    const ArgReader r{info, "Model"};
    Napi::Env env = info.Env();
    if (!info[0].IsObject()) r.fail("config must be an object");
    const Napi::Object o = info[0].As<Napi::Object>();
    auto num = [&](const char* k) {
      const Napi::Value v = o.Get(k);
      if (!v.IsNumber()) r.fail(std::string("config.") + k + " must be a number");
      return v.As<Napi::Number>().DoubleValue();
    };
    auto i = [&](const char* k) { return static_cast<int>(num(k)); };
    Config c{};
    c.hidden = i("hidden"), c.vocab = i("vocab"), c.layers = i("layers"), c.heads = i("heads");
    c.kv_heads = i("kvHeads"), c.head_dim = i("headDim"), c.rotary_dim = i("rotaryDim");
    c.attention_factor = num("attentionFactor"), c.eps = static_cast<float>(num("eps"));
    c.scale = static_cast<float>(num("scale")), c.top_k = i("topK"), c.num_experts = i("numExperts");
    c.rule = i("rule"), c.renormalize = i("renormalize"), c.activation = i("activation");
    c.limit = static_cast<float>(num("limit")), c.alpha = static_cast<float>(num("alpha"));
    c.max_tokens = i("maxTokens"), c.max_logit_rows = i("maxLogitRows"), c.page_size = i("pageSize");
    c.num_pages = i("numPages"), c.max_pages_per_seq = i("maxPagesPerSeq"), c.max_seq_len = i("maxSeqLen");
    c.max_inter = i("maxInter"), c.graph_tokens = i("graphTokens");
    c.fp8_inter = o.Has("fp8Inter") ? i("fp8Inter") : 0;
    c.kv_f32 = o.Has("kvF32") ? i("kvF32") : 0;
    c.expert_mma = o.Has("expertMma") ? i("expertMma") : 1;
    c.weights_bytes = static_cast<size_t>(num("weightsBytes"));
    const auto layout = info[1].As<Napi::Float64Array>();
    r.length(layout.ElementLength(), kGlobalFields + static_cast<size_t>(c.layers) * kLayerFields, "layout",
             "4 + layers * 26");
    auto s = std::make_unique<State>(env, c);
    s->embed = at_bf16(*s, layout[kEmbed]);
    s->lm_head = at_bf16(*s, layout[kLmHead]);
    s->final_norm = at_bf16(*s, layout[kFinalNorm]);
    s->inv_freq = reinterpret_cast<const float*>(at_bf16(*s, layout[kInvFreq]));
    for (int l = 0; l < c.layers; ++l) {
      const double* f = layout.Data() + kGlobalFields + static_cast<size_t>(l) * kLayerFields;
      LayerPtrs p{};
      p.in_norm = at_bf16(*s, f[kInNorm]), p.post_norm = at_bf16(*s, f[kPostNorm]);
      p.qkv_w = at_bf16(*s, f[kQkvW]), p.qkv_b = at_bf16(*s, f[kQkvB]);
      p.o_w = at_bf16(*s, f[kOW]), p.o_b = at_bf16(*s, f[kOB]);
      p.q_norm = at_bf16(*s, f[kQNorm]), p.k_norm = at_bf16(*s, f[kKNorm]);
      p.sinks = reinterpret_cast<const float*>(at_bf16(*s, f[kSinks]));
      p.router_w = at_bf16(*s, f[kRouterW]), p.router_b = at_bf16(*s, f[kRouterB]);
      p.gate_up = reinterpret_cast<const uint8_t*>(at_bf16(*s, f[kGateUp]));
      p.gate_up_scales = reinterpret_cast<const uint8_t*>(at_bf16(*s, f[kGateUpScales]));
      p.gate_up_bias = at_bf16(*s, f[kGateUpBias]);
      p.down = reinterpret_cast<const uint8_t*>(at_bf16(*s, f[kDown]));
      p.down_scales = reinterpret_cast<const uint8_t*>(at_bf16(*s, f[kDownScales]));
      p.down_bias = at_bf16(*s, f[kDownBias]);
      p.mlp_kind = static_cast<int>(f[kMlpKind]), p.experts = static_cast<int>(f[kExperts]);
      p.inter = static_cast<int>(f[kInter]), p.window = static_cast<int>(f[kWindow]);
      p.interleaved = f[kInterleaved] != 0;
      p.qkv_scales = reinterpret_cast<const float*>(at_bf16(*s, f[kQkvScales]));
      p.o_scales = reinterpret_cast<const float*>(at_bf16(*s, f[kOScales]));
      p.fp8_br = static_cast<int>(f[kFp8BlockRows]), p.fp8_bc = static_cast<int>(f[kFp8BlockCols]);
      s->layers.push_back(p);
    }
    state_ = std::move(s);
  }

 private:
  State& state(const ArgReader& r) {
    if (!state_) r.fail("the model was disposed");
    return *state_;
  }

  // upload(offset, bytes: Uint8Array): host -> weights buffer at a byte offset.
  Napi::Value Upload(const Napi::CallbackInfo& info) {
    const ArgReader r{info, "Model.upload"};
    State& s = state(r);
    const double off = r.number(0, "offset");
    const auto data = r.u8(1, "bytes");
    if (off < 0 || off + static_cast<double>(data.ByteLength()) > static_cast<double>(s.weights.bytes()))
      r.fail("offset + bytes is outside the weights buffer");
    check_cuda(info.Env(),
               cudaMemcpy(s.weights.get<uint8_t>() + static_cast<size_t>(off), data.Data(), data.ByteLength(),
                          cudaMemcpyHostToDevice),
               "cudaMemcpy (weights upload)");
    return info.Env().Undefined();
  }

  // prepare() -> number of MoE layers moved to the tensor-core path. Called once, after every
  // upload: rewrites each MXFP4 expert tensor whose shapes the path takes into its tile layout (in
  // place, through a scratch of one expert). Calling it again does nothing.
  Napi::Value Prepare(const Napi::CallbackInfo& info) {
    const ArgReader r{info, "Model.prepare"};
    Napi::Env env = info.Env();
    State& s = state(r);
    const Config& c = s.c;
    int moved = 0;
    if (s.prepared || !c.expert_mma) return Napi::Number::New(env, 0);
    size_t scratch_bytes = 0;
    for (const LayerPtrs& w : s.layers)
      if (w.mlp_kind == kMlpMxfp4Experts && moe_mma_supported(c.hidden, w.inter))
        scratch_bytes = std::max({scratch_bytes, moe_repack_scratch_bytes(2 * w.inter, c.hidden),
                                  moe_repack_scratch_bytes(c.hidden, w.inter)});
    if (scratch_bytes > 0) {
      DeviceBuffer scratch(env, scratch_bytes, "expert repack scratch");
      const bool interleaved = static_cast<ExpertActivation>(c.activation) == ExpertActivation::GptOssClamped;
      for (LayerPtrs& w : s.layers) {
        if (w.mlp_kind != kMlpMxfp4Experts || !moe_mma_supported(c.hidden, w.inter)) continue;
        check_cuda(env,
                   moe_repack_mxfp4(const_cast<uint8_t*>(w.gate_up), const_cast<uint8_t*>(w.gate_up_scales), w.experts,
                                    2 * w.inter, c.hidden, interleaved ? MoeRowMap::GateUpInterleaved : MoeRowMap::GateUpHalves,
                                    scratch.get(), s.stream),
                   "moe_repack_mxfp4 (gate/up)");
        check_cuda(env,
                   moe_repack_mxfp4(const_cast<uint8_t*>(w.down), const_cast<uint8_t*>(w.down_scales), w.experts, c.hidden,
                                    w.inter, MoeRowMap::Identity, scratch.get(), s.stream),
                   "moe_repack_mxfp4 (down)");
        w.mma = true;
        ++moved;
      }
      check_cuda(env, cudaStreamSynchronize(s.stream), "Model.prepare (cudaStreamSynchronize)");
    }
    s.prepared = true;
    return Napi::Number::New(env, moved);
  }

  // step(inputs: Int32Array, tokens, logitRows, maxLen, copyLogits, hiddenLayers: Int32Array | null,
  //      decode: boolean, sample: Float64Array | null, traceRouting?: boolean)
  //   -> { ids: Int32Array, logits: Float32Array | null, hidden: Float32Array | null,
  //        sampled: Int32Array | null, graph: boolean,
  //        routing?: { logits: Float32Array [layers, tokens, numExperts], experts: Int32Array [layers, tokens, topK] } }
  // inputs: [tokens | positions | slots | seqLens | logitRows] each maxTokens long, then maxTokens
  // block-table rows of maxPagesPerSeq. decode: every token is its own sequence's one new token and
  // every row's logits are wanted; such a step replays a CUDA graph. sample: [logitRows][9]
  // settings (SampleField order) to draw a token from each logits row with sample_rows
  // (temperature 0: argmax), returned as `sampled`.
  Napi::Value Step(const Napi::CallbackInfo& info) {
    const ArgReader r{info, "Model.step"};
    Napi::Env env = info.Env();
    State& s = state(r);
    const Config& c = s.c;
    const auto in = r.i32(0, "inputs");
    r.length(in.ElementLength(), c.input_ints(), "inputs", "5 * maxTokens + maxTokens * maxPagesPerSeq");
    const int T = r.integer(1, "tokens", 1, c.max_tokens);
    const int n_logit = r.integer(2, "logitRows", 0, std::min(T, c.max_logit_rows));
    const int max_len = r.integer(3, "maxLen", 1, c.max_seq_len);
    const bool copy_logits = r.boolean(4, "copyLogits");
    std::vector<int> hidden;
    if (!r.is_null(5)) {
      const auto h = r.i32(5, "hiddenLayers");
      for (size_t k = 0; k < h.ElementLength(); ++k) {
        if (h[k] < 0 || h[k] >= c.layers) r.fail("hiddenLayers holds a layer outside [0, layers)");
        hidden.push_back(h[k]);
      }
    }
    const bool trace = info.Length() > 8 && r.boolean(8, "traceRouting");
    // absorb: the step's rows also feed the attached drafter's cache (prefill chunks and plain
    // decodes of sequences that speculate).
    const bool absorb = info.Length() > 9 && r.boolean(9, "absorb");
    if (absorb && !s.drafter) r.fail("absorb needs a drafter (attachDrafter)");
    const bool decode = r.boolean(6, "decode") && hidden.empty() && n_logit == T && !trace;
    const bool sampling = !r.is_null(7) && n_logit > 0;
    Napi::Float64Array sample_in;
    if (sampling) {
      sample_in = r.typed<Napi::Float64Array>(7, "sample", napi_float64_array, "Float64Array");
      r.length(sample_in.ElementLength(), static_cast<size_t>(n_logit) * kSampleFields, "sample", "logitRows * 9");
    }

    int rows = T;
    const int MT = c.max_tokens;
    int32_t* pin = s.in_host.get<int32_t>();
    std::memcpy(pin, in.Data(), sizeof(int32_t) * 5 * MT);
    std::memcpy(pin + 5 * MT, in.Data() + 5 * MT, sizeof(int32_t) * static_cast<size_t>(T) * c.max_pages_per_seq);
    int bucket = 0;
    if (decode) {
      bucket = 1;
      while (bucket < T) bucket *= 2;
      if (bucket > c.graph_tokens || bucket > c.max_logit_rows) bucket = 0;
    }
    if (bucket > 0) {
      // Padding rows: token 0 at position 0, written to and read from the scratch page.
      for (int t = T; t < bucket; ++t) {
        pin[t] = 0, pin[MT + t] = 0, pin[2 * MT + t] = s.trash_page() * c.page_size, pin[3 * MT + t] = 1;
        pin[5 * MT + t * c.max_pages_per_seq] = s.trash_page();
      }
      for (int t = 0; t < bucket; ++t) pin[4 * MT + t] = t;
      rows = bucket;
    }
    check_slots(r, s, pin, rows, "a");
    cudaStream_t st = s.stream;
    s.sampling = sampling;
    if (sampling) stage_sampling(r, s, sample_in, n_logit);
    upload_inputs(env, s, s.in_tokens, pin, rows, "cudaMemcpyAsync (inputs)");
    // Several rows of one sequence in a step (a prefill chunk, a verify block) share their K/V
    // reads through attention_prefill. src/model.ts lays a sequence's rows out consecutively; a
    // row continues the previous row's sequence when it is the next position on the same pages.
    s.prefill_tiles = 0;
    if (bucket == 0 && !decode) plan_prefill_tiles(env, s, pin, T);

    Napi::Float32Array hidden_out;
    if (!hidden.empty()) hidden_out = Napi::Float32Array::New(env, hidden.size() * static_cast<size_t>(T) * c.hidden);
    Napi::Float32Array trace_logits;
    Napi::Int32Array trace_ids;
    if (trace) {
      // Dense layers keep NaN logits and -1 experts.
      const size_t n = static_cast<size_t>(c.layers) * T;
      trace_logits = Napi::Float32Array::New(env, n * std::max(c.num_experts, 1));
      trace_ids = Napi::Int32Array::New(env, n * c.slots());
      std::fill(trace_logits.Data(), trace_logits.Data() + trace_logits.ElementLength(), NAN);
      std::fill(trace_ids.Data(), trace_ids.Data() + trace_ids.ElementLength(), -1);
      s.trace_logits = trace_logits.Data();
      s.trace_ids = trace_ids.Data();
    }
    struct TraceReset {
      State& s;
      ~TraceReset() { s.trace_logits = nullptr, s.trace_ids = nullptr; }
    } trace_reset{s};
    auto run_eager = [&](int t, int nl, int ml) {
      s.capture_features = absorb;
      Status stt = forward(s, t, nl, ml, hidden, hidden.empty() ? nullptr : hidden_out.Data());
      s.capture_features = false;
      if (stt.ok() && absorb) stt = draft_absorb(s, t);
      if (!stt.ok()) check_cuda(env, stt.err, std::string("step: ") + stt.what);
    };
    if (bucket > 0) {
      const int graph_key = 4 * bucket + (absorb ? 2 : 0) + (sampling ? 1 : 0);
      replay_or_capture(env, s, s.graphs, graph_key, [&]() {
        s.capture_features = absorb;
        Status stt = forward(s, bucket, bucket, c.max_seq_len, {}, nullptr);
        s.capture_features = false;
        if (stt.ok() && absorb) stt = draft_absorb(s, bucket);
        return stt;
      }, "decode step");
    } else {
      run_eager(T, n_logit, max_len);
    }
    inject_fault(env, s);
    float* out_logits = s.out_host.get<float>();
    int32_t* out_ids = reinterpret_cast<int32_t*>(out_logits + static_cast<size_t>(c.max_logit_rows) * c.vocab);
    const int want = n_logit;
    if (want > 0) {
      check_cuda(env, cudaMemcpyAsync(out_ids, s.argmax_ids, sizeof(int32_t) * want, cudaMemcpyDeviceToHost, st), "cudaMemcpyAsync (ids)");
      if (copy_logits)
        check_cuda(env,
                   cudaMemcpyAsync(out_logits, s.logits, sizeof(float) * want * static_cast<size_t>(c.vocab),
                                   cudaMemcpyDeviceToHost, st),
                   "cudaMemcpyAsync (logits)");
    }
    Napi::Int32Array sampled;
    if (sampling) {
      sampled = Napi::Int32Array::New(env, want);
      const SampleLayout sl(c.max_logit_rows, c.vocab);
      check_cuda(env,
                 cudaMemcpyAsync(sampled.Data(), s.sample_buf.get<char>() + sl.ids, sizeof(int32_t) * want,
                                 cudaMemcpyDeviceToHost, st),
                 "cudaMemcpyAsync (sampled ids)");
    }
    check_cuda(env, cudaStreamSynchronize(st), "step (cudaStreamSynchronize)");
    Napi::Object o = Napi::Object::New(env);
    Napi::Int32Array ids = Napi::Int32Array::New(env, want);
    if (want > 0) std::memcpy(ids.Data(), out_ids, sizeof(int32_t) * want);
    o.Set("ids", ids);
    if (copy_logits && want > 0) {
      Napi::Float32Array lg = Napi::Float32Array::New(env, static_cast<size_t>(want) * c.vocab);
      std::memcpy(lg.Data(), out_logits, sizeof(float) * want * static_cast<size_t>(c.vocab));
      o.Set("logits", lg);
    } else {
      o.Set("logits", env.Null());
    }
    o.Set("hidden", hidden.empty() ? Napi::Value(env.Null()) : Napi::Value(hidden_out));
    o.Set("sampled", sampling ? Napi::Value(sampled) : Napi::Value(env.Null()));
    if (trace) {
      Napi::Object t = Napi::Object::New(env);
      t.Set("logits", trace_logits);
      t.Set("experts", trace_ids);
      o.Set("routing", t);
    }
    o.Set("graph", bucket > 0);
    return o;
  }

  // info() -> { weights, kvCache, activations, pinned, graphs }
  Napi::Value Info(const Napi::CallbackInfo& info) {
    const ArgReader r{info, "Model.info"};
    State& s = state(r);
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("weights", static_cast<double>(s.weights.bytes()));
    o.Set("kvCache", static_cast<double>(s.kv.bytes()));
    o.Set("activations", static_cast<double>(s.arena_bytes));
    o.Set("graphs", static_cast<double>(s.graphs.size()));
    o.Set("kvF32", s.c.kv_f32 != 0);
    o.Set("drafter", s.drafter ? static_cast<double>(s.drafter->weights.bytes() + s.drafter->kv.bytes() + s.drafter->arena.bytes()) : 0.0);
    o.Set("drafterKvCache", s.drafter ? static_cast<double>(s.drafter->kv.bytes()) : 0.0);
    return o;
  }

  // timeGraphs(bucket, sampling, iters) -> device milliseconds a replay of that decode step's
  // graph (CUDA events around `iters` back-to-back launches): the step without the host's part.
  // Replays rewrite the same KV slots with the same values, so the cache is left as it was.
  Napi::Value TimeGraphs(const Napi::CallbackInfo& info) {
    const ArgReader r{info, "Model.timeGraphs"};
    State& s = state(r);
    Napi::Env env = info.Env();
    const int bucket = info[0].As<Napi::Number>().Int32Value();
    const bool sampling = info[1].ToBoolean().Value();
    const int iters = std::max(1, info[2].As<Napi::Number>().Int32Value());
    auto g = s.graphs.find(4 * bucket + (sampling ? 1 : 0));
    if (g == s.graphs.end()) r.fail("no graph for this batch bucket yet: run a decode step of that size first");
    cudaEvent_t a = nullptr, b = nullptr;
    check_cuda(env, cudaEventCreate(&a), "cudaEventCreate");
    check_cuda(env, cudaEventCreate(&b), "cudaEventCreate");
    check_cuda(env, cudaGraphLaunch(g->second, s.stream), "cudaGraphLaunch (warm-up)");
    check_cuda(env, cudaEventRecord(a, s.stream), "cudaEventRecord");
    for (int i = 0; i < iters; ++i) check_cuda(env, cudaGraphLaunch(g->second, s.stream), "cudaGraphLaunch");
    check_cuda(env, cudaEventRecord(b, s.stream), "cudaEventRecord");
    check_cuda(env, cudaEventSynchronize(b), "cudaEventSynchronize");
    float ms = 0.f;
    cudaEventElapsedTime(&ms, a, b);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return Napi::Number::New(env, ms / iters);
  }

  // dropGraphs(): forgets the captured decode graphs; the next decode step of each size captures
  // again (after a change of the MOEFLASH_* launch settings, for measurements).
  Napi::Value DropGraphs(const Napi::CallbackInfo& info) {
    const ArgReader r{info, "Model.dropGraphs"};
    State& s = state(r);
    check_cuda(info.Env(), cudaStreamSynchronize(s.stream), "cudaStreamSynchronize");
    for (auto& g : s.graphs) cudaGraphExecDestroy(g.second);
    s.graphs.clear();
    for (auto& g : s.round_graphs) cudaGraphExecDestroy(g.second);
    s.round_graphs.clear();
    return info.Env().Undefined();
  }

  // attachDrafter(config, layout: Float64Array [4 + layers * 10]): reserves a DFlash drafter's
  // weights, KV cache (the model's pages, the drafter's layers and width) and arena. config:
  // { layers, heads, kvHeads, headDim, rotaryDim, attentionFactor, inter, eps, scale, maskToken,
  //   targetLayers: Int32Array, normLast: boolean, weightsBytes }. The hidden size is the model's.
  Napi::Value AttachDrafter(const Napi::CallbackInfo& info) {
    const ArgReader r{info, "Model.attachDrafter"};
    Napi::Env env = info.Env();
    State& s = state(r);
    if (s.drafter) r.fail("a drafter is already attached");
    if (!info[0].IsObject()) r.fail("config must be an object");
    const Napi::Object o = info[0].As<Napi::Object>();
    auto num = [&](const char* k) {
      const Napi::Value v = o.Get(k);
      if (!v.IsNumber()) r.fail(std::string("config.") + k + " must be a number");
      return v.As<Napi::Number>().DoubleValue();
    };
    DraftConfig d{};
    d.layers = static_cast<int>(num("layers")), d.heads = static_cast<int>(num("heads"));
    d.kv_heads = static_cast<int>(num("kvHeads")), d.head_dim = static_cast<int>(num("headDim"));
    d.rotary_dim = static_cast<int>(num("rotaryDim")), d.attention_factor = num("attentionFactor");
    d.inter = static_cast<int>(num("inter")), d.eps = static_cast<float>(num("eps")), d.scale = static_cast<float>(num("scale"));
    d.mask_token = static_cast<int>(num("maskToken"));
    d.weights_bytes = static_cast<size_t>(num("weightsBytes"));
    d.norm_last = o.Get("normLast").ToBoolean().Value();
    const Napi::Value ids = o.Get("targetLayers");
    if (!ids.IsTypedArray()) r.fail("config.targetLayers must be an Int32Array");
    const auto ia = ids.As<Napi::Int32Array>();
    for (size_t k = 0; k < ia.ElementLength(); ++k) {
      if (ia[k] < 0 || ia[k] >= s.c.layers) r.fail("config.targetLayers names a layer outside the model");
      d.target_ids.push_back(ia[k]);
    }
    if (d.layers < 1 || d.target_ids.empty() || d.kv_heads < 1 || d.heads % d.kv_heads != 0 || d.head_dim % 8 != 0 ||
        d.rotary_dim > d.head_dim || d.rotary_dim % 2 != 0 || d.inter < 1 || s.c.hidden % 8 != 0)
      r.fail("drafter shapes outside what the kernels take");
    const auto layout = info[1].As<Napi::Float64Array>();
    r.length(layout.ElementLength(), kDraftGlobals + static_cast<size_t>(d.layers) * kDraftLayerFields, "layout", "4 + layers * 10");
    const Config& c = s.c;
    auto dr = std::make_unique<Drafter>(env, d, c.max_tokens, c.hidden, c.max_pages_per_seq, c.max_seq_len,
                                        (static_cast<size_t>(c.num_pages) + 1) * c.page_size, c.kv_f32 != 0);
    auto at = [&](double off) -> const bf16_bits* {
      if (off < 0) return nullptr;
      if (off >= static_cast<double>(d.weights_bytes)) r.fail("a drafter layout offset is outside its weights");
      return reinterpret_cast<const bf16_bits*>(dr->weights.get<uint8_t>() + static_cast<size_t>(off));
    };
    dr->fc = at(layout[kDFc]), dr->hidden_norm = at(layout[kDHiddenNorm]), dr->norm = at(layout[kDNorm]);
    dr->inv_freq = reinterpret_cast<const float*>(at(layout[kDInvFreq]));
    for (int l = 0; l < d.layers; ++l) {
      const double* f = layout.Data() + kDraftGlobals + static_cast<size_t>(l) * kDraftLayerFields;
      LayerPtrs p{};
      p.in_norm = at(f[kDInNorm]), p.post_norm = at(f[kDPostNorm]), p.qkv_w = at(f[kDQkvW]), p.qkv_b = at(f[kDQkvB]);
      p.o_w = at(f[kDOW]), p.o_b = at(f[kDOB]), p.q_norm = at(f[kDQNorm]), p.k_norm = at(f[kDKNorm]);
      p.gate_up = reinterpret_cast<const uint8_t*>(at(f[kDGateUp]));
      p.down = reinterpret_cast<const uint8_t*>(at(f[kDDown]));
      p.mlp_kind = kMlpDense, p.inter = d.inter;
      dr->layers.push_back(p);
    }
    s.drafter = std::move(dr);
    return env.Undefined();
  }

  // uploadDrafter(offset, bytes: Uint8Array): host -> drafter weights at a byte offset.
  Napi::Value UploadDrafter(const Napi::CallbackInfo& info) {
    const ArgReader r{info, "Model.uploadDrafter"};
    State& s = state(r);
    if (!s.drafter) r.fail("no drafter attached");
    const double off = r.number(0, "offset");
    const auto data = r.u8(1, "bytes");
    if (off < 0 || off + static_cast<double>(data.ByteLength()) > static_cast<double>(s.drafter->weights.bytes()))
      r.fail("offset + bytes is outside the drafter's weights");
    check_cuda(info.Env(),
               cudaMemcpy(s.drafter->weights.get<uint8_t>() + static_cast<size_t>(off), data.Data(), data.ByteLength(),
                          cudaMemcpyHostToDevice),
               "cudaMemcpy (drafter weights upload)");
    return info.Env().Undefined();
  }

  // round(verifyInputs: Int32Array, tokens, logitRows, maxLen, draftInputs: Int32Array, draftTokens,
  //       draftLogitRows, draftMaxLen, spec: Int32Array [seqs][5], sample: Float64Array | null)
  //   -> { ids: Int32Array [logitRows], sampled: Int32Array | null, emitted: Int32Array [seqs][17],
  //        accepted: Int32Array [seqs] }
  // One DFlash round in one call: the drafter's block forward over draftInputs (per speculating
  // sequence its anchor and B masks; logit rows its masks), its argmax ids copied into the verify
  // rows after each anchor (unless spec's `forced` is set: the host put the drafts there), the
  // model's forward over verifyInputs (speculating sequences' [anchor, d_1..d_B] with every row's
  // logits, plain decodes beside them) leaving every row's context feature, the drafter absorbing
  // those rows, and greedy acceptance. spec per sequence: verify row of the anchor, its first
  // logit row, B, the first draft logit row, forced. Only ids come back.
  Napi::Value Round(const Napi::CallbackInfo& info) {
    const ArgReader r{info, "Model.round"};
    Napi::Env env = info.Env();
    State& s = state(r);
    if (!s.drafter) r.fail("no drafter attached");
    Drafter& dr = *s.drafter;
    const Config& c = s.c;
    const int MT = c.max_tokens;
    const size_t input_ints = c.input_ints();
    const auto vin = r.i32(0, "verifyInputs");
    r.length(vin.ElementLength(), input_ints, "verifyInputs", "5 * maxTokens + maxTokens * maxPagesPerSeq");
    const int T = r.integer(1, "tokens", 1, MT);
    const int n_logit = r.integer(2, "logitRows", 1, std::min(T, c.max_logit_rows));
    const int max_len = r.integer(3, "maxLen", 1, c.max_seq_len);
    const auto din = r.i32(4, "draftInputs");
    r.length(din.ElementLength(), input_ints, "draftInputs", "5 * maxTokens + maxTokens * maxPagesPerSeq");
    const int DT = r.integer(5, "draftTokens", 1, MT);
    const int dn_logit = r.integer(6, "draftLogitRows", 1, std::min(DT, c.max_logit_rows));
    const int dmax_len = r.integer(7, "draftMaxLen", 1, c.max_seq_len);
    const auto spec = r.i32(8, "spec");
    const int S = static_cast<int>(spec.ElementLength() / 5);
    if (S < 1 || spec.ElementLength() != static_cast<size_t>(S) * 5) r.fail("spec must hold 5 ints a speculating sequence");
    std::vector<int32_t> row0(S), logit0(S), block(S);
    for (int k = 0; k < S; ++k) {
      const int32_t* f = spec.Data() + 5 * k;
      row0[k] = f[0], logit0[k] = f[1], block[k] = f[2];
      if (f[2] < 1 || f[2] > kMaxDraftBlock || f[0] < 0 || f[0] + f[2] >= T || f[1] < 0 || f[1] + f[2] >= n_logit || f[3] < 0 ||
          f[3] + f[2] > dn_logit)
        r.fail("spec row " + std::to_string(k) + " is outside the round's rows");
    }
    const bool sampling = !r.is_null(9);
    Napi::Float64Array sample_in;
    if (sampling) {
      sample_in = r.typed<Napi::Float64Array>(9, "sample", napi_float64_array, "Float64Array");
      r.length(sample_in.ElementLength(), static_cast<size_t>(n_logit) * kSampleFields, "sample", "logitRows * 9");
    }
    int32_t* pin = s.in_host.get<int32_t>();
    std::memcpy(pin, vin.Data(), sizeof(int32_t) * input_ints);
    check_slots(r, s, pin, T, "a");
    check_slots(r, s, din.Data(), DT, "a draft");
    cudaStream_t st = s.stream;
    s.sampling = sampling;
    if (sampling) stage_sampling(r, s, sample_in, n_logit);
    upload_inputs(env, s, s.in_tokens, pin, T, "cudaMemcpyAsync (verify inputs)");
    upload_inputs(env, s, dr.in_tokens, din.Data(), DT, "cudaMemcpyAsync (draft inputs)");
    std::vector<int32_t> spec_dev(3 * static_cast<size_t>(S));
    std::copy(row0.begin(), row0.end(), spec_dev.begin());
    std::copy(logit0.begin(), logit0.end(), spec_dev.begin() + S);
    std::copy(block.begin(), block.end(), spec_dev.begin() + 2 * S);
    check_cuda(env, cudaMemcpyAsync(dr.spec, spec_dev.data(), sizeof(int32_t) * spec_dev.size(), cudaMemcpyHostToDevice, st),
               "cudaMemcpyAsync (round spec)");
    plan_prefill_tiles(env, s, pin, T);
    auto fail = [&](const Status& stt) {
      s.capture_features = false;
      check_cuda(env, stt.err, std::string("round: ") + stt.what);
    };
    (void)fail;
    // The round's launches; every input is already on the device. With max lengths at the
    // cache's size (as decode graphs) the same launches serve every round of this shape.
    auto body = [&](int ml, int dml) -> Status {
      Status stt = draft_forward(s, DT, dn_logit, dml);
      if (!stt.ok()) return stt;
      for (int k = 0; k < S; ++k) {
        if (spec.Data()[5 * k + 4] != 0) continue;
        MF_TRY(cudaMemcpyAsync(s.in_tokens + row0[k] + 1, s.argmax_ids + spec.Data()[5 * k + 3], sizeof(int32_t) * block[k],
                               cudaMemcpyDeviceToDevice, st),
               "cudaMemcpyAsync (drafts into the verify rows)");
      }
      s.capture_features = true;
      stt = forward(s, T, n_logit, ml, {}, nullptr);
      s.capture_features = false;
      if (!stt.ok()) return stt;
      stt = draft_absorb(s, T);
      if (!stt.ok()) return stt;
      DflashAcceptArgs aa{};
      aa.tokens = s.in_tokens, aa.target_ids = s.argmax_ids;
      aa.verify_row0 = dr.spec, aa.logit_row0 = dr.spec + S, aa.block = dr.spec + 2 * S;
      aa.seqs = S, aa.stride = kMaxDraftBlock + 1, aa.emitted = dr.emitted, aa.accepted = dr.accepted;
      MF_TRY(dflash_accept_greedy(aa, st), "dflash_accept_greedy");
      return {};
    };
    // S sequences all speculating with the same B and nothing else in the step (the layout is
    // then fixed by S and B): a graph per (S, B, whether the host forced the drafts: the graph then
    // copies none).
    bool single = !sampling && T == S * (block[0] + 1) && DT == T && env_int("MOEFLASH_ROUND_GRAPHS", 1) != 0;
    for (int k = 0; k < S && single; ++k)
      single = block[k] == block[0] && spec.Data()[5 * k + 4] == spec.Data()[4] && row0[k] == k * (block[0] + 1) &&
               logit0[k] == k * (block[0] + 1) && spec.Data()[5 * k + 3] == k * block[0];
    if (single) {
      const int key = (S * (kMaxDraftBlock + 1) + block[0]) * 2 + (spec.Data()[4] != 0 ? 1 : 0);
      replay_or_capture(env, s, s.round_graphs, key, [&]() { return body(c.max_seq_len, c.max_seq_len); }, "round");
    } else {
      const Status stt = body(max_len, dmax_len);
      if (!stt.ok()) fail(stt);
    }
    s.capture_features = false;
    inject_fault(env, s);
    Napi::Int32Array ids = Napi::Int32Array::New(env, n_logit);
    Napi::Int32Array emitted = Napi::Int32Array::New(env, static_cast<size_t>(S) * (kMaxDraftBlock + 1));
    Napi::Int32Array accepted = Napi::Int32Array::New(env, S);
    check_cuda(env, cudaMemcpyAsync(ids.Data(), s.argmax_ids, sizeof(int32_t) * n_logit, cudaMemcpyDeviceToHost, st), "cudaMemcpyAsync (ids)");
    check_cuda(env, cudaMemcpyAsync(emitted.Data(), dr.emitted, sizeof(int32_t) * emitted.ElementLength(), cudaMemcpyDeviceToHost, st),
               "cudaMemcpyAsync (emitted)");
    check_cuda(env, cudaMemcpyAsync(accepted.Data(), dr.accepted, sizeof(int32_t) * S, cudaMemcpyDeviceToHost, st),
               "cudaMemcpyAsync (accepted)");
    Napi::Int32Array sampled;
    if (sampling) {
      sampled = Napi::Int32Array::New(env, n_logit);
      const SampleLayout sl(c.max_logit_rows, c.vocab);
      check_cuda(env, cudaMemcpyAsync(sampled.Data(), s.sample_buf.get<char>() + sl.ids, sizeof(int32_t) * n_logit, cudaMemcpyDeviceToHost, st),
                 "cudaMemcpyAsync (sampled ids)");
    }
    check_cuda(env, cudaStreamSynchronize(st), "round (cudaStreamSynchronize)");
    Napi::Object out = Napi::Object::New(env);
    out.Set("ids", ids);
    out.Set("sampled", sampling ? Napi::Value(sampled) : Napi::Value(env.Null()));
    out.Set("emitted", emitted);
    out.Set("accepted", accepted);
    out.Set("graph", single);
    return out;
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    state_.reset();
    return info.Env().Undefined();
  }

  std::unique_ptr<State> state_;
};

// memInfo() -> { free, total } of the current device, in bytes.
Napi::Value MemInfo(const Napi::CallbackInfo& info) {
  size_t f = 0, t = 0;
  check_cuda(info.Env(), cudaMemGetInfo(&f, &t), "cudaMemGetInfo");
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("free", static_cast<double>(f));
  o.Set("total", static_cast<double>(t));
  return o;
}

}  // namespace

void InitModel(Napi::Env env, Napi::Object exports) {
  exports.Set("Model", Model::Class(env));
  exports.Set("memInfo", Napi::Function::New(env, MemInfo, "memInfo"));
}

}  // namespace moeflash
