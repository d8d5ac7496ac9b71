// bf16 matrix-vector product for 1-8 tokens: y[t] = W x[t] (+ bias), W [rows, cols] row-major bf16,
// float32 accumulation. Decode reads every weight once per step, so this kernel is about moving
// bytes: 16-byte streaming loads, coalesced across the warp, several rows and chunks in flight per
// thread, and the next row group's loads issued before the current group's reduction.
//
// Work split: a thread block owns groups of R consecutive rows (grid-stride over groups, grid
// sized to fill the device once). Inside a group the 256 threads split the columns in chunks of 8
// (16 bytes), thread i taking chunks i, i + 256, ...; every thread keeps R x T partial sums, which
// are reduced across the warp (reduce-scatter butterfly) and then across the 8 warps in warp
// order. x is staged once per block in shared memory as two planes of float4 per token (elements
// 8c..8c+3 and 8c+4..8c+7 of chunk c), so the 16-byte shared loads of a warp hit 32 distinct
// banks. The chunk -> thread mapping and both reduction trees are the same for every T, so a
// token's result is bit-identical whatever else shares its launch.
#include <algorithm>

#include "common.cuh"

namespace moeflash {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 2;  // chunks per thread per batch: cols <= 4096 is one batch

template <int T, int R>
struct GemvTile {
  static constexpr int kValues = R * T;
  static constexpr int kPadded = next_pow2(kValues);
  static_assert(kPadded <= 32, "R * T must fit one reduce-scatter");
};

__device__ __forceinline__ void decode8(const uint4& w, float (&f)[8]) {
  f[0] = bf16_lo(w.x);
  f[1] = bf16_hi(w.x);
  f[2] = bf16_lo(w.y);
  f[3] = bf16_hi(w.y);
  f[4] = bf16_lo(w.z);
  f[5] = bf16_hi(w.z);
  f[6] = bf16_lo(w.w);
  f[7] = bf16_hi(w.w);
}

template <int R>
__device__ __forceinline__ void load_batch(uint4 (&wv)[kUnroll][R], const bf16_bits* __restrict__ w, int group,
                                           int rows, int cols, int nchunk, int c0) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    // Rows past the end re-read the last row (always valid memory); their sums are never stored.
    const int row = min(group * R + r, rows - 1);
    const bf16_bits* wr = w + static_cast<int64_t>(row) * cols;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kThreads;
      wv[u][r] = c < nchunk ? ld_stream_u4(wr + 8 * c) : make_uint4(0, 0, 0, 0);
    }
  }
}

// With a norm (PreNorm.weight set) the staged vector of token t is rmsnorm(x[t] + residual[t]),
// computed by every block for itself; block 0 also writes x[t] + residual[t] to x_out and the
// normalized vector to normed_out. One launch replaces rmsnorm_residual + gemv_bf16.
struct PreNorm {
  const float* residual;
  const bf16_bits* weight;
  float eps;
  float* x_out;
  float* normed_out;
};

// With a fold (Fold.partials set) the projection is the one before a MoE router's norm (the o
// projection): y[t] = residual[t] + W x[t] (+ bias) is the next residual stream v, and each block
// also leaves, for its own rows i, the partial sums that the router needs,
//   partials[block][t][e] = sum_i W_r[e, i] * (g_i * v[t, i])   (e < experts)
//   partials[block][t][experts] = sum_i v[t, i]^2,
// so that logits = rsqrt(sum v^2 / rows + eps) * sum over blocks + b_r follow from one pass over
// the blocks (the MoE kernel does it), without a router launch between.
struct Fold {
  const float* residual;        // [T, rows], the residual stream before this projection
  const bf16_bits* norm_weight;  // g [rows]
  const bf16_bits* router_wt;    // W_r transposed, [rows, experts]
  int experts;
  int local_rows;  // shared-memory rows a block holds: ceil(groups / grid) * R
  float* partials;  // [gridDim.x][T][experts + 1]
};

