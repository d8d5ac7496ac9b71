// Token selection from logits rows: greedy arg-max, and sampling that reproduces core's
// sampling/sample.ts sampleToken bit for bit (temperature, top-k, top-p, min-p; the inverse-CDF
// draw with the Philox uniform of philox.cuh).
//
// argmax_rows splits a vocabulary row (201088 logits for gpt-oss) over several blocks so that one
// row does not wait on one multiprocessor. sample_rows gives each row one block that runs the
// reference's steps in its order: the arithmetic is sample_math.cuh's (fdlibm exp, float64
// sums added in the reference's order), the selections are exact integer work on order keys
// (radix select for top-k, a bitonic sort of top-p's candidates).
#include <algorithm>
#include <cfloat>

#include "common.cuh"
#include "philox.cuh"
#include "sample_math.cuh"

namespace moeflash {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerRow = 64;

struct ValIdx {
  float v;
  int i;
};

// Larger value first, lower index among equals, NaN below every number (the reference's order).
__device__ __forceinline__ bool better(float a, int ia, float b, int ib) {
  const bool an = a != a, bn = b != b;
  if (an || bn) return an == bn ? ia < ib : bn;
  return a > b || (a == b && ia < ib);
}

__host__ __device__ inline int blocks_per_row(int vocab) {
  const int n = (vocab + 8191) / 8192;
  return n < 1 ? 1 : (n > kMaxBlocksPerRow ? kMaxBlocksPerRow : n);
}
__host__ __device__ inline int chunk_of(int vocab) {
  const int nb = blocks_per_row(vocab);
  return (vocab + nb - 1) / nb;
}

__device__ __forceinline__ ValIdx warp_best(ValIdx x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) {
    const float ov = __shfl_xor_sync(kFullMask, x.v, m);
    const int oi = __shfl_xor_sync(kFullMask, x.i, m);
    if (better(ov, oi, x.v, x.i)) x = ValIdx{ov, oi};
  }
  return x;
}

__device__ ValIdx block_best(ValIdx x) {
  __shared__ ValIdx warps[kThreads / 32];
  x = warp_best(x);
  if ((threadIdx.x & 31) == 0) warps[threadIdx.x >> 5] = x;
  __syncthreads();
  x = warps[0];
  for (int w = 1; w < kThreads / 32; ++w)
    if (better(warps[w].v, warps[w].i, x.v, x.i)) x = warps[w];
  __syncthreads();
  return x;
}

// The best (value, index) of each block's chunk.
__global__ void __launch_bounds__(kThreads) partial_best_kernel(const float* __restrict__ logits, int vocab,
                                                               ValIdx* __restrict__ partial) {
  const int row = blockIdx.y;
  const int chunk = chunk_of(vocab);
  const int begin = blockIdx.x * chunk;
  const int end = min(vocab, begin + chunk);
  const float* l = logits + static_cast<int64_t>(row) * vocab;
  ValIdx best{__uint_as_float(0x7fc00000u), 0x7fffffff};
  for (int i = begin + threadIdx.x; i < end; i += kThreads) {
    const float v = l[i];
    if (better(v, i, best.v, best.i)) best = ValIdx{v, i};
  }
  best = block_best(best);
  if (threadIdx.x == 0) partial[row * gridDim.x + blockIdx.x] = best;
}

__global__ void argmax_final_kernel(const ValIdx* __restrict__ partial, int nb, int32_t* __restrict__ out) {
  const int row = blockIdx.x;
  ValIdx best{__uint_as_float(0x7fc00000u), 0x7fffffff};
  for (int b = threadIdx.x; b < nb; b += 32) {
    const ValIdx p = partial[row * nb + b];
    if (better(p.v, p.i, best.v, best.i)) best = p;
  }
  best = warp_best(best);
  if (threadIdx.x == 0) out[row] = best.i == 0x7fffffff ? 0 : best.i;
}

// ------------------------------------------------------------------ sampling: one block a row
// sample_kernel runs core's transform step by step for one row per block (the file comment of
// sample_math.cuh says what makes it bit-exact). Everything is recomputed from the logits and a
// few per-row scalars, so the only workspace is room for top-p's candidates.
constexpr int kST = 1024;  // threads of a sampling block
constexpr int kSWarps = kST / 32;
constexpr int kSortCapLog2 = 15;  // top-p candidates sorted in (dynamic) shared memory, 128 KiB
constexpr int kSortCap = 1 << kSortCapLog2;
constexpr int kSumSlots = 256;  // checkpoints of the probability sum, so the draw rescans one chunk
static_assert(kSWarps == 32, "the block scans give one warp's lane to each warp of the block");

