// MXFP4 MoE on tensor cores (moe_mma.h describes the scheme).
//
// Tile layout (after moe_repack_mxfp4), per expert: row tile rt (16 rows) x k-tile kt (2 blocks of
// 32 columns) is 512 bytes at ((rt * nkt) + kt) * 512. Lane l = 4g + q holds the uint4
//   { row g word q of block 2kt, row g+8 word q of block 2kt, row g word q of block 2kt+1,
//     row g+8 word q of block 2kt+1 }
// (word q of a 16-byte block = its elements 8q..8q+7, bits permuted by tile_word). The E8M0
// scales of a tile are 32 bytes at tile * 32: bytes 4g..4g+3 = scale of (row g, block 2kt),
// (g+8, 2kt), (g, 2kt+1), (g+8, 2kt+1).
//
// mma.m16n8k16 needs, from lane (g, q), A rows g and g+8 at k = 2q, 2q+1, 2q+8, 2q+9 and B column g
// at the same k. The k order inside an mma is free as long as A and B agree, so the lane's word q
// (8 elements) feeds two mmas over one 32-element block: nibble pair (p, p+4) of the word is the
// f16x2 for k = (2q, 2q+1) or (2q+8, 2q+9). Both mmas of a block share one E8M0 scale per row,
// applied to their sum in float32. B is staged in shared memory in the same order.
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>

#include "common.cuh"
#include "moe_mma.h"
#include "router_topk.cuh"

namespace moeflash {
namespace {

constexpr int kSplitK = 8;  // warps of a block: the row tile's reduction split 8 ways
constexpr int kThreads = kSplitK * 32;
constexpr int kMaxCols = 16;

// The repack permutes the bits of every 32-bit word of codes so that each nibble pair (p, p + 4)
// becomes an f16x2 equal to E2M1 * 2^-14 (low half: nibble p; same bit move as e2m1_pair_scaled in
// common.cuh) in 11 integer operations per word instead of 15: pair p keeps its low code's three
// magnitude bits at tile_mag_pos(p) (cyclically) and its sign bit at tile_sign_pos(p), its high
// code's at the same places + 16, chosen so that pairs 1 and 3 need one rotate and one AND and pair 2 no
// rotate for its magnitude (no placement lets all four pairs take one rotate: an exhaustive search).
// f16 wants the magnitude at bits 9..11 and the sign at bit 15 (25..27 and 31 for the high half).
__host__ __device__ constexpr int tile_mag_pos(int p) { return p == 0 ? 0 : p == 1 ? 13 : p == 2 ? 9 : 6; }
__host__ __device__ constexpr int tile_sign_pos(int p) { return p == 0 ? 4 : p == 1 ? 19 : p == 2 ? 5 : 12; }

__device__ __forceinline__ uint32_t rotl32(uint32_t w, int n) { return __funnelshift_l(w, w, n); }

template <int P>
__device__ __forceinline__ uint32_t e2m1_h2(uint32_t w) {
  static_assert((tile_mag_pos(P) + 32 - 9) % 32 == (tile_sign_pos(P) + 32 - 15) % 32 || P == 0 || P == 2,
                "pairs 1 and 3 move magnitude and sign with one rotate");
  if constexpr (P == 0) return (rotl32(w, 9) & 0x0e000e00u) | (rotl32(w, 11) & 0x80008000u);
  if constexpr (P == 1) return rotl32(w, 28) & 0x8e008e00u;
  if constexpr (P == 2) return (w & 0x0e000e00u) | (rotl32(w, 10) & 0x80008000u);
  return rotl32(w, 3) & 0x8e008e00u;
}

// The checkpoint's word (nibble n = element 8q + n) in the layout e2m1_h2 decodes.
__device__ __forceinline__ uint32_t tile_word(uint32_t w) {
  uint32_t r = 0;
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t nib = (w >> (4 * (p + 4 * h))) & 0xfu;
      r |= rotl32(nib & 7u, (tile_mag_pos(p) + 16 * h) & 31);
      r |= (nib >> 3) << ((tile_sign_pos(p) + 16 * h) & 31);
    }
  return r;
}

// Byte i of a word of E8M0 codes as the float 2^(s - 127) (code 0 gives 0 instead of 2^-127 and
// 0xFF gives infinity instead of NaN: neither occurs in a usable checkpoint).
template <int I>
__device__ __forceinline__ float e8m0_byte(uint32_t s) {
  constexpr int kShift = 23 - 8 * I;
  const uint32_t v = kShift >= 0 ? (s << kShift) : (s >> (-kShift));
  return __uint_as_float(v & 0x7f800000u);
}

__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t ld_nc_u32(const uint8_t* p) {
  return __ldg(reinterpret_cast<const unsigned int*>(p));
}

// ------------------------------------------------------------------ plan
// plan[0] = item count; plan[1 + 3i ..] = { expert, columns, first index into the slot list };
// then the slot list: every (token, slot) pair grouped by expert (ascending), each group in slot
// order, cut into items of at most `cols` pairs.
__device__ __forceinline__ int plan_items_offset() { return 1; }
__host__ __device__ inline int max_items(int slots, int experts, int cols) {
  return std::min(slots, experts) + slots / cols;
}

// Exclusive prefix sums of v[0..n) in place (warp 0 walks it 32 at a time); returns the total.
__device__ int warp0_exclusive_scan(int* v, int n, int lane) {
  int carry = 0;
  for (int base = 0; base < n; base += 32) {
    const int x = base + lane < n ? v[base + lane] : 0;
    int incl = x;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int y = __shfl_up_sync(kFullMask, incl, d);
      if (lane >= d) incl += y;
    }
    if (base + lane < n) v[base + lane] = carry + incl - x;
    carry += __shfl_sync(kFullMask, incl, 31);
  }
  return carry;
}

