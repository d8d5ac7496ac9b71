/**
 * Token sampling: the reference that the CPU backend runs and the CUDA backend mirrors.
 *
 * probabilities(logits, params) is THE distribution a token is drawn from. The speculative
 * verifier applies it, unchanged, to both the target's and the draft's logits, so acceptance
 * min(1, p/q) compares distributions that went through the same transforms (FORMATS.md,
 * "Speculative acceptance"). Every choice below (order of transforms, tie rules, which sums are
 * in which order) is part of that contract.
 *
 * THE TRANSFORM, for one row of V logits l[0..V-1] (float32) with temperature T > 0:
 *   0. Reject a NaN or +Infinity logit, and a row whose logits are all -Infinity.
 *   1. temperature  w[i] = exp((l[i] - lmax) / T) in float64, lmax = max l; so the largest
 *                   weight is exactly 1. A -Infinity logit gets weight 0.
 *   2. top-k        (0 < k < V) keep the k largest LOGITS; among logits equal to the k-th
 *                   largest, keep the lowest indices. Pure float32 comparisons, so a device
 *                   computes the same set bit for bit.
 *   3. top-p        (p < 1) rank the survivors (weight > 0) by logit, descending, ties by lower
 *                   index (the order of argmax and top-k); keep the shortest prefix whose
 *                   weight sum (float64, accumulated in that order) is >= p * S, where S is
 *                   the survivors' weight sum (float64, in index order). The first stays.
 *   4. min-p        (m > 0) drop a survivor whose weight is < m. Since the largest weight is 1,
 *                   this is exactly "prob < m * max prob" of the renormalized distribution.
 *   5. renormalize  prob[i] = w[i] / sum(w) over survivors (float64 sum in index order), stored
 *                   as float32; 0 for every dropped token.
 * The token of largest logit (lowest index among equals) survives every step, so at least one
 * probability is positive.
 *
 * Temperature 0 (or undefined) is greedy: the distribution is one-hot at argmax. That keeps
 * sampleFrom(probabilities(l, params), u) === sampleToken(l, params, key) for every input.
 *
 * Steps 0 to 2 are pure comparisons; steps 3 to 5 depend on Math.exp (V8's is fdlibm) and on
 * the order of the float64 sums. The CUDA port (cuda-backend kernels/sample.cu) runs fdlibm's exp
 * and reproduces these sums in this order, so it returns the same token bit for bit; a port that
 * uses another exp or a tree reduction may disagree where a sum lands within rounding of a top-p
 * threshold or of the sampled uniform.
 */

import { MoeflashError } from '../errors.js';
import { uniform, type RngKey } from './rng.js';

export interface SamplingParams {
  /** Softmax temperature; 0 or undefined means greedy (argmax). Finite, >= 0. */
  temperature?: number;
  /** Keep only the k most likely tokens; 0 or undefined disables. Integer >= 0. */
  topK?: number;
  /** Nucleus sampling mass; 1 or undefined disables. In (0, 1]. */
  topP?: number;
  /** Drop tokens below minP times the top probability; 0 or undefined disables. In [0, 1]. */
  minP?: number;
  /** Seed of the counter-based RNG (see rng.ts); an integer in [0, 2^53 - 1]. */
  seed?: number;
}

/** Selects one row of a larger buffer, e.g. row r of a [T, V] logits matrix: offset r * V. */
export interface LogitsRow {
  offset?: number;
  /** Defaults to the rest of the buffer after offset. */
  length?: number;
}

export interface ProbabilitiesOptions extends LogitsRow {
  /** Written in place and returned instead of a fresh array; must have exactly `length` entries. */
  out?: Float32Array;
}

function invalid(message: string): MoeflashError {
  return new MoeflashError('INVALID_ARGUMENT', message);
}

function show(value: unknown): string {
  return typeof value === 'string' ? JSON.stringify(value) : String(value);
}

