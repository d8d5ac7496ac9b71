// FP8 E4M3 matrix-vector product with block scales for 1-8 tokens: y[t] = W x[t] (+ bias),
// W [rows, cols] row-major E4M3 codes, W's value = e4m3 * scales[row block, col block], float32
// accumulation. It is gemv_bf16's schedule with half the bytes per weight: decode is bandwidth
// bound, so the weights stream through 16-byte loads (16 codes), coalesced across the warp, with
// several rows and chunks in flight per thread and the next row group's loads issued before the
// current group's reduction.
//
// Work split: a thread block owns groups of R consecutive rows (grid-stride over groups). Inside a
// group the 256 threads split the columns in chunks of 16, thread i taking chunks i, i + 256, ...
// A chunk never straddles a scale block (block_cols % 16 == 0), so each thread sums the 16
// products of a chunk unscaled and applies the chunk's block scale once: one multiply per 16
// products instead of one per weight. The R x T partial sums are reduced across the warp
// (reduce-scatter butterfly) and then across the 8 warps in warp order, as in gemv_bf16.
//
// Decoding: sm_89+ converts two E4M3 codes to two fp16 in one instruction (cvt.rn.f16x2.e4m3x2),
// exact for every code (subnormals included; fp16 holds every E4M3 value) and NaN for S.1111.111
// as e4m3fn defines it; fp16 -> float32 is exact too. So every product is e4m3 * x rounded once.
//
// x is staged once per block in shared memory as four planes of float4 per token (plane p of chunk
// c holds elements 16c + 4p .. 16c + 4p + 3), so the 16-byte shared loads of a warp hit 32
// distinct banks. The chunk -> thread mapping, the order of the 16 products of a chunk and both
// reduction trees are the same for every T, so a token's result is bit-identical whatever else
// shares its launch.
#include <algorithm>

#include "common.cuh"

namespace moeflash {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 2;  // chunks per thread per batch: cols <= 8192 is one batch
constexpr int kChunk = 16;  // codes per 16-byte load

template <int T, int R>
struct Fp8Tile {
  static constexpr int kValues = R * T;
  static constexpr int kPadded = next_pow2(kValues);
  static_assert(kPadded <= 32, "R * T must fit one reduce-scatter");
};

struct Fp8Args {
  const uint8_t* w;
  const float* scales;
  const bf16_bits* bias;
  const float* x;
  float* y;
  int rows, cols;
  int ldy;  // y row stride: a block of rows of a wider output
  int block_rows;
  int chunks_per_block;  // block_cols / 16
  int scale_cols;        // ceil(cols / block_cols)
};

// The four codes of a 32-bit word (byte order = column order) as float32.
__device__ __forceinline__ void e4m3x4_to_f32(uint32_t w, float (&f)[4]) {
  uint32_t lo, hi;
  asm("{\n\t.reg .b16 a, b;\n\tmov.b32 {a, b}, %2;\n\tcvt.rn.f16x2.e4m3x2 %0, a;\n\tcvt.rn.f16x2.e4m3x2 %1, b;\n}"
      : "=r"(lo), "=r"(hi)
      : "r"(w));
  const float2 p = __half22float2(*reinterpret_cast<const __half2*>(&lo));
  const float2 q = __half22float2(*reinterpret_cast<const __half2*>(&hi));
  f[0] = p.x;
  f[1] = p.y;
  f[2] = q.x;
  f[3] = q.y;
}

template <int P>
__device__ __forceinline__ uint32_t word(const uint4& v) {
  static_assert(P >= 0 && P < 4, "word index");
  if constexpr (P == 0) return v.x;
  else if constexpr (P == 1) return v.y;
  else if constexpr (P == 2) return v.z;
  else return v.w;
}

// The weight and scale rows of a row group: divisions stay out of the chunk loop.
template <int R>
struct GroupRows {
  const uint8_t* w[R];
  const float* s[R];
};

template <int R>
__device__ __forceinline__ GroupRows<R> group_rows(const Fp8Args& a, int group) {
  GroupRows<R> g;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    // Rows past the end re-read the last row (always valid memory); their sums are never stored.
    const int row = min(group * R + r, a.rows - 1);
    g.w[r] = a.w + static_cast<int64_t>(row) * a.cols;
    g.s[r] = a.scales + static_cast<int64_t>(row / a.block_rows) * a.scale_cols;
  }
  return g;
}

