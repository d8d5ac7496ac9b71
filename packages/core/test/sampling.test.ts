import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { MoeflashError } from '../src/errors.js';
import { rngKey, RngPurpose, uniform, type RngKey } from '../src/sampling/rng.js';
import {
  argmax,
  isGreedy,
  probabilities,
  sampleFrom,
  sampleToken,
  validateSamplingParams,
  type SamplingParams,
} from '../src/sampling/sample.js';

// ---------------------------------------------------------------------------------------------
// Independent reference: full comparator sorts, no selection or pre-filtering. Built from the
// written definition in sample.ts, so agreement checks both the definition and the fast paths.

function refArgmax(l: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < l.length; i++) if (l[i]! > l[best]!) best = i;
  return best;
}

function refProbabilities(l: Float32Array, params: SamplingParams): Float32Array {
  const n = l.length;
  const out = new Float32Array(n);
  if (!params.temperature) {
    out[refArgmax(l)] = 1;
    return out;
  }
  const t = params.temperature;
  const lmax = l[refArgmax(l)]!;
  const w = Float64Array.from(l, (v) => Math.exp((v - lmax) / t));
  const idx = [...Array(n).keys()];
  const k = params.topK ?? 0;
  if (k > 0 && k < n) {
    const order = idx.slice().sort((a, b) => (l[a]! === l[b]! ? a - b : l[a]! > l[b]! ? -1 : 1));
    for (let j = k; j < n; j++) w[order[j]!] = 0;
  }
  const p = params.topP ?? 1;
  if (p < 1) {
    let s = 0;
    for (let i = 0; i < n; i++) s += w[i]!;
    const order = idx
      .filter((i) => w[i]! > 0)
      .sort((a, b) => (l[a]! === l[b]! ? a - b : l[a]! > l[b]! ? -1 : 1));
    let keep = order.length;
    let cum = 0;
    for (let j = 0; j < order.length; j++) {
      cum += w[order[j]!]!;
      if (cum >= p * s) {
        keep = j + 1;
        break;
      }
    }
    for (let j = keep; j < order.length; j++) w[order[j]!] = 0;
  }
  const m = params.minP ?? 0;
  for (let i = 0; i < n; i++) if (w[i]! < m) w[i] = 0;
  let s = 0;
  for (let i = 0; i < n; i++) s += w[i]!;
  for (let i = 0; i < n; i++) out[i] = w[i]! / s;
  return out;
}

