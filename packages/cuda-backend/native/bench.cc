// Timing entry points for bench/kernels-bench.mjs. Buffers are filled with pseudo-random data on
// the device; each iteration is bracketed by CUDA events; all iterations are queued behind a
// sleep kernel so that the device runs them back to back (the numbers are device time, not
// host launch rate). Weights rotate over several copies so that matrices smaller than the L2
// cache are not timed out of the cache.
#include <algorithm>
#include <cstdint>
#include <random>
#include <set>
#include <vector>

#include "addon.h"
#include "kernels.h"

namespace moeflash {
namespace {

class Events {
 public:
  Events(Napi::Env env, int n) : env_(env), ev_(2 * static_cast<size_t>(n), nullptr) {
    for (auto& e : ev_) check_cuda(env, cudaEventCreate(&e), "cudaEventCreate");
  }
  ~Events() {
    for (auto e : ev_)
      if (e != nullptr) cudaEventDestroy(e);
  }
  void start(int i, cudaStream_t s) { check_cuda(env_, cudaEventRecord(ev_[2 * i], s), "cudaEventRecord"); }
  void stop(int i, cudaStream_t s) { check_cuda(env_, cudaEventRecord(ev_[2 * i + 1], s), "cudaEventRecord"); }
  Napi::Float64Array times() {
    const int n = static_cast<int>(ev_.size() / 2);
    Napi::Float64Array out = Napi::Float64Array::New(env_, n);
    for (int i = 0; i < n; ++i) {
      float ms = 0;
      check_cuda(env_, cudaEventElapsedTime(&ms, ev_[2 * i], ev_[2 * i + 1]), "cudaEventElapsedTime");
      out[i] = ms;
    }
    return out;
  }

 private:
  Napi::Env env_;
  std::vector<cudaEvent_t> ev_;
};

class Stream {
 public:
  explicit Stream(Napi::Env env) { check_cuda(env, cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking), "cudaStreamCreate"); }
  ~Stream() { cudaStreamDestroy(s_); }
  operator cudaStream_t() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

// Long enough to cover the host queueing `iters` launches.
uint64_t queue_cover_ns(int iters) { return 2'000'000ull + 40'000ull * iters; }

// copy(bytes, iters) -> Float64Array of ms per device-to-device copy
Napi::Value Copy(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "bench.copy"};
  Napi::Env env = info.Env();
  const size_t bytes = static_cast<size_t>(r.number(0, "bytes"));
  const int iters = r.integer(1, "iters", 1, 1000);
  DeviceBuffer a(env, bytes, "copy source"), b(env, bytes, "copy destination");
  Stream s(env);
  check_cuda(env, fill_u8_random(a.get<uint8_t>(), bytes, 1, 0, 255, s), "fill");
  check_cuda(env, cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, s), "cudaMemcpyAsync (warm-up)");
  Events ev(env, iters);
  check_cuda(env, gpu_sleep(queue_cover_ns(iters), s), "gpu_sleep");
  for (int i = 0; i < iters; ++i) {
    ev.start(i, s);
    check_cuda(env, cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, s), "cudaMemcpyAsync");
    ev.stop(i, s);
  }
  check_cuda(env, cudaStreamSynchronize(s), "cudaStreamSynchronize (copy)");
  return ev.times();
}

