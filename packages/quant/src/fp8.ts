/**
 * FP8 (OCP 8-bit floating point): E4M3 in its finite-only "e4m3fn" form and E5M2, plus the
 * 128x128 block-scaled E4M3 weights of HF / DeepSeek-V3 checkpoints.
 *
 * Conversion from float32 rounds to nearest, ties to even, deciding on the float32 bits with
 * integer arithmetic. Scalar encoders take a JS number and round it to float32 first (as storing it
 * in a `Float32Array` would), so scalar and array encoders agree bit for bit and match a cast of a
 * float32 tensor.
 *
 * Overflow, the two modes:
 * - `saturate: true` (the default of every encoder here): finite values beyond the largest normal
 *   and infinities become +-max (448 for E4M3, 57344 for E5M2), as CUDA's `__NV_SATFINITE`
 *   conversion and the OCP saturating mode do.
 * - `saturate: false`: what PyTorch's `tensor.to(torch.float8_e4m3fn)` / `torch.float8_e5m2` casts
 *   do. E4M3 rounds as if the grid went on to 480 (the NaN code's place), so magnitudes above 464
 *   and infinities become NaN (0x7F with the input's sign) while 448 < |x| <= 464 gives 448. E5M2
 *   overflows like IEEE: |x| >= 61440 and infinities give +-Inf.
 *
 * NaN encodes to the all-ones code with the input's sign bit (0x7F / 0xFF), as PyTorch does; JS
 * does not promise to keep a NaN's sign through arithmetic, so treat both NaN codes alike.
 * Signed zeros keep their sign (-0 and negative values that round to zero give 0x80).
 *
 * @module
 */

import { MoeflashError } from '@moeflash/core';
import { checkCode, checkOut, f32ToBits, u32View } from './bits.js';

/** The two FP8 formats. */
export type Fp8Format = 'e4m3' | 'e5m2';

/** Options of the FP8 encoders. */
export interface Fp8EncodeOptions {
  /** Clamp overflow (and infinities) to the largest finite value; default true. See module notes. */
  saturate?: boolean;
}

/** Largest finite E4M3 (e4m3fn) magnitude, 1.75 * 2^8. */
export const E4M3_MAX = 448;
/** Largest finite E5M2 magnitude, 1.75 * 2^15. */
export const E5M2_MAX = 57344;

/**
 * E4M3 code of the float32 with bit pattern `u`.
 * Normals: bias 7, so float32 exponents 121..135 map to fields 1..15 (field 15 with mantissa 111 is
 * NaN). Subnormals: m * 2^-9.
 */
function e4m3FromBits(u: number, saturate: boolean): number {
  const sign = (u >>> 24) & 0x80;
  const a = u & 0x7fffffff;
  if (a >= 0x7f800000) {
    if (a > 0x7f800000) return sign | 0x7f;
    return sign | (saturate ? 0x7e : 0x7f);
  }
  let mag: number;
  if (a >= 0x3c800000) {
    // RNE on the 20 dropped mantissa bits. A carry out of the mantissa lands in the exponent, which
    // is the correct next binade; rebias by (127 - 7) << 3.
    mag = ((a + 0x7ffff + ((a >>> 20) & 1)) >>> 20) - 960;
    if (mag > 0x7e) mag = saturate ? 0x7e : 0x7f;
  } else {
    // Below 2^-6: q = |x| / 2^-9 = sig * 2^(e - 141), rounded to an integer (q = 8 is the smallest
    // normal, whose code is also 8).
    const e = a >>> 23;
    const shift = 141 - e;
    if (shift > 24) {
      mag = 0; // q < 2^24 / 2^25 = 0.5 (float32 subnormals included)
    } else {
      const sig = (a & 0x7fffff) | 0x800000;
      mag = sig >>> shift;
      const rem = sig & ((1 << shift) - 1);
      const half = 1 << (shift - 1);
      if (rem > half || (rem === half && (mag & 1) === 1)) mag += 1;
    }
  }
  return sign | mag;
}

/**
 * E5M2 code of the float32 with bit pattern `u`.
 * Normals: bias 15, float32 exponents 113..142 map to fields 1..30; field 31 is Inf/NaN.
 * Subnormals: m * 2^-16.
 */
function e5m2FromBits(u: number, saturate: boolean): number {
  const sign = (u >>> 24) & 0x80;
  const a = u & 0x7fffffff;
  if (a >= 0x7f800000) {
    if (a > 0x7f800000) return sign | 0x7f;
    return sign | (saturate ? 0x7b : 0x7c);
  }
  let mag: number;
  if (a >= 0x38800000) {
    mag = ((a + 0xfffff + ((a >>> 21) & 1)) >>> 21) - 448;
    if (mag > 0x7b) mag = saturate ? 0x7b : 0x7c;
  } else {
    // q = |x| / 2^-16 = sig * 2^(e - 134).
    const e = a >>> 23;
    const shift = 134 - e;
    if (shift > 24) {
      mag = 0;
    } else {
      const sig = (a & 0x7fffff) | 0x800000;
      mag = sig >>> shift;
      const rem = sig & ((1 << shift) - 1);
      const half = 1 << (shift - 1);
      if (rem > half || (rem === half && (mag & 1) === 1)) mag += 1;
    }
  }
  return sign | mag;
}

