// Decode attention with the q/k/v epilogue folded in: one launch a layer does what qkv_prepare,
// attention_split_kernel and attention_combine_kernel do in three.
//
// Block = (query head, sequence, split of kChunk visible positions); a sequence uses as many
// splits as its visible keys need, the other blocks of the grid return at once. Every block
// normalizes (Qwen3) and rotates its own query head and the new key of its kv head from the raw
// q | k | v row, exactly as qkv_prepare does; the first query head of each kv group, split 0,
// writes the new key and value to the cache. No block reads the new position from the cache:
// they all use the key and value they computed, so no block waits for another's write.
//
// Scores: a thread a position (row offsets kept in shared memory for P V); softmax over the split
// with block reductions; P V with threads laid out as 8-dim chunks x position groups. A sequence
// whose visible keys fit one split (<= kChunk) writes its output directly, the sink in the
// denominator. Otherwise each split leaves (unnormalized output, max, sum) in the workspace and
// the last split to finish (a self-resetting counter per (sequence, head)) merges them in split
// order with the sink: deterministic, and a sequence's result never depends on the others.
//
// Against the three-kernel path at gpt-oss-20b shapes (64 query heads, 8 kv heads, head_dim 64):
// 64 blocks a token instead of 24, each with 1/8 of the arithmetic, and two launches fewer.
// Used for head_dim 16, 32, 64 or 128 while the step's maximum length keeps the grid small
// (attention_fused_supported); longer caches keep the split kernel, which reads each kv head
// once for all its query heads.
#include <cuda_bf16.h>

#include <cfloat>

#include "common.cuh"
#include "qkv_epilogue.cuh"

namespace moeflash {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 1024;  // visible positions per split
constexpr int kMaxSplits = 8;  // so maximum lengths up to 8192 positions
// V rows a thread has in flight in P V (n / (256 / (head_dim / 8)) rows each: 20 at 640 positions
// and head_dim 64, so 3 round trips instead of 5 with 4).
constexpr int kPvUnroll = 8;

__device__ __forceinline__ bf16_bits to_bf16(float v) {
  const __nv_bfloat16 b = __float2bfloat16_rn(v);
  return *reinterpret_cast<const bf16_bits*>(&b);
}

struct FusedWorkspace {
  float* o;       // [seqs][heads][kMaxSplits][head_dim]
  float* ml;      // [seqs][heads][kMaxSplits][2]: max, sum
  int* counters;  // [seqs][heads]
};

__host__ __device__ inline size_t fused_partials(int seqs, int heads) {
  return static_cast<size_t>(seqs) * heads * kMaxSplits;
}

__host__ __device__ inline FusedWorkspace carve_fused(void* base, int seqs, int heads, int head_dim) {
  float* f = static_cast<float*>(base);
  const size_t n = fused_partials(seqs, heads);
  return FusedWorkspace{f, f + n * head_dim, reinterpret_cast<int*>(f + n * (head_dim + 2))};
}

// Every thread gets the block's reduction of its warps' already reduced values, in warp order.
template <typename Combine>
__device__ __forceinline__ float block_combine(float warp_value, float* red, Combine combine) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = warp_value;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = combine(r, red[w]);
  return r;
}

__device__ __forceinline__ float block_max(float v, float* red) {
  return block_combine(warp_max(v), red, [](float a, float b) { return fmaxf(a, b); });
}

__device__ __forceinline__ float block_sum(float v, float* red) {
  return block_combine(warp_sum(v), red, [](float a, float b) { return a + b; });
}

