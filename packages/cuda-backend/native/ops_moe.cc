// Test-only binding of the tensor-core MoE layer (kernels/moe_mma.h): checkpoint-layout MXFP4
// experts in, the combined layer output out. Uploads, repacks and runs the same launches as the
// model executor, so the tests check the whole path: plan, repack, gate/up, down and combine.
#include <vector>

#include "addon.h"
#include "moe_mma.h"

#include <algorithm>
#include <vector>

namespace moeflash {
namespace {

DeviceBuffer upload_bytes(Napi::Env env, const void* p, size_t bytes, const char* what) {
  DeviceBuffer b(env, bytes, what);
  if (bytes > 0) b.upload(env, p, bytes, what);
  return b;
}

// moeMma(gateUpBlocks, gateUpScales, gateUpBias | null, downBlocks, downScales, downBias | null,
//        x [tokens, hidden], expertIds [tokens, topK], expertWeights [tokens, topK], tokens, topK,
//        numExperts, hidden, inter, activation (0 swiglu, 1 gpt-oss clamped), limit, alpha,
//        interleaved, repeat) -> Float32Array [tokens, hidden]
// repeat > 1 runs the layer that many times on the same buffers (the counters must come back to
// zero for every launch after the first to be right) and sets `msPerLaunch` on the result: the
// device time of launches 2..repeat, queued back to back, divided by their number.
Napi::Value MoeMma(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "ops.moeMma"};
  Napi::Env env = info.Env();
  const int T = r.integer(9, "tokens", 1, 1 << 14);
  const int K = r.integer(10, "topK", 1, 32);
  const int E = r.integer(11, "numExperts", 1, 1024);
  const int H = r.integer(12, "hidden", 64, 1 << 16);
  const int I = r.integer(13, "inter", 64, 1 << 16);
  if (!moe_mma_supported(H, I)) r.fail("hidden and inter must be multiples of 64");
  const int act = r.integer(14, "activation", 0, 1);
  const double limit = r.number(15, "limit");
  const double alpha = r.number(16, "alpha");
  const bool interleaved = r.boolean(17, "interleaved");
  const int repeat = r.integer(18, "repeat", 1, 10000);
  const size_t guRows = 2 * static_cast<size_t>(I), dnRows = H;
  const auto gub = r.u8(0, "gateUpBlocks");
  const auto gus = r.u8(1, "gateUpScales");
  const auto dnb = r.u8(3, "downBlocks");
  const auto dns = r.u8(4, "downScales");
  r.length(gub.ElementLength(), E * guRows * (H / 32) * 16, "gateUpBlocks", "experts * 2 inter * hidden/32 * 16");
  r.length(gus.ElementLength(), E * guRows * (H / 32), "gateUpScales", "experts * 2 inter * hidden/32");
  r.length(dnb.ElementLength(), E * dnRows * (I / 32) * 16, "downBlocks", "experts * hidden * inter/32 * 16");
  r.length(dns.ElementLength(), E * dnRows * (I / 32), "downScales", "experts * hidden * inter/32");
  DeviceBuffer d_gub = upload_bytes(env, gub.Data(), gub.ByteLength(), "gateUpBlocks");
  DeviceBuffer d_gus = upload_bytes(env, gus.Data(), gus.ByteLength(), "gateUpScales");
  DeviceBuffer d_dnb = upload_bytes(env, dnb.Data(), dnb.ByteLength(), "downBlocks");
  DeviceBuffer d_dns = upload_bytes(env, dns.Data(), dns.ByteLength(), "downScales");
  DeviceBuffer d_gubias, d_dnbias;
  if (!r.is_null(2)) {
    const auto b = r.bf16(2, "gateUpBias");
    r.length(b.ElementLength(), E * guRows, "gateUpBias", "experts * 2 inter");
    d_gubias = upload_bytes(env, b.Data(), b.ByteLength(), "gateUpBias");
  }
  if (!r.is_null(5)) {
    const auto b = r.bf16(5, "downBias");
    r.length(b.ElementLength(), E * dnRows, "downBias", "experts * hidden");
    d_dnbias = upload_bytes(env, b.Data(), b.ByteLength(), "downBias");
  }
  const auto x = r.f32(6, "x");
  const auto ids = r.i32(7, "expertIds");
  const auto wts = r.f32(8, "expertWeights");
  r.length(x.ElementLength(), static_cast<size_t>(T) * H, "x", "tokens * hidden");
  if (ids.ElementLength() % (static_cast<size_t>(T) * K) != 0 || ids.ElementLength() == 0)
    r.fail("expertIds must hold tokens * topK ids (or a multiple: sets cycled through by repeat)");
  r.length(wts.ElementLength(), static_cast<size_t>(T) * K, "expertWeights", "tokens * topK");
  // expertIds may hold several sets of tokens * topK ids: launch i takes set i % sets, so that a
  // repeated benchmark reads different experts from launch to launch instead of L2-resident ones.
  const size_t sets = ids.ElementLength() / (static_cast<size_t>(T) * K);
  for (size_t i = 0; i < ids.ElementLength(); ++i)
    if (ids[i] < 0 || ids[i] >= E) r.fail("expertIds holds " + std::to_string(ids[i]) + ", outside [0, numExperts)");
  DeviceBuffer d_x = upload_bytes(env, x.Data(), x.ByteLength(), "x");
  DeviceBuffer d_ids = upload_bytes(env, ids.Data(), ids.ByteLength(), "expertIds");
  DeviceBuffer d_w = upload_bytes(env, wts.Data(), wts.ByteLength(), "expertWeights");

