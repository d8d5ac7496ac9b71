// MXFP4 expert projections for 1-8 tokens, weights dequantized in registers.
//
// Weight layout (gpt-oss checkpoints): blocks [E, rows, cols/32, 16] bytes, two E2M1 codes a byte
// (element 2i in the low nibble), scales [E, rows, cols/32] E8M0. One 16-byte load is one block of
// 32 elements; a lane owns whole blocks of a row (lane l: blocks l, l + 32, ...), so a warp's loads
// of a row are 512 contiguous bytes. Each block's products are summed unscaled and multiplied by
// the block scale once (e2m1_pair_scaled in common.cuh explains the 2^-14 factor).
//
// The activation vectors a lane multiplies with (x of the tokens, or the expert activations) are
// read in a blocked layout where the 8 float4 of block b sit at float4 index s * (cols/32) + b,
// s = 0..7, so that a warp's 16-byte reads are contiguous. x is put in that layout when it is
// staged in shared memory; the gate/up kernel writes its output in it for the down kernel.
//
// Routing: the kernels read expert_ids [tokens, top_k] from device memory (the router's output).
// An expert used by several (token, slot) pairs is read once per launch: the block of its first
// slot, in token-major order, does all its pairs; blocks of later slots of the same expert exit.
#include <algorithm>

#include "common.cuh"

namespace moeflash {
namespace {

constexpr int kMaxSlots = 64;  // tokens * top_k

// The (token, slot) pairs whose expert is that of slot `s`, as a bitmask over slots, and whether
// `s` is the first of them. ids of up to 64 slots are held two a lane (slot l and l + 32).
struct SlotIds {
  int a, b;
};
__device__ __forceinline__ SlotIds load_slot_ids(const int32_t* ids, int slots, int lane) {
  return SlotIds{lane < slots ? ids[lane] : -1, lane + 32 < slots ? ids[lane + 32] : -1};
}
__device__ __forceinline__ uint64_t slots_of_expert(const SlotIds& s, int expert) {
  const uint32_t lo = __ballot_sync(kFullMask, s.a == expert);
  const uint32_t hi = __ballot_sync(kFullMask, s.b == expert);
  return (static_cast<uint64_t>(hi) << 32) | lo;
}
__device__ __forceinline__ int expert_of_slot(const SlotIds& s, int slot) {
  const int a = __shfl_sync(kFullMask, s.a, slot & 31);
  const int b = __shfl_sync(kFullMask, s.b, slot & 31);
  return slot < 32 ? a : b;
}

// The first slot at or after `from` that is its expert's first slot, or `slots` if none.
__device__ __forceinline__ int next_first_slot(const SlotIds& s, int slots, int from) {
  for (int slot = from; slot < slots; ++slot) {
    const uint64_t m = slots_of_expert(s, expert_of_slot(s, slot));
    if ((m & ((uint64_t{1} << slot) - 1)) == 0) return slot;
  }
  return slots;
}

// Index of the j-th set bit of a slot mask (j < 64), lowest first.
__device__ __forceinline__ int nth_slot(uint64_t m, int j) {
  for (int i = 0; i < j; ++i) m &= m - 1;
  return __ffsll(static_cast<long long>(m)) - 1;
}

// Sums over one 32-element block of ROWS rows (4 packed words each) times the matching x values
// of NX vectors: bd[r][j] += sum_i w[r][i] x[j][i], unscaled. xs(j, s) returns the float4 of slot s
// (elements 4s..4s+3 of the block) of vector j; each is loaded once for all rows. Word q holds
// elements 8q..8q+7; nibble pair p covers elements 8q+p (in float4 slot 2q) and 8q+p+4 (slot
// 2q+1), component p of each.
template <int ROWS, int NX, typename XFn>
__device__ __forceinline__ void block_dot(const uint4 (&wq)[ROWS], int nx, XFn xs, float (&bd)[ROWS][NX]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    float2 d[ROWS][4];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const uint32_t w = q == 0 ? wq[r].x : q == 1 ? wq[r].y : q == 2 ? wq[r].z : wq[r].w;
      d[r][0] = e2m1_pair_scaled<0>(w);
      d[r][1] = e2m1_pair_scaled<1>(w);
      d[r][2] = e2m1_pair_scaled<2>(w);
      d[r][3] = e2m1_pair_scaled<3>(w);
    }
#pragma unroll
    for (int j = 0; j < NX; ++j) {
      if (NX == 1 || j < nx) {
        const float4 lo = xs(j, 2 * q);
        const float4 hi = xs(j, 2 * q + 1);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          float s = bd[r][j];
          s = fmaf(d[r][0].x, lo.x, s);
          s = fmaf(d[r][0].y, hi.x, s);
          s = fmaf(d[r][1].x, lo.y, s);
          s = fmaf(d[r][1].y, hi.y, s);
          s = fmaf(d[r][2].x, lo.z, s);
          s = fmaf(d[r][2].y, hi.z, s);
          s = fmaf(d[r][3].x, lo.w, s);
          s = fmaf(d[r][3].y, hi.w, s);
          bd[r][j] = s;
        }
      }
    }
  }
}