template <int T, int R, bool FOLD>
__global__ void __launch_bounds__(kThreads) gemv_bf16_kernel(const bf16_bits* __restrict__ w,
                                                             const bf16_bits* __restrict__ bias,
                                                             const float* __restrict__ x,
                                                             float* __restrict__ y, int rows, int cols, PreNorm pn,
                                                             Fold fd) {
  using Tile = GemvTile<T, R>;
  extern __shared__ float4 smem[];
  const int nchunk = cols / 8;
  float4* xs = smem;  // [T][2][nchunk]
  float* red = reinterpret_cast<float*>(smem + 2 * T * nchunk);  // [kWarps][kPadded]
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int ngroups = (rows + R - 1) / R;
  int group = blockIdx.x;
  if (group >= ngroups) return;

  uint4 wv[kUnroll][R];
  load_batch<R>(wv, w, group, rows, cols, nchunk, tid);

  // The fold's inputs for this block's rows (weights, and a residual stream written three launches
  // back): loaded before the wait. Rows past the end hold zeros and add nothing.
  constexpr bool fold = FOLD;
  const int LR = fd.local_rows;
  float* v_s = red + kWarps * 32;  // [T][LR]: residual, then v
  float* g_s = v_s + T * LR;       // [LR]
  bf16_bits* wr_s = reinterpret_cast<bf16_bits*>(g_s + LR);  // [LR][experts]
  if constexpr (fold) {
    const int E = fd.experts;
    const int n_local = (ngroups - group + gridDim.x - 1) / gridDim.x * R;
    for (int j = tid; j < n_local; j += kThreads) {
      const int row = (group + (j / R) * gridDim.x) * R + j % R;
      g_s[j] = row < rows ? bf16_to_f32(fd.norm_weight[row]) : 0.f;
#pragma unroll
      for (int t = 0; t < T; ++t) v_s[t * LR + j] = row < rows ? fd.residual[static_cast<int64_t>(t) * rows + row] : 0.f;
    }
    for (int i = tid; i < n_local * E; i += kThreads) {
      const int j = i / E;
      const int row = (group + (j / R) * gridDim.x) * R + j % R;
      wr_s[i] = row < rows ? fd.router_wt[static_cast<int64_t>(row) * E + (i - j * E)] : bf16_bits(0);
    }
  }
  pdl_prologue();  // the weights are no kernel's output: their first loads overlap the previous kernel

  const int n4 = cols / 4;
  if (pn.weight == nullptr) {
    for (int j = tid; j < T * n4; j += kThreads) {
      const int t = j / n4;
      const int e = j - t * n4;
      xs[(2 * t + (e & 1)) * nchunk + (e >> 1)] = ld_f4(x + static_cast<int64_t>(t) * cols + 4 * e);
    }
    __syncthreads();
  } else {
    // Same arithmetic as norm.cu: x + residual, sum of squares with fmaf per component, then
    // (v * inv) * weight.
    const bool writer = blockIdx.x == 0;
    float ss[T];
#pragma unroll
    for (int t = 0; t < T; ++t) {
      float acc = 0.f;
      for (int e = tid; e < n4; e += kThreads) {
        float4 v = ld_f4(x + static_cast<int64_t>(t) * cols + 4 * e);
        if (pn.residual != nullptr) {
          const float4 r = ld_f4(pn.residual + static_cast<int64_t>(t) * cols + 4 * e);
          v.x += r.x;
          v.y += r.y;
          v.z += r.z;
          v.w += r.w;
        }
        if (writer && pn.x_out != nullptr) reinterpret_cast<float4*>(pn.x_out + static_cast<int64_t>(t) * cols)[e] = v;
        xs[(2 * t + (e & 1)) * nchunk + (e >> 1)] = v;
        acc = fmaf(v.x, v.x, acc);
        acc = fmaf(v.y, v.y, acc);
        acc = fmaf(v.z, v.z, acc);
        acc = fmaf(v.w, v.w, acc);
      }
      ss[t] = warp_sum(acc);
    }
    float* part = red;  // [kWarps][T] (red is free until the first reduction)
    if (lane == 0)
#pragma unroll
      for (int t = 0; t < T; ++t) part[warp * T + t] = ss[t];
    __syncthreads();
    float inv[T];
#pragma unroll
    for (int t = 0; t < T; ++t) {
      float total = 0.f;
#pragma unroll
      for (int i = 0; i < kWarps; ++i) total += part[i * T + t];
      inv[t] = rsqrtf(total / static_cast<float>(cols) + pn.eps);
    }
#pragma unroll
    for (int t = 0; t < T; ++t) {
      for (int e = tid; e < n4; e += kThreads) {
        float4& v = xs[(2 * t + (e & 1)) * nchunk + (e >> 1)];
        const uint2 g2 = *reinterpret_cast<const uint2*>(pn.weight + 4 * e);
        v = make_float4((v.x * inv[t]) * bf16_lo(g2.x), (v.y * inv[t]) * bf16_hi(g2.x), (v.z * inv[t]) * bf16_lo(g2.y),
                        (v.w * inv[t]) * bf16_hi(g2.y));
        if (writer && pn.normed_out != nullptr)
          reinterpret_cast<float4*>(pn.normed_out + static_cast<int64_t>(t) * cols)[e] = v;
      }
    }
    __syncthreads();
  }

  for (int local = 0; group < ngroups; group += gridDim.x, local += R) {
    float acc[R][T];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < T; ++t) acc[r][t] = 0.f;

    for (int c0 = tid;;) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + u * kThreads;
        if (c < nchunk) {
          float wf[R][8];
#pragma unroll
          for (int r = 0; r < R; ++r) decode8(wv[u][r], wf[r]);
#pragma unroll
          for (int t = 0; t < T; ++t) {
            const float4 a = xs[(2 * t) * nchunk + c];
            const float4 b = xs[(2 * t + 1) * nchunk + c];
#pragma unroll
            for (int r = 0; r < R; ++r) {
              float s = acc[r][t];
              s = fmaf(wf[r][0], a.x, s);
              s = fmaf(wf[r][1], a.y, s);
              s = fmaf(wf[r][2], a.z, s);
              s = fmaf(wf[r][3], a.w, s);
              s = fmaf(wf[r][4], b.x, s);
              s = fmaf(wf[r][5], b.y, s);
              s = fmaf(wf[r][6], b.z, s);
              s = fmaf(wf[r][7], b.w, s);
              acc[r][t] = s;
            }
          }
        }
      }
      c0 += kUnroll * kThreads;
      if (c0 >= nchunk) break;
      load_batch<R>(wv, w, group, rows, cols, nchunk, c0);
    }

    // Next group's first loads go out before this group's reduction and barriers.
    const int next = group + gridDim.x;
    if (next < ngroups) load_batch<R>(wv, w, next, rows, cols, nchunk, tid);

    float v[Tile::kPadded];
