/**
 * Block-size policy: how many tokens to draft in the next round.
 *
 * A round that drafts B tokens costs t_draft(B) + t_verify(B) and emits on average
 *
 *   E(B) = 1 + sum_{i=1..B} prod_{j=1..i} a_j
 *
 * tokens, where a_j is the probability that draft j is accepted given that drafts 1..j-1 were
 * (the bonus or correction token is the 1). The policy picks B* = argmax_B E(B) / (t_draft(B) +
 * t_verify(B)) over B = 0..maxBlockSize; B = 0 is plain decoding (E = 1, no draft, a one-token
 * step), chosen when speculation does not pay. Ties go to the smaller B.
 *
 * a_j is the request's own measurement, smoothed toward a prior so that the first rounds (and
 * positions seldom reached) have a sane value: a_j = (accepted_j + k a0) / (reached_j + k).
 *
 * Timings are shared by every request of one speculator (they belong to the model and the
 * hardware, not to the text): exponential moving averages per number of drafted tokens, measured
 * with performance.now around drafting and from the end of drafting to the verdict. A B never
 * measured is estimated from those that were: a least-squares line in B through the measured
 * averages when two or more exist, else the prior shape scaled through the one measured point,
 * else the prior alone in units of one plain decoding step. The prior verify shape 1 + 0.4 B
 * follows the MoE verify costs measured on the GPU host (DESIGN.md: 9 tokens cost 4.6 steps).
 *
 * A policy that settles on a small B would never learn that larger ones pay, so every
 * `probeEvery` rounds it drafts maxBlockSize once.
 */

const EMA = 0.2;

export interface TimingPriors {
  /** Verify cost of B drafts relative to a plain step: 1 + verifySlope * B. */
  verifySlope: number;
  /** Draft cost relative to a plain step: draftBase + draftSlope * B (0 for B = 0). */
  draftBase: number;
  draftSlope: number;
}

interface Average {
  ms: number;
  n: number;
}

/** Measured round timings of one speculator, keyed by the number of drafted tokens. */
export class TimingModel {
  private readonly verify: Average[] = [];
  private readonly draft: Average[] = [];

  constructor(readonly priors: TimingPriors) {}

  observeDraft(drafted: number, ms: number): void {
    if (drafted > 0) observe(this.draft, drafted, ms);
  }

  observeVerify(drafted: number, ms: number): void {
    observe(this.verify, drafted, ms);
  }

  /** Estimated verify milliseconds (or prior units while nothing is measured) for B drafts. */
  verifyCost(b: number): number {
    return estimate(this.verify, b, (x) => 1 + this.priors.verifySlope * x);
  }

  draftCost(b: number): number {
    if (b === 0) return 0;
    const unit = this.verifyCost(0);
    return estimate(this.draft, b, (x) => (this.priors.draftBase + this.priors.draftSlope * x) * unit);
  }
}

function observe(table: Average[], b: number, ms: number): void {
  if (!(ms >= 0 && ms < Infinity)) return;
  const a = (table[b] ??= { ms, n: 0 });
  a.ms = a.n === 0 ? ms : a.ms + EMA * (ms - a.ms);
  a.n++;
}

function estimate(table: Average[], b: number, prior: (b: number) => number): number {
  const own = table[b];
  if (own && own.n > 0) return own.ms;
  const points: [number, number][] = [];
  table.forEach((a, x) => {
    if (a && a.n > 0) points.push([x, a.ms]);
  });
  if (points.length === 0) return prior(b);
  if (points.length === 1) {
    const [x0, y0] = points[0]!;
    const p0 = prior(x0);
    return p0 > 0 ? (y0 * prior(b)) / p0 : y0;
  }
  let sx = 0, sy = 0, sxx = 0, sxy = 0;
  let minY = Infinity;
  for (const [x, y] of points) {
    minY = Math.min(minY, y);
    sx += x;
    sy += y;
    sxx += x * x;
    sxy += x * y;
  }
  const n = points.length;
  const slope = Math.max(0, (n * sxy - sx * sy) / (n * sxx - sx * sx));
  const intercept = (sy - slope * sx) / n;
  // A line fitted to noisy points can dip below zero far from them; no round is free.
  return Math.max(intercept + slope * b, minY / 4);
}

export interface PolicyOptions {
  maxBlockSize: number;
  /** Prior acceptance a0 and its weight k in pseudo-rounds. */
  acceptancePrior?: number;
  priorWeight?: number;
  probeEvery?: number;
}

/** Chooses B for each round of one request. */
export class BlockSizePolicy {
  private sinceProbe = 0;
  readonly maxBlockSize: number;
  private readonly a0: number;
  private readonly k: number;
  private readonly probeEvery: number;

  constructor(
    opts: PolicyOptions,
    private readonly timings: TimingModel,
    private readonly counts: { reached: readonly number[]; acceptedAt: readonly number[] },
  ) {
    this.maxBlockSize = opts.maxBlockSize;
    this.a0 = opts.acceptancePrior ?? 0.6;
    this.k = opts.priorWeight ?? 2;
    this.probeEvery = opts.probeEvery ?? 16;
  }

  /** Smoothed probability that draft position i (0-based) is accepted given all before it were. */
  conditionalAcceptance(i: number): number {
    const reached = this.counts.reached[i] ?? 0;
    const accepted = this.counts.acceptedAt[i] ?? 0;
    return (accepted + this.k * this.a0) / (reached + this.k);
  }

  /** E(B): expected tokens a round of B drafts emits. */
  expectedTokens(b: number): number {
    let e = 1;
    let run = 1;
    for (let i = 0; i < b; i++) {
      run *= this.conditionalAcceptance(i);
      e += run;
    }
    return e;
  }

  /** Expected tokens per millisecond (or per prior unit) of a round of B drafts. */
  rate(b: number): number {
    return this.expectedTokens(b) / (this.timings.draftCost(b) + this.timings.verifyCost(b));
  }

  best(): number {
    let best = 0;
    let bestRate = this.rate(0);
    for (let b = 1; b <= this.maxBlockSize; b++) {
      const r = this.rate(b);
      if (r > bestRate) {
        best = b;
        bestRate = r;
      }
    }
    return best;
  }

  /** B for the next round. */
  next(): number {
    const b = this.best();
    if (b >= this.maxBlockSize) {
      this.sinceProbe = 0;
      return b;
    }
    if (++this.sinceProbe >= this.probeEvery) {
      this.sinceProbe = 0;
      return this.maxBlockSize;
    }
    return b;
  }
}