// gemvBf16(rows, cols, tokens, iters, copies, warmup) -> { times, bytes }
Napi::Value Gemv(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "bench.gemvBf16"};
  Napi::Env env = info.Env();
  const int rows = r.integer(0, "rows", 1, 1 << 30);
  const int cols = r.integer(1, "cols", 8, 1 << 20);
  const int tokens = r.integer(2, "tokens", 1, 8);
  const int iters = r.integer(3, "iters", 1, 1000);
  const int copies = r.integer(4, "copies", 1, 1024);
  const int warmup = r.integer(5, "warmup", 0, 1000);
  const size_t wn = static_cast<size_t>(rows) * cols;
  DeviceBuffer w(env, wn * 2 * copies, "weights");
  DeviceBuffer bias(env, static_cast<size_t>(rows) * 2, "bias");
  DeviceBuffer x(env, sizeof(float) * tokens * static_cast<size_t>(cols), "x");
  DeviceBuffer y(env, sizeof(float) * tokens * static_cast<size_t>(rows), "y");
  Stream s(env);
  check_cuda(env, fill_bf16_random(w.get<bf16_bits>(), wn * copies, 7, 0.05f, s), "fill weights");
  check_cuda(env, fill_bf16_random(bias.get<bf16_bits>(), rows, 8, 0.1f, s), "fill bias");
  check_cuda(env, fill_f32_random(x.get<float>(), static_cast<size_t>(tokens) * cols, 9, 1.0f, s), "fill x");
  auto launch = [&](int i) {
    const bf16_bits* wi = w.get<bf16_bits>() + (i % copies) * wn;
    check_cuda(env, gemv_bf16(wi, bias.get<bf16_bits>(), x.get<float>(), y.get<float>(), rows, cols, tokens, s), "gemv_bf16");
  };
  for (int i = 0; i < warmup; ++i) launch(i);
  Events ev(env, iters);
  check_cuda(env, gpu_sleep(queue_cover_ns(iters), s), "gpu_sleep");
  for (int i = 0; i < iters; ++i) {
    ev.start(i, s);
    launch(i);
    ev.stop(i, s);
  }
  check_cuda(env, cudaStreamSynchronize(s), "cudaStreamSynchronize (gemv_bf16)");
  Napi::Object o = Napi::Object::New(env);
  o.Set("times", ev.times());
  o.Set("bytes", static_cast<double>(wn * 2 + static_cast<size_t>(rows) * 2 +
                                     sizeof(float) * tokens * (static_cast<size_t>(cols) + rows)));
  return o;
}