// Scale column of the chunks c0 + u * kThreads.
__device__ __forceinline__ void scale_columns(const Fp8Args& a, int c0, int (&scol)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) scol[u] = (c0 + u * kThreads) / a.chunks_per_block;
}

template <int R>
__device__ __forceinline__ void load_batch(uint4 (&wv)[kUnroll][R], float (&sv)[kUnroll][R], const GroupRows<R>& g,
                                           const int (&scol)[kUnroll], int nchunk, int c0) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + u * kThreads;
      const bool in = c < nchunk;
      wv[u][r] = in ? ld_stream_u4(g.w[r] + kChunk * c) : make_uint4(0, 0, 0, 0);
      sv[u][r] = in ? __ldg(g.s[r] + scol[u]) : 0.f;
    }
  }
}

// Adds the 16 products of word P of chunk c of each row to part[r][t], in column order.
template <int T, int R, int P>
__device__ __forceinline__ void chunk_word(const uint4 (&wv)[R], const float4* xs, int nchunk, int c,
                                           float (&part)[R][T]) {
  float wf[R][4];
#pragma unroll
  for (int r = 0; r < R; ++r) e4m3x4_to_f32(word<P>(wv[r]), wf[r]);
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const float4 xv = xs[(4 * t + P) * nchunk + c];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float s = part[r][t];
      s = fmaf(wf[r][0], xv.x, s);
      s = fmaf(wf[r][1], xv.y, s);
      s = fmaf(wf[r][2], xv.z, s);
      s = fmaf(wf[r][3], xv.w, s);
      part[r][t] = s;
    }
  }
}

template <int T, int R>
__global__ void __launch_bounds__(kThreads) gemv_fp8_kernel(const Fp8Args a) {
  using Tile = Fp8Tile<T, R>;
  extern __shared__ float4 smem[];
  const int nchunk = a.cols / kChunk;
  float4* xs = smem;  // [T][4][nchunk]
  float* red = reinterpret_cast<float*>(smem + 4 * T * nchunk);  // [kWarps][kPadded]
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int ngroups = (a.rows + R - 1) / R;
  int group = blockIdx.x;
  if (group >= ngroups) return;

  // Every group starts at chunk tid: its scale columns are computed once.
  int scol_first[kUnroll];
  scale_columns(a, tid, scol_first);
  GroupRows<R> rows_now = group_rows<R>(a, group);
  uint4 wv[kUnroll][R];
  float sv[kUnroll][R];
  load_batch<R>(wv, sv, rows_now, scol_first, nchunk, tid);

  const int n4 = a.cols / 4;
  for (int j = tid; j < T * n4; j += kThreads) {
    const int t = j / n4;
    const int e = j - t * n4;
    xs[(4 * t + (e & 3)) * nchunk + (e >> 2)] = ld_f4(a.x + static_cast<int64_t>(t) * a.cols + 4 * e);
  }
  __syncthreads();

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
          float part[R][T];
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int t = 0; t < T; ++t) part[r][t] = 0.f;
          chunk_word<T, R, 0>(wv[u], xs, nchunk, c, part);
          chunk_word<T, R, 1>(wv[u], xs, nchunk, c, part);
          chunk_word<T, R, 2>(wv[u], xs, nchunk, c, part);
          chunk_word<T, R, 3>(wv[u], xs, nchunk, c, part);
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int t = 0; t < T; ++t) acc[r][t] = fmaf(part[r][t], sv[u][r], acc[r][t]);
        }
      }
      c0 += kUnroll * kThreads;
      if (c0 >= nchunk) break;
      int scol[kUnroll];
      scale_columns(a, c0, scol);
      load_batch<R>(wv, sv, rows_now, scol, nchunk, c0);
    }

    // Next group's first loads go out before this group's reduction and barriers.
    const int next = group + gridDim.x;
    if (next < ngroups) {
      rows_now = group_rows<R>(a, next);
      load_batch<R>(wv, sv, rows_now, scol_first, nchunk, tid);
    }

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
      if (row < a.rows) {
        if (a.bias != nullptr) s += bf16_to_f32(a.bias[row]);
        a.y[static_cast<int64_t>(t) * a.ldy + row] = s;
      }
    }
    __syncthreads();
  }
}

using KernelFn = void (*)(const Fp8Args);