// kBatch: blocks of a row a lane loads ahead in one batch. With 3, cols <= 3072 (gpt-oss) is one
// batch; wider rows loop.
template <int ROWS, int kBatch>
struct RowLoads {
  uint4 q[ROWS][kBatch];
  uint32_t s[ROWS][kBatch];
};

template <int ROWS, int kBatch>
__device__ __forceinline__ void load_rows(RowLoads<ROWS, kBatch>& L, const uint8_t* blocks, const uint8_t* scales,
                                          const int64_t (&row_index)[ROWS], int nb, int b0) {
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int b = b0 + 32 * u;
      if (b < nb) {
        const int64_t blk = row_index[r] * nb + b;
        L.q[r][u] = ld_stream_u4(blocks + blk * 16);
        L.s[r][u] = ld_stream_u8(scales + blk);
      } else {
        L.q[r][u] = make_uint4(0, 0, 0, 0);
        L.s[r][u] = 127;
      }
    }
  }
}

// acc[r][j] += dot(row r, vector j) over the lane's blocks of one batch.
template <int ROWS, int NX, int kBatch, typename XFn>
__device__ __forceinline__ void consume_rows(const RowLoads<ROWS, kBatch>& L, int nb, int b0, int nx, XFn xs_of_block,
                                             float (&acc)[ROWS][NX]) {
#pragma unroll
  for (int u = 0; u < kBatch; ++u) {
    const int b = b0 + 32 * u;
    if (b < nb) {
      float bd[ROWS][NX];
      uint4 wq[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        wq[r] = L.q[r][u];
#pragma unroll
        for (int j = 0; j < NX; ++j) bd[r][j] = 0.f;
      }
      block_dot<ROWS, NX>(wq, nx, [&](int j, int s) { return xs_of_block(j, s, b); }, bd);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float scale = e8m0_to_f32(L.s[r][u]);
#pragma unroll
        for (int j = 0; j < NX; ++j) acc[r][j] = fmaf(bd[r][j] * kE2m1Unscale, scale, acc[r][j]);
      }
    }
  }
}

// ------------------------------------------------------------------ gate/up
constexpr int kGuWarps = 16;  // one output (its gate row and its up row) per warp

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + expf(-g)); }
__device__ __forceinline__ float sigmoid_f(float z) { return 1.0f / (1.0f + expf(-z)); }

