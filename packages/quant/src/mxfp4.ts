/**
 * MXFP4 (OCP Microscaling v1.0): blocks of 32 E2M1 elements that share one E8M0 power-of-two
 * scale, packed as gpt-oss checkpoints store them.
 *
 * Conventions this module fixes (the spec leaves them open):
 * - Signed zero: an element keeps the sign of its input, so a negative value that rounds to zero
 *   (and -0 itself) becomes code 0x8 (-0), as an IEEE cast would. Both zeros decode to 0 in
 *   magnitude, so the choice never changes a decoded value's use in a product.
 * - All-zero block (every element +0 or -0): scale code 0 (2^-127), which is what the OCP rule
 *   gives when floor(log2(0)) = -infinity is clamped.
 * - A NaN or an infinity anywhere in a block: scale code 0xFF (NaN) and every element code 0,
 *   following the OCP reference code, where log2(inf) overflows the scale range to NaN.
 *
 * @module
 */

import { MoeflashError } from '@moeflash/core';
import { checkCode, f32ToBits, u32View } from './bits.js';

/** Elements in one MXFP4 block (one shared scale). */
export const MXFP4_BLOCK_SIZE = 32;

/** Bytes of packed element codes in one MXFP4 block (two 4-bit codes a byte). */
export const MXFP4_BLOCK_BYTES = 16;

/** The E8M0 code that marks a block as NaN. */
export const E8M0_NAN = 0xff;

/** The E8M0 exponent bias: code c stands for 2^(c - 127). */
export const E8M0_BIAS = 127;

/**
 * The value of each E2M1 code: index = code (0x0..0xF). Codes 0x8..0xF are the negations of
 * 0x0..0x7; 0x8 is -0.
 */
export const E2M1_VALUES: Readonly<Float32Array> = Float32Array.of(
  0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6,
);

/**
 * How a block's shared exponent is chosen from its largest magnitude `amax`.
 * - `'ocp'`: the OCP MX v1.0 rule, floor(log2(amax)) - 2. Elements up to 8X - epsilon can occur
 *   and those above 6X saturate to 6X (a block maximum of 7.9X is stored as 6X).
 * - `'no-clip'`: the smallest exponent e with amax / 2^e <= 6, so nothing in the block saturates;
 *   it costs one bit of resolution when the block maximum's mantissa is above 1.5.
 *
 * Both clamp the exponent to [-127, 127].
 */
export type Mxfp4ScaleRule = 'ocp' | 'no-clip';

/** Options of {@link quantizeMxfp4}. */
export interface QuantizeMxfp4Options {
  /** Scale selection rule; default `'ocp'`. */
  scaleRule?: Mxfp4ScaleRule;
  /** Write packed codes here (at least length / 2 bytes) instead of allocating. */
  blocks?: Uint8Array;
  /** Write scale codes here (at least length / 32 bytes) instead of allocating. */
  scales?: Uint8Array;
}

/** Result of {@link quantizeMxfp4}. */
export interface Mxfp4Quantized {
  /**
   * Packed E2M1 codes, 16 bytes a block; element 2i of a block in the LOW nibble of byte i, element
   * 2i + 1 in the high nibble (the gpt-oss `*_blocks` layout).
   */
  blocks: Uint8Array;
  /** One E8M0 scale code a block (the gpt-oss `*_scales` layout). */
  scales: Uint8Array;
}

// Rounding to the E2M1 grid is a count of decision thresholds passed. The thresholds are the
// midpoints between neighbours; at a midpoint the even mantissa wins, so 0.25, 1.25, 2.5 and 5 go
// down (strictly greater needed) and 0.75, 1.75, 3.5 go up (greater or equal suffices).
const THRESHOLDS = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5] as const;
const TIE_GOES_UP = [false, true, false, true, false, true, false] as const;
const F32_MAX = 3.4028234663852886e38;
const SCALE_MIN = -127;
const SCALE_MAX = 127;

// For every shared exponent s in [-127, 127], the seven thresholds t * 2^s as float32 bit patterns,
// lowered by one where a tie rounds up, so that "magnitude bits > entry" is the test for all seven.
// t * 2^s is a multiple of 2^-129 and at most 5 * 2^127, hence exactly representable whenever it
// is finite: comparing bits is comparing the exact quotient v / 2^s with the threshold, including
// the subnormal quotients near 2^-127 that a float division would round first.
const THRESHOLD_BITS = buildThresholdTable();

function buildThresholdTable(): Int32Array {
  const table = new Int32Array((SCALE_MAX - SCALE_MIN + 1) * 8);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let s = SCALE_MIN; s <= SCALE_MAX; s++) {
    const row = (s - SCALE_MIN) * 8;
    for (let k = 0; k < THRESHOLDS.length; k++) {
      const t = THRESHOLDS[k] * 2 ** s;
      let bits: number;
      if (t > F32_MAX) {
        // No finite float32 reaches it; the infinity pattern keeps the comparison false.
        bits = 0x7f800000;
      } else {
        f[0] = t;
        bits = u[0];
      }
      table[row + k] = TIE_GOES_UP[k] ? bits - 1 : bits;
    }
    table[row + 7] = 0x7f800000;
  }
  return table;
}