constexpr int kPlanThreads = 1024;

__global__ void __launch_bounds__(kPlanThreads) moe_plan_kernel(const int32_t* __restrict__ ids, int slots, int experts,
                                                                int cols, int32_t* __restrict__ plan) {
  pdl_prologue();
  __shared__ int count[1024], slot_start[1024], item_start[1024];
  const int tid = threadIdx.x, lane = tid & 31;
  for (int e = tid; e < experts; e += blockDim.x) count[e] = 0;
  __syncthreads();
  for (int s = tid; s < slots; s += blockDim.x) {
    const int e = ids[s];
    if (e >= 0 && e < experts) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  for (int e = tid; e < experts; e += blockDim.x) {
    slot_start[e] = count[e];
    item_start[e] = (count[e] + cols - 1) / cols;
  }
  __syncthreads();
  if (tid < 32) {
    warp0_exclusive_scan(slot_start, experts, lane);
    const int n = warp0_exclusive_scan(item_start, experts, lane);
    if (lane == 0) plan[0] = n;
  }
  __syncthreads();
  int32_t* items = plan + plan_items_offset();
  int32_t* list = items + 3 * max_items(slots, experts, cols);
  for (int e = tid; e < experts; e += blockDim.x) {
    const int n = count[e];
    if (n == 0) continue;
    // Stable: the expert's pairs in slot order.
    int pos = slot_start[e];
    for (int s = 0; s < slots; ++s)
      if (ids[s] == e) list[pos++] = s;
    for (int j = 0, it = item_start[e]; j * cols < n; ++j, ++it) {
      items[3 * it] = e;
      items[3 * it + 1] = min(cols, n - j * cols);
      items[3 * it + 2] = slot_start[e] + j * cols;
    }
  }
}

// The same plan, built by every block in shared memory, for decode steps (<= 8 tokens, <= 64
// pairs, 8 columns an item: an expert has at most one pair a token, so an item is an expert).
// Items are ordered by their first pair instead of by expert id; nothing depends on the order.
// Saves the plan kernel's launch, which is on the critical path of every layer.
constexpr int kInlineSlots = 64;

// With `route`, the block first takes each token's top-k from the router logits (warp t, token t)
// and block 0 publishes them for the down kernel.
template <int PER_LANE>
__device__ __forceinline__ void route_in_block(const MoeMmaArgs& a, int* id_s, float* w_s) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp < a.tokens)
    topk_row<PER_LANE>(a.router_logits + static_cast<int64_t>(warp) * a.num_experts, a.num_experts, a.top_k, a.rule,
                       a.renormalize, lane, id_s + warp * a.top_k, w_s + warp * a.top_k);
}

// With `route`, *route_w (when given) points at the block's copy of the routing weights.
__device__ void build_plan_in_block(const int32_t* __restrict__ ids, int slots, int* plan_s,
                                    const MoeMmaArgs* route = nullptr, bool publish = true,
                                    const int** route_ids = nullptr, const float** route_w = nullptr) {
  __shared__ int id_s[kInlineSlots], head_s[kInlineSlots], rank_s[kInlineSlots];
  __shared__ float w_s[kInlineSlots];
  const int t = threadIdx.x;
  if (route != nullptr && route_ids != nullptr) {
    *route_ids = id_s;
    *route_w = w_s;
  }
  if (route != nullptr) {
    const int per_lane = (route->num_experts + 31) / 32;
    if (per_lane <= 1) route_in_block<1>(*route, id_s, w_s);
    else if (per_lane <= 2) route_in_block<2>(*route, id_s, w_s);
    else if (per_lane <= 4) route_in_block<4>(*route, id_s, w_s);
    else route_in_block<8>(*route, id_s, w_s);
    __syncthreads();
    if (publish && blockIdx.x == 0 && t < slots) {
      route->route_ids[t] = id_s[t];
      route->route_weights[t] = w_s[t];
    }
  } else if (t < slots) {
    id_s[t] = ids[t];
  }
  __syncthreads();
  if (t < slots) {
    const int e = id_s[t];
    int head = t, rank = 0;
    for (int s = 0; s < t; ++s)
      if (id_s[s] == e) {
        head = min(head, s);
        ++rank;
      }
    head_s[t] = head;
    rank_s[t] = rank;
  }
  __syncthreads();
  int* items = plan_s + 1;
  int* list = items + 3 * kInlineSlots;
  if (t < slots) {
    const int head = head_s[t];
    int start = 0;  // pairs of the items whose first pair comes before this one's
    for (int s = 0; s < slots; ++s) start += head_s[s] < head;
    list[start + rank_s[t]] = t;
    if (head == t) {
      int item = 0, cols = 0;
      for (int s = 0; s < slots; ++s) {
        item += s < t && head_s[s] == s;
        cols += head_s[s] == t;
      }
      items[3 * item] = id_s[t];
      items[3 * item + 1] = cols;
      items[3 * item + 2] = start;
    }
  }
  if (t == 0) {
    int n = 0;
    for (int s = 0; s < slots; ++s) n += head_s[s] == s;
    plan_s[0] = n;
  }
  __syncthreads();
}