// moe(tokens, topK, numExperts, hidden, inter, iters, layers, warmup, activation)
//   -> { gateUp: Float64Array, down: Float64Array, gateUpBytes: Float64Array, downBytes: Float64Array }
// Each iteration routes every token to topK distinct random experts (a fresh draw per
// iteration) and uses layer i % layers' weights.
Napi::Value Moe(const Napi::CallbackInfo& info) {
  const ArgReader r{info, "bench.moe"};
  Napi::Env env = info.Env();
  MoeDims d{};
  d.tokens = r.integer(0, "tokens", 1, 8);
  d.top_k = r.integer(1, "topK", 1, 8);
  d.num_experts = r.integer(2, "numExperts", d.top_k, 4096);
  d.hidden = r.integer(3, "hidden", 32, 1 << 20);
  d.inter = r.integer(4, "inter", 32, 1 << 20);
  const int iters = r.integer(5, "iters", 1, 1000);
  const int layers = r.integer(6, "layers", 1, 64);
  const int warmup = r.integer(7, "warmup", 0, 1000);
  const int activation = r.integer(8, "activation", 0, 1);
  if (d.hidden % 32 != 0 || d.inter % 32 != 0) r.fail("hidden and inter must be multiples of 32");
  const size_t E = d.num_experts, H = d.hidden, I = d.inter;
  const size_t gu_blocks = E * 2 * I * (H / 32), dn_blocks = E * H * (I / 32);
  DeviceBuffer gu_q(env, gu_blocks * 16 * layers, "gate_up blocks"), gu_s(env, gu_blocks * layers, "gate_up scales");
  DeviceBuffer dn_q(env, dn_blocks * 16 * layers, "down blocks"), dn_s(env, dn_blocks * layers, "down scales");
  DeviceBuffer gu_b(env, E * 2 * I * 2, "gate_up bias"), dn_b(env, E * H * 2, "down bias");
  DeviceBuffer x(env, sizeof(float) * d.tokens * H, "x");
  DeviceBuffer act(env, sizeof(float) * d.tokens * d.top_k * I, "act");
  DeviceBuffer y(env, sizeof(float) * d.tokens * H, "y");
  const int total = warmup + iters;
  const int slots = d.tokens * d.top_k;
  DeviceBuffer ids(env, sizeof(int32_t) * slots * total, "expert ids");
  DeviceBuffer rw(env, sizeof(float) * slots, "routing weights");
  Stream s(env);
  // Scales 118..126 keep magnitudes near those of real checkpoints (and never NaN).
  check_cuda(env, fill_u8_random(gu_q.get<uint8_t>(), gu_blocks * 16 * layers, 11, 0, 255, s), "fill");
  check_cuda(env, fill_u8_random(gu_s.get<uint8_t>(), gu_blocks * layers, 12, 118, 126, s), "fill");
  check_cuda(env, fill_u8_random(dn_q.get<uint8_t>(), dn_blocks * 16 * layers, 13, 0, 255, s), "fill");
  check_cuda(env, fill_u8_random(dn_s.get<uint8_t>(), dn_blocks * layers, 14, 118, 126, s), "fill");
  check_cuda(env, fill_bf16_random(gu_b.get<bf16_bits>(), E * 2 * I, 15, 0.1f, s), "fill");
  check_cuda(env, fill_bf16_random(dn_b.get<bf16_bits>(), E * H, 16, 0.1f, s), "fill");
  check_cuda(env, fill_f32_random(x.get<float>(), d.tokens * H, 17, 1.0f, s), "fill");
  check_cuda(env, fill_f32_random(rw.get<float>(), slots, 18, 1.0f, s), "fill");

  std::mt19937 rng(1234);
  std::vector<int32_t> host_ids(static_cast<size_t>(slots) * total);
  Napi::Float64Array gu_bytes = Napi::Float64Array::New(env, iters);
  Napi::Float64Array dn_bytes = Napi::Float64Array::New(env, iters);
  for (int i = 0; i < total; ++i) {
    std::set<int> distinct;
    for (int t = 0; t < d.tokens; ++t) {
      std::vector<int> perm(E);
      for (size_t e = 0; e < E; ++e) perm[e] = static_cast<int>(e);
      for (int k = 0; k < d.top_k; ++k) {
        std::uniform_int_distribution<int> pick(k, static_cast<int>(E) - 1);
        std::swap(perm[k], perm[pick(rng)]);
        host_ids[static_cast<size_t>(i) * slots + t * d.top_k + k] = perm[k];
        distinct.insert(perm[k]);
      }
    }
    if (i >= warmup) {
      const double n = static_cast<double>(distinct.size());
      gu_bytes[i - warmup] = n * 2 * I * (H / 32) * 17 + sizeof(float) * (d.tokens * H + slots * I);
      dn_bytes[i - warmup] = n * H * (I / 32) * 17 + sizeof(float) * (slots * I + d.tokens * H + slots);
    }
  }
  ids.upload(env, host_ids.data(), host_ids.size() * sizeof(int32_t), "expert ids");

  auto gate_up = [&](int i) {
    const Mxfp4Experts w{gu_q.get<uint8_t>() + (i % layers) * gu_blocks * 16, gu_s.get<uint8_t>() + (i % layers) * gu_blocks,
                         gu_b.get<bf16_bits>()};
    check_cuda(env,
               moe_gate_up_mxfp4(w, x.get<float>(), ids.get<int32_t>() + static_cast<size_t>(i) * slots, d,
                                 static_cast<ExpertActivation>(activation), 7.0f, 1.702f, act.get<float>(), s),
               "moe_gate_up_mxfp4");
  };
  auto down = [&](int i) {
    const Mxfp4Experts w{dn_q.get<uint8_t>() + (i % layers) * dn_blocks * 16, dn_s.get<uint8_t>() + (i % layers) * dn_blocks,
                         dn_b.get<bf16_bits>()};
    check_cuda(env,
               moe_down_mxfp4(w, act.get<float>(), ids.get<int32_t>() + static_cast<size_t>(i) * slots, rw.get<float>(), d,
                              y.get<float>(), s),
               "moe_down_mxfp4");
  };
  for (int i = 0; i < warmup; ++i) {
    gate_up(i);
    down(i);
  }
  Events ev_gu(env, iters), ev_dn(env, iters);
  check_cuda(env, gpu_sleep(queue_cover_ns(2 * iters), s), "gpu_sleep");
  for (int i = 0; i < iters; ++i) {
    ev_gu.start(i, s);
    gate_up(warmup + i);
    ev_gu.stop(i, s);
    ev_dn.start(i, s);
    down(warmup + i);
    ev_dn.stop(i, s);
  }
  check_cuda(env, cudaStreamSynchronize(s), "cudaStreamSynchronize (moe)");
  Napi::Object o = Napi::Object::New(env);
  o.Set("gateUp", ev_gu.times());
  o.Set("down", ev_dn.times());
  o.Set("gateUpBytes", gu_bytes);
  o.Set("downBytes", dn_bytes);
  return o;
}

}  // namespace

Napi::Object InitBench(Napi::Env env) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("copy", Napi::Function::New(env, Copy, "copy"));
  o.Set("gemvBf16", Napi::Function::New(env, Gemv, "gemvBf16"));
  o.Set("moe", Napi::Function::New(env, Moe, "moe"));
  return o;
}

}  // namespace moeflash