#pragma unroll
    for (int i = 0; i < Tile::kPadded; ++i) v[i] = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < T; ++t) v[r * T + t] = acc[r][t];
    warp_reduce_scatter<Tile::kPadded>(v, lane);
    constexpr int kLanesPerValue = 32 / Tile::kPadded;
    if ((lane & (kLanesPerValue - 1)) == 0) red[warp * Tile::kPadded + lane / kLanesPerValue] = v[0];
    __syncthreads();
    if (tid < Tile::kValues) {
      const int r = tid / T;
      const int t = tid - r * T;
      const int row = group * R + r;
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < kWarps; ++i) s += red[i * Tile::kPadded + tid];
      if (row < rows) {
        if (bias != nullptr) s += bf16_to_f32(bias[row]);
        if constexpr (fold) {
          s += v_s[t * LR + local + r];
          v_s[t * LR + local + r] = s;
        }
        y[static_cast<int64_t>(t) * rows + row] = s;
      }
    }
    __syncthreads();
  }

  if constexpr (fold) {
    // The loop's last barrier published v_s. One thread a (token, expert) sum, rows in order.
    const int E = fd.experts;
    const int n_local = (ngroups - static_cast<int>(blockIdx.x) + gridDim.x - 1) / gridDim.x * R;
    float* out = fd.partials + static_cast<int64_t>(blockIdx.x) * T * (E + 1);
    for (int i = tid; i < T * (E + 1); i += kThreads) {
      const int t = i / (E + 1), e = i - t * (E + 1);
      const float* v = v_s + t * LR;
      float acc = 0.f;
      if (e < E)
        for (int j = 0; j < n_local; ++j) acc = fmaf(bf16_to_f32(wr_s[j * E + e]), g_s[j] * v[j], acc);
      else
        for (int j = 0; j < n_local; ++j) acc = fmaf(v[j], v[j], acc);
      out[i] = acc;
    }
  }
}

using KernelFn = void (*)(const bf16_bits*, const bf16_bits*, const float*, float*, int, int, PreNorm, Fold);

template <int T, int R>
KernelFn kernel_for() {
  return gemv_bf16_kernel<T, R, false>;
}

template <int R>
KernelFn pick_tokens(int t) {
  switch (t) {
    case 1: return kernel_for<1, R>();
    case 2: return kernel_for<2, R>();
    case 3: return kernel_for<3, R>();
    case 4: return kernel_for<4, R>();
    case 5: return kernel_for<5, R>();
    case 6: return kernel_for<6, R>();
    case 7: return kernel_for<7, R>();
    default: return kernel_for<8, R>();
  }
}

size_t smem_bytes(int tokens, int cols) {
  return static_cast<size_t>(tokens) * cols * sizeof(float) + kWarps * 32 * sizeof(float);
}
static_assert(kWarps * 8 <= kWarps * 32, "the norm's partial sums fit the reduction area");

size_t max_smem() {
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) optin = 48 * 1024;
  return static_cast<size_t>(optin);
}

}  // namespace