using namespace sampling;

struct SampleShared {
  int hist[256];
  unsigned long long scan64[kSWarps];
  int scan32[kSWarps];
  unsigned long long red64;
  int red32;
  // block_seqsum's state
  double ss_s;
  int ss_start, ss_hit, ss_fail, ss_hitt, ss_slot;
  int slot_start[kSumSlots];
  double slot_s[kSumSlots];
  // block_radix_select's choice at each level
  int rs_digit, rs_left, rs_count;
};

struct SumResult {
  double s;
  int hit;
};

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }
__device__ __forceinline__ int warp_id() { return threadIdx.x >> 5; }

__device__ unsigned long long block_max_u64(SampleShared& sh, unsigned long long v) {
  if (threadIdx.x == 0) sh.red64 = 0;
  __syncthreads();
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) {
    const unsigned long long o = __shfl_xor_sync(kFullMask, v, m);
    v = o > v ? o : v;
  }
  if (lane_id() == 0) atomicMax(&sh.red64, v);
  __syncthreads();
  const unsigned long long r = sh.red64;
  __syncthreads();
  return r;
}

// How many i in [0, n) satisfy pred; every thread gets the count.
template <class Pred>
__device__ int block_count(int n, Pred pred) {
  int c = 0;
  for (int base = 0; base < n; base += kST) {
    const int i = base + static_cast<int>(threadIdx.x);
    c += __syncthreads_count(i < n && pred(i));
  }
  return c;
}

// Inclusive prefix sum over the threads of the block, in thread order.
__device__ unsigned long long block_inclusive_sum(SampleShared& sh, unsigned long long v) {
  const int lane = lane_id(), warp = warp_id();
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long n = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += n;
  }
  if (lane == 31) sh.scan64[warp] = v;
  __syncthreads();
  if (warp == 0) {
    unsigned long long w = sh.scan64[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long n = __shfl_up_sync(kFullMask, w, o);
      if (lane >= o) w += n;
    }
    sh.scan64[lane] = w;
  }
  __syncthreads();
  const unsigned long long r = v + (warp > 0 ? sh.scan64[warp - 1] : 0ull);
  __syncthreads();
  return r;
}

// The parity of the running q through a run of terms is a map p -> (p & m) ^ b, coded m | b << 1:
// a term that rounds to a fixed integer flips it by that integer's parity, a tie makes it even.
constexpr int kParityIdentity = 1;
__device__ __forceinline__ int parity_then(int first, int second) {
  const int m = first & second & 1;
  const int b = ((first >> 1) & second & 1) ^ (second >> 1);
  return m | (b << 1);
}

// The composition of the maps of all earlier threads (exclusive scan, thread order).
__device__ int block_exclusive_parity(SampleShared& sh, int f) {
  const int lane = lane_id(), warp = warp_id();
  int v = f;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v = parity_then(n, v);
  }
  int ex = __shfl_up_sync(kFullMask, v, 1);
  if (lane == 0) ex = kParityIdentity;
  if (lane == 31) sh.scan32[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int w = sh.scan32[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(kFullMask, w, o);
      if (lane >= o) w = parity_then(n, w);
    }
    sh.scan32[lane] = w;
  }
  __syncthreads();
  const int r = parity_then(warp > 0 ? sh.scan32[warp - 1] : kParityIdentity, ex);
  __syncthreads();
  return r;
}

