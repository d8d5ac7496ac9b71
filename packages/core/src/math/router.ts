import type { MoeSpec } from '../model/spec.js';

/** The experts one token goes to and the weight of each. */
export interface Routing {
  experts: Int32Array;
  weights: Float32Array;
}

/**
 * Router logits -> top-k experts and their weights (refs/FORMATS.md, "Routing").
 * Ties in top-k go to the lower expert index.
 */
export function route(logits: Float32Array, moe: MoeSpec): Routing {
  const e = moe.numExperts;
  const k = moe.topK;
  const scores = new Float64Array(e);
  if (moe.rule === 'softmax_then_topk') {
    let m = -Infinity;
    for (let i = 0; i < e; i++) if (logits[i] > m) m = logits[i];
    let s = 0;
    for (let i = 0; i < e; i++) s += (scores[i] = Math.exp(logits[i] - m));
    for (let i = 0; i < e; i++) scores[i] = Math.fround(scores[i] / s);
  } else {
    for (let i = 0; i < e; i++) scores[i] = logits[i];
  }
  const experts = topK(scores, k);
  const weights = new Float32Array(k);
  if (moe.rule === 'softmax_then_topk') {
    let sum = 0;
    for (let j = 0; j < k; j++) sum += scores[experts[j]];
    for (let j = 0; j < k; j++) weights[j] = moe.normTopkProb ? scores[experts[j]] / sum : scores[experts[j]];
  } else {
    const m = scores[experts[0]];
    let sum = 0;
    const ex = new Float64Array(k);
    for (let j = 0; j < k; j++) sum += (ex[j] = Math.exp(scores[experts[j]] - m));
    for (let j = 0; j < k; j++) weights[j] = ex[j] / sum;
  }
  return { experts, weights };
}

/** Indices of the k largest values, largest first; equal values keep the lower index first. */
export function topK(values: ArrayLike<number>, k: number): Int32Array {
  const out = new Int32Array(k).fill(-1);
  const best = new Float64Array(k).fill(-Infinity);
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (out[k - 1] !== -1 && !(v > best[k - 1])) continue;
    let j = k - 1;
    while (j > 0 && (out[j - 1] === -1 || v > best[j - 1])) {
      best[j] = best[j - 1];
      out[j] = out[j - 1];
      j--;
    }
    best[j] = v;
    out[j] = i;
  }
  return out;
}
