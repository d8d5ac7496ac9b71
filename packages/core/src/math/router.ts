import type { MoeSpec } from '../model/spec.js';
import { sigmoid } from './activations.js';

/** The experts one token goes to and the weight of each. */
export interface Routing {
  experts: Int32Array;
  weights: Float32Array;
}

/**
 * Router logits -> top-k experts and their weights (refs/FORMATS.md, "Routing").
 * Ties in top-k go to the lower expert index. `correctionBias` is deepseek_v3's
 * `e_score_correction_bias` (rule `sigmoid_grouped_topk` only; null reads as zeros).
 */
export function route(logits: Float32Array, moe: MoeSpec, correctionBias: Float32Array | null = null): Routing {
  if (moe.rule === 'sigmoid_grouped_topk') return routeGrouped(logits, moe, correctionBias);
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

/**
 * DeepSeek-V3's router, in float32 where HF is (`DeepseekV3MoE.route_tokens_to_experts`):
 *   s = sigmoid(logits); choice = s + e_score_correction_bias;
 *   a group's score is the sum of its two largest choice values; the `topkGroups` best groups stay;
 *   the top-k experts by choice among them are taken (the bias steers selection only);
 *   weights = s of those experts, divided by their sum (+1e-20) when `normTopkProb`, times
 *   `routedScalingFactor`.
 * HF masks the experts of dropped groups with a choice of 0.0, not -infinity, so an expert there
 * can outrank a kept one whose choice is negative (possible with a negative bias): kept as HF has it.
 */
export function routeGrouped(logits: Float32Array, moe: MoeSpec, correctionBias: Float32Array | null): Routing {
  const e = moe.numExperts;
  const k = moe.topK;
  const g = moe.grouped;
  if (!g) throw new Error('routeGrouped: the spec has no grouped routing (rule sigmoid_grouped_topk needs moe.grouped)');
  const scores = new Float64Array(e);
  const choice = new Float64Array(e);
  for (let i = 0; i < e; i++) {
    scores[i] = Math.fround(sigmoid(logits[i]));
    choice[i] = Math.fround(scores[i] + (correctionBias ? correctionBias[i] : 0));
  }
  const perGroup = e / g.numGroups;
  const groupScores = new Float64Array(g.numGroups);
  for (let grp = 0; grp < g.numGroups; grp++) {
    const [a, b] = topK(choice.subarray(grp * perGroup, (grp + 1) * perGroup), 2);
    groupScores[grp] = Math.fround(choice[grp * perGroup + a] + choice[grp * perGroup + b]);
  }
  const masked = new Float64Array(e);
  for (const grp of topK(groupScores, g.topkGroups)) {
    for (let i = grp * perGroup; i < (grp + 1) * perGroup; i++) masked[i] = choice[i];
  }
  const experts = topK(masked, k);
  const weights = new Float32Array(k);
  let sum = 0;
  for (let j = 0; j < k; j++) sum = Math.fround(sum + scores[experts[j]]);
  const denom = Math.fround(sum + 1e-20);
  for (let j = 0; j < k; j++) {
    const w = moe.normTopkProb ? Math.fround(scores[experts[j]] / denom) : scores[experts[j]];
    weights[j] = w * g.routedScalingFactor;
  }
  return { experts, weights };
}
