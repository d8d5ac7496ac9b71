// Test-only entry points: each takes host typed arrays, copies them to fresh device buffers, runs
// one kernel family, waits for it, and copies the result back. This is how the kernels are
// checked against the TypeScript references; the engine never uses this path (weights and
// activations stay on the device there).
#include <cmath>
#include <cstring>
#include <vector>

#include "addon.h"
#include "kernels.h"

namespace moeflash {
namespace {

template <typename TA>
DeviceBuffer to_device(Napi::Env env, const TA& a, const char* what) {
  DeviceBuffer b(env, a.ByteLength(), what);
  if (a.ByteLength() > 0) b.upload(env, a.Data(), a.ByteLength(), what);
  return b;
}

template <typename TA>
DeviceBuffer to_device_opt(const ArgReader& r, size_t i, TA (ArgReader::*get)(size_t, const char*) const,
                           const char* name) {
  if (r.is_null(i)) return DeviceBuffer();
  return to_device(r.env(), (r.*get)(i, name), name);
}

// Waits for the kernel so that a fault is reported by this op, naming it.
void finish(Napi::Env env, cudaError_t launch, const char* kernel) {
  check_cuda(env, launch, std::string("launch of ") + kernel);
  check_cuda(env, cudaDeviceSynchronize(), std::string(kernel) + " (cudaDeviceSynchronize after the kernel)");
}

Napi::Float32Array f32_from(Napi::Env env, const DeviceBuffer& b, size_t n, const char* what) {
  Napi::Float32Array out = Napi::Float32Array::New(env, n);
  if (n > 0) b.download(env, out.Data(), n * sizeof(float), what);
  return out;
}
Napi::Int32Array i32_from(Napi::Env env, const DeviceBuffer& b, size_t n, const char* what) {
  Napi::Int32Array out = Napi::Int32Array::New(env, n);
  if (n > 0) b.download(env, out.Data(), n * sizeof(int32_t), what);
  return out;
}

// embedding(table: Uint16Array [vocab, hidden], hidden, ids: Int32Array) -> Float32Array [tokens, hidden]
Napi::Value Embedding(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "ops.embedding"};
  Napi::Env env = info.Env();
  const auto table = r.bf16(0, "table");
  const int hidden = r.integer(1, "hidden", 8, 1 << 20);
  if (hidden % 8 != 0) r.fail("hidden must be a multiple of 8");
  const auto ids = r.i32(2, "ids");
  if (table.ElementLength() % hidden != 0) r.fail("table length must be a multiple of hidden");
  const int64_t vocab = static_cast<int64_t>(table.ElementLength() / hidden);
  for (size_t i = 0; i < ids.ElementLength(); ++i)
    if (ids[i] < 0 || ids[i] >= vocab) r.fail("ids[" + std::to_string(i) + "] is outside [0, " + std::to_string(vocab) + ")");
  const int tokens = static_cast<int>(ids.ElementLength());
  DeviceBuffer d_table = to_device(env, table, "table");
  DeviceBuffer d_ids = to_device(env, ids, "ids");
  DeviceBuffer d_out(env, sizeof(float) * tokens * hidden, "out");
  finish(env, embedding_bf16(d_table.get<bf16_bits>(), d_ids.get<int32_t>(), tokens, hidden, d_out.get<float>(), nullptr),
         "embedding_bf16");
  return f32_from(env, d_out, static_cast<size_t>(tokens) * hidden, "out");
}

// rmsnorm(x, residual | null, weight: Uint16Array, eps, rows) -> { out, x }
Napi::Value RmsNorm(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "ops.rmsnorm"};
  Napi::Env env = info.Env();
  const auto x = r.f32(0, "x");
  const auto weight = r.bf16(2, "weight");
  const double eps = r.number(3, "eps");
  const int rows = r.integer(4, "rows", 1, 1 << 24);
  const int hidden = static_cast<int>(weight.ElementLength());
  if (hidden % 4 != 0) r.fail("hidden (weight length) must be a multiple of 4");
  r.length(x.ElementLength(), static_cast<size_t>(rows) * hidden, "x", "rows * hidden");
  DeviceBuffer d_x = to_device(env, x, "x");
  DeviceBuffer d_res;
  if (!r.is_null(1)) {
    const auto res = r.f32(1, "residual");
    r.length(res.ElementLength(), x.ElementLength(), "residual", "rows * hidden");
    d_res = to_device(env, res, "residual");
  }
  DeviceBuffer d_w = to_device(env, weight, "weight");
  DeviceBuffer d_out(env, x.ByteLength(), "out");
  finish(env,
         rmsnorm_residual(d_x.get<float>(), d_res.get<float>(), d_w.get<bf16_bits>(), static_cast<float>(eps), rows,
                          hidden, d_out.get<float>(), nullptr),
         "rmsnorm_residual");
  Napi::Object o = Napi::Object::New(env);
  o.Set("out", f32_from(env, d_out, x.ElementLength(), "out"));
  o.Set("x", f32_from(env, d_x, x.ElementLength(), "x"));
  return o;
}

