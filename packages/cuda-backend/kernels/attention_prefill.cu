// Prefill / verify attention: many query rows per sequence over the paged bf16 KV cache, flash-
// attention style on tensor cores.
//
// Block = (tile of rows of one sequence, kv head, subset of up to 16 of its query heads). Its 64
// query vectors are (row, head) pairs, vector m = row (m / heads) and head (m % heads), so each
// K/V position read from the cache serves every row of the tile and every query head that shares
// the kv head. Each of the 4 warps owns 16 vectors: one m16 tile of mma.m16n8k16.
// The block walks the positions its rows see in tiles of 64 starting at multiples of 64: K (as
// stored) and V (transposed, so that P V's B operand is one 32-bit load) go to shared memory,
// then each warp computes S = Q K^T, masks it per vector (causal + window), updates its running
// max and sum (online softmax, float32) and accumulates P V. The sink joins the denominator at
// the end.
//
// Precision: K and V are bf16 already and enter the MMA exactly; Q and P are float32 and enter
// as bf16 hi + lo pairs (two MMAs each), so every product is within ~2^-17 of float32 and the
// result stays near the float32 reference (bf16 Q and P alone would cost ~1e-3 relative).
#include <algorithm>
#include <climits>
#include <cmath>

#include "common.cuh"
#include "mma_bf16.cuh"

namespace moeflash {
namespace {

constexpr int kVectors = kAttentionPrefillVectors;  // query vectors a block: 4 warps x 16
constexpr int kThreads = 128;
constexpr int kKeys = 64;  // key positions a tile
// Shared rows are padded by 8 bf16 (4 words): the 8 rows that one fragment load touches then
// start 4 banks apart, and the 4 lanes of a row cover the 4 banks between.
constexpr int kPad = 8;

template <int DP>
struct Smem {
  alignas(16) bf16_bits k[kKeys][DP + kPad];  // [position][dim]
  alignas(16) bf16_bits vt[DP][kKeys + kPad];  // [dim][position]
  int len[kVectors];                           // per row of the tile
  int lo[kVectors];                            // first visible position per row
};

__device__ __forceinline__ uint4 cache_chunk(const bf16_bits* cache, const AttentionPrefillArgs& a, const int32_t* table,
                                             int kvh, int pos, int chunk) {
  const int page = __ldg(table + pos / a.page_size);
  const int64_t row = (static_cast<int64_t>(page) * a.page_size + pos % a.page_size) * a.num_kv_heads + kvh;
  return __ldg(reinterpret_cast<const uint4*>(cache + row * a.head_dim) + chunk);
}

// DP: head_dim padded to a multiple of 16 that the fragments walk (64 or 128); dims from
// head_dim to DP are zeros in Q, K and V.
template <int DP>
__global__ void __launch_bounds__(kThreads) attention_prefill_kernel(AttentionPrefillArgs a) {
  constexpr int KS = DP / 16;     // k-steps of Q K^T over the head dims
  constexpr int DT = DP / 8;      // n-tiles of P V over the head dims
  constexpr int NT = kKeys / 8;   // n-tiles of Q K^T over a key tile
  constexpr int PS = kKeys / 16;  // k-steps of P V over a key tile
  constexpr int CH = DP / 8;      // 16-byte chunks of a padded K/V row
  __shared__ Smem<DP> sm;

  const int D = a.head_dim;
  const int group = a.num_heads / a.num_kv_heads;
  const int heads = min(group, kAttentionPrefillMaxHeads);
  const int subsets = (group + heads - 1) / heads;
  const int kvh = blockIdx.y / subsets;
  const int h0 = kvh * group + (blockIdx.y % subsets) * heads;
  const int nh = min(heads, kvh * group + group - h0);
  const int row0 = a.tiles[2 * blockIdx.x];
  // More rows than fit would overrun the per-row arrays: the excess is left unwritten instead.
  const int count = min(a.tiles[2 * blockIdx.x + 1], kVectors / heads);
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;  // fragment row (and B column)
  const int t = lane & 3;   // fragment column pair

  if (tid < count) {
    const int len = a.seq_lens[row0 + tid];
    sm.len[tid] = len;
    sm.lo[tid] = a.window > 0 ? max(0, len - a.window) : 0;
  }
  __syncthreads();
  // Positions any row of the tile sees, and the row whose block table maps all of them.
  int kbeg = INT_MAX, kend = 0, longest = 0;
  for (int r = 0; r < count; ++r) {
    kbeg = min(kbeg, sm.lo[r]);
    if (sm.len[r] > kend) kend = sm.len[r], longest = r;
  }
  const int32_t* table = a.block_table + static_cast<int64_t>(row0 + longest) * a.max_pages_per_seq;

  // This thread's two accumulator rows are vectors warp*16 + g and + 8; a vector that is padding
  // (past the tile's rows, or a head outside the subset) sees no keys and is not written.
  bool valid[2];
  int vrow[2], vhead[2], vlen[2], vlo[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int m = warp * 16 + g + 8 * i;
    const int r = m / heads;
    const int hh = m - r * heads;
    valid[i] = r < count && hh < nh;
    vrow[i] = row0 + r;
    vhead[i] = h0 + hh;
    vlen[i] = valid[i] ? sm.len[r] : 0;
    vlo[i] = valid[i] ? sm.lo[r] : INT_MAX;
  }
  // The warp's own span, to skip key tiles that none of its vectors sees.
  int wend = max(vlen[0], vlen[1]);
  int wbeg = min(vlo[0], vlo[1]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    wend = max(wend, __shfl_xor_sync(kFullMask, wend, o));
    wbeg = min(wbeg, __shfl_xor_sync(kFullMask, wbeg, o));
  }

  // Q as A fragments, hi and lo parts, for the whole kernel.
  uint32_t qhi[KS][4], qlo[KS][4];
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int i = j & 1;
      const int d = kk * 16 + (j >> 1) * 8 + 2 * t;
      float2 x = make_float2(0.f, 0.f);
      if (valid[i] && d < D)
        x = *reinterpret_cast<const float2*>(a.q + (static_cast<int64_t>(vrow[i]) * a.num_heads + vhead[i]) * D + d);
      split_bf16x2(x.x, x.y, qhi[kk][j], qlo[kk][j]);
    }
  }