// ------------------------------------------------------------------ shared pieces of a block
// B staging: column j is the float32 vector src(j) of length kd, multiplied by a power of two
// 2^shift_j chosen from its largest magnitude (largest |x| * 2^shift_j < 2^15, so f16 cannot
// overflow) and stored as f16 in the mma k order: uint4 (j, block b, q) holds the f16x2 pairs
// (8q, 8q+4), (8q+1, 8q+5), (8q+2, 8q+6), (8q+3, 8q+7) of the block. col_unscale[j] =
// 2^(14 - shift_j) undoes both this scale and the 2^-14 of the decoded weights.
struct Staging {
  uint4* xs;
  int stride;  // uint4 per column: nb * 4 + 4 (the pad spreads the 8 columns a warp reads over banks)
};

template <typename SrcFn>
__device__ void stage_columns(const Staging& st, int cols, int kd, SrcFn src, float* col_unscale,
                              float (*amax_part)[kMaxCols]) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n4 = kd / 4;
  __syncthreads();  // the item's slot list (load_item) is in shared memory
  for (int j = 0; j < cols; ++j) {
    const float4* v = reinterpret_cast<const float4*>(src(j));
    float m = 0.f;
    for (int i = tid; i < n4; i += kThreads) {
      const float4 f = v[i];
      m = fmaxf(m, fmaxf(fmaxf(fabsf(f.x), fabsf(f.y)), fmaxf(fabsf(f.z), fabsf(f.w))));
    }
    m = warp_max(m);
    if (lane == 0) amax_part[warp][j] = m;
  }
  __syncthreads();
  __shared__ float col_scale[kMaxCols];
  if (tid < cols) {
    float m = 0.f;
    for (int w = 0; w < kSplitK; ++w) m = fmaxf(m, amax_part[w][tid]);
    int shift = 0;
    if (m > 0.f && m <= 3.402823466e38f) {
      const int e = static_cast<int>((__float_as_uint(m) >> 23) & 0xff) - 127;  // m in [2^e, 2^(e+1))
      shift = min(126, max(-126, 14 - e));
    }
    col_scale[tid] = ldexpf(1.0f, shift);
    col_unscale[tid] = ldexpf(1.0f, 14 - shift);
  }
  __syncthreads();
  const int nb = kd / 32;
  const int units = cols * nb * 4;
  for (int u = tid; u < units; u += kThreads) {
    const int j = u / (nb * 4);
    const int r = u - j * nb * 4;  // b * 4 + q
    const float s = col_scale[j];
    const float4* p = reinterpret_cast<const float4*>(src(j) + r * 8);
    const float4 lo = p[0], hi = p[1];
    uint4 h;
    const __half2 h0 = __floats2half2_rn(lo.x * s, hi.x * s);
    const __half2 h1 = __floats2half2_rn(lo.y * s, hi.y * s);
    const __half2 h2 = __floats2half2_rn(lo.z * s, hi.z * s);
    const __half2 h3 = __floats2half2_rn(lo.w * s, hi.w * s);
    h.x = *reinterpret_cast<const uint32_t*>(&h0);
    h.y = *reinterpret_cast<const uint32_t*>(&h1);
    h.z = *reinterpret_cast<const uint32_t*>(&h2);
    h.w = *reinterpret_cast<const uint32_t*>(&h3);
    st.xs[j * st.stride + r] = h;
  }
  __syncthreads();
}

// The warp's share of one row tile, kBatch k-tiles at a time: the weights of a batch are loaded
// together (one 16-byte load and one 4-byte scale load a lane per k-tile), then consumed.
template <int NB>
struct Batch {
  uint4 a[NB];
  uint32_t sc[NB];
};

template <int kBatch>
__device__ __forceinline__ void load_batch(Batch<kBatch>& B, const uint8_t* __restrict__ tiles,
                                           const uint8_t* __restrict__ scales, int kb, int k1) {
  const int lane = threadIdx.x & 31, g = lane >> 2;
  // One base address a batch; the k-tiles are immediate offsets from it.
  const uint8_t* pt = tiles + static_cast<int64_t>(kb) * 512 + lane * 16;
  const uint8_t* ps = scales + static_cast<int64_t>(kb) * 32 + g * 4;
#pragma unroll
  for (int u = 0; u < kBatch; ++u) {
    if (kb + u < k1) {
      B.a[u] = ld_stream_u4(pt + u * 512);
      B.sc[u] = ld_nc_u32(ps + u * 32);
    }
  }
}

// acc[n][i] (n-tile n, fragment element i: rows g / g+8, columns 2q / 2q+1) += the batch's
// k-tiles, in k order. Lanes whose B column is past `cols` read the last column again: the sums
// of those columns are never read, and no predicate or zero fill is needed. ONE: the item has one
// column (a one-token step), so only column 0 (elements 0 and 2) is accumulated.
template <int NT, int kBatch, bool ONE = false>
__device__ __forceinline__ void consume_batch(const Batch<kBatch>& B, int kb, int k1, const Staging& st, int cols,
                                              float (&acc)[NT][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  int boff[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) boff[n] = (ONE ? 0 : min(n * 8 + g, cols - 1)) * st.stride + q;
#pragma unroll
  for (int u = 0; u < kBatch; ++u) {
    if (kb + u < k1) {
      const int kt = kb + u;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const uint32_t wg = half ? B.a[u].z : B.a[u].x;
        const uint32_t wg8 = half ? B.a[u].w : B.a[u].y;
        const float sg = half ? e8m0_byte<2>(B.sc[u]) : e8m0_byte<0>(B.sc[u]);
        const float sg8 = half ? e8m0_byte<3>(B.sc[u]) : e8m0_byte<1>(B.sc[u]);
        const uint32_t a0 = e2m1_h2<0>(wg), a1 = e2m1_h2<0>(wg8), a2 = e2m1_h2<1>(wg), a3 = e2m1_h2<1>(wg8);
        const uint32_t a4 = e2m1_h2<2>(wg), a5 = e2m1_h2<2>(wg8), a6 = e2m1_h2<3>(wg), a7 = e2m1_h2<3>(wg8);
        const int b = 2 * kt + half;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          const uint4 bv = st.xs[boff[n] + b * 4];
          float c[4] = {0.f, 0.f, 0.f, 0.f};
          mma16816(c, a0, a1, a2, a3, bv.x, bv.y);
          mma16816(c, a4, a5, a6, a7, bv.z, bv.w);
          acc[n][0] = fmaf(c[0], sg, acc[n][0]);
          if (!ONE) acc[n][1] = fmaf(c[1], sg, acc[n][1]);
          acc[n][2] = fmaf(c[2], sg8, acc[n][2]);
          if (!ONE) acc[n][3] = fmaf(c[3], sg8, acc[n][3]);
        }
      }
    }
  }
}

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + expf(-g)); }
__device__ __forceinline__ float sigmoid_f(float z) { return 1.0f / (1.0f + expf(-z)); }