// Block = (slot whose expert it computes, kGuWarps consecutive outputs of that expert) for every
// (token, slot) pair routed to the expert. A warp computes one output: the dot products of its
// gate row and its up row with x of each pair's token, then the activation.
template <int NX>
__global__ void __launch_bounds__(kGuWarps * 32) moe_gate_up_kernel(Mxfp4Experts w, const float* __restrict__ x,
                                                                  const int32_t* __restrict__ ids, MoeDims d,
                                                                  ExpertActivation act, float limit, float alpha,
                                                                  float* __restrict__ out) {
  extern __shared__ float4 xs[];  // [NX][8][nb] float4, blocked layout of each pair's token
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int slots = d.tokens * d.top_k;
  const int slot = blockIdx.y;
  const SlotIds sid = load_slot_ids(ids, slots, lane);
  const int expert = expert_of_slot(sid, slot);
  const uint64_t pairs = slots_of_expert(sid, expert);
  if ((pairs & ((uint64_t{1} << slot) - 1)) != 0) return;  // an earlier slot does this expert
  const int np = min(__popcll(pairs), NX);

  const int H = d.hidden, I = d.inter;
  const int nb = H / 32;
  const int o = blockIdx.x * kGuWarps + warp;
  const int oc = min(o, I - 1);  // past the end: recompute the last output, never stored
  const bool interleaved = act == ExpertActivation::GptOssClamped;
  const int64_t base = expert * 2 * static_cast<int64_t>(I);
  const int64_t row_index[2] = {base + (interleaved ? 2 * oc : oc), base + (interleaved ? 2 * oc + 1 : I + oc)};

  // Weight loads go out first; staging x and the barrier overlap their latency.
  constexpr int kBatch = 3;
  RowLoads<2, kBatch> L;
  load_rows<2, kBatch>(L, w.blocks, w.scales, row_index, nb, lane);

  const int n4 = H / 4;
  {
    uint64_t m = pairs;
    for (int j = 0; j < np; ++j, m &= m - 1) {
      const int t = (__ffsll(static_cast<long long>(m)) - 1) / d.top_k;
      const float* xt = x + static_cast<int64_t>(t) * H;
      for (int e = threadIdx.x; e < n4; e += blockDim.x) {
        // float4 e holds elements 4e..4e+3: block e / 8, slot e % 8.
        xs[(j * 8 + (e & 7)) * nb + (e >> 3)] = ld_f4(xt + 4 * e);
      }
    }
  }
  __syncthreads();

  float acc[2][NX];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int j = 0; j < NX; ++j) acc[r][j] = 0.f;
  auto xs_of_block = [&](int j, int s, int b) { return xs[(j * 8 + s) * nb + b]; };
  for (int b0 = lane;;) {
    consume_rows<2, NX, kBatch>(L, nb, b0, np, xs_of_block, acc);
    b0 += 32 * kBatch;
    if (b0 >= nb) break;
    load_rows<2, kBatch>(L, w.blocks, w.scales, row_index, nb, b0);
  }

  constexpr int kN = next_pow2(2 * NX);
  float v[kN];
#pragma unroll
  for (int i = 0; i < kN; ++i) v[i] = 0.f;
#pragma unroll
  for (int j = 0; j < NX; ++j) {
    v[j] = acc[0][j];
    v[NX + j] = acc[1][j];
  }
  warp_reduce_scatter<kN>(v, lane);
  // Totals go through shared memory so that each pair's gate and up sums meet in one lane.
  __shared__ float totals[kGuWarps][kN];
  constexpr int kLanesPerValue = 32 / kN;
  if ((lane & (kLanesPerValue - 1)) == 0) totals[warp][lane / kLanesPerValue] = v[0];
  __syncwarp();
  if (o < I && lane < np) {
    float g = totals[warp][lane];
    float u = totals[warp][NX + lane];
    if (w.bias != nullptr) {
      g += bf16_to_f32(w.bias[row_index[0]]);
      u += bf16_to_f32(w.bias[row_index[1]]);
    }
    float y;
    if (interleaved) {
      g = fminf(g, limit);
      u = fminf(fmaxf(u, -limit), limit);
      y = (u + 1.0f) * (g * sigmoid_f(g * alpha));
    } else {
      y = silu_f(g) * u;
    }
    out[static_cast<int64_t>(nth_slot(pairs, lane)) * I + static_cast<int64_t>(moe_act_blocked_index(o, I))] = y;
  }
}