function buildDecodeTable(mbits: number, bias: number, finiteOnly: boolean): Float32Array {
  const t = new Float32Array(256);
  const ebits = 7 - mbits;
  const emask = (1 << ebits) - 1;
  const mmask = (1 << mbits) - 1;
  for (let c = 0; c < 256; c++) {
    const s = c & 0x80 ? -1 : 1;
    const e = (c >>> mbits) & emask;
    const m = c & mmask;
    let v: number;
    if (finiteOnly) {
      v = e === emask && m === mmask ? Number.NaN : 0;
    } else {
      v = e === emask ? (m === 0 ? Number.POSITIVE_INFINITY : Number.NaN) : 0;
    }
    if (!Number.isNaN(v) && v !== Number.POSITIVE_INFINITY) {
      v = e === 0 ? m * 2 ** (1 - bias - mbits) : (1 + m / (1 << mbits)) * 2 ** (e - bias);
    }
    t[c] = s * v;
  }
  return t;
}

const E4M3_TABLE = buildDecodeTable(3, 7, true);
const E5M2_TABLE = buildDecodeTable(2, 15, false);

/**
 * The E4M3 (e4m3fn) value of a code: bias 7, subnormals m * 2^-9, 0x7F and 0xFF are NaN, no Inf.
 */
export function decodeE4M3(code: number): number {
  checkCode(code, 255, 'E4M3');
  return E4M3_TABLE[code];
}

/** The E5M2 value of a code: bias 15, subnormals m * 2^-16, 0x7C / 0xFC are +-Inf, 0x7D..0x7F NaN. */
export function decodeE5M2(code: number): number {
  checkCode(code, 255, 'E5M2');
  return E5M2_TABLE[code];
}

/**
 * The E4M3 (e4m3fn) code nearest to `x` (RNE from float32). Overflow per `opts.saturate`
 * (default true: clamp to +-448; false: NaN, as PyTorch's cast).
 */
export function encodeE4M3(x: number, opts: Fp8EncodeOptions = {}): number {
  return e4m3FromBits(f32ToBits(x), opts.saturate ?? true);
}

/**
 * The E5M2 code nearest to `x` (RNE from float32). Overflow per `opts.saturate`
 * (default true: clamp to +-57344, infinities included; false: +-Inf, as PyTorch's cast).
 */
export function encodeE5M2(x: number, opts: Fp8EncodeOptions = {}): number {
  return e5m2FromBits(f32ToBits(x), opts.saturate ?? true);
}

function checkFormat(format: string, fn: string): asserts format is Fp8Format {
  if (format !== 'e4m3' && format !== 'e5m2') {
    throw new MoeflashError(
      'INVALID_ARGUMENT',
      `${fn}: unknown FP8 format ${JSON.stringify(format)}; use 'e4m3' or 'e5m2'`,
    );
  }
}

/**
 * Encode every element of `values` to FP8 codes (same rules as {@link encodeE4M3} /
 * {@link encodeE5M2}). Writes into `out` when given (at least `values.length` bytes).
 */
export function encodeFp8(
  values: Float32Array,
  format: Fp8Format,
  opts: Fp8EncodeOptions & { out?: Uint8Array } = {},
): Uint8Array {
  checkFormat(format, 'encodeFp8');
  const n = values.length;
  checkOut(opts.out, n, 'encodeFp8');
  const out = opts.out ?? new Uint8Array(n);
  const u = u32View(values);
  const sat = opts.saturate ?? true;
  if (format === 'e4m3') {
    for (let i = 0; i < n; i++) out[i] = e4m3FromBits(u[i], sat);
  } else {
    for (let i = 0; i < n; i++) out[i] = e5m2FromBits(u[i], sat);
  }
  return out;
}

/** Decode FP8 codes to float32 (exact). Writes into `out` when given. */
export function decodeFp8(codes: Uint8Array, format: Fp8Format, out?: Float32Array): Float32Array {
  checkFormat(format, 'decodeFp8');
  const n = codes.length;
  checkOut(out, n, 'decodeFp8');
  const dst = out ?? new Float32Array(n);
  const t = format === 'e4m3' ? E4M3_TABLE : E5M2_TABLE;
  for (let i = 0; i < n; i++) dst[i] = t[codes[i]];
  return dst;
}

/** A block-scaled E4M3 weight as HF fp8 checkpoints (DeepSeek-V3 style) store it. */
export interface Fp8BlockedWeight {
  /** E4M3 codes, row-major [rows, cols] (the checkpoint's `W.weight`, dtype F8_E4M3). */
  data: Uint8Array;
  /**
   * Per-block float32 multipliers, row-major [ceil(rows / blockRows), ceil(cols / blockCols)]
   * (the checkpoint's `W.weight_scale_inv`): real weight = decoded fp8 * scaleInv of its block.
   */
  scaleInv: Float32Array;
}