// E8M0 code -> scale value; doubles hold every 2^(c-127) exactly.
const E8M0_VALUES = (() => {
  const t = new Float64Array(256);
  for (let c = 0; c < 255; c++) t[c] = 2 ** (c - E8M0_BIAS);
  t[E8M0_NAN] = Number.NaN;
  return t;
})();

/**
 * floor(log2(x)) of a positive finite float32 given its magnitude bits, exact: the exponent field
 * for normals, the leading mantissa bit's position for subnormals.
 */
function floorLog2OfBits(a: number): number {
  const e = a >>> 23;
  if (e !== 0) return e - 127;
  return 31 - Math.clz32(a) - 149;
}

/**
 * The shared exponent of a block whose largest magnitude has float32 bits `amaxBits` (finite).
 * Exported for the converter and tests; most callers want {@link quantizeMxfp4}.
 */
export function mxfp4SharedExponent(amaxBits: number, rule: Mxfp4ScaleRule = 'ocp'): number {
  if (amaxBits === 0) return SCALE_MIN;
  let e = floorLog2OfBits(amaxBits) - 2;
  // amax = M * 2^E with M in [1, 2): M * 4 <= 6 needs M <= 1.5, otherwise one more doubling.
  // A subnormal amax lands at the lower clamp either way, so its mantissa is not normalized here.
  if (rule === 'no-clip' && (amaxBits & 0x7fffff) > 0x400000) e += 1;
  if (e < SCALE_MIN) return SCALE_MIN;
  if (e > SCALE_MAX) return SCALE_MAX;
  return e;
}

/** The value of an E2M1 code (0x0..0xF). */
export function decodeE2M1(code: number): number {
  checkCode(code, 15, 'E2M1');
  return E2M1_VALUES[code];
}

/**
 * The E2M1 code nearest to `x` (ties to the even mantissa), as if the block scale were 1:
 * magnitudes above 6 (and infinities) saturate to 6, and the sign is kept (so -0.1 gives 0x8).
 * `x` is first rounded to float32. NaN has no E2M1 code and throws INVALID_ARGUMENT.
 */
export function encodeE2M1(x: number): number {
  if (Number.isNaN(x)) {
    throw new MoeflashError('INVALID_ARGUMENT', 'E2M1 has no NaN: cannot encode NaN');
  }
  const u = f32ToBits(x);
  const a = u & 0x7fffffff;
  const row = (0 - SCALE_MIN) * 8;
  let c = 0;
  for (let k = 0; k < 7; k++) c += (THRESHOLD_BITS[row + k] - a) >>> 31;
  return c | ((u >>> 28) & 8);
}

/** The scale 2^(code - 127) of an E8M0 code; code 0xFF gives NaN. */
export function decodeE8M0(code: number): number {
  checkCode(code, 255, 'E8M0');
  return E8M0_VALUES[code];
}

/**
 * Quantize `values` to MXFP4 along its last axis: consecutive runs of 32 elements form a block.
 * `values.length` must be a multiple of 32 (pad rows whose length is not).
 *
 * Each element becomes the E2M1 code nearest to v / X (ties to even, saturating at 6), where
 * X = 2^e and e is chosen by `opts.scaleRule` (see {@link Mxfp4ScaleRule}). The division is exact
 * (see the module notes for signed zeros, all-zero and NaN blocks).
 */