// ------------------------------------------------------------------ down + combine
constexpr int kDnWarps = 4;
constexpr int kDnRowsPerWarp = 2;
constexpr int kDnRows = kDnWarps * kDnRowsPerWarp;  // output rows a block owns
// Warp groups of a block split the distinct experts between them (group g takes every kDnGroups-th
// one): at one token the 4 experts of a row pair are read by 4 warps at once instead of one after
// another. Each slot still has one writer, so the combine (and the result) is unchanged.
constexpr int kDnGroups = 4;

// Block = kDnRows output rows for every token. Each warp walks the distinct experts (in the
// order of their first slot) for its rows, writing W_down[e] act[slot] to shared memory; after a
// barrier the block combines each token's slots in slot order.
template <int NX>
__global__ void __launch_bounds__(kDnWarps * kDnGroups * 32) moe_down_kernel(Mxfp4Experts w, const float* __restrict__ act,
                                                                 const int32_t* __restrict__ ids,
                                                                 const float* __restrict__ route_w, MoeDims d,
                                                                 float* __restrict__ y) {
  __shared__ float part[kMaxSlots][kDnRows];
  const int lane = threadIdx.x & 31;
  const int warp = (threadIdx.x >> 5) % kDnWarps;
  const int group = (threadIdx.x >> 5) / kDnWarps;
  const int slots = d.tokens * d.top_k;
  const int H = d.hidden, I = d.inter;
  const int nb = I / 32;
  const int row0 = blockIdx.x * kDnRows + warp * kDnRowsPerWarp;
  const SlotIds sid = load_slot_ids(ids, slots, lane);

  int nth = 0;
  for (int slot = next_first_slot(sid, slots, 0); slot < slots; slot = next_first_slot(sid, slots, slot + 1)) {
    if (nth++ % kDnGroups != group) continue;
    const int expert = expert_of_slot(sid, slot);
    int64_t row_index[kDnRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kDnRowsPerWarp; ++r) row_index[r] = static_cast<int64_t>(expert) * H + min(row0 + r, H - 1);
    constexpr int kBatch = 3;
    RowLoads<kDnRowsPerWarp, kBatch> L;
    load_rows<kDnRowsPerWarp, kBatch>(L, w.blocks, w.scales, row_index, nb, lane);

    // Up to NX pairs at a time (more only if a token lists an expert twice).
    uint64_t rest = slots_of_expert(sid, expert);
    while (rest != 0) {
      const int np = min(__popcll(rest), NX);
      const float* vec[NX];
      {
        uint64_t m = rest;
#pragma unroll
        for (int j = 0; j < NX; ++j) {
          const int s = m != 0 ? __ffsll(static_cast<long long>(m)) - 1 : 0;
          vec[j] = act + static_cast<int64_t>(s) * I;
          if (m != 0) m &= m - 1;
        }
      }
      float acc[kDnRowsPerWarp][NX];
#pragma unroll
      for (int r = 0; r < kDnRowsPerWarp; ++r)
#pragma unroll
        for (int j = 0; j < NX; ++j) acc[r][j] = 0.f;
      auto xs_of_block = [&](int j, int s, int b) { return ld_f4(vec[j] + (static_cast<int64_t>(s) * nb + b) * 4); };
      for (int b0 = lane;;) {
        consume_rows<kDnRowsPerWarp, NX, kBatch>(L, nb, b0, np, xs_of_block, acc);
        b0 += 32 * kBatch;
        if (b0 >= nb) break;
        load_rows<kDnRowsPerWarp, kBatch>(L, w.blocks, w.scales, row_index, nb, b0);
      }
      constexpr int kN = next_pow2(kDnRowsPerWarp * NX);
      float v[kN];
#pragma unroll
      for (int i = 0; i < kN; ++i) v[i] = 0.f;
#pragma unroll
      for (int r = 0; r < kDnRowsPerWarp; ++r)
#pragma unroll
        for (int j = 0; j < NX; ++j) v[r * NX + j] = acc[r][j];
      warp_reduce_scatter<kN>(v, lane);
      constexpr int kLanesPerValue = 32 / kN;
      const int idx = lane / kLanesPerValue;
      if ((lane & (kLanesPerValue - 1)) == 0 && idx < kDnRowsPerWarp * NX) {
        const int r = idx / NX;
        const int j = idx - r * NX;
        if (j < np) part[nth_slot(rest, j)][warp * kDnRowsPerWarp + r] = v[0];
      }
      for (int j = 0; j < np; ++j) rest &= rest - 1;
      if (rest != 0) load_rows<kDnRowsPerWarp, kBatch>(L, w.blocks, w.scales, row_index, nb, lane);
    }
  }
  __syncthreads();

  // Combine in slot order: y = sum_k weight * (dot + bias), the product rounded before the sum as
  // the CPU backend does it.
  for (int i = threadIdx.x; i < d.tokens * kDnRows; i += blockDim.x) {
    const int t = i / kDnRows;
    const int rl = i - t * kDnRows;
    const int row = blockIdx.x * kDnRows + rl;
    if (row >= H) continue;
    float s = 0.f;
    for (int k = 0; k < d.top_k; ++k) {
      const int slot = t * d.top_k + k;
      float v = part[slot][rl];
      if (w.bias != nullptr) v += bf16_to_f32(w.bias[static_cast<int64_t>(ids[slot]) * H + row]);
      s = __fadd_rn(s, __fmul_rn(route_w[slot], v));
    }
    y[static_cast<int64_t>(t) * H + row] = s;
  }
}

}  // namespace