// The float64 running sum s0 + term(begin) + term(begin + 1) + ..., added one term at a time in
// that order as the reference does, bit for bit; term(i) must be finite and >= 0.
//
// A step takes kST terms, thread t term start + t. On the grid of the sum at the start of the
// step (sum_grid), each term is an integer increment once its rounding is known; ties need the
// parity of the sum just before them, which a scan of parity maps gives. The prefix sums of the
// increments are then the exact running sums, up to the first term that leaves the binade (or is
// too large to tell): the sum is advanced to just before it, and that term alone is added with an
// IEEE addition. The next step starts after it, on the new grid.
//
// kSearch: stop at the first i with term(i) != 0 whose running sum satisfies hit(sum) (zeros are
// skipped, as sampleFrom skips them); the result's hit is that i and s the sum through it, or -1
// and the whole sum. kSlots: record in sh.slot_* the state (start, sum before start) of the first
// step that starts at or after each multiple of slot_len, for a later search to resume from.
template <bool kSearch, bool kSlots, class Term, class Hit>
__device__ SumResult block_seqsum(SampleShared& sh, int begin, int n, double s0, Term term, Hit hit, int slot_len = 0,
                                  int num_slots = 0) {
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) {
    sh.ss_s = s0;
    sh.ss_start = begin;
    sh.ss_hit = -1;
    sh.ss_slot = 0;
  }
  __syncthreads();
  for (;;) {
    const int start = sh.ss_start;
    const double s = sh.ss_s;
    if (kSlots && t == 0) {
      while (sh.ss_slot < num_slots && sh.ss_slot * slot_len <= start) {
        sh.slot_start[sh.ss_slot] = start;
        sh.slot_s[sh.ss_slot] = s;
        ++sh.ss_slot;
      }
    }
    if (sh.ss_hit >= 0 || start >= n) break;
    const int i = start + t;
    const double x = i < n ? term(i) : 0.0;
    // Barrier: everyone has read the state above before thread 0 may write it.
    if (!__syncthreads_or(x != 0.0)) {
      if (t == 0) sh.ss_start = start + kST;
      __syncthreads();
      continue;
    }
    const SumGrid g = sum_grid(s);
    const SumTerm st = sum_term_on_grid(x, g.emax);
    unsigned long long carry = static_cast<unsigned long long>(st.round);
    if (__syncthreads_or(st.round == kRoundTie)) {
      const int map = st.round == kRoundTie ? 0 : (1 | static_cast<int>((st.a + st.round) & 1) << 1);
      const int before = block_exclusive_parity(sh, map);
      const uint64_t parity = ((g.q & 1) & static_cast<uint64_t>(before & 1)) ^ static_cast<uint64_t>(before >> 1);
      carry = sum_carry(st, parity);
    }
    const unsigned long long inc = st.a + carry;
    if (t == 0) {
      sh.ss_fail = kST;
      sh.ss_hitt = kST;
    }
    const unsigned long long q_after = g.q + block_inclusive_sum(sh, inc);  // barriers inside
    if (i < n && (st.big || q_after >= kGridTop)) atomicMin(&sh.ss_fail, t);
    __syncthreads();
    const int f = sh.ss_fail;
    if (kSearch) {
      if (i < n && t < f && x != 0.0 && hit(sum_value(q_after, g.emax))) atomicMin(&sh.ss_hitt, t);
      __syncthreads();
    }
    const int h = kSearch ? sh.ss_hitt : kST;
    if (h < kST) {
      if (t == h) {
        sh.ss_s = sum_value(q_after, g.emax);
        sh.ss_hit = i;
      }
    } else if (f == kST) {
      if (t == kST - 1) {
        sh.ss_s = sum_value(q_after, g.emax);
        sh.ss_start = start + kST;
      }
    } else if (t == f) {
      const double sf = dadd(sum_value(q_after - inc, g.emax), x);
      sh.ss_s = sf;
      sh.ss_start = i + 1;
      if (kSearch && x != 0.0 && hit(sf)) sh.ss_hit = i;
    }
    __syncthreads();
  }
  if (kSlots && t == 0) {
    while (sh.ss_slot < num_slots) {
      sh.slot_start[sh.ss_slot] = sh.ss_start;
      sh.slot_s[sh.ss_slot] = sh.ss_s;
      ++sh.ss_slot;
    }
  }
  __syncthreads();
  const SumResult r{sh.ss_s, sh.ss_hit};
  __syncthreads();
  return r;
}

struct NoHit {
  __device__ bool operator()(double) const { return false; }
};

