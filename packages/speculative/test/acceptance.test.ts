import { describe, expect, it } from 'vitest';
import { argmax, probabilities, RngPurpose, sampleFrom, sampleToken, uniform, type SamplingParams } from '@moeflash/core';
import { acceptDrafts, acceptGreedy, acceptSampled, type AcceptanceInput } from '@moeflash/speculative';
import { chiSquareSurvival, goodnessOfFit } from './helpers.js';

/**
 * Every statistical test below uses fixed seeds, so it passes or fails deterministically. Each
 * asserts a chi-square p-value above ALPHA: were the rule wrong in no way, a given seed set would
 * fail with probability ALPHA (1e-4), about 2e-3 for all of them together. The negative controls
 * show the same tests reject plausible mistakes with p-values far below it.
 */
const ALPHA = 1e-4;

it('the chi-square survival function matches tabulated quantiles', () => {
  for (const [x, k, p] of [[3.841, 1, 0.05], [14.067, 7, 0.05], [37.566, 20, 0.01], [82.529, 63, 0.05], [0.5, 3, 0.9189]] as const) {
    expect(chiSquareSurvival(x, k)).toBeCloseTo(p, 4);
  }
});

function rows(...r: number[][]): Float32Array {
  return new Float32Array(r.flat());
}

function input(over: Partial<AcceptanceInput> & Pick<AcceptanceInput, 'logits' | 'vocab' | 'drafts'>): AcceptanceInput {
  return { params: { temperature: 1 }, seed: 1, stream: 0, position: 10, ...over };
}

describe('greedy acceptance', () => {
  const V = 4;
  const logits = rows([0, 3, 1, 2], [5, 1, 1, 1], [0, 0, 9, 0], [1, 1, 1, 7]);

  it('accepts the longest prefix equal to the argmax, then emits the target token', () => {
    expect(acceptGreedy(logits, V, [1, 0, 2])).toEqual({ emit: [1, 0, 2, 3], accepted: 3 });
    expect(acceptGreedy(logits, V, [1, 0, 3])).toEqual({ emit: [1, 0, 2], accepted: 2 });
    expect(acceptGreedy(logits, V, [2, 0, 2])).toEqual({ emit: [1], accepted: 0 });
    expect(acceptGreedy(logits, V, [])).toEqual({ emit: [1], accepted: 0 });
  });

  it('breaks argmax ties toward the lowest index', () => {
    const tie = rows([2, 7, 7, 1], [4, 4, 0, 4]);
    expect(acceptGreedy(tie, V, [2])).toEqual({ emit: [1], accepted: 0 });
    expect(acceptGreedy(tie, V, [1])).toEqual({ emit: [1, 0], accepted: 1 });
  });

  it('is what acceptDrafts does at temperature 0, whatever q says', () => {
    const q = rows([1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]);
    expect(acceptDrafts(input({ logits, vocab: V, drafts: [1, 0, 3], q, params: { temperature: 0 } }))).toEqual({ emit: [1, 0, 2], accepted: 2 });
  });

  it('rejects malformed input with errors naming the problem', () => {
    expect(() => acceptDrafts(input({ logits: rows([1, 2, 3, 4]), vocab: V, drafts: [1] }))).toThrow(/logits rows/);
    expect(() => acceptDrafts(input({ logits, vocab: V, drafts: [9] }))).toThrow(/outside the vocabulary/);
    expect(() => acceptDrafts(input({ logits, vocab: V, drafts: [1, 2], q: rows([1, 0, 0, 0]) }))).toThrow(/q must hold/);
  });
});