template <int CH>  // head_dim / 8
__global__ void __launch_bounds__(kThreads) attention_fused_kernel(QkvPrepareArgs p, AttentionDecodeArgs a) {
  constexpr int D = CH * 8;
  constexpr int kGroups = kThreads / CH;  // position groups of P V
  __shared__ __align__(16) float q_s[D];
  __shared__ __align__(16) float k_s[D];
  __shared__ __align__(16) float v_s[D];
  __shared__ __align__(16) bf16_bits k_row[D];  // the new key and value, rounded as the cache holds them
  __shared__ __align__(16) bf16_bits v_row[D];
  __shared__ float cos_s[D / 2], sin_s[D / 2];
  __shared__ float sc[kChunk];        // scores, then probabilities
  __shared__ int64_t rowoff[kChunk];  // cache element offset of each position's row (-1: the new one)
  __shared__ __align__(16) float red_o[kGroups][D];
  __shared__ float red[kWarps];
  __shared__ int last_s;

  pdl_prologue();
  const int h = blockIdx.x, t = blockIdx.y, split = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int group = a.num_heads / a.num_kv_heads;
  const int kvh = h / group;
  const int len = a.seq_lens[t];
  const int lo = a.window > 0 ? max(0, len - a.window) : 0;
  const int splits = (len - lo + kChunk - 1) / kChunk;
  if (split >= splits) return;
  const int p0 = lo + split * kChunk;
  const int n = min(len, p0 + kChunk) - p0;
  const int pos = p.positions[t];

  // The query head, the new key and the new value, from the raw projection row.
  const int q_dim = a.num_heads * D, kv_dim = a.num_kv_heads * D;
  const float* src = p.qkv + static_cast<int64_t>(t) * (q_dim + 2 * kv_dim);
  const int half = p.rotary_dim / 2;
  if (tid < half) rope_cos_sin(static_cast<float>(pos), p.inv_freq[tid], p.attention_factor, &cos_s[tid], &sin_s[tid]);
  for (int i = tid; i < D; i += kThreads) {
    q_s[i] = src[h * D + i];
    k_s[i] = src[q_dim + kvh * D + i];
    v_s[i] = src[q_dim + kv_dim + kvh * D + i];
  }
  __syncthreads();
  const bool writer = h % group == 0 && split == 0;
  if (warp == 0) {
    prepare_head(q_s, D, p.q_norm, p.eps, cos_s, sin_s, half, lane);
  } else if (warp == 1) {
    prepare_head(k_s, D, p.k_norm, p.eps, cos_s, sin_s, half, lane);
    // The new key and value as the cache holds them (bf16), for this block's own reads.
    const int64_t slot = p.slots[t];
    for (int i = lane; i < D; i += 32) {
      const bf16_bits b = to_bf16(k_s[i]);
      if (writer) p.k_cache[slot * kv_dim + kvh * D + i] = b;
      k_row[i] = b;
    }
  } else if (warp == 2) {
    const int64_t slot = p.slots[t];
    for (int i = lane; i < D; i += 32) {
      const bf16_bits b = to_bf16(v_s[i]);
      if (writer) p.v_cache[slot * kv_dim + kvh * D + i] = b;
      v_row[i] = b;
    }
  }
  // Each position's row: in the cache, or (the new position) in shared memory. Generic pointers,
  // so one load path serves both.
  const int32_t* table = a.block_table + static_cast<int64_t>(t) * a.max_pages_per_seq;
  for (int i = tid; i < n; i += kThreads) {
    const int ps = p0 + i;
    rowoff[i] = ps == pos ? -1
                          : ((static_cast<int64_t>(table[ps / a.page_size]) * a.page_size + ps % a.page_size) *
                                 a.num_kv_heads + kvh) * D;
  }
  __syncthreads();

  // Scores, a thread a position, two positions' loads in flight at once.
  const float4* qf = reinterpret_cast<const float4*>(q_s);
  auto dot = [&](const uint4 (&kv)[CH]) {
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const float4 q0 = qf[2 * c], q1 = qf[2 * c + 1];
      s = fmaf(q0.x, bf16_lo(kv[c].x), s);
      s = fmaf(q0.y, bf16_hi(kv[c].x), s);
      s = fmaf(q0.z, bf16_lo(kv[c].y), s);
      s = fmaf(q0.w, bf16_hi(kv[c].y), s);
      s = fmaf(q1.x, bf16_lo(kv[c].z), s);
      s = fmaf(q1.y, bf16_hi(kv[c].z), s);
      s = fmaf(q1.z, bf16_lo(kv[c].w), s);
      s = fmaf(q1.w, bf16_hi(kv[c].w), s);
    }
    return s * a.scale;
  };
  auto k_ptr = [&](int i) {
    const int64_t off = rowoff[i];
    return off >= 0 ? reinterpret_cast<const uint4*>(a.k_cache + off) : reinterpret_cast<const uint4*>(k_row);
  };
  float m_local = -INFINITY;
  for (int i = tid; i < n; i += 2 * kThreads) {
    const int i2 = i + kThreads;
    const bool two = i2 < n;
    const uint4* ka = k_ptr(i);
    const uint4* kb = two ? k_ptr(i2) : ka;
    uint4 kva[CH], kvb[CH];
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      kva[c] = ka[c];
      kvb[c] = kb[c];
    }
    const float sa = dot(kva);
    sc[i] = sa;
    m_local = fmaxf(m_local, sa);
    if (two) {
      const float sb = dot(kvb);
      sc[i2] = sb;
      m_local = fmaxf(m_local, sb);
    }
  }
  const bool direct = splits == 1;
  const float sink = a.sinks != nullptr ? a.sinks[h] : -INFINITY;
  float m = block_max(m_local, red);
  if (direct) m = fmaxf(m, sink);
  float l_local = 0.f;
  for (int i = tid; i < n; i += kThreads) {
    const float e = expf(sc[i] - m);
    sc[i] = e;
    l_local += e;
  }
  float l = block_sum(l_local, red);  // its barriers also publish sc
  if (direct && a.sinks != nullptr) l += expf(sink - m);

  // P V: thread = (8-dim chunk dc, position group g).
  const int dc = tid % CH, g = tid / CH;
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;
  for (int i0 = g; i0 < n; i0 += kPvUnroll * kGroups) {
    uint4 vv[kPvUnroll];
    float pr[kPvUnroll];
#pragma unroll
    for (int u = 0; u < kPvUnroll; ++u) {
      const int i = i0 + u * kGroups;
      pr[u] = 0.f;
      vv[u] = make_uint4(0, 0, 0, 0);
      if (i < n) {
        pr[u] = sc[i];
        const int64_t off = rowoff[i];
        const uint4* vr = off >= 0 ? reinterpret_cast<const uint4*>(a.v_cache + off) : reinterpret_cast<const uint4*>(v_row);
        vv[u] = vr[dc];
      }
    }
#pragma unroll
    for (int u = 0; u < kPvUnroll; ++u) {
      acc[0] = fmaf(pr[u], bf16_lo(vv[u].x), acc[0]);
      acc[1] = fmaf(pr[u], bf16_hi(vv[u].x), acc[1]);
      acc[2] = fmaf(pr[u], bf16_lo(vv[u].y), acc[2]);
      acc[3] = fmaf(pr[u], bf16_hi(vv[u].y), acc[3]);
      acc[4] = fmaf(pr[u], bf16_lo(vv[u].z), acc[4]);
      acc[5] = fmaf(pr[u], bf16_hi(vv[u].z), acc[5]);
      acc[6] = fmaf(pr[u], bf16_lo(vv[u].w), acc[6]);
      acc[7] = fmaf(pr[u], bf16_hi(vv[u].w), acc[7]);
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) red_o[g][dc * 8 + i] = acc[i];
  __syncthreads();

  float* out = a.out + (static_cast<int64_t>(t) * a.num_heads + h) * D;
  if (direct) {
    for (int d = tid; d < D; d += kThreads) {
      float o = 0.f;
      for (int q = 0; q < kGroups; ++q) o += red_o[q][d];
      out[d] = o / l;
    }
    return;
  }

  const FusedWorkspace ws = carve_fused(a.workspace, a.num_seqs, a.num_heads, D);
  const int64_t base = (static_cast<int64_t>(t) * a.num_heads + h) * kMaxSplits;
  for (int d = tid; d < D; d += kThreads) {
    float o = 0.f;
    for (int q = 0; q < kGroups; ++q) o += red_o[q][d];
    ws.o[(base + split) * D + d] = o;
  }
  if (tid == 0) {
    ws.ml[(base + split) * 2] = m;
    ws.ml[(base + split) * 2 + 1] = l;
  }
  __threadfence();
  __syncthreads();
  int* counter = ws.counters + static_cast<int64_t>(t) * a.num_heads + h;
  if (tid == 0) last_s = atomicAdd(counter, 1) == splits - 1;
  __syncthreads();
  if (!last_s) return;
  __threadfence();
  // The last split merges all of them in split order, the sink in the denominator.
  const volatile float* vml = ws.ml;
  const volatile float* vo = ws.o;
  float mm = sink;
  for (int s = 0; s < splits; ++s) mm = fmaxf(mm, vml[(base + s) * 2]);
  float ll = a.sinks != nullptr ? expf(sink - mm) : 0.f;
  for (int s = 0; s < splits; ++s) ll += vml[(base + s) * 2 + 1] * expf(vml[(base + s) * 2] - mm);
  for (int d = tid; d < D; d += kThreads) {
    float o = 0.f;
    for (int s = 0; s < splits; ++s) o += vo[(base + s) * D + d] * expf(vml[(base + s) * 2] - mm);
    out[d] = o / ll;
  }
  if (tid == 0) *counter = 0;
}

}  // namespace