// rope(q, k | null, positions: Int32Array, invFreq, attentionFactor, numHeads, numKvHeads, headDim,
//      rotaryDim) -> { q, k }
Napi::Value Rope(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "ops.rope"};
  Napi::Env env = info.Env();
  const auto q = r.f32(0, "q");
  const auto positions = r.i32(2, "positions");
  const auto inv_freq = r.f32(3, "invFreq");
  const double factor = r.number(4, "attentionFactor");
  const int num_heads = r.integer(5, "numHeads", 1, 4096);
  const int num_kv_heads = r.integer(6, "numKvHeads", 1, 4096);
  const int head_dim = r.integer(7, "headDim", 2, 1024);
  const int rotary_dim = r.integer(8, "rotaryDim", 2, head_dim);
  if (rotary_dim % 2 != 0) r.fail("rotaryDim must be even");
  const int tokens = static_cast<int>(positions.ElementLength());
  r.length(q.ElementLength(), static_cast<size_t>(tokens) * num_heads * head_dim, "q", "tokens * numHeads * headDim");
  r.length(inv_freq.ElementLength(), rotary_dim / 2, "invFreq", "rotaryDim / 2");
  DeviceBuffer d_q = to_device(env, q, "q");
  DeviceBuffer d_k;
  size_t k_len = 0;
  if (!r.is_null(1)) {
    const auto k = r.f32(1, "k");
    k_len = k.ElementLength();
    r.length(k_len, static_cast<size_t>(tokens) * num_kv_heads * head_dim, "k", "tokens * numKvHeads * headDim");
    d_k = to_device(env, k, "k");
  }
  DeviceBuffer d_pos = to_device(env, positions, "positions");
  DeviceBuffer d_freq = to_device(env, inv_freq, "invFreq");
  finish(env,
         rope_rotate_half(d_q.get<float>(), d_k.get<float>(), d_pos.get<int32_t>(), d_freq.get<float>(), factor, tokens,
                          num_heads, num_kv_heads, head_dim, rotary_dim, nullptr),
         "rope_rotate_half");
  Napi::Object o = Napi::Object::New(env);
  o.Set("q", f32_from(env, d_q, q.ElementLength(), "q"));
  o.Set("k", k_len > 0 ? f32_from(env, d_k, k_len, "k") : Napi::Value(env.Null()));
  return o;
}

// gemvBf16(w: Uint16Array [rows, cols], bias | null, x: Float32Array [tokens, cols], rows, cols, tokens)
//   -> Float32Array [tokens, rows]
Napi::Value GemvBf16(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "ops.gemvBf16"};
  Napi::Env env = info.Env();
  const auto w = r.bf16(0, "w");
  const auto x = r.f32(2, "x");
  const int rows = r.integer(3, "rows", 1, 1 << 30);
  const int cols = r.integer(4, "cols", 8, 1 << 20);
  const int tokens = r.integer(5, "tokens", 1, 1 << 16);
  if (cols % 8 != 0) r.fail("cols must be a multiple of 8");
  r.length(w.ElementLength(), static_cast<size_t>(rows) * cols, "w", "rows * cols");
  r.length(x.ElementLength(), static_cast<size_t>(tokens) * cols, "x", "tokens * cols");
  DeviceBuffer d_bias;
  if (!r.is_null(1)) {
    const auto b = r.bf16(1, "bias");
    r.length(b.ElementLength(), rows, "bias", "rows");
    d_bias = to_device(env, b, "bias");
  }
  DeviceBuffer d_w = to_device(env, w, "w");
  DeviceBuffer d_x = to_device(env, x, "x");
  DeviceBuffer d_y(env, sizeof(float) * rows * static_cast<size_t>(tokens), "y");
  finish(env, gemv_bf16(d_w.get<bf16_bits>(), d_bias.get<bf16_bits>(), d_x.get<float>(), d_y.get<float>(), rows, cols, tokens, nullptr),
         "gemv_bf16");
  return f32_from(env, d_y, static_cast<size_t>(rows) * tokens, "y");
}

// gemvFp8(w: Uint8Array [rows, cols] E4M3, scales: Float32Array [ceil(rows / blockRows),
//         ceil(cols / blockCols)], blockRows, blockCols, bias: Uint16Array | null,
//         x: Float32Array [tokens, cols], rows, cols, tokens, yStride | null)
//   -> Float32Array [tokens, yStride] (yStride defaults to rows; columns past rows stay zero)
Napi::Value GemvFp8(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "ops.gemvFp8"};
  Napi::Env env = info.Env();
  const auto w = r.u8(0, "w");
  const auto scales = r.f32(1, "scales");
  const int block_rows = r.integer(2, "blockRows", 1, 1 << 20);
  const int block_cols = r.integer(3, "blockCols", 16, 1 << 20);
  const auto x = r.f32(5, "x");
  const int rows = r.integer(6, "rows", 1, 1 << 30);
  const int cols = r.integer(7, "cols", 16, 1 << 20);
  const int tokens = r.integer(8, "tokens", 1, 1 << 16);
  const int y_stride = r.is_null(9) ? rows : r.integer(9, "yStride", rows, 1 << 30);
  if (cols % 16 != 0) r.fail("cols must be a multiple of 16");
  if (block_cols % 16 != 0) r.fail("blockCols must be a multiple of 16");
  r.length(w.ElementLength(), static_cast<size_t>(rows) * cols, "w", "rows * cols");
  const size_t scale_rows = (static_cast<size_t>(rows) + block_rows - 1) / block_rows;
  const size_t scale_cols = (static_cast<size_t>(cols) + block_cols - 1) / block_cols;
  r.length(scales.ElementLength(), scale_rows * scale_cols, "scales", "ceil(rows / blockRows) * ceil(cols / blockCols)");
  r.length(x.ElementLength(), static_cast<size_t>(tokens) * cols, "x", "tokens * cols");
  DeviceBuffer d_bias;
  if (!r.is_null(4)) {
    const auto b = r.bf16(4, "bias");
    r.length(b.ElementLength(), rows, "bias", "rows");
    d_bias = to_device(env, b, "bias");
  }
  DeviceBuffer d_w = to_device(env, w, "w");
  DeviceBuffer d_s = to_device(env, scales, "scales");
  DeviceBuffer d_x = to_device(env, x, "x");
  const size_t y_len = static_cast<size_t>(y_stride) * tokens;
  DeviceBuffer d_y(env, sizeof(float) * y_len, "y");
  check_cuda(env, cudaMemset(d_y.get(), 0, sizeof(float) * y_len), "cudaMemset (y)");
  finish(env,
         gemv_fp8_strided(d_w.get<uint8_t>(), d_s.get<float>(), block_rows, block_cols, d_bias.get<bf16_bits>(),
                          d_x.get<float>(), d_y.get<float>(), y_stride, rows, cols, tokens, nullptr),
         "gemv_fp8");
  return f32_from(env, d_y, y_len, "y");
}