describe('sampled acceptance on hand-made p and q', () => {
  const V = 5;
  const pLogits = [1.2, 0.3, -0.5, 0.9, 0.1];
  const pRow = (params: SamplingParams = { temperature: 1 }) => probabilities(new Float32Array(pLogits), params);

  it('p == q never rejects', () => {
    const logits = rows(pLogits, pLogits, pLogits);
    const q = new Float32Array([...pRow(), ...pRow()]);
    for (let seed = 0; seed < 500; seed++) {
      const x0 = sampleFrom(pRow(), uniform({ seed, seq: 0, position: 10, purpose: RngPurpose.Draft }));
      const x1 = sampleFrom(pRow(), uniform({ seed, seq: 0, position: 11, purpose: RngPurpose.Draft }));
      const v = acceptSampled(input({ logits, vocab: V, drafts: [x0, x1], q, seed }));
      expect(v.accepted).toBe(2);
      expect(v.emit.slice(0, 2)).toEqual([x0, x1]);
    }
  });

  it('a draft the target cannot produce (p(x) = 0) is always rejected and never emitted', () => {
    const params = { temperature: 1, topK: 2 };
    const logits = rows(pLogits, pLogits);
    const q = new Float32Array([0.1, 0.1, 0.6, 0.1, 0.1]);
    for (let seed = 0; seed < 300; seed++) {
      const v = acceptSampled(input({ logits, vocab: V, drafts: [2], q, params, seed }));
      expect(v.accepted).toBe(0);
      expect([0, 3]).toContain(v.emit[0]);
    }
  });

  it('q(x) = 0 is judged as a deterministic draft: accepted with probability p(x), never re-drawn on rejection', () => {
    const logits = rows(pLogits, pLogits);
    const q = new Float32Array([0.5, 0.5, 0, 0, 0]);
    const p = pRow();
    const N = 20000;
    let accepted = 0;
    for (let seed = 0; seed < N; seed++) {
      const v = acceptSampled(input({ logits, vocab: V, drafts: [3], q, seed }));
      if (v.accepted === 1) accepted++;
      else expect(v.emit[0]).not.toBe(3);
    }
    // Binomial(N, p(3)): 4.5 standard deviations is a false alarm of under 1e-5.
    expect(Math.abs(accepted - N * p[3]!)).toBeLessThan(4.5 * Math.sqrt(N * p[3]! * (1 - p[3]!)));
  });

  it('a deterministic drafter (no q) emits p exactly in distribution, and its token is never the residual draw', () => {
    const logits = rows(pLogits, pLogits);
    const N = 20000;
    const counts = new Array<number>(V).fill(0);
    for (let seed = 0; seed < N; seed++) {
      const v = acceptSampled(input({ logits, vocab: V, drafts: [0], seed }));
      if (v.accepted === 0) expect(v.emit[0]).not.toBe(0);
      counts[v.emit[0]!]!++;
    }
    expect(goodnessOfFit(counts, [...pRow()], N).p).toBeGreaterThan(ALPHA);
  });

  it('the bonus token is the very token plain decoding samples at that position', () => {
    const logits = rows(pLogits, pLogits, [0.2, 0.1, 3, 0.4, 0.3]);
    const q = new Float32Array([...pRow(), ...pRow()]);
    for (let seed = 0; seed < 50; seed++) {
      const v = acceptSampled(input({ logits, vocab: V, drafts: [0, 3], q, seed, stream: 7, position: 20 }));
      expect(v.accepted).toBe(2);
      expect(v.emit[2]).toBe(sampleToken(logits, { temperature: 1 }, { seed, seq: 7, position: 22 }, { offset: 2 * V, length: V }));
    }
  });

  it('an all-zero residual (q >= p everywhere, as rounding can leave it) falls back to p', () => {
    const p = pRow();
    const q = new Float32Array(p.map((x) => 2 * x));
    const logits = rows(pLogits, pLogits);
    let rejected = 0;
    for (let seed = 0; seed < 2000; seed++) {
      const v = acceptSampled(input({ logits, vocab: V, drafts: [0], q, seed }));
      if (v.accepted === 0) rejected++;
      expect(p[v.emit[0]!]).toBeGreaterThan(0);
    }
    expect(rejected).toBeGreaterThan(500);
  });
});

/** One draft from a hand-made q, judged against a hand-made p: the emitted token must follow p. */
function firstTokenCounts(pLogits: number[], qLogits: number[], params: SamplingParams, N: number, rule = acceptSampled): number[] {
  const V = pLogits.length;
  const logits = rows(pLogits, pLogits);
  const q = probabilities(new Float32Array(qLogits), params);
  const counts = new Array<number>(V).fill(0);
  for (let seed = 0; seed < N; seed++) {
    const x = sampleFrom(q, uniform({ seed, seq: 3, position: 10, purpose: RngPurpose.Draft }));
    const v = rule(input({ logits, vocab: V, drafts: [x], q, params, seed, stream: 3 }));
    counts[v.emit[0]!]!++;
  }
  return counts;
}

/** A common mistake: resample from p instead of the residual after a rejection. */
function resampleFromP(a: AcceptanceInput) {
  const v = acceptSampled(a);
  if (v.accepted === 1) return v;
  const p = probabilities(a.logits, a.params, { offset: 0, length: a.vocab });
  return { emit: [sampleFrom(p, uniform({ seed: a.seed, seq: a.stream, position: a.position, purpose: RngPurpose.Residual }))], accepted: 0 };
}

