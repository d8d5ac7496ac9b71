// Tensor-core building blocks with bf16 operands: one mma.sync m16n8k16 and the split of float32
// values into bf16 hi + lo pairs. Kept apart from the kernels that use them so that those
// kernels can be checked on the CPU with a stand-in for this header.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

namespace moeflash {

// d += A B for the whole warp: A [16 x 16] bf16, B [16 x 8] bf16, d [16 x 8] float32. Fragments
// (PTX ISA, mma.m16n8k16 .bf16), with g = lane / 4 and t = lane % 4; a register holds two bf16,
// the lower-indexed element in the low half:
//   a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b0 = B[2t, 2t+1][g]     b1 = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t, 2t+1]                        d[2], d[3] = D[g+8][2t, 2t+1]
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// x ~= hi + lo, hi = bf16(x), lo = bf16(x - hi), for a pair (x0 in the low halves): a product of
// hi + lo with an exact bf16 operand, accumulated in float32, is within about 2^-17 of the
// float32 product, where bf16 alone would be 2^-9 off.
__device__ __forceinline__ void split_bf16x2(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
  const float2 hf = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(x0 - hf.x, x1 - hf.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

}  // namespace moeflash