struct MoeArgs {
  MoeDims d;
  DeviceBuffer blocks, scales, bias, ids;
};

// Shared by the two expert ops: (blocks, scales, bias | null, <vector>, ids, tokens, topK,
// numExperts, hidden, inter) with `rows`/`cols` of the projection.
MoeArgs read_moe(const ArgReader& r, size_t first_dim_arg, bool gate_up) {
  Napi::Env env = r.env();
  MoeArgs m;
  m.d.tokens = r.integer(first_dim_arg, "tokens", 1, 8);
  m.d.top_k = r.integer(first_dim_arg + 1, "topK", 1, 8);
  m.d.num_experts = r.integer(first_dim_arg + 2, "numExperts", 1, 1 << 16);
  m.d.hidden = r.integer(first_dim_arg + 3, "hidden", 32, 1 << 20);
  m.d.inter = r.integer(first_dim_arg + 4, "inter", 32, 1 << 20);
  if (m.d.hidden % 32 != 0 || m.d.inter % 32 != 0) r.fail("hidden and inter must be multiples of 32");
  const size_t rows = gate_up ? 2 * static_cast<size_t>(m.d.inter) : m.d.hidden;
  const size_t cols = gate_up ? m.d.hidden : m.d.inter;
  const size_t E = m.d.num_experts;
  const auto blocks = r.u8(0, "blocks");
  const auto scales = r.u8(1, "scales");
  r.length(blocks.ElementLength(), E * rows * (cols / 32) * 16, "blocks", "experts * rows * cols/32 * 16");
  r.length(scales.ElementLength(), E * rows * (cols / 32), "scales", "experts * rows * cols/32");
  if (!r.is_null(2)) {
    const auto b = r.bf16(2, "bias");
    r.length(b.ElementLength(), E * rows, "bias", "experts * rows");
    m.bias = to_device(env, b, "bias");
  }
  const auto ids = r.i32(4, "expertIds");
  r.length(ids.ElementLength(), static_cast<size_t>(m.d.tokens) * m.d.top_k, "expertIds", "tokens * topK");
  for (int t = 0; t < m.d.tokens; ++t)
    for (int k = 0; k < m.d.top_k; ++k) {
      const int e = ids[t * m.d.top_k + k];
      if (e < 0 || e >= m.d.num_experts) r.fail("expertIds holds " + std::to_string(e) + ", outside [0, numExperts)");
      for (int j = 0; j < k; ++j)
        if (ids[t * m.d.top_k + j] == e) r.fail("token " + std::to_string(t) + " lists expert " + std::to_string(e) + " twice");
    }
  m.blocks = to_device(env, blocks, "blocks");
  m.scales = to_device(env, scales, "scales");
  m.ids = to_device(env, ids, "expertIds");
  return m;
}

// moeGateUp(blocks, scales, bias | null, x [tokens, hidden], expertIds [tokens, topK], tokens, topK,
//           numExperts, hidden, inter, activation (0 swiglu, 1 gpt-oss clamped), limit, alpha)
//   -> Float32Array [tokens, topK, inter] (natural layout; the device layout is blocked)
Napi::Value MoeGateUp(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "ops.moeGateUp"};
  Napi::Env env = info.Env();
  MoeArgs m = read_moe(r, 5, true);
  const int act = r.integer(10, "activation", 0, 1);
  const double limit = r.number(11, "limit");
  const double alpha = r.number(12, "alpha");
  const auto x = r.f32(3, "x");
  r.length(x.ElementLength(), static_cast<size_t>(m.d.tokens) * m.d.hidden, "x", "tokens * hidden");
  DeviceBuffer d_x = to_device(env, x, "x");
  const size_t n = static_cast<size_t>(m.d.tokens) * m.d.top_k * m.d.inter;
  DeviceBuffer d_act(env, n * sizeof(float), "act");
  const Mxfp4Experts w{m.blocks.get<uint8_t>(), m.scales.get<uint8_t>(), m.bias.get<bf16_bits>()};
  finish(env,
         moe_gate_up_mxfp4(w, d_x.get<float>(), m.ids.get<int32_t>(), m.d, static_cast<ExpertActivation>(act),
                           static_cast<float>(limit), static_cast<float>(alpha), d_act.get<float>(), nullptr),
         "moe_gate_up_mxfp4");
  std::vector<float> blocked(n);
  d_act.download(env, blocked.data(), n * sizeof(float), "act");
  Napi::Float32Array out = Napi::Float32Array::New(env, n);
  for (size_t v = 0; v < n / m.d.inter; ++v)
    for (int i = 0; i < m.d.inter; ++i) out[v * m.d.inter + i] = blocked[v * m.d.inter + moe_act_blocked_index(i, m.d.inter)];
  return out;
}