describe('the acceptance rule samples p exactly (chi-square, fixed seeds)', () => {
  const pLogits = [2.0, 1.1, 0.3, -0.4, 0.8, -1.5, 0.0, 1.6];
  const qLogits = [0.1, 1.9, 0.3, 1.2, -0.8, 0.5, 1.4, -0.2];
  const cases: [string, SamplingParams][] = [
    ['temperature 1', { temperature: 1 }],
    ['temperature 0.7, top-k 5', { temperature: 0.7, topK: 5 }],
    ['temperature 1.3, top-p 0.8', { temperature: 1.3, topP: 0.8 }],
    ['top-k 6, top-p 0.9, min-p 0.1', { temperature: 1, topK: 6, topP: 0.9, minP: 0.1 }],
  ];
  const N = 20000;
  for (const [name, params] of cases) {
    it(name, () => {
      const p = probabilities(new Float32Array(pLogits), params);
      const counts = firstTokenCounts(pLogits, qLogits, params, N);
      const fit = goodnessOfFit(counts, [...p], N);
      expect(fit.p).toBeGreaterThan(ALPHA);
      for (let t = 0; t < p.length; t++) if (p[t] === 0) expect(counts[t]).toBe(0);
    });
  }

  it('negative control: resampling from p after a rejection is detected', () => {
    const p = probabilities(new Float32Array(pLogits), { temperature: 1 });
    const counts = firstTokenCounts(pLogits, qLogits, { temperature: 1 }, N, resampleFromP);
    expect(goodnessOfFit(counts, [...p], N).p).toBeLessThan(1e-12);
  });
});

/**
 * A whole generation, several rounds: the target is a Markov chain over V tokens (its logits
 * depend on the previous token), the drafter another one that drafts autoregressively from its
 * own chain. The first three emitted tokens must follow the target chain exactly.
 */
describe('multi-round speculative sampling follows the target chain exactly', () => {
  const V = 4;
  const target = [
    [1.0, 0.2, -0.3, 0.6],
    [-0.5, 1.3, 0.4, 0.1],
    [0.3, 0.3, 1.1, -1.0],
    [0.9, -0.2, 0.0, 0.8],
  ];
  const drafter = [
    [0.9, 0.4, -0.1, 0.2],
    [0.0, 0.9, 0.9, -0.5],
    [0.6, 0.1, 0.7, -0.2],
    [1.5, -0.4, 0.2, 0.1],
  ];

  function run(params: SamplingParams, B: number, deterministic: boolean, seed: number, stream: number): number[] {
    const out: number[] = [];
    let last = 2;
    let position = 6; // the position of the first token to decide
    while (out.length < 3) {
      const drafts: number[] = [];
      const q = new Float32Array(B * V);
      let prev = last;
      for (let i = 0; i < B; i++) {
        const logits = new Float32Array(drafter[prev]!);
        let x: number;
        if (deterministic) x = argmax(logits);
        else {
          const row = q.subarray(i * V, (i + 1) * V);
          probabilities(logits, params, { out: row });
          x = sampleFrom(row, uniform({ seed, seq: stream, position: position + i, purpose: RngPurpose.Draft }));
        }
        drafts.push(x);
        prev = x;
      }
      const logits = rows(...[last, ...drafts].map((t) => target[t]!));
      const v = acceptDrafts({ logits, vocab: V, drafts, q: deterministic ? undefined : q, params, seed, stream, position });
      out.push(...v.emit);
      position += v.emit.length;
      last = v.emit[v.emit.length - 1]!;
    }
    return out.slice(0, 3);
  }

  function exact(params: SamplingParams): Map<string, number> {
    const p = target.map((l) => probabilities(new Float32Array(l), params));
    const m = new Map<string, number>();
    for (let a = 0; a < V; a++) for (let b = 0; b < V; b++) for (let c = 0; c < V; c++) {
      const pr = p[2]![a]! * p[a]![b]! * p[b]![c]!;
      if (pr > 0) m.set(`${a},${b},${c}`, pr);
    }
    return m;
  }

  const N = 12000;
  const cases: [string, SamplingParams, number, boolean][] = [
    ['B = 3, sampled drafts, temperature 1', { temperature: 1 }, 3, false],
    ['B = 2, sampled drafts, top-k 3', { temperature: 0.8, topK: 3 }, 2, false],
    ['B = 4, sampled drafts, top-p 0.85', { temperature: 1, topP: 0.85 }, 4, false],
    ['B = 3, deterministic drafts (q one-hot), temperature 1', { temperature: 1 }, 3, true],
    ['B = 1, deterministic drafts, top-k 2', { temperature: 1.2, topK: 2 }, 1, true],
  ];
  for (const [name, params, B, det] of cases) {
    it(name, () => {
      const counts = new Map<string, number>();
      for (let s = 0; s < N; s++) {
        const k = run(params, B, det, s, 1).join(',');
        counts.set(k, (counts.get(k) ?? 0) + 1);
      }
      const e = exact(params);
      for (const k of counts.keys()) expect(e.has(k)).toBe(true);
      expect(goodnessOfFit(counts, e, N).p).toBeGreaterThan(ALPHA);
    });
  }
});