namespace {

// Rows a group for a matrix of `rows` rows: large matrices take 4 (more loads in flight a thread),
// small ones fewer so that the groups still spread over every multiprocessor.
int rows_per_group(int rows) {
  const int sms = device_sm_count();
  return rows >= 16 * sms * 4 ? 4 : rows >= 4 * sms * 2 ? 2 : 1;
}

cudaError_t gemv_launch(const bf16_bits* w, const bf16_bits* bias, const float* x, float* y, int rows, int cols,
                        int tokens, const PreNorm& pn, cudaStream_t stream) {
  if (tokens <= 0 || rows <= 0) return cudaSuccess;
  if (cols <= 0 || cols % 8 != 0) return cudaErrorInvalidValue;
  // Tokens per launch: at most 8 and as many as their x fits shared memory. Splitting changes no
  // result, since a token's reduction order does not depend on its batch.
  const size_t limit = max_smem();
  int per_launch = 8;
  while (per_launch > 1 && smem_bytes(per_launch, cols) > limit) --per_launch;
  if (smem_bytes(per_launch, cols) > limit) return cudaErrorInvalidValue;
  const int sms = device_sm_count();
  const int r = rows_per_group(rows);
  for (int t0 = 0; t0 < tokens; t0 += per_launch) {
    const int t = std::min(per_launch, tokens - t0);
    const KernelFn fn = r == 4 ? pick_tokens<4>(t) : r == 2 ? pick_tokens<2>(t) : pick_tokens<1>(t);
    const size_t smem = smem_bytes(t, cols);
    const int groups = ceil_div(rows, r);
    const int grid = std::min(groups, resident_blocks(reinterpret_cast<const void*>(fn), kThreads, smem) * sms);
    const int64_t off = static_cast<int64_t>(t0) * cols;
    PreNorm p = pn;
    if (p.residual != nullptr) p.residual += off;
    if (p.x_out != nullptr) p.x_out += off;
    if (p.normed_out != nullptr) p.normed_out += off;
    const cudaError_t e = launch_pdl(fn, grid, kThreads, smem, stream, w, bias, x + off,
                                     y + static_cast<int64_t>(t0) * rows, rows, cols, p, Fold{});
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace

int gemv_fold_blocks(int rows) {
  const int groups = ceil_div(rows, rows_per_group(rows));
  // MOEFLASH_FOLD_BLOCKS overrides the grid (measurements); the consumers read one partial row a block.
  const int blocks = env_int("MOEFLASH_FOLD_BLOCKS", device_sm_count());
  return std::max(1, std::min({groups, blocks, kMaxFoldBlocks}));
}

cudaError_t gemv_bf16_fold(const bf16_bits* w, const bf16_bits* bias, const float* x, const float* residual,
                           const bf16_bits* norm_weight, const bf16_bits* router_wt, int experts, float* partials,
                           int blocks, float* y, int rows, int cols, int tokens, cudaStream_t stream) {
  if (tokens <= 0 || rows <= 0) return cudaSuccess;
  if (tokens > kMaxFoldTokens || experts <= 0 || experts > kMaxFoldExperts || cols <= 0 || cols % 8 != 0 ||
      residual == nullptr || norm_weight == nullptr || router_wt == nullptr || partials == nullptr ||
      blocks != gemv_fold_blocks(rows))
    return cudaErrorInvalidValue;
  const int r = rows_per_group(rows);
  const int groups = ceil_div(rows, r);
  const int local_rows = ceil_div(groups, blocks) * r;
  const size_t smem = smem_bytes(tokens, cols) + sizeof(float) * (tokens + 1) * local_rows +
                      sizeof(bf16_bits) * static_cast<size_t>(local_rows) * experts;
  if (smem > max_smem()) return cudaErrorInvalidValue;
  static_assert(kMaxFoldTokens == 2, "one kernel per token count below");
  const KernelFn fn = tokens == 1 ? (r == 4 ? gemv_bf16_kernel<1, 4, true> : r == 2 ? gemv_bf16_kernel<1, 2, true> : gemv_bf16_kernel<1, 1, true>)
                                  : (r == 4 ? gemv_bf16_kernel<2, 4, true> : r == 2 ? gemv_bf16_kernel<2, 2, true> : gemv_bf16_kernel<2, 1, true>);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(reinterpret_cast<const void*>(fn),
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  return launch_pdl(fn, blocks, kThreads, smem, stream, w, bias, x, y, rows, cols, PreNorm{},
                    Fold{residual, norm_weight, router_wt, experts, local_rows, partials});
}

cudaError_t gemv_bf16(const bf16_bits* w, const bf16_bits* bias, const float* x, float* y, int rows, int cols,
                      int tokens, cudaStream_t stream) {
  return gemv_launch(w, bias, x, y, rows, cols, tokens, PreNorm{}, stream);
}

cudaError_t gemv_bf16_prenorm(const bf16_bits* w, const bf16_bits* bias, const float* x, const float* residual,
                              const bf16_bits* norm_weight, float eps, float* x_out, float* normed_out, float* y,
                              int rows, int cols, int tokens, cudaStream_t stream) {
  if (norm_weight == nullptr || cols % 4 != 0) return cudaErrorInvalidValue;
  return gemv_launch(w, bias, x, y, rows, cols, tokens, PreNorm{residual, norm_weight, eps, x_out, normed_out}, stream);
}

}  // namespace moeflash