// act[slot, o] = activation(gate + bias, up + bias) for output o of `expert`; gv and uv are the
// unscaled gate and up sums.
__device__ __forceinline__ void store_activation(const MoeMmaArgs& a, int expert, int o, int slot, float gv, float uv) {
  const int I = a.inter;
  const int64_t gr = a.interleaved ? 2 * o : o, ur = a.interleaved ? 2 * o + 1 : I + o;
  if (a.gate_up_bias != nullptr) {
    const int64_t base = static_cast<int64_t>(expert) * 2 * I;
    gv += bf16_to_f32(a.gate_up_bias[base + gr]);
    uv += bf16_to_f32(a.gate_up_bias[base + ur]);
  }
  float y;
  if (a.activation == ExpertActivation::GptOssClamped) {
    gv = fminf(gv, a.limit);
    uv = fminf(fmaxf(uv, -a.limit), a.limit);
    y = (uv + 1.0f) * (gv * sigmoid_f(gv * a.alpha));
  } else {
    y = silu_f(gv) * uv;
  }
  a.act[static_cast<int64_t>(slot) * I + o] = y;
}

// y[t, rows of row tile rt] = sum over k in slot order of weight * (part + bias), the product
// rounded before the sum as the CPU backend does it; threads first, first + stride, ... share the
// rows. Run by the last writer of the row tile's parts (part is read from L2: other blocks wrote it).
__device__ __forceinline__ void combine_row_tile(const MoeMmaArgs& a, int rt, int first, int stride,
                                                 const int* ids = nullptr, const float* wts = nullptr) {
  const int H = a.hidden, K = a.top_k;
  if (ids == nullptr) ids = a.expert_ids;
  if (wts == nullptr) wts = a.expert_weights;
  for (int v = first; v < a.tokens * 16; v += stride) {
    const int t = v >> 4, row = rt * 16 + (v & 15);
    float sum = 0.f;
    for (int k = 0; k < K; ++k) {
      const int slot = t * K + k;
      float x = __ldcg(a.part + static_cast<int64_t>(slot) * H + row);
      if (a.down_bias != nullptr) x += bf16_to_f32(a.down_bias[static_cast<int64_t>(ids[slot]) * H + row]);
      sum = __fadd_rn(sum, __fmul_rn(wts[slot], x));
    }
    a.y[static_cast<int64_t>(t) * H + row] = sum;
  }
}