  {
    DeviceBuffer scratch(env, std::max(moe_repack_scratch_bytes(2 * I, H), moe_repack_scratch_bytes(H, I)), "repack scratch");
    check_cuda(env,
               moe_repack_mxfp4(d_gub.get<uint8_t>(), d_gus.get<uint8_t>(), E, 2 * I, H,
                                interleaved ? MoeRowMap::GateUpInterleaved : MoeRowMap::GateUpHalves, scratch.get(), nullptr),
               "moe_repack_mxfp4 (gate/up)");
    check_cuda(env,
               moe_repack_mxfp4(d_dnb.get<uint8_t>(), d_dns.get<uint8_t>(), E, H, I, MoeRowMap::Identity, scratch.get(), nullptr),
               "moe_repack_mxfp4 (down)");
    check_cuda(env, cudaDeviceSynchronize(), "moe_repack_mxfp4");
  }
  const int slots = T * K;
  DeviceBuffer d_plan(env, sizeof(int32_t) * moe_plan_ints(slots, E), "plan");
  DeviceBuffer d_counters(env, sizeof(int32_t) * moe_counter_ints(H), "counters");
  check_cuda(env, cudaMemset(d_counters.get(), 0, d_counters.bytes()), "cudaMemset (counters)");
  DeviceBuffer d_act(env, sizeof(float) * slots * static_cast<size_t>(I), "act");
  DeviceBuffer d_part(env, sizeof(float) * slots * static_cast<size_t>(H), "part");
  DeviceBuffer d_y(env, sizeof(float) * T * static_cast<size_t>(H), "y");