// The key of descending rank `rank` (1-based) among order_key(l[i]), i < n (no NaN), the number
// of keys equal to it, and how many of those are within the top `rank`.
__device__ void block_radix_select(SampleShared& sh, const float* __restrict__ l, int n, int rank, uint32_t& key,
                                   int& equal, int& within) {
  const int t = static_cast<int>(threadIdx.x), lane = lane_id();
  uint32_t prefix = 0, mask = 0;
  int left = rank;
  int count = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (t < 256) sh.hist[t] = 0;
    __syncthreads();
    for (int base = 0; base < n; base += kST) {
      const int i = base + t;
      uint32_t d = 256;  // not counted
      if (i < n) {
        const uint32_t k = order_key(l[i]);
        if ((k & mask) == prefix) d = (k >> shift) & 255u;
      }
      const unsigned peers = __match_any_sync(kFullMask, d);
      if (d < 256 && __ffs(peers) - 1 == lane) atomicAdd(&sh.hist[d], __popc(peers));
    }
    __syncthreads();
    if (t == 0) {
      int above = 0, d = 255;
      for (; d > 0; --d) {
        const int c = sh.hist[d];
        if (above + c >= left) break;
        above += c;
      }
      sh.rs_digit = d;
      sh.rs_left = left - above;
      sh.rs_count = sh.hist[d];
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(sh.rs_digit) << shift;
    mask |= 255u << shift;
    left = sh.rs_left;
    count = sh.rs_count;
    __syncthreads();
  }
  key = prefix;
  equal = count;
  within = left;
}

// The index of the nth (1-based) i in [0, n) that satisfies pred, in index order; -1 if fewer do.
template <class Pred>
__device__ int block_nth(SampleShared& sh, int n, int nth, Pred pred) {
  const int t = static_cast<int>(threadIdx.x), lane = lane_id(), warp = warp_id();
  if (t == 0) sh.red32 = -1;
  __syncthreads();
  int seen = 0;
  for (int base = 0; base < n && seen < nth; base += kST) {
    const int i = base + t;
    const bool p = i < n && pred(i);
    const unsigned ballot = __ballot_sync(kFullMask, p);
    if (lane == 0) sh.scan32[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kSWarps; ++w) {
      const int c = sh.scan32[w];
      before += w < warp ? c : 0;
      total += c;
    }
    if (p && seen + before + __popc(ballot & ((1u << lane) - 1)) + 1 == nth) sh.red32 = i;
    seen += total;
    __syncthreads();
  }
  const int r = sh.red32;
  __syncthreads();
  return r;
}

// Appends key(i) for every i in [0, n) with keep(i, key) to out, in no particular order; returns
// how many.
template <class Keep>
__device__ int block_compact(SampleShared& sh, const float* __restrict__ l, int n, uint32_t* out, Keep keep) {
  const int t = static_cast<int>(threadIdx.x), lane = lane_id();
  if (t == 0) sh.red32 = 0;
  __syncthreads();
  for (int base = 0; base < n; base += kST) {
    const int i = base + t;
    uint32_t key = 0;
    bool c = false;
    if (i < n) {
      key = order_key(l[i]);
      c = keep(i, key);
    }
    const unsigned ballot = __ballot_sync(kFullMask, c);
    int at = 0;
    if (lane == 0 && ballot != 0) at = atomicAdd(&sh.red32, __popc(ballot));
    at = __shfl_sync(kFullMask, at, 0);
    if (c) out[at + __popc(ballot & ((1u << lane) - 1))] = key;
  }
  __syncthreads();
  const int r = sh.red32;
  __syncthreads();
  return r;
}

// One step of the bitonic network, descending, in the variant whose merges all run one way: the
// first step of a merge compares mirror positions of each run of 2^(lh + 1), the later ones
// (clean) positions 2^ls apart. keys is padded to `pairs` * 2 with virtual smallest keys; those
// never move, so a comparison that involves one (j >= n) is skipped. The caller adds a barrier.
__device__ __forceinline__ void exchange_desc(uint32_t* keys, int i, int j) {
  const uint32_t a = keys[i], b = keys[j];
  if (a < b) {
    keys[i] = b;
    keys[j] = a;
  }
}
__device__ void bitonic_flip(uint32_t* keys, int n, int pairs, int lh) {
  for (int p = static_cast<int>(threadIdx.x); p < pairs; p += kST) {
    const int run = (p >> lh) << (lh + 1), off = p & ((1 << lh) - 1);
    const int j = run + (2 << lh) - 1 - off;
    if (j < n) exchange_desc(keys, run + off, j);
  }
}
__device__ void bitonic_clean(uint32_t* keys, int n, int pairs, int ls) {
  for (int p = static_cast<int>(threadIdx.x); p < pairs; p += kST) {
    const int i = ((p >> ls) << (ls + 1)) + (p & ((1 << ls) - 1));
    if (i + (1 << ls) < n) exchange_desc(keys, i, i + (1 << ls));
  }
}
// Merges lh_from .. lh_to - 1 of the network on n keys (lh_from = 0: a full sort of 2^lh_to).
__device__ void bitonic_levels(uint32_t* keys, int n, int pairs, int lh_from, int lh_to) {
  for (int lh = lh_from; lh < lh_to; ++lh) {
    bitonic_flip(keys, n, pairs, lh);
    __syncthreads();
    for (int ls = lh - 1; ls >= 0; --ls) {
      bitonic_clean(keys, n, pairs, ls);
      __syncthreads();
    }
  }
}