// ------------------------------------------------------------------ streaming (persistent) form
// One kernel for both projections. The grid is what fits on the device at once; block b takes a
// contiguous run of the step's units (item, row tile), item-major, so it stages an item's vectors
// once for all its row tiles. Each warp streams its k-range of unit after unit with two register
// batches: the loads of the next batch (of this unit or the next one) are issued before the
// current batch is consumed, so weight loads stay in flight through the reductions, barriers and
// epilogues that a block-per-row-tile grid pays for with idle memory.
// kBatch: k-tiles whose loads a warp issues together; two batches are held (the one consumed and
// the next), and MINB resident blocks a multiprocessor bound the registers for them.
template <int NT, bool DOWN, int kBatch, int MINB>
__global__ void __launch_bounds__(kThreads, MINB) moe_mma_stream_kernel(MoeMmaArgs a, int cols_per_item,
                                                                                   int row_tiles, bool inline_plan) {
  pdl_prologue();
  extern __shared__ uint4 smem_xs[];
  __shared__ float red[2][kSplitK][NT * 4][32];
  __shared__ float amax_part[kSplitK][kMaxCols];
  __shared__ float col_unscale[kMaxCols];
  __shared__ int slot_s[kMaxCols];
  __shared__ int item_s[2];  // expert, columns of the staged item
  __shared__ bool last;
  __shared__ int plan_s[1 + 4 * kInlineSlots];
  const int slots = a.tokens * a.top_k;
  const int32_t* plan = a.plan;
  int max_it = max_items(slots, a.num_experts, cols_per_item);
  if (inline_plan) {
    build_plan_in_block(a.expert_ids, slots, plan_s);
    plan = plan_s;
    max_it = kInlineSlots;
  }
  const int n_items = plan[0];
  const int total = n_items * row_tiles;
  const int per_block = (total + gridDim.x - 1) / gridDim.x;
  const int u0 = blockIdx.x * per_block, u1 = min(total, u0 + per_block);
  if (u0 >= u1) return;
  const int32_t* items = plan + plan_items_offset();
  const int32_t* list = items + 3 * max_it;

  const int H = a.hidden, I = a.inter;
  const int kd = DOWN ? I : H;  // reduction length
  const int rows = DOWN ? H : 2 * I;
  const int nb = kd / 32, nkt = nb / 2;
  const int64_t expert_tiles = static_cast<int64_t>(rows / 16) * nkt;
  const uint8_t* wblocks = DOWN ? a.down_blocks : a.gate_up_blocks;
  const uint8_t* wscales = DOWN ? a.down_scales : a.gate_up_scales;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int per = (nkt + kSplitK - 1) / kSplitK;
  const int k0 = min(nkt, warp * per), k1 = min(nkt, k0 + per);
  const int nbat = (k1 - k0 + kBatch - 1) / kBatch;  // batches a unit (0 for a warp with no k-tiles)

  // First tile of unit u for this block's warps.
  auto unit_tiles = [&](int u, const uint8_t*& t, const uint8_t*& sc) {
    const int item = u / row_tiles, rt = u - item * row_tiles;
    const int64_t tile0 = items[3 * item] * expert_tiles + static_cast<int64_t>(rt) * nkt;
    t = wblocks + tile0 * 512;
    sc = wscales + tile0 * 32;
  };

  Batch<kBatch> B0, B1;
  const uint8_t *cur_t, *cur_s;
  unit_tiles(u0, cur_t, cur_s);
  if (nbat > 0) load_batch(B0, cur_t, cur_s, k0, k1);

  const Staging st{smem_xs, nb * 4 + 4};
  int staged = -1;
  int g_batch = 0;  // batches consumed by this warp so far: its parity says which registers hold the current one
  for (int u = u0; u < u1; ++u) {
    const int item = u / row_tiles, rt = u - item * row_tiles;
    if (item != staged) {
      __syncthreads();  // the previous item's epilogue has read slot_s and xs
      if (threadIdx.x < 2) item_s[threadIdx.x] = items[3 * item + threadIdx.x];
      if (threadIdx.x < kMaxCols) {
        const int cols = items[3 * item + 1];
        if (static_cast<int>(threadIdx.x) < cols) slot_s[threadIdx.x] = list[items[3 * item + 2] + threadIdx.x];
      }
      __syncthreads();
      const int cols = item_s[1];
      if constexpr (DOWN) {
        stage_columns(st, cols, kd, [&](int j) { return a.act + static_cast<int64_t>(slot_s[j]) * I; }, col_unscale,
                      amax_part);
      } else {
        stage_columns(st, cols, kd, [&](int j) { return a.x + static_cast<int64_t>(slot_s[j] / a.top_k) * H; },
                      col_unscale, amax_part);
      }
      staged = item;
    }
    const int expert = item_s[0], cols = item_s[1];

    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;
    for (int j = 0; j < nbat; ++j, ++g_batch) {
      // Issue the next batch's loads (this unit's next k-range, or the next unit's first).
      const uint8_t *nt = cur_t, *ns = cur_s;
      int nk = k0 + (j + 1) * kBatch;
      bool has_next = j + 1 < nbat;
      if (!has_next && u + 1 < u1) {
        unit_tiles(u + 1, nt, ns);
        nk = k0;
        has_next = true;
      }
      const int kb = k0 + j * kBatch;
      if ((g_batch & 1) == 0) {
        if (has_next) load_batch(B1, nt, ns, nk, k1);
        consume_batch<NT, kBatch>(B0, kb, k1, st, cols, acc);
      } else {
        if (has_next) load_batch(B0, nt, ns, nk, k1);
        consume_batch<NT, kBatch>(B1, kb, k1, st, cols, acc);
      }
      if (j + 1 == nbat) cur_t = nt, cur_s = ns;
    }
    const int buf = (u - u0) & 1;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[buf][warp][n * 4 + i][lane] = acc[n][i];
    __syncthreads();

    if constexpr (!DOWN) {
      for (int v = threadIdx.x; v < NT * 64; v += kThreads) {
        const int n = v >> 6, c = (v >> 5) & 1, l = v & 31;
        const int g = l >> 2, q = l & 3;
        const int col = n * 8 + 2 * q + c;
        if (col >= cols) continue;
        float gs = 0.f, us = 0.f;
#pragma unroll
        for (int w = 0; w < kSplitK; ++w) {
          gs += red[buf][w][n * 4 + c][l];
          us += red[buf][w][n * 4 + 2 + c][l];
        }
        store_activation(a, expert, rt * 8 + g, slot_s[col], gs * col_unscale[col], us * col_unscale[col]);
      }
    } else {
      for (int v = threadIdx.x; v < NT * 128; v += kThreads) {
        const int n = v >> 7, i = (v >> 5) & 3, l = v & 31;
        const int g = l >> 2, q = l & 3;
        const int col = n * 8 + 2 * q + (i & 1);
        if (col >= cols) continue;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kSplitK; ++w) sum += red[buf][w][n * 4 + i][l];
        a.part[static_cast<int64_t>(slot_s[col]) * H + rt * 16 + g + (i >= 2 ? 8 : 0)] = sum * col_unscale[col];
      }
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) last = atomicAdd(&a.counters[rt], 1) == n_items - 1;
      __syncthreads();
      if (last) {
        __threadfence();
        combine_row_tile(a, rt, threadIdx.x, kThreads);
        if (threadIdx.x == 0) a.counters[rt] = 0;
      }
    }
  }
}