// moeDown(blocks, scales, bias | null, act [tokens, topK, inter] (natural layout), expertIds,
//         tokens, topK, numExperts, hidden, inter, expertWeights [tokens, topK])
//   -> Float32Array [tokens, hidden]
Napi::Value MoeDown(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "ops.moeDown"};
  Napi::Env env = info.Env();
  MoeArgs m = read_moe(r, 5, false);
  const auto act = r.f32(3, "act");
  const size_t n = static_cast<size_t>(m.d.tokens) * m.d.top_k * m.d.inter;
  r.length(act.ElementLength(), n, "act", "tokens * topK * inter");
  const auto weights = r.f32(10, "expertWeights");
  r.length(weights.ElementLength(), static_cast<size_t>(m.d.tokens) * m.d.top_k, "expertWeights", "tokens * topK");
  std::vector<float> blocked(n);
  for (size_t v = 0; v < n / m.d.inter; ++v)
    for (int i = 0; i < m.d.inter; ++i) blocked[v * m.d.inter + moe_act_blocked_index(i, m.d.inter)] = act[v * m.d.inter + i];
  DeviceBuffer d_act(env, n * sizeof(float), "act");
  d_act.upload(env, blocked.data(), n * sizeof(float), "act");
  DeviceBuffer d_w = to_device(env, weights, "expertWeights");
  DeviceBuffer d_y(env, sizeof(float) * m.d.tokens * m.d.hidden, "y");
  const Mxfp4Experts w{m.blocks.get<uint8_t>(), m.scales.get<uint8_t>(), m.bias.get<bf16_bits>()};
  finish(env, moe_down_mxfp4(w, d_act.get<float>(), m.ids.get<int32_t>(), d_w.get<float>(), m.d, d_y.get<float>(), nullptr),
         "moe_down_mxfp4");
  return f32_from(env, d_y, static_cast<size_t>(m.d.tokens) * m.d.hidden, "y");
}

// router(w: Uint16Array [E, hidden], bias | null, x [tokens, hidden], tokens, numExperts, hidden, topK,
//        rule (0 topk_then_softmax, 1 softmax_then_topk), renormalize) -> { logits, ids, weights }
Napi::Value Router(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "ops.router"};
  Napi::Env env = info.Env();
  const auto w = r.bf16(0, "w");
  const auto x = r.f32(2, "x");
  const int tokens = r.integer(3, "tokens", 1, 1 << 16);
  const int experts = r.integer(4, "numExperts", 1, 1024);
  const int hidden = r.integer(5, "hidden", 8, 1 << 20);
  const int top_k = r.integer(6, "topK", 1, std::min(32, experts));
  const int rule = r.integer(7, "rule", 0, 1);
  const bool renorm = r.boolean(8, "renormalize");
  if (hidden % 8 != 0) r.fail("hidden must be a multiple of 8");
  r.length(w.ElementLength(), static_cast<size_t>(experts) * hidden, "w", "numExperts * hidden");
  r.length(x.ElementLength(), static_cast<size_t>(tokens) * hidden, "x", "tokens * hidden");
  DeviceBuffer d_bias;
  if (!r.is_null(1)) {
    const auto b = r.bf16(1, "bias");
    r.length(b.ElementLength(), experts, "bias", "numExperts");
    d_bias = to_device(env, b, "bias");
  }
  DeviceBuffer d_w = to_device(env, w, "w");
  DeviceBuffer d_x = to_device(env, x, "x");
  DeviceBuffer d_logits(env, sizeof(float) * tokens * experts, "logits");
  DeviceBuffer d_ids(env, sizeof(int32_t) * tokens * top_k, "ids");
  DeviceBuffer d_wt(env, sizeof(float) * tokens * top_k, "weights");
  check_cuda(env, gemv_bf16(d_w.get<bf16_bits>(), d_bias.get<bf16_bits>(), d_x.get<float>(), d_logits.get<float>(), experts, hidden, tokens, nullptr),
             "launch of gemv_bf16 (router logits)");
  finish(env,
         router_topk(d_logits.get<float>(), tokens, experts, top_k, static_cast<RoutingRule>(rule), renorm,
                     d_ids.get<int32_t>(), d_wt.get<float>(), nullptr),
         "router_topk");
  Napi::Object o = Napi::Object::New(env);
  o.Set("logits", f32_from(env, d_logits, static_cast<size_t>(tokens) * experts, "logits"));
  o.Set("ids", i32_from(env, d_ids, static_cast<size_t>(tokens) * top_k, "ids"));
  o.Set("weights", f32_from(env, d_wt, static_cast<size_t>(tokens) * top_k, "weights"));
  return o;
}