/** Throws INVALID_ARGUMENT naming the first bad field and its allowed range. */
export function validateSamplingParams(params: SamplingParams): void {
  if (params === null || typeof params !== 'object') {
    throw invalid(`sampling: params must be an object; got ${show(params)}`);
  }
  const { temperature, topK, topP, minP, seed } = params as Record<string, unknown>;
  if (
    temperature !== undefined &&
    !(typeof temperature === 'number' && Number.isFinite(temperature) && temperature >= 0)
  ) {
    throw invalid(
      `sampling: temperature must be a finite number >= 0 (0 = greedy); got ${show(temperature)}`,
    );
  }
  if (topK !== undefined && !(Number.isSafeInteger(topK) && (topK as number) >= 0)) {
    throw invalid(`sampling: topK must be an integer >= 0 (0 = no top-k); got ${show(topK)}`);
  }
  if (topP !== undefined && !(typeof topP === 'number' && topP > 0 && topP <= 1)) {
    throw invalid(`sampling: topP must be a number in (0, 1] (1 = no top-p); got ${show(topP)}`);
  }
  if (minP !== undefined && !(typeof minP === 'number' && minP >= 0 && minP <= 1)) {
    throw invalid(`sampling: minP must be a number in [0, 1] (0 = no min-p); got ${show(minP)}`);
  }
  if (seed !== undefined && !(Number.isSafeInteger(seed) && (seed as number) >= 0)) {
    throw invalid(`sampling: seed must be an integer in [0, 2^53 - 1]; got ${show(seed)}`);
  }
}

/** True when params select greedy decoding (temperature 0 or unset). */
export function isGreedy(params: SamplingParams): boolean {
  return params.temperature === undefined || params.temperature === 0;
}

function resolveRow(
  buffer: ArrayLike<number>,
  offset: number | undefined,
  length: number | undefined,
): [number, number] {
  const off = offset ?? 0;
  if (!Number.isSafeInteger(off) || off < 0 || off > buffer.length) {
    throw invalid(`sampling: offset must be an integer in [0, ${buffer.length}]; got ${show(offset)}`);
  }
  const len = length ?? buffer.length - off;
  if (!Number.isSafeInteger(len) || len < 1 || off + len > buffer.length) {
    throw invalid(
      `sampling: length must be an integer in [1, ${buffer.length - off}] (offset ${off}, buffer ${buffer.length}); got ${show(length)}`,
    );
  }
  return [off, len];
}

/**
 * Index (relative to offset) of the largest logit; the lowest index among equal maxima.
 * NaN ranks below every number, so it is returned only when the whole row is NaN (index 0).
 * That total order makes the result independent of reduction order: a parallel argmax that
 * combines (value, index) pairs by it gets the same index.
 */
export function argmax(logits: ArrayLike<number>, offset?: number, length?: number): number {
  const [off, len] = resolveRow(logits, offset, length);
  let best = 0;
  let bestValue = logits[off]!;
  for (let i = 1; i < len; i++) {
    const v = logits[off + i]!;
    // `bestValue !== bestValue` is NaN: any number beats it.
    if (v > bestValue || (bestValue !== bestValue && v === v)) {
      best = i;
      bestValue = v;
    }
  }
  return best;
}

/** Argmax that also enforces step 0 of the transform (no NaN, no +Infinity, not all -Infinity). */
function checkedArgmax(logits: ArrayLike<number>, off: number, len: number): number {
  let best = -1;
  let bestValue = -Infinity;
  for (let i = 0; i < len; i++) {
    const v = logits[off + i]!;
    if (v !== v || v === Infinity) {
      throw invalid(`sampling: logits[${i}] is ${String(v)}; logits must be finite or -Infinity`);
    }
    if (v > bestValue) {
      best = i;
      bestValue = v;
    }
  }
  if (best < 0) {
    throw invalid('sampling: every logit is -Infinity, so no token can be sampled');
  }
  return best;
}

function swap(a: Float64Array, i: number, j: number): void {
  const t = a[i]!;
  a[i] = a[j]!;
  a[j] = t;
}

/**
 * The value at ascending rank `target` of `a` (which it reorders): quickselect with a three-way
 * partition, switching to a sort after O(log n) rounds so that the worst case is O(n log n).
 */
function selectAscending(a: Float64Array, target: number): number {
  let lo = 0;
  let hi = a.length - 1;
  let rounds = 2 * (32 - Math.clz32(a.length)) + 4;
  while (hi > lo) {
    if (hi - lo < 32 || rounds-- === 0) {
      a.subarray(lo, hi + 1).sort();
      return a[target]!;
    }
    const x = a[lo]!;
    const y = a[(lo + hi) >>> 1]!;
    const z = a[hi]!;
    const pivot = x < y ? (y < z ? y : x < z ? z : x) : x < z ? x : y < z ? z : y;
    let lt = lo;
    let i = lo;
    let gt = hi;
    while (i <= gt) {
      const v = a[i]!;
      if (v < pivot) swap(a, lt++, i++);
      else if (v > pivot) swap(a, i, gt--);
      else i++;
    }
    if (target < lt) hi = lt - 1;
    else if (target > gt) lo = gt + 1;
    else return pivot;
  }
  return a[target]!;
}