cudaError_t moe_gate_up_mxfp4(const Mxfp4Experts& w, const float* x, const int32_t* expert_ids, const MoeDims& d,
                              ExpertActivation act, float limit, float alpha, float* act_out, cudaStream_t stream) {
  if (d.tokens <= 0) return cudaSuccess;
  if (d.tokens > 8 || d.top_k <= 0 || d.top_k > 8 || d.hidden % 32 != 0 || d.inter % 32 != 0)
    return cudaErrorInvalidValue;
  const dim3 grid(ceil_div(d.inter, kGuWarps), d.tokens * d.top_k);
  const int nx = d.tokens <= 1 ? 1 : d.tokens <= 2 ? 2 : d.tokens <= 4 ? 4 : 8;
  const size_t smem = static_cast<size_t>(nx) * d.hidden * sizeof(float);
  auto launch = [&](auto kernel) {
    if (smem > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    kernel<<<grid, kGuWarps * 32, smem, stream>>>(w, x, expert_ids, d, act, limit, alpha, act_out);
    return cudaGetLastError();
  };
  switch (nx) {
    case 1: return launch(moe_gate_up_kernel<1>);
    case 2: return launch(moe_gate_up_kernel<2>);
    case 4: return launch(moe_gate_up_kernel<4>);
    default: return launch(moe_gate_up_kernel<8>);
  }
}

cudaError_t moe_down_mxfp4(const Mxfp4Experts& w, const float* act, const int32_t* expert_ids,
                           const float* expert_weights, const MoeDims& d, float* y, cudaStream_t stream) {
  if (d.tokens <= 0) return cudaSuccess;
  if (d.tokens > 8 || d.top_k <= 0 || d.top_k > 8 || d.hidden % 32 != 0 || d.inter % 32 != 0)
    return cudaErrorInvalidValue;
  const int grid = ceil_div(d.hidden, kDnRows);
  const int nx = d.tokens <= 1 ? 1 : d.tokens <= 2 ? 2 : d.tokens <= 4 ? 4 : 8;
  auto launch = [&](auto kernel) {
    kernel<<<grid, kDnWarps * kDnGroups * 32, 0, stream>>>(w, act, expert_ids, expert_weights, d, y);
    return cudaGetLastError();
  };
  switch (nx) {
    case 1: return launch(moe_down_kernel<1>);
    case 2: return launch(moe_down_kernel<2>);
    case 4: return launch(moe_down_kernel<4>);
    default: return launch(moe_down_kernel<8>);
  }
}

}  // namespace moeflash