// routerTopk(logits [tokens, E], tokens, numExperts, topK, rule, renormalize) -> { ids, weights }
Napi::Value RouterTopk(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "ops.routerTopk"};
  Napi::Env env = info.Env();
  const auto logits = r.f32(0, "logits");
  const int tokens = r.integer(1, "tokens", 1, 1 << 20);
  const int experts = r.integer(2, "numExperts", 1, 1024);
  const int top_k = r.integer(3, "topK", 1, std::min(32, experts));
  const int rule = r.integer(4, "rule", 0, 1);
  const bool renorm = r.boolean(5, "renormalize");
  r.length(logits.ElementLength(), static_cast<size_t>(tokens) * experts, "logits", "tokens * numExperts");
  DeviceBuffer d_logits = to_device(env, logits, "logits");
  DeviceBuffer d_ids(env, sizeof(int32_t) * tokens * top_k, "ids");
  DeviceBuffer d_wt(env, sizeof(float) * tokens * top_k, "weights");
  finish(env,
         router_topk(d_logits.get<float>(), tokens, experts, top_k, static_cast<RoutingRule>(rule), renorm,
                     d_ids.get<int32_t>(), d_wt.get<float>(), nullptr),
         "router_topk");
  Napi::Object o = Napi::Object::New(env);
  o.Set("ids", i32_from(env, d_ids, static_cast<size_t>(tokens) * top_k, "ids"));
  o.Set("weights", f32_from(env, d_wt, static_cast<size_t>(tokens) * top_k, "weights"));
  return o;
}

// attentionDecode(q, kCache: Uint16Array, vCache, blockTable: Int32Array, seqLens: Int32Array,
//                 sinks | null, numHeads, numKvHeads, headDim, pageSize, window, scale)
//   -> Float32Array [numSeqs, numHeads, headDim]
Napi::Value AttentionDecode(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "ops.attentionDecode"};
  Napi::Env env = info.Env();
  const auto q = r.f32(0, "q");
  const auto kc = r.bf16(1, "kCache");
  const auto vc = r.bf16(2, "vCache");
  const auto table = r.i32(3, "blockTable");
  const auto lens = r.i32(4, "seqLens");
  AttentionDecodeArgs a{};
  a.num_heads = r.integer(6, "numHeads", 1, 4096);
  a.num_kv_heads = r.integer(7, "numKvHeads", 1, a.num_heads);
  a.head_dim = r.integer(8, "headDim", 8, 128);
  a.page_size = r.integer(9, "pageSize", 1, 1 << 20);
  a.window = r.integer(10, "window", 0, 1 << 30);
  a.scale = static_cast<float>(r.number(11, "scale"));
  if (a.head_dim % 8 != 0) r.fail("headDim must be a multiple of 8");
  if (a.num_heads % a.num_kv_heads != 0 || a.num_heads / a.num_kv_heads > 16)
    r.fail("numHeads must be a multiple of numKvHeads, at most 16 times it");
  a.num_seqs = static_cast<int>(lens.ElementLength());
  if (a.num_seqs == 0) r.fail("seqLens is empty");
  r.length(q.ElementLength(), static_cast<size_t>(a.num_seqs) * a.num_heads * a.head_dim, "q", "numSeqs * numHeads * headDim");
  const size_t row = static_cast<size_t>(a.num_kv_heads) * a.head_dim;
  if (kc.ElementLength() % (row * a.page_size) != 0) r.fail("kCache length must be a multiple of pageSize * numKvHeads * headDim");
  r.length(vc.ElementLength(), kc.ElementLength(), "vCache", "the length of kCache");
  const int pages = static_cast<int>(kc.ElementLength() / (row * a.page_size));
  if (table.ElementLength() % a.num_seqs != 0) r.fail("blockTable length must be a multiple of numSeqs");
  a.max_pages_per_seq = static_cast<int>(table.ElementLength() / a.num_seqs);
  int max_len = 1;
  for (int s = 0; s < a.num_seqs; ++s) {
    const int len = lens[s];
    if (len < 1 || len > a.max_pages_per_seq * a.page_size)
      r.fail("seqLens[" + std::to_string(s) + "] = " + std::to_string(len) + " is outside [1, maxPagesPerSeq * pageSize]");
    for (int p = 0; p < (len + a.page_size - 1) / a.page_size; ++p) {
      const int page = table[s * a.max_pages_per_seq + p];
      if (page < 0 || page >= pages) r.fail("blockTable holds page " + std::to_string(page) + ", outside the cache");
    }
    max_len = std::max(max_len, len);
  }
  a.max_seq_len = max_len;
  DeviceBuffer d_sinks;
  if (!r.is_null(5)) {
    const auto sinks = r.f32(5, "sinks");
    r.length(sinks.ElementLength(), a.num_heads, "sinks", "numHeads");
    d_sinks = to_device(env, sinks, "sinks");
  }
  DeviceBuffer d_q = to_device(env, q, "q");
  DeviceBuffer d_k = to_device(env, kc, "kCache");
  DeviceBuffer d_v = to_device(env, vc, "vCache");
  DeviceBuffer d_table = to_device(env, table, "blockTable");
  DeviceBuffer d_lens = to_device(env, lens, "seqLens");
  DeviceBuffer d_out(env, q.ByteLength(), "out");
  DeviceBuffer d_ws(env, attention_decode_workspace_bytes(a.num_seqs, a.num_heads, a.head_dim, a.max_seq_len), "workspace");
  a.q = d_q.get<float>();
  a.k_cache = d_k.get<bf16_bits>();
  a.v_cache = d_v.get<bf16_bits>();
  a.block_table = d_table.get<int32_t>();
  a.seq_lens = d_lens.get<int32_t>();
  a.sinks = d_sinks.get<float>();
  a.out = d_out.get<float>();
  a.workspace = d_ws.get();
  finish(env, attention_decode(a, nullptr), "attention_decode");
  return f32_from(env, d_out, q.ElementLength(), "out");
}