  MoeMmaArgs a{};
  a.gate_up_blocks = d_gub.get<uint8_t>();
  a.gate_up_scales = d_gus.get<uint8_t>();
  a.gate_up_bias = d_gubias.get<bf16_bits>();
  a.down_blocks = d_dnb.get<uint8_t>();
  a.down_scales = d_dns.get<uint8_t>();
  a.down_bias = d_dnbias.get<bf16_bits>();
  a.interleaved = interleaved;
  a.activation = static_cast<ExpertActivation>(act);
  a.limit = static_cast<float>(limit);
  a.alpha = static_cast<float>(alpha);
  a.x = d_x.get<float>();
  a.expert_ids = d_ids.get<int32_t>();
  a.expert_weights = d_w.get<float>();
  a.tokens = T, a.top_k = K, a.num_experts = E, a.hidden = H, a.inter = I;
  a.plan = d_plan.get<int32_t>();
  a.counters = d_counters.get<int32_t>();
  a.act = d_act.get<float>();
  a.part = d_part.get<float>();
  a.y = d_y.get<float>();
  check_cuda(env, cudaMemset(d_y.get(), 0xff, d_y.bytes()), "cudaMemset (y)");
  check_cuda(env, moe_mxfp4_mma(a, nullptr), "moe_mxfp4_mma");
  check_cuda(env, cudaDeviceSynchronize(), "moe_mxfp4_mma");
  // Launches after the first are timed back to back (a benchmark's view of one layer).
  float elapsed_ms = 0.f;
  DeviceBuffer trace_buf;
  if (repeat > 1) {
    if (env_int("MOEFLASH_MOE_TRACE", 0) == 1) {
      trace_buf = DeviceBuffer(env, sizeof(unsigned long long) * kMoeTraceEntries, "trace");
      check_cuda(env, cudaMemset(trace_buf.get(), 0, trace_buf.bytes()), "cudaMemset (trace)");
    }
    cudaEvent_t e0, e1;
    check_cuda(env, cudaEventCreate(&e0), "cudaEventCreate");
    check_cuda(env, cudaEventCreate(&e1), "cudaEventCreate");
    check_cuda(env, cudaEventRecord(e0, nullptr), "cudaEventRecord");
    for (int i = 1; i < repeat; ++i) {
      a.expert_ids = d_ids.get<int32_t>() + (i % sets) * static_cast<size_t>(slots);
      a.trace = i == repeat - 1 ? trace_buf.get<unsigned long long>() : nullptr;
      check_cuda(env, moe_mxfp4_mma(a, nullptr), "moe_mxfp4_mma");
    }
    a.expert_ids = d_ids.get<int32_t>();
    a.trace = nullptr;
    check_cuda(env, cudaEventRecord(e1, nullptr), "cudaEventRecord");
    check_cuda(env, cudaEventSynchronize(e1), "moe_mxfp4_mma (repeated)");
    cudaEventElapsedTime(&elapsed_ms, e0, e1);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
  }
  std::vector<int32_t> counters(moe_counter_ints(H));
  d_counters.download(env, counters.data(), counters.size() * sizeof(int32_t), "counters");
  for (int c : counters)
    if (c != 0) throw_invalid(env, "ops.moeMma: a row-tile counter was left at " + std::to_string(c));
  Napi::Float32Array out = Napi::Float32Array::New(env, static_cast<size_t>(T) * H);
  d_y.download(env, out.Data(), out.ByteLength(), "y");
  if (repeat > 1) out.Set("msPerLaunch", static_cast<double>(elapsed_ms) / (repeat - 1));
  if (trace_buf.get() != nullptr) {
    // Nanoseconds from the earliest recorded point of the last launch; -1 where nothing was written.
    std::vector<unsigned long long> t(kMoeTraceEntries);
    trace_buf.download(env, t.data(), t.size() * sizeof(unsigned long long), "trace");
    unsigned long long t0 = ~0ull;
    for (auto v : t)
      if (v != 0) t0 = std::min(t0, v);
    Napi::Float64Array tr = Napi::Float64Array::New(env, t.size());
    for (size_t i = 0; i < t.size(); ++i) tr[i] = t[i] != 0 ? static_cast<double>(t[i] - t0) : -1.0;
    out.Set("trace", tr);
  }
  return out;
}

}  // namespace

void AddMoeOps(Napi::Env env, Napi::Object ops) { ops.Set("moeMma", Napi::Function::New(env, MoeMma, "moeMma")); }

}  // namespace moeflash
