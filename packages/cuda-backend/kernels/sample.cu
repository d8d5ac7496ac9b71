// Token selection from logits rows: greedy arg-max and temperature sampling by inverse CDF, both
// mirroring core's sampling/sample.ts, plus the Philox uniforms they use (philox.cuh).
//
// A vocabulary row (201088 logits for gpt-oss) is split over several blocks so that one row does
// not wait on one multiprocessor. Every sum is taken in a fixed order, so the result is
// deterministic. Sampling repeats the reference's float64 arithmetic (weights, their sum, float32
// probabilities, the running sum against u * total); only the order of the float64 additions
// differs, which moves the chosen token only when u * total falls within ~1e-16 of a boundary.
#include <algorithm>
#include <cfloat>

#include "common.cuh"
#include "philox.cuh"

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

__device__ double block_sum(double v) {
  __shared__ double warps[kThreads / 32];
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) warps[threadIdx.x >> 5] = v;
  __syncthreads();
  double s = 0.0;
  for (int w = 0; w < kThreads / 32; ++w) s += warps[w];
  __syncthreads();
  return s;
}

// Pass 1 (both paths): the best (value, index) of each block's chunk.
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

struct SampleWorkspace {
  ValIdx* best;     // [rows][nb]
  double* wsum;     // [rows][nb]: sum of weights of the block's chunk
  double* psum;     // [rows][nb]: sum of float32 probabilities of the block's chunk
  float* prob;      // [rows][vocab]
};

__host__ __device__ inline size_t align16(size_t n) { return (n + 15) & ~size_t{15}; }

__host__ __device__ inline SampleWorkspace carve_sample(void* base, int rows, int vocab) {
  const int nb = blocks_per_row(vocab);
  char* p = static_cast<char*>(base);
  SampleWorkspace w;
  w.best = reinterpret_cast<ValIdx*>(p);
  p += align16(sizeof(ValIdx) * rows * nb);
  w.wsum = reinterpret_cast<double*>(p);
  p += align16(sizeof(double) * rows * nb);
  w.psum = reinterpret_cast<double*>(p);
  p += align16(sizeof(double) * rows * nb);
  w.prob = reinterpret_cast<float*>(p);
  return w;
}

__device__ __forceinline__ double row_max(const ValIdx* best, int row, int nb) {
  float m = best[row * nb].v;
  for (int b = 1; b < nb; ++b) m = fmaxf(m, best[row * nb + b].v);
  return m;
}

// Pass 2: w = exp((l - max) / T) in float64, summed per block.
__global__ void __launch_bounds__(kThreads) weight_sum_kernel(const float* __restrict__ logits, int vocab,
                                                             double temperature, SampleWorkspace ws) {
  const int row = blockIdx.y;
  const int nb = gridDim.x;
  const int chunk = chunk_of(vocab);
  const int begin = blockIdx.x * chunk;
  const int end = min(vocab, begin + chunk);
  const float* l = logits + static_cast<int64_t>(row) * vocab;
  const double m = row_max(ws.best, row, nb);
  double s = 0.0;
  for (int i = begin + threadIdx.x; i < end; i += kThreads) s += exp((static_cast<double>(l[i]) - m) / temperature);
  s = block_sum(s);
  if (threadIdx.x == 0) ws.wsum[row * nb + blockIdx.x] = s;
}

// Pass 3: prob = float32(w / sum), stored, and summed per block in float64.
__global__ void __launch_bounds__(kThreads) prob_kernel(const float* __restrict__ logits, int vocab,
                                                       double temperature, SampleWorkspace ws) {
  const int row = blockIdx.y;
  const int nb = gridDim.x;
  const int chunk = chunk_of(vocab);
  const int begin = blockIdx.x * chunk;
  const int end = min(vocab, begin + chunk);
  const float* l = logits + static_cast<int64_t>(row) * vocab;
  const double m = row_max(ws.best, row, nb);
  double total = 0.0;
  for (int b = 0; b < nb; ++b) total += ws.wsum[row * nb + b];
  double s = 0.0;
  float* prob = ws.prob + static_cast<int64_t>(row) * vocab;
  for (int i = begin + threadIdx.x; i < end; i += kThreads) {
    const float p = static_cast<float>(exp((static_cast<double>(l[i]) - m) / temperature) / total);
    prob[i] = p;
    s += p;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) ws.psum[row * nb + blockIdx.x] = s;
}