// ------------------------------------------------------------------ row form (decode)
// Decode steps (<= 8 tokens, plan built in the block): block = (item, RT = 8 / SK row tiles), warp
// = (row tile, k-split). A warp streams its whole k-range in batches of kRowBatch with the next two
// batches always in flight and meets no block barrier after staging: at SK > 1 the SK warps of a row
// tile add their sums through shared memory behind a named barrier of those warps only.
constexpr int kRowBatch = 4;

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
template <bool DOWN>
__device__ __forceinline__ void trace_point(const MoeMmaArgs& a, int point) {
  if (a.trace != nullptr && threadIdx.x == 0 && blockIdx.x < kMoeTraceBlocks)
    a.trace[((DOWN ? 1 : 0) * kMoeTraceBlocks + blockIdx.x) * kMoeTracePoints + point] = global_ns();
}

__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// The down kernel reads only weights and the routing before its wait for the gate/up kernel: it
// takes the top-k from the router logits itself (or reads the ids), which the kernel before gate/up
// wrote, and gate/up's blocks launched it only after that kernel had finished (pdl_prologue). So
// its blocks, scheduled as gate/up's retire, have their first two weight batches in flight while
// the gate/up tail runs (H100, gpt-oss-20b batch 1: 40-47 us a step less than waiting first).
// ONE: a one-token step (every item has one column).
template <bool DOWN, int SK, bool ONE>
__global__ void __launch_bounds__(kThreads, 3) moe_mma_rows_kernel(MoeMmaArgs a, int groups_per_item) {
  trace_point<DOWN>(a, 0);
  if constexpr (!DOWN) {
    pdl_prologue();
    trace_point<DOWN>(a, 1);
  }
  extern __shared__ uint4 smem_xs[];
  constexpr int RT = kSplitK / SK;
  __shared__ float red[SK > 1 ? RT : 1][SK][4][32];
  __shared__ float amax_part[kSplitK][kMaxCols];
  __shared__ float col_unscale[kMaxCols];
  __shared__ int plan_s[1 + 4 * kInlineSlots];
  const int slots = a.tokens * a.top_k;
  const int* route_ids = nullptr;
  const float* route_w = nullptr;
  build_plan_in_block(a.expert_ids, slots, plan_s, a.router_logits != nullptr ? &a : nullptr, !DOWN, &route_ids,
                      &route_w);
  const int n_items = plan_s[0];
  const int item = blockIdx.x / groups_per_item;
  trace_point<DOWN>(a, 2);
  if (item >= n_items) {
    if constexpr (DOWN) pdl_prologue();
    return;
  }
  const int group = blockIdx.x - item * groups_per_item;
  const int* items = plan_s + 1;
  const int* slot_s = items + 3 * kInlineSlots + items[3 * item + 2];
  const int expert = items[3 * item], cols = items[3 * item + 1];

  const int H = a.hidden, I = a.inter;
  const int kd = DOWN ? I : H;
  const int rows = DOWN ? H : 2 * I;
  const int row_tiles = rows / 16;
  const int nb = kd / 32, nkt = nb / 2;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r = warp / SK, sk = warp - r * SK;
  const int rt = group * RT + r;
  const bool active = rt < row_tiles;
  const int per = (nkt + SK - 1) / SK;
  const int k0 = min(nkt, sk * per), k1 = active ? min(nkt, k0 + per) : k0;
  const int64_t tile0 = (static_cast<int64_t>(expert) * row_tiles + (active ? rt : 0)) * nkt;
  const uint8_t* tiles = (DOWN ? a.down_blocks : a.gate_up_blocks) + tile0 * 512;
  const uint8_t* scales = (DOWN ? a.down_scales : a.gate_up_scales) + tile0 * 32;

  Batch<kRowBatch> B0, B1;
  if (k0 < k1) load_batch(B0, tiles, scales, k0, k1);
  if (k0 + kRowBatch < k1) load_batch(B1, tiles, scales, k0 + kRowBatch, k1);
  if constexpr (DOWN) {
    pdl_prologue();  // the activations are gate/up's output
    trace_point<DOWN>(a, 1);
  }
  const Staging st{smem_xs, nb * 4 + 4};
  if constexpr (DOWN) {
    stage_columns(st, cols, kd, [&](int j) { return a.act + static_cast<int64_t>(slot_s[j]) * I; }, col_unscale,
                  amax_part);
  } else {
    stage_columns(st, cols, kd, [&](int j) { return a.x + static_cast<int64_t>(slot_s[j] / a.top_k) * H; },
                  col_unscale, amax_part);
  }
  trace_point<DOWN>(a, 3);
  if (!active) return;  // no block barrier follows

  float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
  int j = 0;
  // Two batches stay in flight: a buffer is refilled (batch j + 2) as soon as it is consumed.
  for (int kb = k0; kb < k1; kb += kRowBatch, ++j) {
    const int kn = kb + 2 * kRowBatch;
    if ((j & 1) == 0) {
      consume_batch<1, kRowBatch, ONE>(B0, kb, k1, st, cols, acc);
      if (kn < k1) load_batch(B0, tiles, scales, kn, k1);
    } else {
      consume_batch<1, kRowBatch, ONE>(B1, kb, k1, st, cols, acc);
      if (kn < k1) load_batch(B1, tiles, scales, kn, k1);
    }
  }
  trace_point<DOWN>(a, 4);
  if constexpr (SK > 1) {
#pragma unroll
    for (int i = 0; i < 4; ++i) red[r][sk][i][lane] = acc[0][i];
    named_barrier(1 + r, SK * 32);
    if (sk != 0) return;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < SK; ++w) v += red[r][w][i][lane];
      acc[0][i] = v;
    }
  }
  const int g = lane >> 2, q = lane & 3;
  if constexpr (!DOWN) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int col = 2 * q + c;
      if (col >= cols) continue;
      store_activation(a, expert, rt * 8 + g, slot_s[col], acc[0][c] * col_unscale[col], acc[0][2 + c] * col_unscale[col]);
    }
    trace_point<DOWN>(a, 5);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int col = 2 * q + (i & 1);
      if (col < cols)
        a.part[static_cast<int64_t>(slot_s[col]) * H + rt * 16 + g + (i >= 2 ? 8 : 0)] = acc[0][i] * col_unscale[col];
    }
    __threadfence();
    __syncwarp();
    int last = 0;
    if (lane == 0) last = atomicAdd(&a.counters[rt], 1) == n_items - 1;
    last = __shfl_sync(kFullMask, last, 0);
    trace_point<DOWN>(a, 5);
    if (!last) return;
    __threadfence();
    combine_row_tile(a, rt, lane, 32, route_ids, route_w);
    if (lane == 0) a.counters[rt] = 0;
    trace_point<DOWN>(a, 6);
  }
}