// Sorts keys[0, n) (global memory) in descending order; returns where the result is: buf (shared,
// kSortCap keys) when n <= kSortCap, else keys itself. Larger inputs run the same network with
// every step whose pairs lie inside one chunk of kSortCap keys done on that chunk in shared
// memory, so only the steps that span chunks read global memory. A chunk that runs past n is
// filled with key 0, below every real key (order_key of a non-NaN is never 0), which leaves it
// where the virtual padding would be.
__device__ uint32_t* block_sort_desc(uint32_t* keys, int n, uint32_t* buf) {
  const int t = static_cast<int>(threadIdx.x);
  if (n <= kSortCap) {
    for (int j = t; j < n; j += kST) buf[j] = keys[j];
    __syncthreads();
    int lg = 0;
    while ((1 << lg) < n) ++lg;
    if (lg > 0) bitonic_levels(buf, n, 1 << (lg - 1), 0, lg);
    return buf;
  }
  int lg = kSortCapLog2;
  while ((1 << lg) < n) ++lg;
  const int pairs = 1 << (lg - 1);
  const int chunks = (n + kSortCap - 1) / kSortCap;
  // lh_to == kSortCapLog2 sorts each chunk; after that only a merge's last steps are chunk-local.
  for (int lh = kSortCapLog2 - 1; lh < lg; ++lh) {
    if (lh >= kSortCapLog2) {
      bitonic_flip(keys, n, pairs, lh);
      __syncthreads();
      for (int ls = lh - 1; ls >= kSortCapLog2; --ls) {
        bitonic_clean(keys, n, pairs, ls);
        __syncthreads();
      }
    }
    for (int c = 0; c < chunks; ++c) {
      uint32_t* chunk = keys + static_cast<int64_t>(c) * kSortCap;
      const int valid = n - c * kSortCap;
      for (int j = t; j < kSortCap; j += kST) buf[j] = j < valid ? chunk[j] : 0u;
      __syncthreads();
      if (lh < kSortCapLog2) {
        bitonic_levels(buf, kSortCap, kSortCap / 2, 0, kSortCapLog2);
      } else {
        for (int ls = kSortCapLog2 - 1; ls >= 0; --ls) {
          bitonic_clean(buf, kSortCap, kSortCap / 2, ls);
          __syncthreads();
        }
      }
      for (int j = t; j < kSortCap && j < valid; j += kST) chunk[j] = buf[j];
      __syncthreads();
    }
  }
  return keys;
}

