// Kernels that only the model executor needs: the q/k/v epilogue that feeds the paged KV cache,
// a general decode-attention fallback for head sizes the tuned kernel does not take, bf16 expert
// and dense MLPs, and row gather/add helpers for logits and hidden-state copies.
#include <cuda_bf16.h>

#include <algorithm>

#include "common.cuh"
#include "qkv_epilogue.cuh"

namespace moeflash {
namespace {

__device__ __forceinline__ bf16_bits f32_to_bf16(float v) {
  const __nv_bfloat16 b = __float2bfloat16_rn(v);
  return *reinterpret_cast<const bf16_bits*>(&b);
}

// ------------------------------------------------------------------ q/k/v epilogue
// Block = (token, a group of kPrepHeads q/k heads), a warp a head: the heads of the fused q | k | v
// row are staged in shared memory, normalized (Qwen3) and rotated, then q goes to q_out and k to
// the cache; each block also copies its share of v. Splitting the heads over blocks keeps a
// one-token step from waiting on one block that walks every head.
constexpr int kPrepHeads = 8;
constexpr int kPrepThreads = kPrepHeads * 32;

__global__ void __launch_bounds__(kPrepThreads) qkv_prepare_kernel(QkvPrepareArgs a) {
  pdl_prologue();
  extern __shared__ float row[];
  const int t = blockIdx.x;
  const int D = a.head_dim;
  const int q_dim = a.num_heads * D, kv_dim = a.num_kv_heads * D;
  const int width = q_dim + 2 * kv_dim;
  const int half = a.rotary_dim / 2;
  const int heads = a.num_heads + a.num_kv_heads;
  const int h0 = blockIdx.y * kPrepHeads;
  const int nh = min(kPrepHeads, heads - h0);
  float* cos_s = row + kPrepHeads * D;
  float* sin_s = cos_s + half;
  const float* src = a.qkv + static_cast<int64_t>(t) * width;
  for (int i = threadIdx.x; i < nh * D; i += kPrepThreads) row[i] = src[h0 * D + i];
  const float pos = static_cast<float>(a.positions[t]);
  for (int i = threadIdx.x; i < half; i += kPrepThreads)
    rope_cos_sin(pos, a.inv_freq[i], a.attention_factor, &cos_s[i], &sin_s[i]);
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp < nh) {
    const int h = h0 + warp;
    float* v = row + warp * D;
    prepare_head(v, D, h < a.num_heads ? a.q_norm : a.k_norm, a.eps, cos_s, sin_s, half, lane);
    const int64_t slot = a.slots[t];
    if (h < a.num_heads) {
      float* q_out = a.q_out + static_cast<int64_t>(t) * q_dim + static_cast<int64_t>(h) * D;
      for (int i = lane; i < D; i += 32) q_out[i] = v[i];
    } else if (a.k_cache_f32 != nullptr) {
      float* kc = a.k_cache_f32 + slot * kv_dim + static_cast<int64_t>(h - a.num_heads) * D;
      for (int i = lane; i < D; i += 32) kc[i] = v[i];
    } else {
      bf16_bits* kc = a.k_cache + slot * kv_dim + static_cast<int64_t>(h - a.num_heads) * D;
      for (int i = lane; i < D; i += 32) kc[i] = f32_to_bf16(v[i]);
    }
  }
  const int chunk = (kv_dim + gridDim.y - 1) / gridDim.y;
  const int v0 = blockIdx.y * chunk, v1 = min(kv_dim, v0 + chunk);
  const int64_t vrow = static_cast<int64_t>(a.slots[t]) * kv_dim;
  if (a.v_cache_f32 != nullptr) {
    for (int i = v0 + threadIdx.x; i < v1; i += kPrepThreads) a.v_cache_f32[vrow + i] = src[q_dim + kv_dim + i];
  } else {
    for (int i = v0 + threadIdx.x; i < v1; i += kPrepThreads) a.v_cache[vrow + i] = f32_to_bf16(src[q_dim + kv_dim + i]);
  }
}

// ------------------------------------------------------------------ attention fallback
// One block per (query, head): scores for every visible key into shared memory, softmax with the
// sink, then P V with threads over the head dimensions. Used for head_dim % 8 != 0, head_dim >
// 128 or query groups above 16, where attention.cu's tiled kernel does not apply.
constexpr int kAttThreads = 128;

__device__ __forceinline__ float cache_value(const bf16_bits* p) { return bf16_to_f32(*p); }
__device__ __forceinline__ float cache_value(const float* p) { return *p; }

template <typename KV>
__global__ void __launch_bounds__(kAttThreads) attention_generic_kernel(AttentionDecodeArgs a, const KV* k_cache,
                                                                        const KV* v_cache) {
  pdl_prologue();
  extern __shared__ float sc[];
  __shared__ float red[kAttThreads / 32];
  const int h = blockIdx.x, t = blockIdx.y;
  const int D = a.head_dim;
  const int kvh = h / (a.num_heads / a.num_kv_heads);
  const int len = a.seq_lens[t];
  const int lo = a.window > 0 ? max(0, len - a.window) : 0;
  const int n = len - lo;
  const float* q = a.q + (static_cast<int64_t>(t) * a.num_heads + h) * D;
  auto row = [&](const KV* cache, int p) {
    const int page = a.block_table[static_cast<int64_t>(t) * a.max_pages_per_seq + p / a.page_size];
    return cache + ((static_cast<int64_t>(page) * a.page_size + p % a.page_size) * a.num_kv_heads + kvh) * D;
  };
  float m = -INFINITY;
  for (int i = threadIdx.x; i < n; i += kAttThreads) {
    const KV* k = row(k_cache, lo + i);
    float s = 0.f;
    for (int d = 0; d < D; ++d) s = fmaf(q[d], cache_value(k + d), s);
    s *= a.scale;
    sc[i] = s;
    m = fmaxf(m, s);
  }
  m = warp_max(m);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
  __syncthreads();
  m = a.sinks != nullptr ? a.sinks[h] : -INFINITY;
  for (int i = 0; i < kAttThreads / 32; ++i) m = fmaxf(m, red[i]);
  __syncthreads();
  float l = 0.f;
  for (int i = threadIdx.x; i < n; i += kAttThreads) {
    const float e = expf(sc[i] - m);
    sc[i] = e;
    l += e;
  }
  l = warp_sum(l);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = l;
  __syncthreads();
  l = a.sinks != nullptr ? expf(a.sinks[h] - m) : 0.f;
  for (int i = 0; i < kAttThreads / 32; ++i) l += red[i];
  float* out = a.out + (static_cast<int64_t>(t) * a.num_heads + h) * D;
  for (int d = threadIdx.x; d < D; d += kAttThreads) {
    float o = 0.f;
    for (int i = 0; i < n; ++i) o = fmaf(sc[i], cache_value(row(v_cache, lo + i) + d), o);
    out[d] = o / l;
  }
}

// ------------------------------------------------------------------ bf16 experts / dense MLP
// A warp per output element; lanes stride over the reduction. These serve bf16 checkpoints of any
// shape (the MXFP4 kernels need multiples of 32) and dense MLP layers; they are not tuned.
constexpr int kMlpWarps = 8;

__device__ __forceinline__ float dot_bf16_f32(const bf16_bits* __restrict__ w, const float* __restrict__ x, int n,
                                              int lane) {
  float s = 0.f;
  for (int i = lane; i < n; i += 32) s = fmaf(bf16_to_f32(w[i]), x[i], s);
  return warp_sum(s);
}

__global__ void __launch_bounds__(kMlpWarps * 32) mlp_gate_up_bf16_kernel(MlpBf16Args a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int j = blockIdx.x * kMlpWarps + warp;
  const int slot = blockIdx.y;  // token * top_k + k
  if (j >= a.inter) return;
  const int t = slot / a.top_k;
  const int64_t e = a.expert_ids[slot];
  const int gr = a.interleaved ? 2 * j : j, ur = a.interleaved ? 2 * j + 1 : a.inter + j;
  const bf16_bits* w = a.gate_up + e * 2 * a.inter * a.hidden;
  const float* x = a.x + static_cast<int64_t>(t) * a.hidden;
  float g = dot_bf16_f32(w + static_cast<int64_t>(gr) * a.hidden, x, a.hidden, lane);
  float u = dot_bf16_f32(w + static_cast<int64_t>(ur) * a.hidden, x, a.hidden, lane);
  if (lane != 0) return;
  if (a.gate_up_bias != nullptr) {
    g += bf16_to_f32(a.gate_up_bias[e * 2 * a.inter + gr]);
    u += bf16_to_f32(a.gate_up_bias[e * 2 * a.inter + ur]);
  }
  float y;
  if (a.activation == ExpertActivation::GptOssClamped) {
    g = fminf(g, a.limit);
    u = fminf(fmaxf(u, -a.limit), a.limit);
    y = (u + 1.0f) * (g * (1.0f / (1.0f + expf(-g * a.alpha))));
  } else {
    y = (g / (1.0f + expf(-g))) * u;
  }
  a.act[static_cast<int64_t>(slot) * a.inter + j] = y;
}

__global__ void __launch_bounds__(kMlpWarps * 32) mlp_down_bf16_kernel(MlpBf16Args a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r = blockIdx.x * kMlpWarps + warp;
  const int t = blockIdx.y;
  if (r >= a.hidden) return;
  float s = 0.f;
  for (int k = 0; k < a.top_k; ++k) {
    const int slot = t * a.top_k + k;
    const int64_t e = a.expert_ids[slot];
    const bf16_bits* w = a.down + (e * a.hidden + r) * a.inter;
    float v = dot_bf16_f32(w, a.act + static_cast<int64_t>(slot) * a.inter, a.inter, lane);
    if (a.down_bias != nullptr) v += bf16_to_f32(a.down_bias[e * a.hidden + r]);
    s = __fadd_rn(s, __fmul_rn(a.expert_weights[slot], v));
  }
  if (lane == 0) a.y[static_cast<int64_t>(t) * a.hidden + r] = s;
}

// ------------------------------------------------------------------ rows
__global__ void gather_rows_kernel(const float* __restrict__ src, const int32_t* __restrict__ idx, int cols,
                                   float* __restrict__ dst) {
  pdl_prologue();
  const float* s = src + static_cast<int64_t>(idx[blockIdx.x]) * cols;
  float* d = dst + static_cast<int64_t>(blockIdx.x) * cols;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) d[i] = s[i];
}

