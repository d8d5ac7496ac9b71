/**
 * Allowed-token masks: one bit a token, bit i of word i >> 5 (the layout xgrammar and the
 * serving engines use, so a backend can take the words as they are). A step applies a mask by
 * giving every disallowed token the logit -Infinity before sampling, so temperature, top-k, top-p
 * and min-p then run on the allowed tokens only; a backend that applies masks itself
 * (StepSample.allowedTokens) must draw the token core draws from applyTokenMask's output.
 */
import { MoeflashError } from '../errors.js';

export type TokenMask = Int32Array;

/** A mask of `vocabSize` tokens, all allowed or none. */
export function tokenMask(vocabSize: number, allowed: boolean): TokenMask {
  const mask = new Int32Array(Math.ceil(vocabSize / 32));
  if (allowed) {
    mask.fill(-1);
    const tail = vocabSize % 32;
    if (tail) mask[mask.length - 1] = (2 ** tail - 1) | 0;
  }
  return mask;
}

export function maskAllows(mask: TokenMask, token: number): boolean {
  return ((mask[token >>> 5]! >>> (token & 31)) & 1) === 1;
}

export function maskSet(mask: TokenMask, token: number, allowed: boolean): void {
  if (allowed) mask[token >>> 5]! |= 1 << (token & 31);
  else mask[token >>> 5]! &= ~(1 << (token & 31));
}

/** Number of allowed tokens. */
export function maskCount(mask: TokenMask): number {
  let n = 0;
  for (let w of mask) {
    w = w - ((w >>> 1) & 0x55555555);
    w = (w & 0x33333333) + ((w >>> 2) & 0x33333333);
    n += (((w + (w >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
  }
  return n;
}

/** a AND b into `out` (default a new mask). */
export function maskAnd(a: TokenMask, b: TokenMask, out: TokenMask = new Int32Array(a.length)): TokenMask {
  for (let i = 0; i < a.length; i++) out[i] = a[i]! & b[i]!;
  return out;
}

/**
 * A copy of logits row(s) with every disallowed token at -Infinity: `rows` rows of `vocabSize`,
 * row r masked by masks[r]. Throws when a mask allows no token, which would leave nothing to draw.
 */
export function applyTokenMasks(logits: Float32Array, vocabSize: number, masks: readonly TokenMask[]): Float32Array {
  const out = new Float32Array(logits.length);
  out.set(logits);
  masks.forEach((mask, r) => {
    if (maskCount(mask) === 0) {
      throw new MoeflashError('INVALID_ARGUMENT', 'the grammar allows no token at this point (its mask is empty); check the grammar for a rule that cannot complete');
    }
    const base = r * vocabSize;
    for (let t = 0; t < vocabSize; t++) if (!maskAllows(mask, t)) out[base + t] = -Infinity;
  });
  return out;
}