  float acc[DT][4];
#pragma unroll
  for (int n = 0; n < DT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
  float run_max[2] = {-INFINITY, -INFINITY};
  float run_sum[2] = {0.f, 0.f};  // this lane's share; the row's 4 lanes are summed at the end

  // Key tiles start at multiples of kKeys, so a row's keys are grouped the same way whichever
  // rows share its tile: its result depends on its own inputs only.
  for (int k0 = kbeg - kbeg % kKeys; k0 < kend; k0 += kKeys) {
    __syncthreads();  // every warp is done with the previous tile
    // Positions outside [kbeg, kend) (possibly unmapped or unwritten) and dims past head_dim are
    // zeros: a masked score gives P = 0, and 0 * NaN would still poison the sum.
    for (int c = tid; c < kKeys * CH; c += kThreads) {
      const int j = c / CH, ch = c - j * CH;  // consecutive threads along a row: coalesced
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (k0 + j >= kbeg && k0 + j < kend && ch * 8 < D) v = cache_chunk(a.k_cache, a, table, kvh, k0 + j, ch);
      *reinterpret_cast<uint4*>(&sm.k[j][ch * 8]) = v;
    }
    for (int c = tid; c < kKeys * CH; c += kThreads) {
      const int j = c % kKeys, ch = c / kKeys;  // consecutive threads along the positions: the
                                               // 2-byte transposed stores go to distinct banks
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (k0 + j >= kbeg && k0 + j < kend && ch * 8 < D) v = cache_chunk(a.v_cache, a, table, kvh, k0 + j, ch);
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sm.vt[ch * 8 + 2 * e][j] = static_cast<bf16_bits>(w[e] & 0xffffu);
        sm.vt[ch * 8 + 2 * e + 1][j] = static_cast<bf16_bits>(w[e] >> 16);
      }
    }
    __syncthreads();
    if (k0 >= wend || k0 + kKeys <= wbeg) continue;  // warp-uniform

    // S = Q K^T: B[d][p] = K[p][d], so a B register is two adjacent dims of one key row.
    float s[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
      const bf16_bits* kr = &sm.k[n * 8 + g][2 * t];
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        if (kk * 16 >= D) break;
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(kr + kk * 16);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(kr + kk * 16 + 8);
        mma_bf16_16816(s[n], qhi[kk], b0, b1);
        mma_bf16_16816(s[n], qlo[kk], b0, b1);
      }
    }