// attentionPrefill(q, kCache: Uint16Array, vCache, blockTable: Int32Array [rows, maxPagesPerSeq],
//                  seqLens: Int32Array [rows], seqStarts: Int32Array [numSeqs + 1], sinks | null,
//                  numHeads, numKvHeads, headDim, pageSize, window, scale)
//   -> Float32Array [rows, numHeads, headDim]
// Sequence s owns rows [seqStarts[s], seqStarts[s + 1]); they are cut into tiles here.
Napi::Value AttentionPrefill(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "ops.attentionPrefill"};
  Napi::Env env = info.Env();
  const auto q = r.f32(0, "q");
  const auto kc = r.bf16(1, "kCache");
  const auto vc = r.bf16(2, "vCache");
  const auto table = r.i32(3, "blockTable");
  const auto lens = r.i32(4, "seqLens");
  const auto starts = r.i32(5, "seqStarts");
  AttentionPrefillArgs a{};
  a.num_heads = r.integer(7, "numHeads", 1, 4096);
  a.num_kv_heads = r.integer(8, "numKvHeads", 1, a.num_heads);
  a.head_dim = r.integer(9, "headDim", 8, 128);
  a.page_size = r.integer(10, "pageSize", 1, 1 << 20);
  a.window = r.integer(11, "window", 0, 1 << 30);
  a.scale = static_cast<float>(r.number(12, "scale"));
  if (!attention_prefill_supported(a.num_heads, a.num_kv_heads, a.head_dim))
    r.fail("headDim must be a multiple of 8 and numHeads a multiple of numKvHeads");
  const int rows = static_cast<int>(lens.ElementLength());
  if (rows == 0) r.fail("seqLens is empty");
  r.length(q.ElementLength(), static_cast<size_t>(rows) * a.num_heads * a.head_dim, "q", "rows * numHeads * headDim");
  const size_t row = static_cast<size_t>(a.num_kv_heads) * a.head_dim;
  if (kc.ElementLength() % (row * a.page_size) != 0) r.fail("kCache length must be a multiple of pageSize * numKvHeads * headDim");
  r.length(vc.ElementLength(), kc.ElementLength(), "vCache", "the length of kCache");
  const int pages = static_cast<int>(kc.ElementLength() / (row * a.page_size));
  if (table.ElementLength() % rows != 0) r.fail("blockTable length must be a multiple of rows");
  a.max_pages_per_seq = static_cast<int>(table.ElementLength() / rows);
  const int num_seqs = static_cast<int>(starts.ElementLength()) - 1;
  if (num_seqs < 1 || starts[0] != 0 || starts[num_seqs] != rows) r.fail("seqStarts must run from 0 to rows");
  for (int s = 0; s < num_seqs; ++s) {
    if (starts[s + 1] < starts[s]) r.fail("seqStarts must not decrease");
    // The kernel reads a tile's pages from the block table of its longest row.
    int longest = starts[s];
    for (int t = starts[s]; t < starts[s + 1]; ++t) {
      const int len = lens[t];
      if (len < 1 || len > a.max_pages_per_seq * a.page_size)
        r.fail("seqLens[" + std::to_string(t) + "] = " + std::to_string(len) + " is outside [1, maxPagesPerSeq * pageSize]");
      for (int p = 0; p < (len + a.page_size - 1) / a.page_size; ++p) {
        const int page = table[static_cast<size_t>(t) * a.max_pages_per_seq + p];
        if (page < 0 || page >= pages) r.fail("blockTable holds page " + std::to_string(page) + ", outside the cache");
      }
      if (len > lens[longest]) longest = t;
    }
    for (int t = starts[s]; t < starts[s + 1]; ++t)
      for (int p = 0; p < (lens[t] + a.page_size - 1) / a.page_size; ++p)
        if (table[static_cast<size_t>(t) * a.max_pages_per_seq + p] != table[static_cast<size_t>(longest) * a.max_pages_per_seq + p])
          r.fail("the rows of a sequence must share their block-table pages (row " + std::to_string(t) + ")");
  }
  const int tile_rows = attention_prefill_tile_rows(a.num_heads, a.num_kv_heads);
  std::vector<int32_t> tiles(2 * static_cast<size_t>(num_seqs + rows / tile_rows));
  a.num_tiles = attention_prefill_make_tiles(starts.Data(), num_seqs, tile_rows, tiles.data());
  DeviceBuffer d_sinks;
  if (!r.is_null(6)) {
    const auto sinks = r.f32(6, "sinks");
    r.length(sinks.ElementLength(), a.num_heads, "sinks", "numHeads");
    d_sinks = to_device(env, sinks, "sinks");
  }
  DeviceBuffer d_q = to_device(env, q, "q");
  DeviceBuffer d_k = to_device(env, kc, "kCache");
  DeviceBuffer d_v = to_device(env, vc, "vCache");
  DeviceBuffer d_table = to_device(env, table, "blockTable");
  DeviceBuffer d_lens = to_device(env, lens, "seqLens");
  DeviceBuffer d_tiles(env, sizeof(int32_t) * 2 * a.num_tiles, "tiles");
  d_tiles.upload(env, tiles.data(), sizeof(int32_t) * 2 * a.num_tiles, "tiles");
  DeviceBuffer d_out(env, q.ByteLength(), "out");
  // Rows that no tile covers would come back as this NaN pattern instead of stale memory.
  check_cuda(env, cudaMemset(d_out.get(), 0xff, q.ByteLength()), "cudaMemset (out)");
  a.q = d_q.get<float>();
  a.k_cache = d_k.get<bf16_bits>();
  a.v_cache = d_v.get<bf16_bits>();
  a.block_table = d_table.get<int32_t>();
  a.seq_lens = d_lens.get<int32_t>();
  a.tiles = d_tiles.get<int32_t>();
  a.sinks = d_sinks.get<float>();
  a.out = d_out.get<float>();
  finish(env, attention_prefill(a, nullptr), "attention_prefill");
  return f32_from(env, d_out, q.ElementLength(), "out");
}