/** Step 2: zero the weights of all but the k largest logits (ties: lowest indices). */
function applyTopK(
  logits: ArrayLike<number>,
  off: number,
  len: number,
  k: number,
  w: Float64Array,
): void {
  const values = new Float64Array(len);
  for (let i = 0; i < len; i++) values[i] = logits[off + i]!;
  const kth = selectAscending(values, len - k);
  let above = 0;
  for (let i = 0; i < len; i++) if (logits[off + i]! > kth) above++;
  let ties = k - above;
  for (let i = 0; i < len; i++) {
    const v = logits[off + i]!;
    if (v > kth) continue;
    if (v === kth && ties > 0) {
      ties--;
      continue;
    }
    w[i] = 0;
  }
}

/**
 * Step 3: keep the shortest prefix, in rank order (logit descending, lower index first), whose
 * weight reaches p of the survivors' total. Survivors are the tokens whose weight is still > 0.
 * Ranking by logit rather than by weight matters only where distinct logits round to the same
 * weight; it keeps one order for argmax, top-k and top-p, so the argmax token is always first.
 */
function applyTopP(
  logits: ArrayLike<number>,
  off: number,
  w: Float64Array,
  weight: (logit: number) => number,
  p: number,
): void {
  const len = w.length;
  let total = 0;
  let positive = 0;
  for (let i = 0; i < len; i++) {
    if (w[i]! > 0) {
      total += w[i]!;
      positive++;
    }
  }
  const goal = p * total;
  // Only a token of weight >= (1 - p) * total / positive can be in the nucleus: all lighter
  // tokens together weigh less than (1 - p) * total. The heavy tokens are a prefix of the rank
  // order, so their prefix sums equal those of the full order and the cut is the same; sorting
  // only them keeps a peaked distribution (the usual case) far below V log V. The full sort is
  // the fallback for when rounding says otherwise.
  const floor = ((1 - p) * total) / positive;
  let cut = nucleusCut(logits, off, w, weight, goal, floor);
  if (cut === undefined && floor > 0) cut = nucleusCut(logits, off, w, weight, goal, 0);
  // Rounding can leave the full sum a hair below p * total (p close to 1): keep everything.
  if (cut === undefined) return;
  const [threshold, count] = cut;
  let above = 0;
  for (let i = 0; i < len; i++) if (w[i]! > 0 && logits[off + i]! > threshold) above++;
  let ties = count - above;
  for (let i = 0; i < len; i++) {
    if (w[i]! === 0) continue;
    const v = logits[off + i]!;
    if (v > threshold) continue;
    if (v === threshold && ties > 0) {
      ties--;
      continue;
    }
    w[i] = 0;
  }
}

/**
 * Sorts the logits of the survivors of weight >= floor and accumulates their weights from the
 * largest logit down until the sum reaches `goal`. Returns [logit at the cut, tokens kept], or
 * undefined when the goal is never reached.
 */
function nucleusCut(
  logits: ArrayLike<number>,
  off: number,
  w: Float64Array,
  weight: (logit: number) => number,
  goal: number,
  floor: number,
): [number, number] | undefined {
  let n = 0;
  for (let i = 0; i < w.length; i++) if (w[i]! > 0 && w[i]! >= floor) n++;
  const sorted = new Float64Array(n);
  for (let i = 0, j = 0; i < w.length; i++) {
    if (w[i]! > 0 && w[i]! >= floor) sorted[j++] = logits[off + i]!;
  }
  sorted.sort();
  let cum = 0;
  for (let j = n - 1; j >= 0; j--) {
    // Recomputed with the same expression as w[i], hence the same value.
    cum += weight(sorted[j]!);
    if (cum >= goal) return [sorted[j]!, n - j];
  }
  return undefined;
}

/**
 * The sampling distribution of one logits row after temperature, top-k, top-p and min-p (in
 * that order; the file comment is the exact definition). Zero for every dropped token.
 */