export function quantizeMxfp4(values: Float32Array, opts: QuantizeMxfp4Options = {}): Mxfp4Quantized {
  const n = values.length;
  if (n % MXFP4_BLOCK_SIZE !== 0) {
    throw new MoeflashError(
      'INVALID_ARGUMENT',
      `quantizeMxfp4: length ${n} is not a multiple of the block size ${MXFP4_BLOCK_SIZE}; ` +
        'pad the last axis to a multiple of 32',
    );
  }
  const rule = opts.scaleRule ?? 'ocp';
  if (rule !== 'ocp' && rule !== 'no-clip') {
    throw new MoeflashError(
      'INVALID_ARGUMENT',
      `quantizeMxfp4: unknown scaleRule ${JSON.stringify(rule)}; use 'ocp' or 'no-clip'`,
    );
  }
  const nBlocks = n / MXFP4_BLOCK_SIZE;
  const blocks = opts.blocks ?? new Uint8Array(nBlocks * MXFP4_BLOCK_BYTES);
  const scales = opts.scales ?? new Uint8Array(nBlocks);
  if (blocks.length < nBlocks * MXFP4_BLOCK_BYTES || scales.length < nBlocks) {
    throw new MoeflashError(
      'INVALID_ARGUMENT',
      `quantizeMxfp4: output buffers too small for ${nBlocks} blocks ` +
        `(blocks needs ${nBlocks * MXFP4_BLOCK_BYTES} bytes, scales ${nBlocks})`,
    );
  }
  const noClip = rule === 'no-clip';
  const u = u32View(values);
  const thr = THRESHOLD_BITS;

  for (let b = 0, src = 0, dst = 0; b < nBlocks; b++, src += 32, dst += 16) {
    let amax = 0;
    for (let i = src; i < src + 32; i++) {
      const a = u[i] & 0x7fffffff;
      if (a > amax) amax = a;
    }
    if (amax >= 0x7f800000) {
      scales[b] = E8M0_NAN;
      blocks.fill(0, dst, dst + 16);
      continue;
    }

    // Inlined mxfp4SharedExponent: this loop is the converter's hot path.
    let e = SCALE_MIN;
    if (amax !== 0) {
      const ef = amax >>> 23;
      e = (ef !== 0 ? ef - 127 : 31 - Math.clz32(amax) - 149) - 2;
      if (noClip && (amax & 0x7fffff) > 0x400000) e += 1;
      if (e < SCALE_MIN) e = SCALE_MIN;
      else if (e > SCALE_MAX) e = SCALE_MAX;
    }
    scales[b] = e + E8M0_BIAS;

    const row = (e - SCALE_MIN) * 8;
    const t0 = thr[row];
    const t1 = thr[row + 1];
    const t2 = thr[row + 2];
    const t3 = thr[row + 3];
    const t4 = thr[row + 4];
    const t5 = thr[row + 5];
    const t6 = thr[row + 6];

    for (let j = 0, i = src; j < 16; j++, i += 2) {
      const u0 = u[i];
      const u1 = u[i + 1];
      const a0 = u0 & 0x7fffffff;
      const a1 = u1 & 0x7fffffff;
      // (t - a) >>> 31 is 1 exactly when a > t; both lie in [0, 2^31) so the difference is exact.
      const c0 =
        ((t0 - a0) >>> 31) +
        ((t1 - a0) >>> 31) +
        ((t2 - a0) >>> 31) +
        ((t3 - a0) >>> 31) +
        ((t4 - a0) >>> 31) +
        ((t5 - a0) >>> 31) +
        ((t6 - a0) >>> 31);
      const c1 =
        ((t0 - a1) >>> 31) +
        ((t1 - a1) >>> 31) +
        ((t2 - a1) >>> 31) +
        ((t3 - a1) >>> 31) +
        ((t4 - a1) >>> 31) +
        ((t5 - a1) >>> 31) +
        ((t6 - a1) >>> 31);
      blocks[dst + j] = c0 | ((u0 >>> 28) & 8) | (c1 << 4) | ((u1 >>> 24) & 0x80);
    }
  }
  return { blocks, scales };
}

/**
 * Decode MXFP4 blocks to float32: element = E2M1 value * 2^(scale - 127), computed exactly and
 * rounded once to float32 (only scales above 2^125 can overflow to +-Infinity). A block whose scale
 * code is 0xFF decodes to NaN throughout.
 *
 * @param blocks packed codes, 16 bytes a block (layout of {@link Mxfp4Quantized.blocks})
 * @param scales one E8M0 code a block
 * @param count number of elements to produce (default: every element, 32 a block); a smaller
 *   count drops the tail, for rows padded to a multiple of 32
 */
export function dequantizeMxfp4(blocks: Uint8Array, scales: Uint8Array, count?: number): Float32Array {
  const nBlocks = scales.length;
  if (blocks.length !== nBlocks * MXFP4_BLOCK_BYTES) {
    throw new MoeflashError(
      'INVALID_ARGUMENT',
      `dequantizeMxfp4: ${blocks.length} block bytes do not match ${nBlocks} scales ` +
        `(expected ${nBlocks * MXFP4_BLOCK_BYTES})`,
    );
  }
  const total = nBlocks * MXFP4_BLOCK_SIZE;
  const n = count ?? total;
  if (!Number.isInteger(n) || n < 0 || n > total) {
    throw new MoeflashError(
      'INVALID_ARGUMENT',
      `dequantizeMxfp4: count ${String(count)} must be an integer in [0, ${total}]`,
    );
  }
  const out = new Float32Array(n);
  const lut = E2M1_VALUES;
  const fullBlocks = Math.floor(n / MXFP4_BLOCK_SIZE);
  for (let b = 0, dst = 0, src = 0; b < fullBlocks; b++, dst += 32, src += 16) {
    const x = E8M0_VALUES[scales[b]];
    for (let j = 0; j < 16; j++) {
      const byte = blocks[src + j];
      out[dst + 2 * j] = lut[byte & 15] * x;
      out[dst + 2 * j + 1] = lut[byte >>> 4] * x;
    }
  }
  const rest = n - fullBlocks * MXFP4_BLOCK_SIZE;
  if (rest > 0) {
    const x = E8M0_VALUES[scales[fullBlocks]];
    const src = fullBlocks * MXFP4_BLOCK_BYTES;
    const dst = fullBlocks * MXFP4_BLOCK_SIZE;
    for (let k = 0; k < rest; k++) {
      const byte = blocks[src + (k >>> 1)];
      out[dst + k] = lut[k & 1 ? byte >>> 4 : byte & 15] * x;
    }
  }
  return out;
}