// Pass 4: the first index whose running probability sum exceeds u * total.
__global__ void __launch_bounds__(kThreads) pick_kernel(SampleArgs a, SampleWorkspace ws) {
  __shared__ double thread_sum[kThreads];
  __shared__ double target_s, prefix_s;
  __shared__ int block_s;
  __shared__ int found_s;
  const int row = blockIdx.x;
  const int vocab = a.vocab;
  const int nb = blocks_per_row(vocab);
  const int chunk = chunk_of(vocab);
  const float* prob = ws.prob + static_cast<int64_t>(row) * vocab;
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int b = 0; b < nb; ++b) total += ws.psum[row * nb + b];
    const float u = philox_uniform(a.seed_lo, a.seed_hi, a.seqs[row], a.positions[row], a.purpose, 0);
    const double target = static_cast<double>(u) * total;
    double prefix = 0.0;
    int chosen = -1, last_positive = 0;
    double prefix_of_last = 0.0;
    for (int b = 0; b < nb; ++b) {
      const double s = ws.psum[row * nb + b];
      if (s > 0.0) {
        last_positive = b;
        prefix_of_last = prefix;
        if (prefix + s > target) {
          chosen = b;
          break;
        }
      }
      prefix += s;
    }
    if (chosen < 0) {
      chosen = last_positive;
      prefix = prefix_of_last;
    }
    target_s = target;
    prefix_s = prefix;
    block_s = chosen;
    found_s = 0x7fffffff;
  }
  __syncthreads();
  const int begin = block_s * chunk;
  const int end = min(vocab, begin + chunk);
  const int per = (end - begin + kThreads - 1) / kThreads;
  const int mine0 = begin + threadIdx.x * per;
  const int mine1 = min(end, mine0 + per);
  double s = 0.0;
  for (int i = mine0; i < mine1; ++i) s += prob[i];
  thread_sum[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double run = prefix_s;
    for (int t = 0; t < kThreads; ++t) {
      const double v = thread_sum[t];
      thread_sum[t] = run;
      run += v;
    }
  }
  __syncthreads();
  double cum = thread_sum[threadIdx.x];
  int hit = 0x7fffffff, last = -1;
  for (int i = mine0; i < mine1; ++i) {
    const float p = prob[i];
    if (p == 0.f) continue;  // a zero-probability token is never returned
    cum += p;
    last = i;
    if (cum > target_s) {
      hit = i;
      break;
    }
  }
  atomicMin(&found_s, hit);
  __syncthreads();
  if (found_s == 0x7fffffff) {
    // u * total sits at the very top of the row's mass: the reference returns its last positive
    // entry; recover it with a max over the threads.
    __shared__ int last_s;
    if (threadIdx.x == 0) last_s = -1;
    __syncthreads();
    atomicMax(&last_s, last);
    __syncthreads();
    if (threadIdx.x == 0) a.out[row] = last_s < 0 ? 0 : last_s;
  } else if (threadIdx.x == 0) {
    a.out[row] = found_s;
  }
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
  const size_t nb = blocks_per_row(vocab);
  return align16(sizeof(ValIdx) * rows * nb) + 2 * align16(sizeof(double) * rows * nb) +
         sizeof(float) * static_cast<size_t>(rows) * vocab;
}

cudaError_t sample_rows(const SampleArgs& a, cudaStream_t stream) {
  if (a.rows <= 0) return cudaSuccess;
  if (a.vocab <= 0 || !(a.temperature > 0.0)) return cudaErrorInvalidValue;
  const int nb = blocks_per_row(a.vocab);
  const SampleWorkspace ws = carve_sample(a.workspace, a.rows, a.vocab);
  const dim3 grid(nb, a.rows);
  partial_best_kernel<<<grid, kThreads, 0, stream>>>(a.logits, a.vocab, ws.best);
  weight_sum_kernel<<<grid, kThreads, 0, stream>>>(a.logits, a.vocab, a.temperature, ws);
  prob_kernel<<<grid, kThreads, 0, stream>>>(a.logits, a.vocab, a.temperature, ws);
  pick_kernel<<<a.rows, kThreads, 0, stream>>>(a, ws);
  return cudaGetLastError();
}

cudaError_t philox_uniforms(uint32_t seed_lo, uint32_t seed_hi, const uint32_t* counters, int n, float* u,
                            uint32_t* words, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  philox_kernel<<<ceil_div(n, 128), 128, 0, stream>>>(seed_lo, seed_hi, counters, n, u, words);
  return cudaGetLastError();
}

}  // namespace moeflash
