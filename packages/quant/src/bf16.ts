/**
 * bfloat16: the top 16 bits of a float32.
 *
 * float32 -> bf16 rounds to nearest even on the 16 dropped bits; finite values that round past the
 * largest bf16 become +-Inf, as in IEEE. A NaN becomes the quiet NaN 0x7FC0 carrying the input's
 * sign (0xFFC0 for a negative NaN): plain truncation could turn a NaN whose payload sits in the low
 * bits into an infinity, and rounding could carry it into the sign. PyTorch's scalar CPU path gives
 * 0x7FC0 for every NaN and other paths differ, so compare NaN-ness, not NaN bits.
 *
 * @module
 */

import { checkCode, checkOut, f32ToBits, u32View } from './bits.js';

const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

function bf16FromBits(u: number): number {
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) & 0x8000) | 0x7fc0;
  // Adding 0x7FFF plus the kept LSB rounds ties to even; the sum stays below 2^32 for every
  // non-NaN pattern, so the shift sees the exact value.
  return (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;
}

/**
 * The bf16 bit pattern (0..0xFFFF) nearest to `x`, ties to even. `x` is first rounded to float32.
 */
export function f32ToBf16Bits(x: number): number {
  return bf16FromBits(f32ToBits(x));
}

/** The float32 value of a bf16 bit pattern (exact). */
export function bf16BitsToF32(bits: number): number {
  checkCode(bits, 0xffff, 'bf16');
  scratchU32[0] = bits << 16;
  return scratchF32[0];
}

/** Encode every element of `values` to bf16 bit patterns. Writes into `out` when given. */
export function encodeBf16(values: Float32Array, out?: Uint16Array): Uint16Array {
  const n = values.length;
  checkOut(out, n, 'encodeBf16');
  const dst = out ?? new Uint16Array(n);
  const u = u32View(values);
  for (let i = 0; i < n; i++) dst[i] = bf16FromBits(u[i]);
  return dst;
}

/** Decode bf16 bit patterns to float32 (exact). Writes into `out` when given. */
export function decodeBf16(bits: Uint16Array, out?: Float32Array): Float32Array {
  const n = bits.length;
  checkOut(out, n, 'decodeBf16');
  const dst = out ?? new Float32Array(n);
  const d = u32View(dst);
  for (let i = 0; i < n; i++) d[i] = bits[i] << 16;
  return dst;
}

/**
 * Round every element of `values` to the nearest bf16 value, returned as float32 (what a bf16
 * store followed by a load gives). Writes into `out` when given; `out` may be `values` itself.
 */
export function roundToBf16(values: Float32Array, out?: Float32Array): Float32Array {
  const n = values.length;
  checkOut(out, n, 'roundToBf16');
  const dst = out ?? new Float32Array(n);
  const s = u32View(values);
  const d = u32View(dst);
  for (let i = 0; i < n; i++) d[i] = bf16FromBits(s[i]) << 16;
  return dst;
}