// The dense MLP's activation between two gemv_fp8 launches, with mlp_bf16's formula so that FP8
// and bf16 dense layers differ only by their weights.
__global__ void swiglu_kernel(const float* __restrict__ gu, int tokens, int inter, float* __restrict__ act) {
  const int64_t n = static_cast<int64_t>(tokens) * inter;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / inter;
    const int64_t j = i - t * inter;
    const float g = gu[t * 2 * inter + j];
    const float u = gu[t * 2 * inter + inter + j];
    act[i] = (g / (1.0f + expf(-g))) * u;
  }
}

template <int R>
KernelFn pick_tokens(int t) {
  switch (t) {
    case 1: return gemv_fp8_kernel<1, R>;
    case 2: return gemv_fp8_kernel<2, R>;
    case 3: return gemv_fp8_kernel<3, R>;
    case 4: return gemv_fp8_kernel<4, R>;
    case 5: return gemv_fp8_kernel<5, R>;
    case 6: return gemv_fp8_kernel<6, R>;
    case 7: return gemv_fp8_kernel<7, R>;
    default: return gemv_fp8_kernel<8, R>;
  }
}

size_t smem_bytes(int tokens, int cols) {
  return static_cast<size_t>(tokens) * cols * sizeof(float) + kWarps * 32 * sizeof(float);
}

size_t max_smem() {
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) optin = 48 * 1024;
  return static_cast<size_t>(optin);
}

}  // namespace

cudaError_t gemv_fp8(const uint8_t* w, const float* scales, int block_rows, int block_cols, const bf16_bits* bias,
                     const float* x, float* y, int rows, int cols, int tokens, cudaStream_t stream) {
  return gemv_fp8_strided(w, scales, block_rows, block_cols, bias, x, y, rows, rows, cols, tokens, stream);
}

cudaError_t gemv_fp8_strided(const uint8_t* w, const float* scales, int block_rows, int block_cols, const bf16_bits* bias,
                             const float* x, float* y, int y_stride, int rows, int cols, int tokens, cudaStream_t stream) {
  if (tokens <= 0 || rows <= 0) return cudaSuccess;
  if (cols <= 0 || cols % kChunk != 0 || block_rows <= 0 || block_cols <= 0 || block_cols % kChunk != 0 || y_stride < rows)
    return cudaErrorInvalidValue;
  // Tokens per launch: at most 8 and as many as their x fits shared memory. Splitting changes no
  // result, since a token's reduction order does not depend on its batch.
  const size_t limit = max_smem();
  int per_launch = 8;
  while (per_launch > 1 && smem_bytes(per_launch, cols) > limit) --per_launch;
  if (smem_bytes(per_launch, cols) > limit) return cudaErrorInvalidValue;
  Fp8Args a{w, scales, bias, nullptr, nullptr, rows, cols, y_stride, block_rows, block_cols / kChunk, ceil_div(cols, block_cols)};
  // Row groups as gemv_bf16: 4 rows a group for large matrices, fewer for small ones so that the
  // groups still spread over every multiprocessor. The choice depends on rows only.
  const int sms = device_sm_count();
  const int r = rows >= 16 * sms * 4 ? 4 : rows >= 4 * sms * 2 ? 2 : 1;
  for (int t0 = 0; t0 < tokens; t0 += per_launch) {
    const int t = std::min(per_launch, tokens - t0);
    const KernelFn fn = r == 4 ? pick_tokens<4>(t) : r == 2 ? pick_tokens<2>(t) : pick_tokens<1>(t);
    const size_t smem = smem_bytes(t, cols);
    const int groups = ceil_div(rows, r);
    const int grid = std::min(groups, resident_blocks(reinterpret_cast<const void*>(fn), kThreads, smem) * sms);
    a.x = x + static_cast<int64_t>(t0) * cols;
    a.y = y + static_cast<int64_t>(t0) * y_stride;
    fn<<<grid, kThreads, smem, stream>>>(a);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t swiglu_f32(const float* gate_up, int tokens, int inter, float* act, cudaStream_t stream) {
  if (tokens <= 0 || inter <= 0) return cudaSuccess;
  const int64_t n = static_cast<int64_t>(tokens) * inter;
  const int grid = static_cast<int>(std::min<int64_t>((n + 255) / 256, 4096));
  swiglu_kernel<<<grid, 256, 0, stream>>>(gate_up, tokens, inter, act);
  return cudaGetLastError();
}

}  // namespace moeflash
