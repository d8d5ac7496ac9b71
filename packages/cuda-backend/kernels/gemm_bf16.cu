// bf16 matrix product for many tokens (prefill chunks, verify blocks): y[t] = W x[t] (+ bias) on
// tensor cores, where gemv_bf16 would read W once per 8 tokens.
//
// W [rows, cols] bf16 is the A operand, x [tokens, cols] float32 the B operand. The tensor cores
// take bf16, which keeps 8 bits of x's 24: x is split into hi = bf16(x) and lo = bf16(x - hi) and
// both are multiplied (two mma.sync m16n8k16 per tile), so x enters with ~16 bits, products are
// exact in float32 and sums are float32: within ~1e-5 (relative) of the float32 GEMV. A token's
// result depends only on its own x (the k order is fixed), not on how many tokens share the launch.
//
// Block tile 64 rows x 64 tokens, k-tiles of 32; 4 warps in 2 x 2, each 32 rows x 32 tokens. The
// next k-tile is loaded into registers while the current one is multiplied from shared memory
// (double buffered, one barrier a k-tile); fragments come from ldmatrix. Consecutive blocks take
// the token tiles of one row tile, so a W tile read from DRAM is reused from L2.
#include <cuda_bf16.h>

#include "common.cuh"
#include "mma_bf16.cuh"

namespace moeflash {
namespace {

constexpr int BM = 64, BN = 64, BK = 32;
constexpr int kThreads = 128;
constexpr int kPad = 8;  // bf16 of padding a smem row: 80-byte rows keep ldmatrix free of conflicts
constexpr int kLd = BK + kPad;

struct Tiles {
  bf16_bits a[2][BM][kLd];
  bf16_bits bh[2][BN][kLd];
  bf16_bits bl[2][BN][kLd];
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(p)))
               : "memory");  // it reads shared memory: keep it after the barrier that published the tile
}

// The registers of one k-tile: A 64 x 32 bf16 (2 x 16 bytes a thread), B 64 tokens x 32 floats
// (4 float4 a thread).
struct Stage {
  uint4 a[2];
  float4 b[4];
};

__device__ __forceinline__ void load_a(Stage& s, const bf16_bits* __restrict__ w, int rows, int cols, int m0, int k0) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int idx = threadIdx.x + i * kThreads;  // 256 chunks of 8 bf16
    const int r = idx >> 2, c = idx & 3;
    const int row = m0 + r, k = k0 + 8 * c;
    s.a[i] = row < rows && k < cols ? ld_stream_u4(w + static_cast<int64_t>(row) * cols + k) : make_uint4(0, 0, 0, 0);
  }
}

__device__ __forceinline__ void load_b(Stage& s, const float* __restrict__ x, int tokens, int cols, int n0, int k0) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int idx = threadIdx.x + i * kThreads;  // 512 float4
    const int n = idx >> 3, q = idx & 7;
    const int t = n0 + n, k = k0 + 4 * q;
    s.b[i] = t < tokens && k < cols ? ld_f4(x + static_cast<int64_t>(t) * cols + k) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

__device__ __forceinline__ void store_stage(const Stage& s, Tiles& sm, int buf) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    *reinterpret_cast<uint4*>(&sm.a[buf][idx >> 2][8 * (idx & 3)]) = s.a[i];
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int n = idx >> 3, q = idx & 7;
    const float4 v = s.b[i];
    uint2 hi, lo;
    split_bf16x2(v.x, v.y, hi.x, lo.x);
    split_bf16x2(v.z, v.w, hi.y, lo.y);
    *reinterpret_cast<uint2*>(&sm.bh[buf][n][4 * q]) = hi;
    *reinterpret_cast<uint2*>(&sm.bl[buf][n][4 * q]) = lo;
  }
}

__global__ void __launch_bounds__(kThreads) gemm_bf16_kernel(const bf16_bits* __restrict__ w,
                                                             const bf16_bits* __restrict__ bias,
                                                             const float* __restrict__ x, float* __restrict__ y,
                                                             int rows, int cols, int tokens) {
  __shared__ __align__(16) Tiles sm;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp >> 1, wn = warp & 1;
  const int nk = (cols + BK - 1) / BK;

  Stage st;
  load_a(st, w, rows, cols, m0, 0);
  pdl_prologue();  // W is no kernel's output: its first tile is read before the wait
  load_b(st, x, tokens, cols, n0, 0);
  store_stage(st, sm, 0);
  __syncthreads();

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  for (int kt = 0; kt < nk; ++kt) {
    const int buf = kt & 1;
    const bool more = kt + 1 < nk;
    if (more) {
      load_a(st, w, rows, cols, m0, (kt + 1) * BK);
      load_b(st, x, tokens, cols, n0, (kt + 1) * BK);
    }
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) ldmatrix_x4(a[i], &sm.a[buf][wm * 32 + i * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
      for (int p = 0; p < 2; ++p) {  // pairs of n8 tiles
        const int nrow = wn * 32 + p * 16 + (lane & 7) + (lane >> 4) * 8;
        const int kcol = kk + ((lane >> 3) & 1) * 8;
        uint32_t bh[4], bl[4];
        ldmatrix_x4(bh, &sm.bh[buf][nrow][kcol]);
        ldmatrix_x4(bl, &sm.bl[buf][nrow][kcol]);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          mma_bf16_16816(acc[i][2 * p], a[i], bh[0], bh[1]);
          mma_bf16_16816(acc[i][2 * p + 1], a[i], bh[2], bh[3]);
          mma_bf16_16816(acc[i][2 * p], a[i], bl[0], bl[1]);
          mma_bf16_16816(acc[i][2 * p + 1], a[i], bl[2], bl[3]);
        }
      }
    }
    if (more) store_stage(st, sm, buf ^ 1);
    __syncthreads();
  }

  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + wm * 32 + i * 16 + g + 8 * h;
      if (row >= rows) continue;
      const float b = bias != nullptr ? bf16_to_f32(bias[row]) : 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int t = n0 + wn * 32 + j * 8 + 2 * q + c;
          if (t < tokens) y[static_cast<int64_t>(t) * rows + row] = acc[i][j][2 * h + c] + b;
        }
    }
  }
}

}  // namespace

cudaError_t gemm_bf16(const bf16_bits* w, const bf16_bits* bias, const float* x, float* y, int rows, int cols,
                      int tokens, cudaStream_t stream) {
  if (tokens <= 0 || rows <= 0) return cudaSuccess;
  if (cols <= 0 || cols % 8 != 0) return cudaErrorInvalidValue;
  const dim3 grid(ceil_div(tokens, BN), ceil_div(rows, BM));
  if (grid.y > 65535u) return cudaErrorInvalidValue;
  return launch_pdl(gemm_bf16_kernel, grid, kThreads, 0, stream, w, bias, x, y, rows, cols, tokens);
}

}  // namespace moeflash