    // Mask, scale and the online softmax update; s becomes P (unnormalized).
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int p = k0 + n * 8 + 2 * t + e;
          float& x = s[n][2 * i + e];
          x = p >= vlo[i] && p < vlen[i] ? x * a.scale : -INFINITY;
          mx = fmaxf(mx, x);
        }
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      const float m_new = fmaxf(run_max[i], mx);
      const float base = m_new == -INFINITY ? 0.f : m_new;  // nothing seen yet: keep exp() off NaN
      const float alpha = expf(run_max[i] - base);
      run_max[i] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[n][2 * i + e];
          x = expf(x - base);
          sum += x;
        }
      run_sum[i] = run_sum[i] * alpha + sum;
#pragma unroll
      for (int n = 0; n < DT; ++n) {
        acc[n][2 * i] *= alpha;
        acc[n][2 * i + 1] *= alpha;
      }
    }

    // acc += P V. The accumulator layout of S is the A layout of P: key n-tiles 2kk and 2kk+1
    // are the two column halves of k-step kk. B[p][d] = V[p][d] = vt[d][p].
#pragma unroll
    for (int kk = 0; kk < PS; ++kk) {
      uint32_t phi[4], plo[4];
      split_bf16x2(s[2 * kk][0], s[2 * kk][1], phi[0], plo[0]);
      split_bf16x2(s[2 * kk][2], s[2 * kk][3], phi[1], plo[1]);
      split_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1], phi[2], plo[2]);
      split_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3], phi[3], plo[3]);
#pragma unroll
      for (int n = 0; n < DT; ++n) {
        if (n * 8 >= D) break;
        const bf16_bits* vr = &sm.vt[n * 8 + g][kk * 16 + 2 * t];
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(vr);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(vr + 8);
        mma_bf16_16816(acc[n], phi, b0, b1);
        mma_bf16_16816(acc[n], plo, b0, b1);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = run_sum[i];
    l += __shfl_xor_sync(kFullMask, l, 1);
    l += __shfl_xor_sync(kFullMask, l, 2);
    if (!valid[i]) continue;
    // A valid vector sees at least its own position, so run_max is finite here.
    float f = 1.f;
    if (a.sinks != nullptr) {
      const float sink = a.sinks[vhead[i]];
      const float m = fmaxf(run_max[i], sink);
      f = expf(run_max[i] - m);
      l = l * f + expf(sink - m);
    }
    const float inv = f / l;
    float* o = a.out + (static_cast<int64_t>(vrow[i]) * a.num_heads + vhead[i]) * D;
#pragma unroll
    for (int n = 0; n < DT; ++n) {
      const int d = n * 8 + 2 * t;
      if (d < D) *reinterpret_cast<float2*>(o + d) = make_float2(acc[n][2 * i] * inv, acc[n][2 * i + 1] * inv);
    }
  }
}

template <int DP>
cudaError_t launch(const AttentionPrefillArgs& a, int subsets, cudaStream_t stream) {
  const dim3 grid(a.num_tiles, a.num_kv_heads * subsets);
  attention_prefill_kernel<DP><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

bool attention_prefill_supported(int num_heads, int num_kv_heads, int head_dim) {
  return head_dim > 0 && head_dim % 8 == 0 && head_dim <= 128 && num_kv_heads > 0 && num_heads > 0 &&
         num_heads % num_kv_heads == 0;
}

cudaError_t attention_prefill(const AttentionPrefillArgs& a, cudaStream_t stream) {
  if (a.num_tiles <= 0) return cudaSuccess;
  if (!attention_prefill_supported(a.num_heads, a.num_kv_heads, a.head_dim) || a.page_size <= 0) return cudaErrorInvalidValue;
  const int group = a.num_heads / a.num_kv_heads;
  const int heads = std::min(group, kAttentionPrefillMaxHeads);
  const int subsets = (group + heads - 1) / heads;
  if (static_cast<int64_t>(a.num_kv_heads) * subsets > 65535) return cudaErrorInvalidValue;
  return a.head_dim <= 64 ? launch<64>(a, subsets, stream) : launch<128>(a, subsets, stream);
}

}  // namespace moeflash
