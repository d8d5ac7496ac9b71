/**
 * (b) Speculative sampling through the engine: over many seeded runs on a tiny model, the first
 * three emitted tokens follow exactly the distribution plain sampling draws them from.
 *
 * That distribution is computed exactly: the tiny target is run on every prefix the transforms
 * (top-k, top-p) leave possible, and P(t0, t1, t2) = p(t0) p(t1 | t0) p(t2 | t0, t1). Each test
 * is Pearson's chi-square over those cells (pooled below an expected count of 5) with fixed seeds,
 * so it cannot flake; it asserts p > 1e-4, a false alarm rate of 1e-4 per test were the seeds
 * drawn at random. The plain engine is held to the same test, which checks the enumeration.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { probabilities, RngPurpose, sampleFrom, uniform, type Engine, type Proposal, type SamplingParams, type SpeculationContext, type Speculator } from '@moeflash/core';
import { SpeculatingRequest, TimingModel } from '@moeflash/speculative';
import { engineFor, engineWith, goodnessOfFit, tinyPair } from './helpers.js';

const PROMPT = [33, 7, 33, 7, 33, 7, 33];
const N = 800;
const ALPHA = 1e-4;
const CONCURRENT = 16;

type Table = Map<string, Float32Array>;

/** p(. | prompt + prefix) for every prefix of up to two tokens that the transforms allow. */
async function exactTable(engine: Engine, params: SamplingParams): Promise<Table> {
  const model = engine.model;
  const seq = 1_000_000_000;
  const table: Table = new Map();
  const step = async (tokens: number[]) => probabilities((await model.step({ sequences: [{ seq, tokens, logits: 'last' }] })).sequences[0]!.logits, params);
  const p0 = await step(PROMPT);
  table.set('', p0);
  const base = model.length(seq);
  for (let a = 0; a < p0.length; a++) {
    if (!(p0[a]! > 0)) continue;
    const p1 = await step([a]);
    table.set(`${a}`, p1);
    for (let b = 0; b < p1.length; b++) {
      if (!(p1[b]! > 0)) continue;
      table.set(`${a},${b}`, await step([b]));
      model.truncate(seq, base + 1);
    }
    model.truncate(seq, base);
  }
  model.release(seq);
  return table;
}

function joint(table: Table): Map<string, number> {
  const out = new Map<string, number>();
  const p0 = table.get('')!;
  p0.forEach((pa, a) => {
    if (!(pa > 0)) return;
    table.get(`${a}`)!.forEach((pb, b) => {
      if (!(pb > 0)) return;
      table.get(`${a},${b}`)!.forEach((pc, c) => {
        if (pc > 0) out.set(`${a},${b},${c}`, pa * pb * pc);
      });
    });
  });
  return out;
}

async function sample(engine: Engine, params: SamplingParams, blockSize: number, firstSeed: number): Promise<Map<string, number>> {
  const counts = new Map<string, number>();
  for (let s = 0; s < N; s += CONCURRENT) {
    const batch = Array.from({ length: Math.min(CONCURRENT, N - s) }, (_, i) =>
      // maxTokens leaves the first round room for all B drafts; only the first three tokens are tested.
      engine.generate(PROMPT, { ...params, seed: firstSeed + s + i, maxTokens: blockSize + 2, ignoreEos: true, speculative: { blockSize } }).result,
    );
    for (const r of await Promise.all(batch)) {
      const k = r.tokens.slice(0, 3).join(',');
      counts.set(k, (counts.get(k) ?? 0) + 1);
    }
  }
  return counts;
}

/**
 * A drafter close to the target, with an explicit q: 0.7 x the target's own distribution (where
 * the table knows the context) + 0.3 x uniform over four tokens. Its drafts are sampled from q.
 */
class NearTargetRequest extends SpeculatingRequest {
  readonly hiddenLayers: number[] = [];
  constructor(private readonly table: Table, private readonly vocab: number, blockSize: number) {
    super('near-target', { blockSize, adaptive: false }, new TimingModel({ verifySlope: 0.4, draftBase: 0, draftSlope: 0 }));
  }
  protected draft(ctx: SpeculationContext, b: number): Proposal {
    const V = this.vocab;
    const done = ctx.tokens.slice(PROMPT.length);
    const q = new Float32Array(b * V);
    const tokens: number[] = [];
    for (let i = 0; i < b; i++) {
      const row = q.subarray(i * V, (i + 1) * V);
      const p = this.table.get([...done, ...tokens].join(','));
      for (const t of [1, 33, 7, 200]) row[t] = 0.3 / 4;
      if (p) for (let t = 0; t < V; t++) row[t]! += 0.7 * p[t]!;
      else for (const t of [1, 33, 7, 200]) row[t] = 0.25;
      tokens.push(sampleFrom(row, uniform({ seed: ctx.params.seed ?? 0, seq: ctx.stream, position: ctx.cacheLength + 1 + i, purpose: RngPurpose.Draft })));
    }
    return { tokens, q };
  }
}

const CASES: [string, SamplingParams][] = [
  ['temperature 1, top-k 4', { temperature: 1, topK: 4 }],
  ['temperature 0.1, top-p 0.8', { temperature: 0.1, topP: 0.8 }],
];

describe('speculative sampling matches plain sampling in distribution (qwen3_moe)', () => {
  const engines: Engine[] = [];
  let plain: Engine, dflash: Engine, lookup: Engine, near: Engine;
  const tables = new Map<string, Table>();

  beforeAll(async () => {
    const { target, draft } = await tinyPair('qwen3_moe');
    plain = await engineFor(target);
    dflash = await engineFor(target, { method: 'dflash', draft });
    lookup = await engineFor(target, { method: 'prompt-lookup', maxNgram: 2 });
    let current: Table | undefined;
    const spec: Speculator & { use(t: Table): void } = {
      method: 'near-target',
      use: (t) => (current = t),
      forRequest: (o) => new NearTargetRequest(current!, plain.spec.vocabSize, o.blockSize ?? 2),
      dispose: async () => {},
    };
    near = await engineWith(target, spec);
    engines.push(plain, dflash, lookup, near);
    for (const [name, params] of CASES) tables.set(name, await exactTable(plain, params));
    (near.speculator as typeof spec).use(tables.get(CASES[0]![0])!);
  });
  afterAll(async () => {
    for (const e of engines) await e.close();
  });

  for (const [name, params] of CASES) {
    const check = async (engine: Engine, blockSize: number, firstSeed: number) => {
      const expected = joint(tables.get(name)!);
      const counts = await sample(engine, params, blockSize, firstSeed);
      for (const k of counts.keys()) expect(expected.has(k), `sequence ${k} cannot come from plain sampling`).toBe(true);
      const fit = goodnessOfFit(counts, expected, N);
      expect(fit.p, JSON.stringify(fit)).toBeGreaterThan(ALPHA);
    };
    describe(name, () => {
      if (name === CASES[0]![0]) it('plain sampling (checks the exact distribution)', () => check(plain, 1, 0));
      if (name === CASES[0]![0]) it('DFlash, B = 2', () => check(dflash, 2, 10_000));
      it('prompt lookup, B = 3 (deterministic drafts)', () => check(lookup, 3, 20_000));
      it('a drafter close to the target with explicit q, B = 2', async () => {
        (near.speculator as unknown as { use(t: Table): void }).use(tables.get(name)!);
        await check(near, 2, 30_000);
      });
    });
  }
});