size_t attention_fused_workspace_bytes(int num_seqs, int num_heads, int head_dim) {
  const size_t n = fused_partials(num_seqs, num_heads);
  return n * (head_dim + 2) * sizeof(float) + static_cast<size_t>(num_seqs) * num_heads * sizeof(int);
}

bool attention_fused_supported(int num_heads, int num_kv_heads, int head_dim, int rotary_dim, int max_seq_len) {
  return (head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128) && num_kv_heads > 0 &&
         num_heads % num_kv_heads == 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim && max_seq_len > 0 &&
         max_seq_len <= kChunk * kMaxSplits;
}

cudaError_t attention_decode_fused(const QkvPrepareArgs& p, const AttentionDecodeArgs& a, cudaStream_t stream) {
  if (a.num_seqs <= 0) return cudaSuccess;
  if (!attention_fused_supported(a.num_heads, a.num_kv_heads, a.head_dim, p.rotary_dim, a.max_seq_len) ||
      p.tokens != a.num_seqs || a.page_size <= 0)
    return cudaErrorInvalidValue;
  const int splits = (a.max_seq_len + kChunk - 1) / kChunk;
  const dim3 grid(a.num_heads, a.num_seqs, splits);
  switch (a.head_dim) {
    case 16: return launch_pdl(attention_fused_kernel<2>, grid, kThreads, 0, stream, p, a);
    case 32: return launch_pdl(attention_fused_kernel<4>, grid, kThreads, 0, stream, p, a);
    case 64: return launch_pdl(attention_fused_kernel<8>, grid, kThreads, 0, stream, p, a);
    default: return launch_pdl(attention_fused_kernel<16>, grid, kThreads, 0, stream, p, a);
  }
}

}  // namespace moeflash
