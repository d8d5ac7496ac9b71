// Decode attention: one new query token per sequence, grouped-query heads, over a paged bf16 (or
// float32) KV cache, split over the key positions (flash-decoding) and combined in a second kernel.
//
// Split kernel: block = (kv head, a subset of its query heads, sequence, 256-position split).
// Scores for all the block's query heads come from one pass over the keys (a thread a position),
// softmax statistics per head from one warp, then P V with threads laid out as 8-dim chunks x
// position groups. Results (unnormalized output, running max, sum) go to a workspace.
// Combine kernel: per (sequence, head), merges the splits in split order and adds the sink to the
// denominator. The split size is fixed, so a sequence's result does not depend on the others.
#include <algorithm>
#include <cfloat>

#include "common.cuh"

namespace moeflash {
namespace {

constexpr int kSplit = 256;  // key positions per split
constexpr int kThreads = 128;
constexpr int kMaxDim = 128;

struct Workspace {
  float* o;   // [seqs][heads][splits][head_dim]
  float* ml;  // [seqs][heads][splits][2]: max, sum
};

__host__ __device__ inline int max_splits(int max_seq_len) { return std::max(1, (max_seq_len + kSplit - 1) / kSplit); }

__host__ __device__ inline Workspace carve(void* base, int seqs, int heads, int head_dim, int splits) {
  float* f = static_cast<float*>(base);
  const size_t n = static_cast<size_t>(seqs) * heads * splits;
  return Workspace{f, f + n * head_dim};
}

template <typename KV>
__device__ __forceinline__ const KV* kv_row(const KV* cache, const AttentionDecodeArgs& a, int seq, int kvh, int pos) {
  const int page = a.block_table[static_cast<int64_t>(seq) * a.max_pages_per_seq + pos / a.page_size];
  const int64_t row = (static_cast<int64_t>(page) * a.page_size + pos % a.page_size) * a.num_kv_heads + kvh;
  return cache + row * a.head_dim;
}

// Elements 8c .. 8c+7 of a cache row as floats: one 16-byte load of bf16, two of float32.
__device__ __forceinline__ void load8(const bf16_bits* row, int c, float (&f)[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(row) + c);
  f[0] = bf16_lo(v.x), f[1] = bf16_hi(v.x), f[2] = bf16_lo(v.y), f[3] = bf16_hi(v.y);
  f[4] = bf16_lo(v.z), f[5] = bf16_hi(v.z), f[6] = bf16_lo(v.w), f[7] = bf16_hi(v.w);
}
__device__ __forceinline__ void load8(const float* row, int c, float (&f)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(row) + 2 * c);
  const float4 b = __ldg(reinterpret_cast<const float4*>(row) + 2 * c + 1);
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

template <int G, typename KV>
__global__ void __launch_bounds__(kThreads) attention_split_kernel(AttentionDecodeArgs a, const KV* k_cache, const KV* v_cache,
                                                                   int splits) {
  pdl_prologue();
  extern __shared__ float smem[];
  const int D = a.head_dim;
  float* qs = smem;                 // [G][D]
  float* sc = qs + G * D;           // [G][kSplit]: scores, then probabilities
  float* red = sc + G * kSplit;     // [groups][G][D]
  __shared__ float stat_m[G], stat_l[G];

  const int group_size = a.num_heads / a.num_kv_heads;
  const int subsets = (group_size + G - 1) / G;
  const int kvh = blockIdx.x / subsets;
  const int h0 = kvh * group_size + (blockIdx.x % subsets) * G;
  const int nh = min(G, kvh * group_size + group_size - h0);
  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int len = a.seq_lens[seq];
  if (split * kSplit >= len) return;  // the combine kernel reads only the splits that hold keys
  const int lo = a.window > 0 ? max(0, len - a.window) : 0;
  const int pbeg = max(split * kSplit, lo);
  const int pend = min(split * kSplit + kSplit, len);
  const int n = pend - pbeg;
  const Workspace ws = carve(a.workspace, a.num_seqs, a.num_heads, D, splits);
  const int tid = threadIdx.x;

  if (n <= 0) {  // the whole split is outside the sliding window
    for (int i = tid; i < nh * D; i += kThreads) {
      const int g = i / D;
      const int64_t base = (static_cast<int64_t>(seq) * a.num_heads + h0 + g) * splits + split;
      ws.o[base * D + (i - g * D)] = 0.f;
      if (i - g * D == 0) {
        ws.ml[base * 2] = -INFINITY;
        ws.ml[base * 2 + 1] = 0.f;
      }
    }
    return;
  }

  for (int i = tid; i < G * D; i += kThreads) {
    const int g = i / D;
    qs[i] = g < nh ? a.q[(static_cast<int64_t>(seq) * a.num_heads + h0 + g) * D + (i - g * D)] : 0.f;
  }
  __syncthreads();

  // Scores: a thread a key position, every head of the block at once.
  const int chunks = D / 8;
  for (int p = tid; p < n; p += kThreads) {
    const KV* kr = kv_row(k_cache, a, seq, kvh, pbeg + p);
    float acc[G];
#pragma unroll
    for (int g = 0; g < G; ++g) acc[g] = 0.f;
    for (int c = 0; c < chunks; ++c) {
      float kf[8];
      load8(kr, c, kf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float4 q0 = reinterpret_cast<const float4*>(qs + g * D)[2 * c];
        const float4 q1 = reinterpret_cast<const float4*>(qs + g * D)[2 * c + 1];
        float s = acc[g];
        s = fmaf(q0.x, kf[0], s);
        s = fmaf(q0.y, kf[1], s);
        s = fmaf(q0.z, kf[2], s);
        s = fmaf(q0.w, kf[3], s);
        s = fmaf(q1.x, kf[4], s);
        s = fmaf(q1.y, kf[5], s);
        s = fmaf(q1.z, kf[6], s);
        s = fmaf(q1.w, kf[7], s);
        acc[g] = s;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) sc[g * kSplit + p] = acc[g] * a.scale;
  }
  __syncthreads();

  // Softmax statistics: a warp a head.
  const int lane = tid & 31;
  for (int g = tid >> 5; g < nh; g += kThreads / 32) {
    float m = -INFINITY;
    for (int p = lane; p < n; p += 32) m = fmaxf(m, sc[g * kSplit + p]);
    m = warp_max(m);
    float l = 0.f;
    for (int p = lane; p < n; p += 32) {
      const float e = expf(sc[g * kSplit + p] - m);
      sc[g * kSplit + p] = e;
      l += e;
    }
    l = warp_sum(l);
    if (lane == 0) {
      stat_m[g] = m;
      stat_l[g] = l;
    }
  }
  __syncthreads();

  // P V: thread = (8-dim chunk, position group).
  const int groups = kThreads / chunks;
  const int dc = tid % chunks;
  const int pg = tid / chunks;
  if (pg < groups) {
    float acc[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
    for (int p = pg; p < n; p += groups) {
      float vf[8];
      load8(kv_row(v_cache, a, seq, kvh, pbeg + p), dc, vf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float pr = sc[g * kSplit + p];
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(pr, vf[i], acc[g][i]);
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int i = 0; i < 8; ++i) red[(pg * G + g) * D + dc * 8 + i] = acc[g][i];
  }
  __syncthreads();
  for (int i = tid; i < nh * D; i += kThreads) {
    const int g = i / D;
    const int dim = i - g * D;
    float o = 0.f;
    for (int q = 0; q < groups; ++q) o += red[(q * G + g) * D + dim];
    const int64_t base = (static_cast<int64_t>(seq) * a.num_heads + h0 + g) * splits + split;
    ws.o[base * D + dim] = o;
    if (dim == 0) {
      ws.ml[base * 2] = stat_m[g];
      ws.ml[base * 2 + 1] = stat_l[g];
    }
  }
}

__global__ void __launch_bounds__(kThreads) attention_combine_kernel(AttentionDecodeArgs a, int splits) {
  pdl_prologue();
  const int h = blockIdx.x;
  const int seq = blockIdx.y;
  const int D = a.head_dim;
  const int len = a.seq_lens[seq];
  const int used = (len + kSplit - 1) / kSplit;
  const Workspace ws = carve(a.workspace, a.num_seqs, a.num_heads, D, splits);
  const int64_t base = (static_cast<int64_t>(seq) * a.num_heads + h) * splits;
  float m = a.sinks != nullptr ? a.sinks[h] : -INFINITY;
  for (int s = 0; s < used; ++s) m = fmaxf(m, ws.ml[(base + s) * 2]);
  float l = a.sinks != nullptr ? expf(a.sinks[h] - m) : 0.f;
  for (int s = 0; s < used; ++s) {
    const float ms = ws.ml[(base + s) * 2];
    if (ms != -INFINITY) l += ws.ml[(base + s) * 2 + 1] * expf(ms - m);
  }
  for (int dim = threadIdx.x; dim < D; dim += kThreads) {
    float o = 0.f;
    for (int s = 0; s < used; ++s) {
      const float ms = ws.ml[(base + s) * 2];
      if (ms != -INFINITY) o += ws.o[(base + s) * D + dim] * expf(ms - m);
    }
    a.out[(static_cast<int64_t>(seq) * a.num_heads + h) * D + dim] = o / l;
  }
}

template <int G, typename KV>
cudaError_t launch_split(const AttentionDecodeArgs& a, const KV* k_cache, const KV* v_cache, int splits, cudaStream_t stream) {
  const int group_size = a.num_heads / a.num_kv_heads;
  const int subsets = (group_size + G - 1) / G;
  const int chunks = a.head_dim / 8;
  const int groups = kThreads / chunks;
  const size_t smem = sizeof(float) * (static_cast<size_t>(G) * a.head_dim + static_cast<size_t>(G) * kSplit +
                                       static_cast<size_t>(groups) * G * a.head_dim);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(reinterpret_cast<const void*>(attention_split_kernel<G, KV>),
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(a.num_kv_heads * subsets, a.num_seqs, splits);
  return launch_pdl(attention_split_kernel<G, KV>, grid, kThreads, smem, stream, a, k_cache, v_cache, splits);
}

template <typename KV>
cudaError_t launch_split_for_group(const AttentionDecodeArgs& a, const KV* k, const KV* v, int group_size, int splits,
                                   cudaStream_t stream) {
  if (group_size <= 1) return launch_split<1>(a, k, v, splits, stream);
  if (group_size <= 2) return launch_split<2>(a, k, v, splits, stream);
  if (group_size <= 4) return launch_split<4>(a, k, v, splits, stream);
  return launch_split<8>(a, k, v, splits, stream);
}

}  // namespace

size_t attention_decode_workspace_bytes(int num_seqs, int num_heads, int head_dim, int max_seq_len) {
  const size_t n = static_cast<size_t>(num_seqs) * num_heads * max_splits(max_seq_len);
  return n * (head_dim + 2) * sizeof(float);
}

cudaError_t attention_decode(const AttentionDecodeArgs& a, cudaStream_t stream) {
  if (a.num_seqs <= 0) return cudaSuccess;
  if (a.head_dim <= 0 || a.head_dim % 8 != 0 || a.head_dim > kMaxDim || a.num_kv_heads <= 0 ||
      a.num_heads % a.num_kv_heads != 0 || a.page_size <= 0 || a.max_seq_len <= 0)
    return cudaErrorInvalidValue;
  const int group_size = a.num_heads / a.num_kv_heads;
  if (group_size > 16) return cudaErrorInvalidValue;
  const int splits = max_splits(a.max_seq_len);
  // Query heads a block takes at once; a group of 16 is done as two blocks of 8.
  cudaError_t e;
  e = cudaSuccess;
  for (int rep = profile_times("attn_split"); rep > 0 && e == cudaSuccess; --rep)
    e = a.k_cache_f32 != nullptr ? launch_split_for_group(a, a.k_cache_f32, a.v_cache_f32, group_size, splits, stream)
                                 : launch_split_for_group(a, a.k_cache, a.v_cache, group_size, splits, stream);
  for (int rep = profile_times("attn_combine"); rep > 0 && e == cudaSuccess; --rep)
    e = launch_pdl(attention_combine_kernel, dim3(a.num_heads, a.num_seqs), kThreads, 0, stream, a, splits);
  return e;
}

}  // namespace moeflash
