import type { RoutingTrace } from '../backends/backend.js';

/**
 * Where two backends' forward passes of the same tokens part: per position the logits error, per
 * (layer, position) whether they sent the token to the same experts, and for each difference the
 * reference's own router margin there. A difference at a margin below the other backend's router
 * error is a near-tie that rounding flipped; one at a clear margin means the two compute
 * different functions.
 */

/** One (layer, position) where the two backends chose different experts. */
export interface RoutingDifference {
  layer: number;
  position: number;
  /** Experts of the reference and of the backend under test, in routing order. */
  reference: number[];
  other: number[];
  /**
   * The reference's gap between its k-th and (k+1)-th router logit (the choice that flipped is
   * inside this gap), absolute and as a share of the token's largest |router logit|.
   */
  margin: number;
  relativeMargin: number;
  /** ||router logits - reference|| / ||reference|| of this token in this layer. */
  routerError: number;
  /** True when every earlier (layer, position) of the sequence routed alike: the cause, not an echo. */
  first: boolean;
}

export interface RoutingComparison {
  tokens: number;
  /** ||logits - reference|| / ||reference|| over the whole sequence, and per position. */
  logitsError: number;
  positionErrors: number[];
  /** Share of positions whose arg-max token agrees. */
  top1: number;
  /** (layer, position) pairs compared (MoE layers only), and where they differ. */
  choices: number;
  differences: RoutingDifference[];
  /**
   * Largest router-logit error per MoE layer over the positions before the first difference:
   * the noise level of the backend under test where both still see the same inputs.
   */
  routerErrorBeforeFirst: number[];
  /** Positions whose reference margin is below `nearTie` of the logit scale (reported, not faults). */
  nearTies: { layer: number; position: number; relativeMargin: number }[];
}

function relErr(a: ArrayLike<number>, ref: ArrayLike<number>, from = 0, to = ref.length): number {
  let num = 0;
  let den = 0;
  for (let i = from; i < to; i++) {
    const d = a[i] - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
  }
  return den === 0 ? (num === 0 ? 0 : Infinity) : Math.sqrt(num / den);
}

function argmax(a: ArrayLike<number>, from: number, to: number): number {
  let best = from;
  for (let i = from + 1; i < to; i++) if (a[i] > a[best]) best = i;
  return best - from;
}

/** The reference's top-k gap of one token: logit of its k-th choice minus the best logit it left out. */
export function routerMargin(logits: Float32Array, offset: number, numExperts: number, chosen: ArrayLike<number>): { margin: number; scale: number } {
  const set = new Set(Array.from(chosen));
  let kth = Infinity;
  let out = -Infinity;
  let scale = 0;
  for (let e = 0; e < numExperts; e++) {
    const v = logits[offset + e];
    scale = Math.max(scale, Math.abs(v));
    if (set.has(e)) kth = Math.min(kth, v);
    else out = Math.max(out, v);
  }
  return { margin: out === -Infinity ? Infinity : kth - out, scale };
}

/**
 * Compares a backend's logits and routing of one sequence with a reference's (same tokens, same
 * model, each from an empty cache). `nearTie`: margins below this share of the logit scale are
 * listed as near-ties (default 1e-5).
 */
export function compareRouting(
  reference: { logits: Float32Array; routing: RoutingTrace },
  other: { logits: Float32Array; routing: RoutingTrace },
  dims: { vocab: number; numExperts: number; topK: number },
  nearTie = 1e-5,
): RoutingComparison {
  const { vocab: V, numExperts: E, topK: K } = dims;
  const tokens = reference.logits.length / V;
  const positionErrors: number[] = [];
  let agree = 0;
  for (let p = 0; p < tokens; p++) {
    positionErrors.push(relErr(other.logits, reference.logits, p * V, (p + 1) * V));
    if (argmax(other.logits, p * V, (p + 1) * V) === argmax(reference.logits, p * V, (p + 1) * V)) agree++;
  }
  const layers = reference.routing.experts.length;
  const differences: RoutingDifference[] = [];
  const nearTies: RoutingComparison['nearTies'] = [];
  let choices = 0;
  // Positions in order, layers in order within a position: a token's layer l sees the same
  // inputs on both backends only while no earlier position (any layer) and no earlier layer of
  // this position has differed.
  const diffAt: boolean[][] = Array.from({ length: layers }, () => new Array<boolean>(tokens).fill(false));
  const errAt: number[][] = Array.from({ length: layers }, () => new Array<number>(tokens).fill(0));
  for (let l = 0; l < layers; l++) {
    const re = reference.routing.experts[l];
    if (re.length === 0) continue;
    const oe = other.routing.experts[l];
    const rl = reference.routing.logits[l];
    const ol = other.routing.logits[l];
    for (let p = 0; p < tokens; p++) {
      choices++;
      const refSet = Array.from(re.subarray(p * K, (p + 1) * K));
      const othSet = Array.from(oe.subarray(p * K, (p + 1) * K));
      const { margin, scale } = routerMargin(rl, p * E, E, refSet);
      const relativeMargin = scale > 0 ? margin / scale : margin;
      errAt[l][p] = relErr(ol, rl, p * E, (p + 1) * E);
      if (relativeMargin < nearTie) nearTies.push({ layer: l, position: p, relativeMargin });
      const same = refSet.length === othSet.length && [...refSet].sort((a, b) => a - b).join() === [...othSet].sort((a, b) => a - b).join();
      if (same) continue;
      diffAt[l][p] = true;
      differences.push({ layer: l, position: p, reference: refSet, other: othSet, margin, relativeMargin, routerError: errAt[l][p], first: false });
    }
  }
  differences.sort((a, b) => a.position - b.position || a.layer - b.layer);
  const firstDiff = differences[0];
  if (firstDiff) firstDiff.first = true;
  const routerErrorBeforeFirst: number[] = [];
  for (let l = 0; l < layers; l++) {
    if (reference.routing.experts[l].length === 0) continue;
    let m = 0;
    for (let p = 0; p < tokens; p++) {
      if (firstDiff && (p > firstDiff.position || (p === firstDiff.position && l >= firstDiff.layer))) break;
      m = Math.max(m, errAt[l][p]);
    }
    routerErrorBeforeFirst[l] = m;
  }
  return {
    tokens,
    logitsError: relErr(other.logits, reference.logits),
    positionErrors,
    top1: tokens ? agree / tokens : 1,
    choices,
    differences,
    routerErrorBeforeFirst,
    nearTies,
  };
}

/** The verdict on a comparison's first routing difference, in one sentence. */
export function explainFirstDifference(c: RoutingComparison): string {
  const d = c.differences.find((x) => x.first);
  if (!d) return `routing identical at all ${c.choices} (layer, position) choices`;
  const noise = Math.max(...c.routerErrorBeforeFirst.filter((x) => x !== undefined), d.routerError);
  if (d.relativeMargin <= 4 * noise) {
    return `layer ${d.layer}, position ${d.position}: a near-tie flipped by rounding (reference margin ${d.relativeMargin.toExponential(1)} of the logit scale, router error ${d.routerError.toExponential(1)}); the changed token then reaches later positions through the KV cache`;
  }
  return `layer ${d.layer}, position ${d.position}: experts differ at a clear margin (${d.relativeMargin.toExponential(1)} of the logit scale against a router error of ${d.routerError.toExponential(1)}): the backends compute different functions there`;
}
