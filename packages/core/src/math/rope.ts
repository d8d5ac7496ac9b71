import type { RopeSpec } from '../model/spec.js';

/** Inverse frequencies of the rotary dims and the factor applied to cos/sin. */
export interface RopeTable {
  /** rotaryDim / 2 inverse frequencies, float32 as HF holds them. */
  invFreq: Float32Array;
  /** Multiplier of cos and sin (YaRN's attention factor; 1 for default RoPE). */
  attentionFactor: number;
  rotaryDim: number;
}

/** HF `_compute_default_rope_parameters` and `_compute_yarn_parameters`, in float32 where HF is. */
export function ropeTable(rope: RopeSpec): RopeTable {
  const dim = rope.rotaryDim;
  const half = dim / 2;
  const posFreqs = new Float64Array(half);
  for (let i = 0; i < half; i++) posFreqs[i] = Math.fround(Math.pow(rope.theta, Math.fround((2 * i) / dim)));
  const invFreq = new Float32Array(half);
  if (rope.type === 'default' || !rope.yarn) {
    for (let i = 0; i < half; i++) invFreq[i] = 1 / posFreqs[i];
    return { invFreq, attentionFactor: 1, rotaryDim: dim };
  }
  const { factor, betaFast, betaSlow, originalMaxPositionEmbeddings, attentionFactor, truncate } = rope.yarn;
  const correctionDim = (rotations: number) =>
    (dim * Math.log(originalMaxPositionEmbeddings / (rotations * 2 * Math.PI))) / (2 * Math.log(rope.theta));
  let low = correctionDim(betaFast);
  let high = correctionDim(betaSlow);
  if (truncate) {
    low = Math.floor(low);
    high = Math.ceil(high);
  }
  low = Math.max(low, 0);
  high = Math.min(high, dim - 1);
  if (low === high) high += 0.001;
  for (let i = 0; i < half; i++) {
    const ramp = Math.min(1, Math.max(0, Math.fround((i - low) / (high - low))));
    const extrapolation = Math.fround(1 - ramp);
    const interp = Math.fround(1 / Math.fround(factor * posFreqs[i]));
    const extrap = Math.fround(1 / posFreqs[i]);
    invFreq[i] = Math.fround(interp * (1 - extrapolation)) + Math.fround(extrap * extrapolation);
  }
  return { invFreq, attentionFactor, rotaryDim: dim };
}

/**
 * Rotate one head in place (HF's rotate_half convention: dim i pairs with i + rotaryDim/2).
 * v[offset .. offset + rotaryDim) rotates; dims past rotaryDim pass through.
 */
export function applyRope(v: Float32Array, offset: number, position: number, table: RopeTable): void {
  const half = table.rotaryDim / 2;
  const a = table.attentionFactor;
  for (let i = 0; i < half; i++) {
    const angle = Math.fround(position * table.invFreq[i]);
    const c = Math.fround(Math.cos(angle) * a);
    const s = Math.fround(Math.sin(angle) * a);
    const x1 = v[offset + i];
    const x2 = v[offset + i + half];
    v[offset + i] = x1 * c - x2 * s;
    v[offset + i + half] = x2 * c + x1 * s;
  }
}

/**
 * HF `apply_rotary_pos_emb_interleave`'s reordering (deepseek_v3 with `rope_interleave`): rotary
 * dims stored as pairs (2i, 2i+1) move to (i, i + dim/2), after which {@link applyRope} rotates
 * them. Queries and keys are reordered alike, so their dot products are those of rotating each
 * stored pair; doing it HF's way keeps the order of terms in those dot products HF's as well.
 * `scratch` holds at least `dim` values.
 */
export function deinterleaveRotary(v: Float32Array, offset: number, dim: number, scratch: Float32Array): void {
  const half = dim / 2;
  for (let i = 0; i < half; i++) {
    scratch[i] = v[offset + 2 * i];
    scratch[half + i] = v[offset + 2 * i + 1];
  }
  v.set(scratch.subarray(0, dim), offset);
}
