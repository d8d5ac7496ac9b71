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

template <int T, int R>
__global__ void __launch_bounds__(kThreads) gemv_bf16_kernel(const bf16_bits* __restrict__ w,
                                                             const bf16_bits* __restrict__ bias,
                                                             const float* __restrict__ x,
                                                             float* __restrict__ y, int rows, int cols, PreNorm pn) {
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

  for (; group < ngroups; group += gridDim.x) {
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
        y[static_cast<int64_t>(t) * rows + row] = s;
      }
    }
    __syncthreads();
  }
}

using KernelFn = void (*)(const bf16_bits*, const bf16_bits*, const float*, float*, int, int, PreNorm);

template <int T, int R>
KernelFn kernel_for() {
  return gemv_bf16_kernel<T, R>;
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
  // Row groups: large matrices take 4 rows a group (more loads in flight a thread), small ones
  // fewer so that the groups still spread over every multiprocessor.
  const int sms = device_sm_count();
  const int r = rows >= 16 * sms * 4 ? 4 : rows >= 4 * sms * 2 ? 2 : 1;
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
                                     y + static_cast<int64_t>(t0) * rows, rows, cols, p);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t gemv_bf16(const bf16_bits* w, const bf16_bits* bias, const float* x, float* y, int rows, int cols,
                      int tokens, cudaStream_t stream) {
  // Many tokens (prefill chunks): tensor cores, W read once per 64 tokens instead of once per 8.
  if (tokens >= kGemmMinTokens) return gemm_bf16(w, bias, x, y, rows, cols, tokens, stream);
  return gemv_launch(w, bias, x, y, rows, cols, tokens, PreNorm{}, stream);
}

cudaError_t gemv_bf16_prenorm(const bf16_bits* w, const bf16_bits* bias, const float* x, const float* residual,
                              const bf16_bits* norm_weight, float eps, float* x_out, float* normed_out, float* y,
                              int rows, int cols, int tokens, cudaStream_t stream) {
  if (norm_weight == nullptr || cols % 4 != 0) return cudaErrorInvalidValue;
  return gemv_launch(w, bias, x, y, rows, cols, tokens, PreNorm{residual, norm_weight, eps, x_out, normed_out}, stream);
}

}  // namespace moeflash