function softmax64(l: ArrayLike<number>, t = 1): Float64Array {
  let m = -Infinity;
  for (let i = 0; i < l.length; i++) m = Math.max(m, l[i]!);
  const e = Float64Array.from({ length: l.length }, (_, i) => Math.exp((l[i]! - m) / t));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

function nonzero(p: ArrayLike<number>): number[] {
  const r: number[] = [];
  for (let i = 0; i < p.length; i++) if (p[i]! > 0) r.push(i);
  return r;
}

function sum(p: ArrayLike<number>, idx?: number[]): number {
  let s = 0;
  for (const i of idx ?? [...Array(p.length).keys()]) s += p[i]!;
  return s;
}

function expectInvalid(f: () => unknown, ...patterns: RegExp[]): void {
  let err: unknown;
  try {
    f();
  } catch (e) {
    err = e;
  }
  expect(err, 'expected a MoeflashError').toBeInstanceOf(MoeflashError);
  expect((err as MoeflashError).code).toBe('INVALID_ARGUMENT');
  for (const re of patterns) expect((err as MoeflashError).message).toMatch(re);
}

// ---------------------------------------------------------------------------------------------
// Generators

/** Float32 logits with many exact ties (coarse grid) and some -Infinity, never all -Infinity. */
const logitArb = fc.oneof(
  { weight: 5, arbitrary: fc.float({ min: -12, max: 12, noNaN: true, noDefaultInfinity: true }) },
  { weight: 3, arbitrary: fc.integer({ min: -8, max: 8 }).map((x) => x / 2) },
  { weight: 1, arbitrary: fc.constant(-Infinity) },
);
const logitsArb = fc
  .array(logitArb, { minLength: 1, maxLength: 80 })
  .map((a) => {
    const l = Float32Array.from(a);
    if (l.every((v) => v === -Infinity)) l[l.length - 1] = 0;
    return l;
  });

const temperatureArb = fc.double({ min: 0.05, max: 4, noNaN: true });
const paramsArb: fc.Arbitrary<SamplingParams> = fc.record(
  {
    temperature: temperatureArb,
    topK: fc.integer({ min: 0, max: 90 }),
    topP: fc.double({ min: 0.01, max: 1, noNaN: true }),
    minP: fc.double({ min: 0, max: 1, noNaN: true }),
  },
  { requiredKeys: ['temperature'] },
);

const keyArb: fc.Arbitrary<RngKey> = fc.record({
  seed: fc.integer({ min: 0, max: 2 ** 40 }),
  seq: fc.integer({ min: 0, max: 1000 }),
  position: fc.integer({ min: 0, max: 100000 }),
});

const RUNS = { numRuns: 400, seed: 20260101 };

// ---------------------------------------------------------------------------------------------

describe('validateSamplingParams', () => {
  it('accepts the documented ranges, including their edges', () => {
    for (const p of [
      {},
      { temperature: 0 },
      { temperature: 1e-6, topK: 0, topP: 1, minP: 0, seed: 0 },
      { temperature: 100, topK: 1, topP: 1e-9, minP: 1, seed: Number.MAX_SAFE_INTEGER },
    ]) {
      expect(() => validateSamplingParams(p)).not.toThrow();
    }
  });

  const bad: Array<[SamplingParams, RegExp, RegExp]> = [
    [{ temperature: -0.5 }, /temperature/, />= 0/],
    [{ temperature: Number.NaN }, /temperature/, />= 0/],
    [{ temperature: Infinity }, /temperature/, /finite/],
    [{ temperature: '1' as unknown as number }, /temperature/, /"1"/],
    [{ topK: -1 }, /topK/, /integer >= 0/],
    [{ topK: 2.5 }, /topK/, /integer >= 0/],
    [{ topP: 0 }, /topP/, /\(0, 1\]/],
    [{ topP: 1.01 }, /topP/, /\(0, 1\]/],
    [{ topP: Number.NaN }, /topP/, /\(0, 1\]/],
    [{ minP: -0.1 }, /minP/, /\[0, 1\]/],
    [{ minP: 1.5 }, /minP/, /\[0, 1\]/],
    [{ seed: -1 }, /seed/, /\[0, 2\^53 - 1\]/],
    [{ seed: 0.5 }, /seed/, /integer/],
  ];

  it.each(bad)('rejects %j naming the field and its range', (params, field, range) => {
    expectInvalid(() => validateSamplingParams(params), field, range);
    expectInvalid(() => probabilities(Float32Array.of(1, 2), { temperature: 1, ...params }), field);
    expectInvalid(
      () => sampleToken(Float32Array.of(1, 2), { temperature: 1, ...params }, rngKey(0, 0, 0)),
      field,
    );
  });

  it('isGreedy: temperature 0 or unset', () => {
    expect(isGreedy({})).toBe(true);
    expect(isGreedy({ temperature: 0, topK: 5 })).toBe(true);
    expect(isGreedy({ temperature: 0.1 })).toBe(false);
  });
});

describe('argmax', () => {
  it('finds the maximum, lowest index on ties', () => {
    expect(argmax(Float32Array.of(1, 3, 2))).toBe(1);
    expect(argmax(Float32Array.of(5, 7, 7, 1, 7))).toBe(1);
    expect(argmax(Float32Array.of(-Infinity, -Infinity))).toBe(0);
    expect(argmax(Float32Array.of(4))).toBe(0);
  });

  it('works on a row of a larger buffer, returning an index within the row', () => {
    const m = Float32Array.of(9, 9, 9, 1, 4, 4, 2, 9);
    expect(argmax(m, 3, 4)).toBe(1);
    expect(argmax(m, 3)).toBe(4);
  });

  it('ranks NaN below every number', () => {
    expect(argmax(Float32Array.of(Number.NaN, -Infinity, Number.NaN))).toBe(1);
    expect(argmax(Float32Array.of(Number.NaN, 2, 3))).toBe(2);
    expect(argmax(Float32Array.of(Number.NaN, Number.NaN))).toBe(0);
  });

  it('rejects a bad row', () => {
    expectInvalid(() => argmax(Float32Array.of(1, 2), 0, 0), /length/);
    expectInvalid(() => argmax(Float32Array.of(1, 2), 1, 2), /length/);
    expectInvalid(() => argmax(Float32Array.of(1, 2), -1), /offset/);
    expectInvalid(() => argmax(new Float32Array(0)), /length/);
  });

  it('matches a reference scan', () => {
    fc.assert(
      fc.property(logitsArb, (l) => {
        expect(argmax(l)).toBe(refArgmax(l));
      }),
      RUNS,
    );
  });
});

describe('probabilities', () => {
  it('is exactly the reference definition (bit for bit)', () => {
    fc.assert(
      fc.property(logitsArb, paramsArb, (l, params) => {
        expect(probabilities(l, params)).toEqual(refProbabilities(l, params));
      }),
      { ...RUNS, numRuns: 1500 },
    );
  });

  it('agrees with the reference on a large vocabulary (selection and nucleus pre-filter)', () => {
    // Deterministic pseudo-random logits with heavy ties, V = 50000.
    const v = 50000;
    const l = new Float32Array(v);
    for (let i = 0; i < v; i++) {
      const u = uniform({ seed: 99, seq: 0, position: i });
      l[i] = Math.round(u * 400) / 40 - 5;
    }
    for (const params of [
      { temperature: 1, topP: 0.9 },
      { temperature: 0.3, topP: 0.5 },
      { temperature: 1, topK: 1000 },
      { temperature: 1, topK: 777, topP: 0.95 },
      { temperature: 2, topP: 0.999999, minP: 0.01 },
      { temperature: 1, topK: 49999 },
    ]) {
      expect(probabilities(l, params)).toEqual(refProbabilities(l, params));
    }
  });

  it('sums to 1 within 1e-6 and has no negative or non-finite entry', () => {
    fc.assert(
      fc.property(logitsArb, paramsArb, (l, params) => {
        const p = probabilities(l, params);
        expect(p.length).toBe(l.length);
        for (const x of p) expect(x >= 0 && x <= 1).toBe(true);
        expect(Math.abs(sum(p) - 1)).toBeLessThan(1e-6);
        // The most likely token always survives every filter.
        expect(p[argmax(l)]!).toBeGreaterThan(0);
      }),
      RUNS,
    );
  });

  it('is plain softmax without filters', () => {
    const l = Float32Array.of(3, -1, 0.5, 2, 2, -7);
    const p = probabilities(l, { temperature: 1 });
    const ref = softmax64(l);
    for (let i = 0; i < l.length; i++) expect(p[i]).toBe(Math.fround(ref[i]!));
  });

  it('is stable for huge logits (subtracts the max)', () => {
    const p = probabilities(Float32Array.of(1e30, 1e30 - 1e24, -1e30), { temperature: 1 });
    expect(p[0]).toBe(1);
    expect(p[1]).toBe(0);
    const q = probabilities(Float32Array.of(88.5, 88.5, 88.5, 88.5), { temperature: 1 });
    expect(Array.from(q)).toEqual([0.25, 0.25, 0.25, 0.25]);
  });

  it('scales logits by 1/temperature', () => {
    fc.assert(
      fc.property(
        fc.array(fc.float({ min: -6, max: 6, noNaN: true }), { minLength: 2, maxLength: 20 }),
        temperatureArb,
        (a, t) => {
          const l = Float32Array.from(a);
          const p = probabilities(l, { temperature: t });
          const ref = softmax64(l, t);
          for (let i = 0; i < l.length; i++) {
            expect(Math.abs(p[i]! - ref[i]!)).toBeLessThanOrEqual(1e-7 * ref[i]! + 1e-30);
          }
          // log p_i - log p_j = (l_i - l_j) / T wherever both are representable.
          const i = 0;
          const j = l.length - 1;
          if (p[i]! > 1e-30 && p[j]! > 1e-30) {
            const lhs = Math.log(p[i]! / p[j]!);
            expect(Math.abs(lhs - (l[i]! - l[j]!) / t)).toBeLessThan(1e-5);
          }
        },
      ),
      RUNS,
    );
  });

  it('flattens with high temperature and sharpens with low temperature', () => {
    const l = Float32Array.of(1, 2, 3, 4);
    const entropy = (p: Float32Array) => -sum(p.map((x) => (x > 0 ? x * Math.log(x) : 0)));
    const temps = [0.05, 0.3, 1, 3, 30, 1000];
    const h = temps.map((t) => entropy(probabilities(l, { temperature: t })));
    for (let k = 1; k < h.length; k++) expect(h[k]!).toBeGreaterThan(h[k - 1]!);
    expect(probabilities(l, { temperature: 0.01 })[3]).toBe(1);
    expect(h[h.length - 1]!).toBeCloseTo(Math.log(4), 2);
  });

  it('is one-hot at argmax when greedy, whatever the filters', () => {
    const l = Float32Array.of(0.1, 5, -2, 5, 1);
    for (const params of [{}, { temperature: 0 }, { temperature: 0, topK: 3, topP: 0.2, minP: 0.9 }]) {
      expect(Array.from(probabilities(l, params))).toEqual([0, 1, 0, 0, 0]);
    }
  });

  describe('top-k', () => {
    it('leaves at most k nonzero, all of them among the k largest logits', () => {
      fc.assert(
        fc.property(logitsArb, temperatureArb, fc.integer({ min: 1, max: 90 }), (l, t, k) => {
          const p = probabilities(l, { temperature: t, topK: k });
          const kept = nonzero(p);
          expect(kept.length).toBeLessThanOrEqual(k);
          // Every kept logit is >= every dropped logit of positive weight.
          const minKept = Math.min(...kept.map((i) => l[i]!));
          const dropped = [...Array(l.length).keys()].filter((i) => p[i] === 0);
          for (const i of dropped) {
            if (softmax64(l, t)[i]! > 0) expect(l[i]!).toBeLessThanOrEqual(minKept);
          }
          // k >= number of tokens of positive weight: top-k changes nothing.
          if (k >= l.length) expect(p).toEqual(probabilities(l, { temperature: t }));
        }),
        RUNS,
      );
    });

    it('keeps the lower indices among ties at the boundary', () => {
      const l = Float32Array.of(1, 2, 2, 3, 2, 0);
      expect(nonzero(probabilities(l, { temperature: 1, topK: 2 }))).toEqual([1, 3]);
      expect(nonzero(probabilities(l, { temperature: 1, topK: 3 }))).toEqual([1, 2, 3]);
      expect(nonzero(probabilities(l, { temperature: 1, topK: 4 }))).toEqual([1, 2, 3, 4]);
      expect(nonzero(probabilities(Float32Array.of(7, 7, 7), { temperature: 1, topK: 1 }))).toEqual([0]);
    });

    it('treats 0 and k >= V as no top-k', () => {
      const l = Float32Array.of(1, 2, 3);
      const all = probabilities(l, { temperature: 1 });
      expect(probabilities(l, { temperature: 1, topK: 0 })).toEqual(all);
      expect(probabilities(l, { temperature: 1, topK: 3 })).toEqual(all);
      expect(probabilities(l, { temperature: 1, topK: 1000 })).toEqual(all);
    });
  });

  describe('top-p', () => {
    it('keeps the smallest highest-probability set whose mass reaches p', () => {
      fc.assert(
        fc.property(
          logitsArb,
          temperatureArb,
          fc.double({ min: 0.01, max: 0.999, noNaN: true }),
          fc.integer({ min: 0, max: 90 }),
          (l, t, topP, topK) => {
            const p = probabilities(l, { temperature: t, topK, topP });
            // Distribution top-p sees: softmax of the top-k survivors.
            const before = refProbabilities(l, { temperature: t, topK });
            const kept = nonzero(p);
            expect(kept.length).toBeGreaterThanOrEqual(1);
            const mass = sum(before, kept);
            const smallest = Math.min(...kept.map((i) => before[i]!));
            expect(mass).toBeGreaterThanOrEqual(topP - 1e-6);
            if (kept.length > 1) expect(mass - smallest).toBeLessThan(topP + 1e-6);
            // The kept set is a top set: nothing dropped outweighs anything kept.
            for (let i = 0; i < l.length; i++) {
              if (p[i] === 0) expect(before[i]!).toBeLessThanOrEqual(smallest);
            }
          },
        ),
        RUNS,
      );
    });

    it('ranks by logit, so a near-greedy nucleus keeps the argmax token', () => {
      // Distinct logits whose weights round to the same float64: rank order still follows the
      // logits, as argmax does.
      const l = Float32Array.of(-1.401298464324817e-45, 0);
      expect(nonzero(probabilities(l, { temperature: 0.05, topP: 0.01 }))).toEqual([1]);
    });

    it('breaks ties at the boundary by lower index and always keeps one token', () => {
      const l = Float32Array.of(0, 1, 1, 1, 1);
      // Four equal tokens of about 0.2377 each: p = 0.5 needs three of them.
      expect(nonzero(probabilities(l, { temperature: 1, topP: 0.5 }))).toEqual([1, 2, 3]);
      expect(nonzero(probabilities(l, { temperature: 1, topP: 1e-9 }))).toEqual([1]);
      const peaked = Float32Array.of(0, 30, 0);
      expect(Array.from(probabilities(peaked, { temperature: 1, topP: 0.01 }))).toEqual([0, 1, 0]);
    });

    it('keeps everything at p = 1', () => {
      const l = Float32Array.of(1, 2, 3, -50);
      expect(probabilities(l, { temperature: 1, topP: 1 })).toEqual(probabilities(l, { temperature: 1 }));
      expect(nonzero(probabilities(l, { temperature: 1, topP: 1 }))).toEqual([0, 1, 2, 3]);
    });
  });

  describe('min-p', () => {
    it('keeps exactly the tokens with prob >= minP * max prob', () => {
      fc.assert(
        fc.property(logitsArb, temperatureArb, fc.double({ min: 0, max: 1, noNaN: true }), (l, t, minP) => {
          const p = probabilities(l, { temperature: t, minP });
          const ref = softmax64(l, t);
          const top = Math.max(...ref);
          for (let i = 0; i < l.length; i++) {
            const ratio = ref[i]! / top;
            // Far enough above float32 underflow that a kept token cannot round to 0.
            if (ref[i]! > 1e-40 && ratio >= minP * (1 + 1e-9)) expect(p[i]!).toBeGreaterThan(0);
            if (ratio < minP * (1 - 1e-9)) expect(p[i]).toBe(0);
          }
          const pmax = Math.max(...p);
          for (const i of nonzero(p)) expect(p[i]!).toBeGreaterThanOrEqual(minP * pmax * (1 - 1e-6));
        }),
        RUNS,
      );
    });

    it('applies after top-p, relative to the largest probability', () => {
      // softmax of [2, 1, 0, -3] is about [.66, .24, .09, .004]: min-p .2 keeps the first two.
      const l = Float32Array.of(2, 1, 0, -3);
      expect(nonzero(probabilities(l, { temperature: 1, minP: 0.2 }))).toEqual([0, 1]);
      expect(nonzero(probabilities(l, { temperature: 1, minP: 1 }))).toEqual([0]);
      // top-p .95 keeps three tokens; the third is at exp(-2) = .135 of the top, under min-p .14.
      expect(nonzero(probabilities(l, { temperature: 1, topP: 0.95 }))).toEqual([0, 1, 2]);
      expect(nonzero(probabilities(l, { temperature: 1, topP: 0.95, minP: 0.14 }))).toEqual([0, 1]);
      expect(nonzero(probabilities(l, { temperature: 1, topP: 0.95, minP: 0.13 }))).toEqual([0, 1, 2]);
    });
  });

  it('reads a row of a larger buffer and can write into a given array', () => {
    const row = Float32Array.of(0.5, -1, 2, 2.5);
    const matrix = new Float32Array(12).fill(9);
    matrix.set(row, 4);
    const params = { temperature: 0.7, topK: 3, topP: 0.9 };
    const want = probabilities(row, params);
    expect(probabilities(matrix, params, { offset: 4, length: 4 })).toEqual(want);
    const out = new Float32Array(4).fill(123);
    expect(probabilities(matrix, params, { offset: 4, length: 4, out })).toBe(out);
    expect(out).toEqual(want);
    expectInvalid(() => probabilities(matrix, params, { offset: 4, length: 4, out: new Float32Array(3) }), /out/);
    expectInvalid(() => probabilities(matrix, params, { offset: 10, length: 4 }), /length/);
  });

  it('rejects NaN, +Infinity and all -Infinity logits', () => {
    expectInvalid(() => probabilities(Float32Array.of(1, Number.NaN), { temperature: 1 }), /logits\[1\]/, /NaN/);
    expectInvalid(() => probabilities(Float32Array.of(Infinity, 1), { temperature: 1 }), /logits\[0\]/);
    expectInvalid(() => probabilities(Float32Array.of(-Infinity, -Infinity), { temperature: 1 }), /-Infinity/);
    expectInvalid(() => sampleToken(Float32Array.of(1, Number.NaN), {}, rngKey(0, 0, 0)), /logits\[1\]/);
  });
});

describe('sampleFrom', () => {
  const weightsArb = fc
    .array(
      fc.oneof(
        fc.constant(0),
        fc.float({ min: 0, max: 1, noNaN: true }),
        fc.float({ min: Math.fround(1e-30), max: Math.fround(1e-20), noNaN: true }),
      ),
      { minLength: 1, maxLength: 50 },
    )
    .filter((a) => a.some((x) => x > 0))
    .map((a) => Float32Array.from(a));
  const uArb = fc.oneof(
    fc.constant(0),
    fc.constant(1 - 2 ** -24),
    fc.constant(1 - 2 ** -53),
    fc.integer({ min: 0, max: 2 ** 24 - 1 }).map((x) => x * 2 ** -24),
    fc.double({ min: 0, max: 1, maxExcluded: true, noNaN: true }),
  );

  it('returns the first index whose cumulative mass exceeds u * total', () => {
    fc.assert(
      fc.property(weightsArb, uArb, (w, u) => {
        const i = sampleFrom(w, u);
        expect(w[i]!).toBeGreaterThan(0);
        let before = 0;
        for (let j = 0; j < i; j++) before += w[j]!;
        const total = sum(w);
        expect(before).toBeLessThanOrEqual(u * total);
        expect(before + w[i]!).toBeGreaterThan(u * total);
      }),
      { ...RUNS, numRuns: 2000 },
    );
  });

  it('never returns a zero-weight token, even at the edges of u', () => {
    const w = Float32Array.of(0, 0.25, 0, 0, 0.75, 0);
    expect(sampleFrom(w, 0)).toBe(1);
    expect(sampleFrom(w, 0.25 - 2 ** -24)).toBe(1);
    expect(sampleFrom(w, 0.25)).toBe(4);
    expect(sampleFrom(w, 1 - 2 ** -24)).toBe(4);
    expect(sampleFrom(w, 1 - 2 ** -53)).toBe(4);
    expect(sampleFrom(Float32Array.of(0, 0, 1e-45), 0.999)).toBe(2);
  });

  it('accepts unnormalized weights', () => {
    const w = [0, 3, 1];
    expect(sampleFrom(w, 0.74)).toBe(1);
    expect(sampleFrom(w, 0.75)).toBe(2);
  });

  it('rejects a bad u or bad weights', () => {
    expectInvalid(() => sampleFrom([1], 1), /\bu\b/, /\[0, 1\)/);
    expectInvalid(() => sampleFrom([1], -0.1), /\bu\b/);
    expectInvalid(() => sampleFrom([1], Number.NaN), /\bu\b/);
    expectInvalid(() => sampleFrom([0, 0], 0.5), /positive sum/);
    expectInvalid(() => sampleFrom([], 0.5), /positive sum/);
    expectInvalid(() => sampleFrom([1, -1], 0.5), /probs\[1\]/);
    expectInvalid(() => sampleFrom([1, Number.NaN], 0.5), /probs\[1\]/);
  });
});

describe('sampleToken', () => {
  it('is argmax when greedy', () => {
    fc.assert(
      fc.property(logitsArb, keyArb, fc.integer({ min: 0, max: 10 }), (l, key, topK) => {
        expect(sampleToken(l, {}, key)).toBe(argmax(l));
        expect(sampleToken(l, { temperature: 0, topK, topP: 0.5, minP: 0.5 }, key)).toBe(argmax(l));
      }),
      RUNS,
    );
  });

  it('equals sampleFrom(probabilities(...), uniform(key))', () => {
    fc.assert(
      fc.property(logitsArb, paramsArb, keyArb, (l, params, key) => {
        const t = sampleToken(l, params, key);
        expect(t).toBe(sampleFrom(probabilities(l, params), uniform(key)));
        expect(probabilities(l, params)[t]!).toBeGreaterThan(0);
      }),
      RUNS,
    );
  });

  it('reads a row of a larger buffer', () => {
    const v = 6;
    const matrix = new Float32Array(3 * v);
    for (let i = 0; i < matrix.length; i++) matrix[i] = Math.sin(i * 1.7) * 3;
    for (let r = 0; r < 3; r++) {
      const row = matrix.slice(r * v, (r + 1) * v);
      for (let pos = 0; pos < 50; pos++) {
        const key = rngKey(5, 0, pos);
        for (const params of [{}, { temperature: 1.1, topK: 4 }]) {
          expect(sampleToken(matrix, params, key, { offset: r * v, length: v })).toBe(
            sampleToken(row, params, key),
          );
        }
      }
    }
  });

  const logits = Float32Array.of(2, 1.5, 1, 0.5, 0, -0.5, 0.3, 1.2, -1, 0.8);
  const generate = (seed: number, params: SamplingParams, n: number, seq = 0): number[] =>
    Array.from({ length: n }, (_, pos) => sampleToken(logits, params, rngKey(seed, seq, pos)));

  it('reproduces a run exactly from the same seed, and differs for another seed or sequence', () => {
    const params = { temperature: 1, topP: 0.95, seed: 1234 };
    const a = generate(params.seed, params, 500);
    expect(generate(params.seed, params, 500)).toEqual(a);
    expect(generate(1235, params, 500)).not.toEqual(a);
    expect(generate(params.seed, params, 500, 1)).not.toEqual(a);
    expect(new Set(a).size).toBeGreaterThan(3);
  });

  it('uses the Sample purpose by default, not the others', () => {
    const params = { temperature: 1 };
    const draws = (purpose: number) =>
      Array.from({ length: 200 }, (_, pos) => sampleToken(logits, params, rngKey(8, 0, pos, purpose)));
    expect(draws(RngPurpose.Sample)).toEqual(
      Array.from({ length: 200 }, (_, pos) => sampleToken(logits, params, { seed: 8, seq: 0, position: pos })),
    );
    expect(draws(RngPurpose.Accept)).not.toEqual(draws(RngPurpose.Sample));
  });

  // chi-square(df) upper 1e-4 quantiles, df = 1..15 (scipy.stats.chi2.isf(1e-4, df)).
  const CHI2_1E4 = [
    15.137, 18.421, 21.108, 23.513, 25.745, 27.856, 29.878, 31.828, 33.72, 35.564, 37.367, 39.134,
    40.871, 42.579, 44.263,
  ];

  /** Pearson chi-square of `n` draws (positions 0..n-1, one fixed seed) against `expected`. */
  function chiSquare(params: SamplingParams, expected: ArrayLike<number>, seed: number, n: number) {
    const counts = new Array<number>(logits.length).fill(0);
    for (let pos = 0; pos < n; pos++) counts[sampleToken(logits, params, rngKey(seed, 17, pos))]!++;
    let chi2 = 0;
    let cells = 0;
    for (let i = 0; i < counts.length; i++) {
      if (expected[i] === 0) {
        expect(counts[i], `token ${i} has probability 0`).toBe(0);
        continue;
      }
      const e = n * expected[i]!;
      expect(e).toBeGreaterThan(5);
      chi2 += ((counts[i]! - e) * (counts[i]! - e)) / e;
      cells++;
    }
    return { chi2, df: cells - 1 };
  }

  // The seeds are fixed, so these tests are deterministic: they pass or fail the same way on
  // every run. With random seeds a correct sampler would fail one run in 10^4.
  it('matches the softmax distribution by chi-square (20000 draws, alpha = 1e-4)', () => {
    const t = 1.3;
    const { chi2, df } = chiSquare({ temperature: t }, softmax64(logits, t), 20260101, 20000);
    expect(df).toBe(9);
    expect(chi2).toBeLessThan(CHI2_1E4[df - 1]!);
  });

  it('matches the filtered distribution by chi-square (20000 draws, alpha = 1e-4)', () => {
    const params = { temperature: 0.9, topK: 7, topP: 0.9, minP: 0.05 };
    const expected = probabilities(logits, params);
    const { chi2, df } = chiSquare(params, expected, 4242, 20000);
    expect(df).toBeGreaterThanOrEqual(2);
    expect(df).toBeLessThan(9);
    expect(chi2).toBeLessThan(CHI2_1E4[df - 1]!);
  });
});