__global__ void add_kernel(const float* __restrict__ a, const float* __restrict__ b, size_t n, float* __restrict__ out) {
  pdl_prologue();
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = a[i] + b[i];
}

}  // namespace

size_t qkv_prepare_smem_bytes(int num_heads, int num_kv_heads, int head_dim, int rotary_dim) {
  return sizeof(float) * (static_cast<size_t>(kPrepHeads) * head_dim + rotary_dim);
}

cudaError_t qkv_prepare(const QkvPrepareArgs& a, cudaStream_t stream) {
  if (a.tokens <= 0) return cudaSuccess;
  if (a.rotary_dim % 2 != 0 || a.rotary_dim > a.head_dim) return cudaErrorInvalidValue;
  const size_t smem = qkv_prepare_smem_bytes(a.num_heads, a.num_kv_heads, a.head_dim, a.rotary_dim);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(reinterpret_cast<const void*>(qkv_prepare_kernel),
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(a.tokens, ceil_div(a.num_heads + a.num_kv_heads, kPrepHeads));
  return launch_pdl(qkv_prepare_kernel, grid, kPrepThreads, smem, stream, a);
}

bool attention_decode_supported(int num_heads, int num_kv_heads, int head_dim) {
  return head_dim % 8 == 0 && head_dim <= 128 && num_heads % num_kv_heads == 0 && num_heads / num_kv_heads <= 16;
}

namespace {
template <typename KV>
cudaError_t launch_generic(const AttentionDecodeArgs& a, const KV* k_cache, const KV* v_cache, cudaStream_t stream) {
  const size_t smem = sizeof(float) * std::max(1, a.max_seq_len);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(reinterpret_cast<const void*>(attention_generic_kernel<KV>),
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  return launch_pdl(attention_generic_kernel<KV>, dim3(a.num_heads, a.num_seqs), kAttThreads, smem, stream, a, k_cache,
                    v_cache);
}
}  // namespace

cudaError_t attention_generic(const AttentionDecodeArgs& a, cudaStream_t stream) {
  if (a.num_seqs <= 0) return cudaSuccess;
  if (a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads != 0) return cudaErrorInvalidValue;
  return a.k_cache_f32 != nullptr ? launch_generic(a, a.k_cache_f32, a.v_cache_f32, stream)
                                  : launch_generic(a, a.k_cache, a.v_cache, stream);
}

cudaError_t mlp_bf16(const MlpBf16Args& a, cudaStream_t stream) {
  if (a.tokens <= 0) return cudaSuccess;
  mlp_gate_up_bf16_kernel<<<dim3(ceil_div(a.inter, kMlpWarps), a.tokens * a.top_k), kMlpWarps * 32, 0, stream>>>(a);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  mlp_down_bf16_kernel<<<dim3(ceil_div(a.hidden, kMlpWarps), a.tokens), kMlpWarps * 32, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t gather_rows(const float* src, const int32_t* idx, int rows, int cols, float* dst, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  return launch_pdl(gather_rows_kernel, rows, 256, 0, stream, src, idx, cols, dst);
}

cudaError_t add_f32(const float* a, const float* b, size_t n, float* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int grid = static_cast<int>(std::min<size_t>((n + 255) / 256, 4096));
  return launch_pdl(add_kernel, grid, 256, 0, stream, a, b, n, out);
}

}  // namespace moeflash
