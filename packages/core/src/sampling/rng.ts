/**
 * Counter-based random numbers for sampling: Philox4x32-10 (Salmon, Moraes, Dror, Shaw,
 * "Parallel random numbers: as easy as 1, 2, 3", SC 2011), bit-identical to Random123's
 * `philox4x32_R(10, ...)` and cuRAND's `curand_Philox4x32_10(uint4 c, uint2 k)`.
 *
 * A counter-based generator has no state to carry between steps: every uniform is a pure
 * function of (seed, sequence, position, purpose, draw). That is what lets a sequence be
 * replayed from its seed, lets a batched step draw the same numbers as a step of one, and lets
 * the CUDA backend draw exactly the uniforms the CPU backend draws.
 *
 * ---------------------------------------------------------------------------------------------
 * THE MAPPING (a device kernel must copy this exactly)
 *
 *   seed      unsigned 64-bit integer (a JS number must be a safe integer >= 0; a bigint may use
 *             all 64 bits)
 *   seq       sequence id, unsigned 32-bit
 *   position  token position in the sequence (0-based), unsigned 32-bit
 *   purpose   what the draw is for (RngPurpose below), unsigned 32-bit
 *   draw      index of the draw within (seq, position, purpose), unsigned 32-bit, usually 0
 *
 *   key     = { k0 = seed & 0xffffffff, k1 = seed >> 32 }                    (uint2)
 *   counter = { c0 = position, c1 = seq, c2 = draw, c3 = purpose }           (uint4)
 *   x       = Philox4x32_10(counter, key).x        (first output word only; the others unused)
 *   u       = (float)(x >> 8) * 0x1p-24f           (a float32 in [0, 1 - 2^-24], exactly)
 *
 * In CUDA: `uint4 r = curand_Philox4x32_10(make_uint4(pos, seq, draw, purpose),
 *                                          make_uint2(seed_lo, seed_hi));
 *           float u = __uint2float_rz(r.x >> 8) * 0x1p-24f;`
 * Both steps are exact (a 24-bit integer and a power-of-two scale), so u is bit-identical.
 * ---------------------------------------------------------------------------------------------
 *
 * Only one output word is used per draw so that a draw is a single, independent call with no
 * buffering rule for a kernel to copy; a handful of draws per token makes the waste irrelevant.
 */

import { MoeflashError } from '../errors.js';

/** Philox4x32 round multipliers (Random123 PHILOX_M4x32_0 / _1). */
export const PHILOX_M0 = 0xd2511f53;
export const PHILOX_M1 = 0xcd9e8d57;
/** Philox4x32 key schedule (Weyl) increments (Random123 PHILOX_W32_0 / _1). */
export const PHILOX_W0 = 0x9e3779b9;
export const PHILOX_W1 = 0xbb67ae85;

/**
 * Counter word c3: what a uniform is used for. Distinct purposes at the same position use
 * disjoint counters, so, for example, the acceptance test of a draft token and the residual
 * draw after its rejection are independent, as the losslessness proof of speculative sampling
 * requires.
 */
export const RngPurpose = {
  /** The token sampled from the target model's distribution (plain decoding, bonus token). */
  Sample: 0,
  /** The accept/reject uniform of speculative acceptance. */
  Accept: 1,
  /** The draw from norm(max(0, p - q)) after a rejection. */
  Residual: 2,
  /** The draft model's own proposal at this position. */
  Draft: 3,
} as const;
export type RngPurpose = (typeof RngPurpose)[keyof typeof RngPurpose];

/** Where a uniform comes from; see the mapping above. */
export interface RngKey {
  readonly seed: number | bigint;
  readonly seq: number;
  readonly position: number;
  /** Defaults to RngPurpose.Sample. Any u32 is allowed; the named values are the engine's. */
  readonly purpose?: number;
}

const TWO_POW_32 = 4294967296;
const TWO_POW_64N = 1n << 64n;
/** 2^-24, the spacing of the uniforms; exact in float32. */
export const UNIFORM_STEP = 1 / 16777216;

/**
 * High 32 bits of the 64-bit product of two u32, from 16-bit limbs so that every intermediate
 * fits in 32 bits (`__umulhi` on the device).
 */