// ------------------------------------------------------------------ repack
__device__ __forceinline__ int source_row(MoeRowMap map, int rows, int rt, int j) {
  if (map == MoeRowMap::Identity) return rt * 16 + j;
  const int o = rt * 8 + (j & 7);
  const bool gate = j < 8;
  if (map == MoeRowMap::GateUpInterleaved) return gate ? 2 * o : 2 * o + 1;
  return gate ? o : rows / 2 + o;
}

__global__ void moe_repack_kernel(const uint8_t* __restrict__ src_blocks, const uint8_t* __restrict__ src_scales,
                                  uint8_t* __restrict__ dst_blocks, uint8_t* __restrict__ dst_scales, int rows, int nb,
                                  MoeRowMap map) {
  const int nkt = nb / 2;
  const int tile = blockIdx.x;
  const int rt = tile / nkt, kt = tile - rt * nkt;
  const int lane = threadIdx.x, g = lane >> 2, q = lane & 3;
  const int64_t r0 = source_row(map, rows, rt, g), r1 = source_row(map, rows, rt, g + 8);
  const uint32_t* w = reinterpret_cast<const uint32_t*>(src_blocks);
  uint4 v;
  v.x = tile_word(w[(r0 * nb + 2 * kt) * 4 + q]);
  v.y = tile_word(w[(r1 * nb + 2 * kt) * 4 + q]);
  v.z = tile_word(w[(r0 * nb + 2 * kt + 1) * 4 + q]);
  v.w = tile_word(w[(r1 * nb + 2 * kt + 1) * 4 + q]);
  reinterpret_cast<uint4*>(dst_blocks)[static_cast<int64_t>(tile) * 32 + lane] = v;
  if (q == 0) {
    uint8_t* d = dst_scales + static_cast<int64_t>(tile) * 32 + g * 4;
    d[0] = src_scales[r0 * nb + 2 * kt];
    d[1] = src_scales[r1 * nb + 2 * kt];
    d[2] = src_scales[r0 * nb + 2 * kt + 1];
    d[3] = src_scales[r1 * nb + 2 * kt + 1];
  }
}

// The 48 KiB default covers static and dynamic shared memory together; above ~40 KiB of dynamic
// memory the kernels' static arrays may cross it, so opt in.
template <typename K>
cudaError_t allow_smem(K kernel, size_t smem) {
  if (smem <= 40 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(smem));
}

}  // namespace

namespace {
int moe_variant() {
  static const int variant = std::max(0, std::min(3, env_int("MOEFLASH_MOE_VARIANT", 3)));
  return variant;
}
}  // namespace

bool moe_mma_routes(int tokens, int top_k, int num_experts) {
  return moe_variant() == 3 && tokens <= 8 && tokens * top_k <= kInlineSlots && num_experts <= 256 && top_k <= 32;
}

bool moe_mma_supported(int hidden, int inter) {
  return hidden > 0 && inter > 0 && hidden % 64 == 0 && inter % 64 == 0;
}

size_t moe_repack_scratch_bytes(int rows, int cols) { return static_cast<size_t>(rows) * (cols / 32) * 17; }