__global__ void __launch_bounds__(kST, 1) sample_kernel(SampleArgs a, uint32_t* candidates) {
  __shared__ SampleShared sh;
  extern __shared__ __align__(16) uint32_t sort_buf[];  // kSortCap keys
  const int row = blockIdx.x;
  const int V = a.vocab;
  const int t = static_cast<int>(threadIdx.x);
  const float* __restrict__ l = a.logits + static_cast<int64_t>(row) * V;
  const double temperature = a.temperature[row];
  const int top_k = a.top_k != nullptr ? a.top_k[row] : 0;
  const double top_p = a.top_p != nullptr ? a.top_p[row] : 1.0;
  const double min_p = a.min_p != nullptr ? a.min_p[row] : 0.0;

  // Step 0: the arg-max (NaN below every number: argmax_rows' answer) and the reference's checks.
  unsigned long long best = 0;
  bool bad = false;
  for (int i = t; i < V; i += kST) {
    const float v = l[i];
    const bool nan = v != v;
    bad |= nan || v == __uint_as_float(0x7f800000u);
    const uint32_t key = nan ? 0u : order_key(v);
    const unsigned long long packed = (static_cast<unsigned long long>(key) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
    best = packed > best ? packed : best;
  }
  best = block_max_u64(sh, best);
  bad = __syncthreads_or(bad);
  const int top = static_cast<int>(0xffffffffu - static_cast<uint32_t>(best));
  if (!(temperature > 0.0)) {
    if (t == 0) a.out[row] = top;
    return;
  }
  if (bad || static_cast<uint32_t>(best >> 32) == order_key(__uint_as_float(0xff800000u))) {
    if (t == 0) a.out[row] = -1;  // core throws INVALID_ARGUMENT for this row
    return;
  }
  const double lmax = l[top];
  const auto weight = [&](float v) { return logit_weight(v, lmax, temperature); };

  // Step 2, top-k: keep keys above the k-th largest, and the lowest indices among equals to it.
  const bool topk_on = top_k > 0 && top_k < V;
  uint32_t k_key = 0;
  int k_last = V;  // the last index kept among keys equal to k_key
  if (topk_on) {
    int equal = 0, within = 0;
    block_radix_select(sh, l, V, top_k, k_key, equal, within);
    if (within < equal) k_last = block_nth(sh, V, within, [&](int i) { return order_key(l[i]) == k_key; });
  }
  const auto topk_ok = [&](int i, uint32_t key) {
    return !topk_on || key > k_key || (key == k_key && i <= k_last);
  };
  const auto weight_k = [&](int i) -> double {
    const float v = l[i];
    return topk_ok(i, order_key(v)) ? weight(v) : 0.0;
  };

  // Step 3, top-p: the shortest run of survivors, by logit from the top, whose weight reaches
  // p * (their total). Sorting only the candidates at or above the reference's floor, then all
  // survivors if that run falls short, repeats its nucleusCut calls exactly.
  bool topp_on = top_p < 1.0;
  uint32_t p_key = 0;
  int p_last = V;
  if (topp_on) {
    const double total = block_seqsum<false, false>(sh, 0, V, 0.0, weight_k, NoHit{}).s;
    const int positive = block_count(V, [&](int i) { return weight_k(i) > 0.0; });
    const double goal = dmul(top_p, total);
    const double floor_w = ddiv(dmul(dsub(1.0, top_p), total), static_cast<double>(positive));
    uint32_t* const cand = candidates + static_cast<int64_t>(row) * V;
    int cut = -1;
    for (int pass = 0; pass < 2 && cut < 0; ++pass) {
      if (pass == 1 && !(floor_w > 0.0)) break;
      const double fl = pass == 0 ? floor_w : 0.0;
      const int n = block_compact(sh, l, V, cand, [&](int i, uint32_t key) {
        if (!topk_ok(i, key)) return false;
        const double w = weight(l[i]);
        return w > 0.0 && w >= fl;
      });
      const uint32_t* keys = block_sort_desc(cand, n, sort_buf);
      const SumResult r = block_seqsum<true, false>(
          sh, 0, n, 0.0, [&](int j) { return weight(key_value(keys[j])); }, [&](double cum) { return cum >= goal; });
      if (r.hit >= 0) {
        cut = r.hit + 1;
        p_key = keys[r.hit];
      }
      __syncthreads();  // keys is rewritten by the next pass
    }
    if (cut < 0) {
      topp_on = false;  // rounding left the whole sum below p * total: the reference keeps everything
    } else {
      const int above = block_count(V, [&](int i) {
        const float v = l[i];
        const uint32_t key = order_key(v);
        return key > p_key && topk_ok(i, key) && weight(v) > 0.0;
      });
      const auto tied = [&](int i) {
        const uint32_t key = order_key(l[i]);
        return key == p_key && topk_ok(i, key);
      };
      const int keep = cut - above;
      if (keep <= 0) {
        p_last = -1;
      } else if (keep < block_count(V, tied)) {
        p_last = block_nth(sh, V, keep, tied);
      }
    }
  }
  const auto topp_ok = [&](int i, uint32_t key) {
    return !topp_on || key > p_key || (key == p_key && i <= p_last);
  };

  // Steps 4 and 5: min-p against the top weight (exactly 1), then the probabilities.
  const auto weight_final = [&](int i) -> double {
    const float v = l[i];
    const uint32_t key = order_key(v);
    if (!topk_ok(i, key) || !topp_ok(i, key)) return 0.0;
    const double w = weight(v);
    return w < min_p ? 0.0 : w;
  };
  const double sum = block_seqsum<false, false>(sh, 0, V, 0.0, weight_final, NoHit{}).s;
  const auto prob = [&](int i) -> double {
    const double w = weight_final(i);
    return w == 0.0 ? 0.0 : static_cast<double>(to_f32(ddiv(w, sum)));
  };

  // sampleFrom: the first index whose running probability sum exceeds u * total.
  const int slot_len = V / kSumSlots + 1 > kST ? V / kSumSlots + 1 : kST;
  const int num_slots = (V + slot_len - 1) / slot_len;
  const double total_p = block_seqsum<false, true>(sh, 0, V, 0.0, prob, NoHit{}, slot_len, num_slots).s;
  const float u = philox_uniform(a.seed_lo[row], a.seed_hi[row], a.seqs[row], a.positions[row],
                                 a.purposes != nullptr ? a.purposes[row] : 0u, 0);
  const double target = dmul(static_cast<double>(u), total_p);
  const int from = block_count(num_slots, [&](int c) { return sh.slot_s[c] <= target; }) - 1;  // slot 0 holds 0
  const SumResult r = block_seqsum<true, false>(sh, sh.slot_start[from], V, sh.slot_s[from], prob,
                                                [&](double cum) { return cum > target; });
  int token = r.hit;
  if (token < 0) {
    // Unreachable unless rounding puts u * total at the very top: the last positive entry.
    if (t == 0) sh.red32 = -1;
    __syncthreads();
    int last = -1;
    for (int i = t; i < V; i += kST)
      if (prob(i) != 0.0) last = i;
    if (last >= 0) atomicMax(&sh.red32, last);
    __syncthreads();
    token = sh.red32;
  }
  if (t == 0) a.out[row] = token;
}

__global__ void philox_kernel(uint32_t seed_lo, uint32_t seed_hi, const uint32_t* __restrict__ counters, int n,
                              float* __restrict__ u, uint32_t* __restrict__ words) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint32_t* c = counters + 4 * static_cast<int64_t>(i);
  const Philox4 r = philox4x32_10(c[0], c[1], c[2], c[3], seed_lo, seed_hi);
  for (int j = 0; j < 4; ++j) words[4 * static_cast<int64_t>(i) + j] = r.v[j];
  u[i] = philox_uniform(seed_lo, seed_hi, c[1], c[0], c[3], c[2]);
}

}  // namespace