function checkBlocked(
  fn: string,
  length: number,
  rows: number,
  cols: number,
  block: readonly [number, number],
): void {
  const ok = (v: number) => Number.isInteger(v) && v > 0;
  if (!ok(rows) || !ok(cols) || !ok(block[0]) || !ok(block[1])) {
    throw new MoeflashError(
      'INVALID_ARGUMENT',
      `${fn}: rows, cols and block sizes must be positive integers ` +
        `(got rows=${rows}, cols=${cols}, block=[${block[0]}, ${block[1]}])`,
    );
  }
  if (length !== rows * cols) {
    throw new MoeflashError(
      'INVALID_ARGUMENT',
      `${fn}: ${length} elements do not form a [${rows}, ${cols}] matrix`,
    );
  }
}

/**
 * Quantize a row-major [rows, cols] float32 weight to block-scaled E4M3.
 *
 * Per block: scaleInv = float32(amax / 448) (1 when the block is all zeros; the smallest positive
 * float32 when amax / 448 underflows to 0), then each element encodes float32(w / scaleInv) with
 * saturation, which is the DeepSeek-V3 / HF recipe (`s = amax / 448; (w / s).to(float8_e4m3fn)`).
 * Edge blocks are partial. A NaN or infinite weight throws INVALID_ARGUMENT naming its position:
 * this layout has no way to store it.
 */
export function quantizeFp8Blocked(
  w: Float32Array,
  rows: number,
  cols: number,
  block: readonly [number, number] = [128, 128],
): Fp8BlockedWeight {
  checkBlocked('quantizeFp8Blocked', w.length, rows, cols, block);
  const [br, bc] = block;
  const sRows = Math.ceil(rows / br);
  const sCols = Math.ceil(cols / bc);
  const data = new Uint8Array(rows * cols);
  const scaleInv = new Float32Array(sRows * sCols);
  const scratch = new Float32Array(1);
  const scratchU = new Uint32Array(scratch.buffer);
  for (let bi = 0; bi < sRows; bi++) {
    const r0 = bi * br;
    const r1 = Math.min(rows, r0 + br);
    for (let bj = 0; bj < sCols; bj++) {
      const c0 = bj * bc;
      const c1 = Math.min(cols, c0 + bc);
      let amax = 0;
      for (let r = r0; r < r1; r++) {
        for (let c = c0; c < c1; c++) {
          const v = w[r * cols + c];
          if (!Number.isFinite(v)) {
            throw new MoeflashError(
              'INVALID_ARGUMENT',
              `quantizeFp8Blocked: weight [${r}, ${c}] is ${v}; FP8 block scaling needs finite weights`,
            );
          }
          const m = Math.abs(v);
          if (m > amax) amax = m;
        }
      }
      // A float64 quotient of two float32s rounded to float32 equals the float32 division
      // (53 >= 2 * 24 + 2 makes the double rounding innocuous), so this matches torch bit for bit.
      let s = amax === 0 ? 1 : Math.fround(amax / E4M3_MAX);
      if (s === 0) s = 2 ** -149;
      scaleInv[bi * sCols + bj] = s;
      for (let r = r0; r < r1; r++) {
        for (let c = c0; c < c1; c++) {
          const i = r * cols + c;
          scratch[0] = w[i] / s;
          data[i] = e4m3FromBits(scratchU[0], true);
        }
      }
    }
  }
  return { data, scaleInv };
}

/**
 * Dequantize a block-scaled E4M3 weight to row-major float32: float32(decode(code) * scaleInv),
 * the float32 product PyTorch computes for `w.float() * scale_inv`.
 */
export function dequantizeFp8Blocked(
  data: Uint8Array,
  scaleInv: Float32Array,
  rows: number,
  cols: number,
  block: readonly [number, number] = [128, 128],
): Float32Array {
  checkBlocked('dequantizeFp8Blocked', data.length, rows, cols, block);
  const [br, bc] = block;
  const sCols = Math.ceil(cols / bc);
  const expected = Math.ceil(rows / br) * sCols;
  if (scaleInv.length !== expected) {
    throw new MoeflashError(
      'INVALID_ARGUMENT',
      `dequantizeFp8Blocked: scaleInv has ${scaleInv.length} entries, expected ${expected} ` +
        `([${Math.ceil(rows / br)}, ${sCols}] for a [${rows}, ${cols}] weight in ${br}x${bc} blocks)`,
    );
  }
  const out = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    const srow = Math.floor(r / br) * sCols;
    for (let c = 0; c < cols; c++) {
      const i = r * cols + c;
      out[i] = E4M3_TABLE[data[i]] * scaleInv[srow + Math.floor(c / bc)];
    }
  }
  return out;
}