// argmax(logits [rows, vocab], rows, vocab) -> Int32Array [rows]
Napi::Value Argmax(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "ops.argmax"};
  Napi::Env env = info.Env();
  const auto logits = r.f32(0, "logits");
  const int rows = r.integer(1, "rows", 1, 1 << 20);
  const int vocab = r.integer(2, "vocab", 1, 1 << 30);
  r.length(logits.ElementLength(), static_cast<size_t>(rows) * vocab, "logits", "rows * vocab");
  DeviceBuffer d_l = to_device(env, logits, "logits");
  DeviceBuffer d_out(env, sizeof(int32_t) * rows, "out");
  DeviceBuffer d_ws(env, argmax_workspace_bytes(rows, vocab), "workspace");
  finish(env, argmax_rows(d_l.get<float>(), rows, vocab, d_out.get<int32_t>(), d_ws.get(), nullptr), "argmax_rows");
  return i32_from(env, d_out, rows, "out");
}

// sample(logits [rows, vocab], rows, vocab, temperature: Float64Array, topK: Int32Array | null,
//        topP: Float64Array | null, minP: Float64Array | null, seedLo: Uint32Array,
//        seedHi: Uint32Array, seqs: Uint32Array, positions: Uint32Array,
//        purposes: Uint32Array | null) -> Int32Array [rows]; every array has one entry a row.
Napi::Value Sample(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "ops.sample"};
  Napi::Env env = info.Env();
  const auto logits = r.f32(0, "logits");
  SampleArgs a{};
  a.rows = r.integer(1, "rows", 1, 1 << 20);
  a.vocab = r.integer(2, "vocab", 1, 1 << 30);
  r.length(logits.ElementLength(), static_cast<size_t>(a.rows) * a.vocab, "logits", "rows * vocab");
  const auto f64 = [&](size_t i, const char* name) {
    return r.typed<Napi::Float64Array>(i, name, napi_float64_array, "Float64Array");
  };
  const auto per_row = [&](size_t n, const char* name) { r.length(n, a.rows, name, "rows"); };
  // The kernel takes settings as given; these are core's validateSamplingParams ranges.
  const auto temperature = f64(3, "temperature");
  per_row(temperature.ElementLength(), "temperature");
  for (size_t i = 0; i < temperature.ElementLength(); ++i)
    if (!(std::isfinite(temperature[i]) && temperature[i] >= 0))
      r.fail("temperature[" + std::to_string(i) + "] must be a finite number >= 0 (0 = greedy)");
  DeviceBuffer d_topk, d_topp, d_minp, d_purposes;
  if (!r.is_null(4)) {
    const auto top_k = r.i32(4, "topK");
    per_row(top_k.ElementLength(), "topK");
    for (size_t i = 0; i < top_k.ElementLength(); ++i)
      if (top_k[i] < 0) r.fail("topK[" + std::to_string(i) + "] must be >= 0 (0 = off)");
    d_topk = to_device(env, top_k, "topK");
  }
  if (!r.is_null(5)) {
    const auto top_p = f64(5, "topP");
    per_row(top_p.ElementLength(), "topP");
    for (size_t i = 0; i < top_p.ElementLength(); ++i)
      if (!(top_p[i] > 0 && top_p[i] <= 1)) r.fail("topP[" + std::to_string(i) + "] must be in (0, 1] (1 = off)");
    d_topp = to_device(env, top_p, "topP");
  }
  if (!r.is_null(6)) {
    const auto min_p = f64(6, "minP");
    per_row(min_p.ElementLength(), "minP");
    for (size_t i = 0; i < min_p.ElementLength(); ++i)
      if (!(min_p[i] >= 0 && min_p[i] <= 1)) r.fail("minP[" + std::to_string(i) + "] must be in [0, 1] (0 = off)");
    d_minp = to_device(env, min_p, "minP");
  }
  const auto seed_lo = r.u32(7, "seedLo");
  const auto seed_hi = r.u32(8, "seedHi");
  const auto seqs = r.u32(9, "seqs");
  const auto positions = r.u32(10, "positions");
  per_row(seed_lo.ElementLength(), "seedLo");
  per_row(seed_hi.ElementLength(), "seedHi");
  per_row(seqs.ElementLength(), "seqs");
  per_row(positions.ElementLength(), "positions");
  if (!r.is_null(11)) {
    const auto purposes = r.u32(11, "purposes");
    per_row(purposes.ElementLength(), "purposes");
    d_purposes = to_device(env, purposes, "purposes");
  }
  DeviceBuffer d_l = to_device(env, logits, "logits");
  DeviceBuffer d_t = to_device(env, temperature, "temperature");
  DeviceBuffer d_lo = to_device(env, seed_lo, "seedLo");
  DeviceBuffer d_hi = to_device(env, seed_hi, "seedHi");
  DeviceBuffer d_seqs = to_device(env, seqs, "seqs");
  DeviceBuffer d_pos = to_device(env, positions, "positions");
  DeviceBuffer d_out(env, sizeof(int32_t) * a.rows, "out");
  DeviceBuffer d_ws(env, sample_workspace_bytes(a.rows, a.vocab), "workspace");
  a.logits = d_l.get<float>();
  a.temperature = d_t.get<double>();
  a.top_k = d_topk.get<int32_t>();
  a.top_p = d_topp.get<double>();
  a.min_p = d_minp.get<double>();
  a.seed_lo = d_lo.get<uint32_t>();
  a.seed_hi = d_hi.get<uint32_t>();
  a.seqs = d_seqs.get<uint32_t>();
  a.positions = d_pos.get<uint32_t>();
  a.purposes = d_purposes.get<uint32_t>();
  a.out = d_out.get<int32_t>();
  a.workspace = d_ws.get();
  finish(env, sample_rows(a, nullptr), "sample_rows");
  return i32_from(env, d_out, a.rows, "out");
}