export function probabilities(
  logits: ArrayLike<number>,
  params: SamplingParams,
  options: ProbabilitiesOptions = {},
): Float32Array {
  validateSamplingParams(params);
  const [off, len] = resolveRow(logits, options.offset, options.length);
  let out = options.out;
  if (out === undefined) {
    out = new Float32Array(len);
  } else {
    if (out.length !== len) {
      throw invalid(`sampling: out must have ${len} entries (the row length); got ${out.length}`);
    }
    out.fill(0);
  }
  const top = checkedArgmax(logits, off, len);
  if (isGreedy(params)) {
    out[top] = 1;
    return out;
  }
  const temperature = params.temperature!;
  const lmax = logits[off + top]!;
  const weight = (logit: number): number => Math.exp((logit - lmax) / temperature);
  const w = new Float64Array(len);
  for (let i = 0; i < len; i++) w[i] = weight(logits[off + i]!);

  const k = params.topK ?? 0;
  if (k > 0 && k < len) applyTopK(logits, off, len, k, w);

  const p = params.topP ?? 1;
  if (p < 1) applyTopP(logits, off, w, weight, p);

  const minP = params.minP ?? 0;
  if (minP > 0) {
    for (let i = 0; i < len; i++) if (w[i]! < minP) w[i] = 0;
  }

  let sum = 0;
  for (let i = 0; i < len; i++) sum += w[i]!;
  for (let i = 0; i < len; i++) out[i] = w[i]! / sum;
  return out;
}

/**
 * Inverse-CDF draw from nonnegative weights (they need not sum to 1, so a residual
 * max(0, p - q) can be passed as is): the first index, in index order, whose cumulative weight
 * exceeds u * total, with total and the cumulative sums in float64 in index order.
 *
 * Zero-weight entries are skipped, so one can never be returned, even when rounding puts u *
 * total exactly on a boundary: the result is always an index of positive weight. Since u < 1
 * the running sum reaches total > u * total, so the scan always ends on an entry.
 */
export function sampleFrom(probs: ArrayLike<number>, u: number): number {
  if (!(typeof u === 'number' && u >= 0 && u < 1)) {
    throw invalid(`sampling: u must be a number in [0, 1); got ${show(u)}`);
  }
  let total = 0;
  for (let i = 0; i < probs.length; i++) {
    const v = probs[i]!;
    if (!(v >= 0 && v < Infinity)) {
      throw invalid(`sampling: probs[${i}] is ${String(v)}; weights must be finite and >= 0`);
    }
    total += v;
  }
  if (!(total > 0 && total < Infinity)) {
    throw invalid(`sampling: weights must have a finite positive sum; got ${String(total)}`);
  }
  const target = u * total;
  let cum = 0;
  let last = -1;
  for (let i = 0; i < probs.length; i++) {
    const v = probs[i]!;
    if (v === 0) continue;
    cum += v;
    last = i;
    if (cum > target) return i;
  }
  return last;
}

/**
 * One token from one logits row: argmax when greedy, else an inverse-CDF draw from
 * probabilities(logits, params) with uniform(key) (draw 0 of that key).
 */
export function sampleToken(
  logits: ArrayLike<number>,
  params: SamplingParams,
  key: RngKey,
  row: LogitsRow = {},
): number {
  validateSamplingParams(params);
  if (isGreedy(params)) {
    const [off, len] = resolveRow(logits, row.offset, row.length);
    return checkedArgmax(logits, off, len);
  }
  return sampleFrom(probabilities(logits, params, row), uniform(key));
}

/**
 * The token a backend returns for a step's StepSequence.sample: argmax(row) when params are
 * greedy (what the engine's greedy decoding takes, NaN ranking last), else sampleToken(row,
 * params, key); -1 where sampleToken rejects the logits (NaN, +Infinity, all -Infinity), so that
 * one bad row fails its own request rather than the whole step. Bad params still throw.
 */
export function sampleTokenOrReject(
  logits: ArrayLike<number>,
  params: SamplingParams,
  key: RngKey,
  row: LogitsRow = {},
): number {
  validateSamplingParams(params);
  if (isGreedy(params)) return argmax(logits, row.offset, row.length);
  resolveRow(logits, row.offset, row.length);
  try {
    return sampleToken(logits, params, key, row);
  } catch (e) {
    if (e instanceof MoeflashError && e.code === 'INVALID_ARGUMENT') return -1;
    throw e;
  }
}