function mulhi32(a: number, b: number): number {
  const a0 = a & 0xffff;
  const a1 = a >>> 16;
  const b0 = b & 0xffff;
  const b1 = b >>> 16;
  const p00 = Math.imul(a0, b0) >>> 0;
  const p01 = Math.imul(a0, b1) >>> 0;
  const p10 = Math.imul(a1, b0) >>> 0;
  const p11 = Math.imul(a1, b1) >>> 0;
  // Carry out of bits 16..31: at most 3 * 0xffff, so it never overflows 32 bits.
  const mid = (p00 >>> 16) + (p01 & 0xffff) + (p10 & 0xffff);
  // The true high word is < 2^32, so none of these partial sums can overflow either.
  return (p11 + (p01 >>> 16) + (p10 >>> 16) + (mid >>> 16)) >>> 0;
}

/**
 * Philox4x32-10: ten rounds of the Philox bijection on a 128-bit counter under a 64-bit key.
 * Words are unsigned 32-bit integers; the result is a fresh array of four.
 */
export function philox4x32(
  counter: ArrayLike<number>,
  key: ArrayLike<number>,
): [number, number, number, number] {
  let c0 = counter[0]! >>> 0;
  let c1 = counter[1]! >>> 0;
  let c2 = counter[2]! >>> 0;
  let c3 = counter[3]! >>> 0;
  let k0 = key[0]! >>> 0;
  let k1 = key[1]! >>> 0;
  for (let round = 0; round < 10; round++) {
    // Random123 bumps the key between rounds, never before the first.
    if (round > 0) {
      k0 = (k0 + PHILOX_W0) >>> 0;
      k1 = (k1 + PHILOX_W1) >>> 0;
    }
    const hi0 = mulhi32(PHILOX_M0, c0);
    const lo0 = Math.imul(PHILOX_M0, c0) >>> 0;
    const hi1 = mulhi32(PHILOX_M1, c2);
    const lo1 = Math.imul(PHILOX_M1, c2) >>> 0;
    const n0 = (hi1 ^ c1 ^ k0) >>> 0;
    const n2 = (hi0 ^ c3 ^ k1) >>> 0;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return [c0, c1, c2, c3];
}

function badArgument(message: string): MoeflashError {
  return new MoeflashError('INVALID_ARGUMENT', message);
}

function checkU32(name: string, value: number): number {
  if (!Number.isInteger(value) || value < 0 || value >= TWO_POW_32) {
    throw badArgument(`rng: ${name} must be an integer in [0, 2^32 - 1]; got ${String(value)}`);
  }
  return value;
}

/** The Philox key [k0, k1] for a seed: its low and high 32-bit words. */
export function seedKey(seed: number | bigint): [number, number] {
  if (typeof seed === 'bigint') {
    if (seed < 0n || seed >= TWO_POW_64N) {
      throw badArgument(`rng: seed must be an integer in [0, 2^64 - 1]; got ${seed.toString()}`);
    }
    return [Number(seed & 0xffffffffn), Number(seed >> 32n)];
  }
  if (!Number.isSafeInteger(seed) || seed < 0) {
    throw badArgument(
      `rng: seed must be an integer in [0, 2^53 - 1] (pass a bigint for 64-bit seeds); got ${String(seed)}`,
    );
  }
  // Host-side split of an exact integer; the device only ever sees the two words.
  return [seed % TWO_POW_32, Math.floor(seed / TWO_POW_32)];
}

/** The Philox counter [c0, c1, c2, c3] of draw `draw` under `key`; see the mapping above. */
export function rngCounter(key: RngKey, draw = 0): [number, number, number, number] {
  return [
    checkU32('position', key.position),
    checkU32('seq', key.seq),
    checkU32('draw', draw),
    checkU32('purpose', key.purpose ?? RngPurpose.Sample),
  ];
}

/** The four raw Philox output words of a draw, for callers that need more than 24 bits. */
export function rngWords(key: RngKey, draw = 0): [number, number, number, number] {
  return philox4x32(rngCounter(key, draw), seedKey(key.seed));
}

/**
 * A uniform float in [0, 1): (x >>> 8) * 2^-24 where x is the first Philox output word.
 * The value is a multiple of 2^-24, hence exactly representable in float32.
 */
export function uniform(key: RngKey, draw = 0): number {
  return (rngWords(key, draw)[0] >>> 8) * UNIFORM_STEP;
}

/** Builds an RngKey, validating every field now rather than at the first draw. */
export function rngKey(
  seed: number | bigint,
  seq: number,
  position: number,
  purpose: number = RngPurpose.Sample,
): RngKey {
  seedKey(seed);
  checkU32('seq', seq);
  checkU32('position', position);
  checkU32('purpose', purpose);
  return { seed, seq, position, purpose };
}