// philox(seedLo, seedHi, counters: Uint32Array [n, 4]) -> { u: Float32Array [n], words: Uint32Array [n, 4] }
Napi::Value Philox(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "ops.philox"};
  Napi::Env env = info.Env();
  const uint32_t lo = static_cast<uint32_t>(r.number(0, "seedLo"));
  const uint32_t hi = static_cast<uint32_t>(r.number(1, "seedHi"));
  const auto counters = r.u32(2, "counters");
  if (counters.ElementLength() % 4 != 0) r.fail("counters length must be a multiple of 4");
  const int n = static_cast<int>(counters.ElementLength() / 4);
  DeviceBuffer d_c = to_device(env, counters, "counters");
  DeviceBuffer d_u(env, sizeof(float) * n, "u");
  DeviceBuffer d_w(env, sizeof(uint32_t) * 4 * n, "words");
  finish(env, philox_uniforms(lo, hi, d_c.get<uint32_t>(), n, d_u.get<float>(), d_w.get<uint32_t>(), nullptr), "philox_uniforms");
  Napi::Object o = Napi::Object::New(env);
  o.Set("u", f32_from(env, d_u, n, "u"));
  Napi::Uint32Array words = Napi::Uint32Array::New(env, 4 * static_cast<size_t>(n));
  if (n > 0) d_w.download(env, words.Data(), sizeof(uint32_t) * 4 * n, "words");
  o.Set("words", words);
  return o;
}

// allocate(bytes): allocates and frees, to exercise the out-of-memory error path.
Napi::Value Allocate(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "ops.allocate"};
  const double bytes = r.number(0, "bytes");
  if (!(bytes >= 0) || bytes > 9.0e15) r.fail("bytes must be a non-negative number");
  DeviceBuffer b(info.Env(), static_cast<size_t>(bytes), "ops.allocate");
  return info.Env().Undefined();
}

}  // namespace

Napi::Object InitOps(Napi::Env env) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("embedding", Napi::Function::New(env, Embedding, "embedding"));
  o.Set("rmsnorm", Napi::Function::New(env, RmsNorm, "rmsnorm"));
  o.Set("rope", Napi::Function::New(env, Rope, "rope"));
  o.Set("gemvBf16", Napi::Function::New(env, GemvBf16, "gemvBf16"));
  o.Set("gemvFp8", Napi::Function::New(env, GemvFp8, "gemvFp8"));
  o.Set("moeGateUp", Napi::Function::New(env, MoeGateUp, "moeGateUp"));
  o.Set("moeDown", Napi::Function::New(env, MoeDown, "moeDown"));
  o.Set("router", Napi::Function::New(env, Router, "router"));
  o.Set("routerTopk", Napi::Function::New(env, RouterTopk, "routerTopk"));
  o.Set("attentionDecode", Napi::Function::New(env, AttentionDecode, "attentionDecode"));
  o.Set("attentionPrefill", Napi::Function::New(env, AttentionPrefill, "attentionPrefill"));
  o.Set("argmax", Napi::Function::New(env, Argmax, "argmax"));
  o.Set("sample", Napi::Function::New(env, Sample, "sample"));
  o.Set("philox", Napi::Function::New(env, Philox, "philox"));
  o.Set("allocate", Napi::Function::New(env, Allocate, "allocate"));
  AddMoeOps(env, o);
  return o;
}

}  // namespace moeflash