cudaError_t moe_repack_mxfp4(uint8_t* blocks, uint8_t* scales, int experts, int rows, int cols, MoeRowMap map,
                             void* scratch, cudaStream_t stream) {
  if (rows % 16 != 0 || cols % 64 != 0) return cudaErrorInvalidValue;
  const int nb = cols / 32;
  const size_t blk_bytes = static_cast<size_t>(rows) * nb * 16, sc_bytes = static_cast<size_t>(rows) * nb;
  uint8_t* tmp_blocks = static_cast<uint8_t*>(scratch);
  uint8_t* tmp_scales = tmp_blocks + blk_bytes;
  for (int e = 0; e < experts; ++e) {
    uint8_t* b = blocks + e * blk_bytes;
    uint8_t* s = scales + e * sc_bytes;
    cudaError_t err = cudaMemcpyAsync(tmp_blocks, b, blk_bytes, cudaMemcpyDeviceToDevice, stream);
    if (err == cudaSuccess) err = cudaMemcpyAsync(tmp_scales, s, sc_bytes, cudaMemcpyDeviceToDevice, stream);
    if (err != cudaSuccess) return err;
    moe_repack_kernel<<<(rows / 16) * (nb / 2), 32, 0, stream>>>(tmp_blocks, tmp_scales, b, s, rows, nb, map);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

size_t moe_plan_ints(int slots, int num_experts) {
  return 1 + 3 * static_cast<size_t>(max_items(slots, num_experts, 8)) + slots;
}

int moe_counter_ints(int hidden) { return (hidden + 15) / 16; }

cudaError_t moe_mxfp4_mma(const MoeMmaArgs& a, cudaStream_t stream) {
  if (a.tokens <= 0) return cudaSuccess;
  if (!moe_mma_supported(a.hidden, a.inter) || a.top_k <= 0 || a.num_experts <= 0 || a.num_experts > 1024)
    return cudaErrorInvalidValue;
  const int slots = a.tokens * a.top_k;
  // Decode steps (<= 8 tokens: an expert has at most 8 pairs) take one n-tile; larger steps two.
  const int cols = a.tokens <= 8 ? 8 : 16;
  const bool inline_plan = a.tokens <= 8 && slots <= kInlineSlots;
  const int items = inline_plan ? std::min(slots, a.num_experts) : max_items(slots, a.num_experts, cols);
  const int alloc_cols = std::min(cols, slots);
  cudaError_t e = cudaSuccess;
  if (!inline_plan) {
    e = launch_pdl(moe_plan_kernel, 1, kPlanThreads, 0, stream, a.expert_ids, slots, a.num_experts, cols, a.plan);
    if (e != cudaSuccess) return e;
  }

  const size_t gu_smem = sizeof(uint4) * alloc_cols * static_cast<size_t>(a.hidden / 32 * 4 + 4);
  const size_t dn_smem = sizeof(uint4) * alloc_cols * static_cast<size_t>(a.inter / 32 * 4 + 4);
  auto launch = [&](auto kernel, size_t smem, int row_tiles) {
    cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    const int fit = device_sm_count() * resident_blocks(reinterpret_cast<const void*>(kernel), kThreads, smem);
    const int grid = std::max(1, std::min(items * row_tiles, fit));
    return launch_pdl(kernel, grid, kThreads, smem, stream, a, cols, row_tiles, inline_plan);
  };
  // Decode steps take the row form. For measurements, MOEFLASH_MOE_VARIANT picks the streaming form
  // instead (0: batches of 6 k-tiles, 2 blocks a multiprocessor; 1: 4 k-tiles, 3 blocks; 2: 3
  // k-tiles, 4 blocks), and MOEFLASH_MOE_WARPS sets the row form's warp target.
  const int variant = moe_variant();
  const int target_warps = std::max(1, env_int("MOEFLASH_MOE_WARPS", 2500));
  if (a.router_logits != nullptr && !moe_mma_routes(a.tokens, a.top_k, a.num_experts))
    return cudaErrorInvalidValue;  // the caller routes first (router_topk) for these steps
  if (variant == 3 && inline_plan) {
    // Enough warps to keep the device's loads in flight: the k-split SK is the smallest that gets
    // items * row tiles * SK to the target (measured on an H100: 36 us a gpt-oss-20b layer at one
    // token against 43 us for the streaming form).
    auto rows_launch = [&](auto k1, auto k2, auto k4, auto k8, size_t smem, int row_tiles) {
      const int units = items * row_tiles;
      const int tw = target_warps;
      const int sk = units >= tw ? 1 : units * 2 >= tw ? 2 : units * 4 >= tw ? 4 : 8;
      const int rt_per_block = kSplitK / sk;
      const int groups = (row_tiles + rt_per_block - 1) / rt_per_block;
      const dim3 grid(items * groups);
      auto go = [&](auto kernel) {
        const cudaError_t err = allow_smem(kernel, smem);
        return err != cudaSuccess ? err : launch_pdl(kernel, grid, kThreads, smem, stream, a, groups);
      };
      switch (sk) {
        case 1: return go(k1);
        case 2: return go(k2);
        case 4: return go(k4);
        default: return go(k8);
      }
    };
    // One token: every item has one column (a token's experts are distinct).
    const bool one = a.tokens == 1;
#define MOEFLASH_ROWS(DOWN, ONE)                                                                             \
  rows_launch(moe_mma_rows_kernel<DOWN, 1, ONE>, moe_mma_rows_kernel<DOWN, 2, ONE>, moe_mma_rows_kernel<DOWN, 4, ONE>, \
              moe_mma_rows_kernel<DOWN, 8, ONE>, DOWN ? dn_smem : gu_smem, DOWN ? a.hidden / 16 : 2 * a.inter / 16)
    for (int rep = profile_times("moe_gu"); rep > 0 && e == cudaSuccess; --rep)
      e = one ? MOEFLASH_ROWS(false, true) : MOEFLASH_ROWS(false, false);
    for (int rep = profile_times("moe_down"); rep > 0 && e == cudaSuccess; --rep)
      e = one ? MOEFLASH_ROWS(true, true) : MOEFLASH_ROWS(true, false);
#undef MOEFLASH_ROWS
    return e;
  }
  auto both = [&](auto gate_up, auto down) {
    const cudaError_t err = launch(gate_up, gu_smem, 2 * a.inter / 16);
    return err != cudaSuccess ? err : launch(down, dn_smem, a.hidden / 16);
  };
#define MOEFLASH_MOE_PAIR(NT, B, M) both(moe_mma_stream_kernel<NT, false, B, M>, moe_mma_stream_kernel<NT, true, B, M>)
  if (cols == 8) {
    if (variant == 1) return MOEFLASH_MOE_PAIR(1, 4, 3);
    if (variant == 2) return MOEFLASH_MOE_PAIR(1, 3, 4);
    return MOEFLASH_MOE_PAIR(1, 6, 2);
  }
  if (variant == 1) return MOEFLASH_MOE_PAIR(2, 4, 3);
  if (variant == 2) return MOEFLASH_MOE_PAIR(2, 3, 4);
  return MOEFLASH_MOE_PAIR(2, 6, 2);
#undef MOEFLASH_MOE_PAIR
}

}  // namespace moeflash
