/**
 * Reinterpretation between float32 values and their IEEE-754 bit patterns. Every encoder in this
 * package works on the bits so that rounding is decided by integer arithmetic, never by a
 * floating-point operation that could round twice.
 *
 * @module
 */

import { MoeflashError } from '@moeflash/core';

const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

/**
 * The float32 bit pattern of `x` (as an unsigned 32-bit integer). `x` is first rounded to float32
 * (round to nearest even), exactly as storing it into a `Float32Array` does.
 */
export function f32ToBits(x: number): number {
  scratchF32[0] = x;
  return scratchU32[0];
}

/** The float32 value whose bit pattern is `bits` (taken modulo 2^32). */
export function bitsToF32(bits: number): number {
  scratchU32[0] = bits;
  return scratchF32[0];
}

/**
 * A `Uint32Array` over the same memory as `values`. Both views use the platform's byte order, so
 * element i of the result is the bit pattern of `values[i]` on any host.
 */
export function u32View(values: Float32Array): Uint32Array {
  return new Uint32Array(values.buffer, values.byteOffset, values.length);
}

/** Throws INVALID_ARGUMENT unless `code` is an integer in [0, max]. */
export function checkCode(code: number, max: number, what: string): void {
  if (!(Number.isInteger(code) && code >= 0 && code <= max)) {
    throw new MoeflashError(
      'INVALID_ARGUMENT',
      `${what} code must be an integer in [0, ${max}], got ${String(code)}`,
    );
  }
}

/** Throws INVALID_ARGUMENT unless `out` is absent or holds at least `length` elements. */
export function checkOut(out: { length: number } | undefined, length: number, what: string): void {
  if (out !== undefined && out.length < length) {
    throw new MoeflashError(
      'INVALID_ARGUMENT',
      `${what}: output buffer holds ${out.length} elements, needs ${length}`,
    );
  }
}