size_t argmax_workspace_bytes(int rows, int vocab) {
  return sizeof(ValIdx) * static_cast<size_t>(rows) * blocks_per_row(vocab);
}

cudaError_t argmax_rows(const float* logits, int rows, int vocab, int32_t* out, void* workspace, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (vocab <= 0) return cudaErrorInvalidValue;
  const int nb = blocks_per_row(vocab);
  auto* partial = static_cast<ValIdx*>(workspace);
  partial_best_kernel<<<dim3(nb, rows), kThreads, 0, stream>>>(logits, vocab, partial);
  argmax_final_kernel<<<rows, 32, 0, stream>>>(partial, nb, out);
  return cudaGetLastError();
}

size_t sample_workspace_bytes(int rows, int vocab) {
  // Room for every logit of every row as a top-p candidate key.
  return sizeof(uint32_t) * static_cast<size_t>(rows > 0 ? rows : 0) * static_cast<size_t>(vocab > 0 ? vocab : 0);
}

cudaError_t sample_rows(const SampleArgs& a, cudaStream_t stream) {
  if (a.rows <= 0) return cudaSuccess;
  if (a.vocab <= 0 || a.logits == nullptr || a.temperature == nullptr || a.seed_lo == nullptr ||
      a.seed_hi == nullptr || a.seqs == nullptr || a.positions == nullptr || a.out == nullptr ||
      a.workspace == nullptr)
    return cudaErrorInvalidValue;
  constexpr size_t smem = sizeof(uint32_t) * kSortCap;
  const cudaError_t e = cudaFuncSetAttribute(reinterpret_cast<const void*>(sample_kernel),
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  sample_kernel<<<a.rows, kST, smem, stream>>>(a, static_cast<uint32_t*>(a.workspace));
  return cudaGetLastError();
}

cudaError_t philox_uniforms(uint32_t seed_lo, uint32_t seed_hi, const uint32_t* counters, int n, float* u,
                            uint32_t* words, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  philox_kernel<<<ceil_div(n, 128), 128, 0, stream>>>(seed_lo, seed_hi, counters, n, u, words);
  return cudaGetLastError();
}

}  // namespace moeflash
