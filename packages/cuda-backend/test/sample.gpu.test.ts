/**
 * sample_rows against core's sampleToken: the same token for the same logits, settings and key,
 * bit for bit, over temperature, top-k, top-p and min-p, with each row of a launch on its own
 * settings. Inputs aim at the places where a port goes wrong: ties at the top-k and top-p
 * boundaries, signed zeros, masked (-Infinity) tokens, top-p runs too long for shared memory,
 * min-p at 1, a huge vocabulary. Needs an NVIDIA GPU and the built addon; where either is
 * missing the suite is skipped and the reason printed.
 *
 * Limit: exact equality of every token. Rows core rejects (a NaN or +Infinity logit, or only
 * -Infinity, on a sampled row) must come back as -1; greedy rows (temperature 0) as argmax.
 *
 * Then the model: StepSequence.sample on eager and CUDA-graph steps gives the token core draws
 * from the step's own logits, and an engine on the CUDA backend generates the same tokens whether
 * the device or the host samples.
 */
import path from 'node:path';
import { describe, expect, it } from 'vitest';

import {
  argmax,
  createEngine,
  loadModelSpec,
  openWeights,
  rngKey,
  sampleToken,
  sampleTokenOrReject,
  type SamplingParams,
  type StepSample,
} from '@moeflash/core';

import { createCudaBackend, cudaOps, isCudaAvailable, type CudaModel } from '../src/index.js';
import { tinyModel } from '../../core/test/helpers.js';
import { firstMismatch, logCheck, randomNormal, rng } from './helpers.js';

const cuda = isCudaAvailable();
const skip = !cuda.ok;
if (!cuda.ok) console.log(`[cuda] sampling tests skipped: ${cuda.reason}`);

const ops = () => cudaOps();

interface Row {
  params: SamplingParams;
  seq: number;
  position: number;
  purpose: number;
}

/** core's answer for row r of a [rows, V] matrix; -1 where core throws. */
function reference(logits: Float32Array, V: number, r: number, row: Row): number {
  const p = row.params;
  if (!p.temperature) return argmax(logits, r * V, V);
  try {
    return sampleToken(logits, p, rngKey(p.seed ?? 0, row.seq, row.position, row.purpose), { offset: r * V, length: V });
  } catch {
    return -1;
  }
}

function runAndCompare(name: string, logits: Float32Array, V: number, rows: Row[]): void {
  const got = ops().sample({
    logits,
    rows: rows.length,
    vocab: V,
    params: rows.map((r) => r.params),
    seqs: rows.map((r) => r.seq),
    positions: rows.map((r) => r.position),
    purpose: rows.map((r) => r.purpose),
  });
  const ref = Int32Array.from(rows, (row, r) => reference(logits, V, r, row));
  const i = firstMismatch(got, ref);
  logCheck(name, i < 0 ? `identical (${rows.length} rows)` : `row ${i}: ${got[i]} vs ${ref[i]} (${JSON.stringify(rows[i]!.params)})`);
  expect(i, name).toBe(-1);
}

type Shape = 'normal' | 'rounded' | 'three' | 'masked' | 'zeros' | 'tiedTop' | 'flat' | 'peaked';

/** One row of logits of a given shape, written into out at offset. */
function fillRow(out: Float32Array, offset: number, V: number, shape: Shape, r: () => number, spread: number): void {
  const row = out.subarray(offset, offset + V);
  row.set(randomNormal(V, r, spread));
  switch (shape) {
    case 'rounded': // many exact ties everywhere, the top-k and top-p boundaries included
      for (let i = 0; i < V; i++) row[i] = Math.round(row[i]!);
      break;
    case 'three': // a third of the vocabulary on each of three values
      for (let i = 0; i < V; i++) row[i] = (i % 3) - 1;
      break;
    case 'masked':
      for (let i = 0; i < V; i += 7) row[i] = -Infinity;
      break;
    case 'zeros': // -0 and +0 compare equal in the reference
      for (let i = 0; i < V; i += 5) row[i] = -0;
      for (let i = 1; i < V; i += 5) row[i] = 0;
      break;
    case 'tiedTop':
      if (V > 20) {
        row[5] = 40;
        row[17] = 40;
      }
      break;
    case 'flat': // top-p keeps almost everything: long candidate runs
      for (let i = 0; i < V; i++) row[i] = row[i]! * 0.05;
      break;
    case 'peaked': // an LLM-like row: a few strong tokens over a long tail
      for (let i = 0; i < 8 && i < V; i++) row[Math.floor(r() * V)] = 12 + 6 * r();
      break;
    default:
  }
}

const TEMPERATURES = [0, 0.05, 0.6, 0.7, 1, 1.3, 2.5];
const TOP_P = [1, 1, 0.9, 0.95, 0.5, 0.3, 0.999, 1e-6];
const MIN_P = [0, 0, 0, 0.05, 0.1, 0.5, 0.999, 1];
const SEEDS = [0, 1, 987654321, 2 ** 40 + 5, 2 ** 53 - 1];
const SHAPES: Shape[] = ['normal', 'rounded', 'three', 'masked', 'zeros', 'tiedTop', 'flat', 'peaked'];

function pick<T>(list: readonly T[], r: () => number): T {
  return list[Math.floor(r() * list.length)]!;
}

function randomParams(V: number, r: () => number): SamplingParams {
  const topK = pick([0, 0, 1, 2, 5, 20, 50, 1000, V - 1, V, V + 5].filter((k) => k >= 0), r);
  return {
    temperature: pick(TEMPERATURES, r),
    topK,
    topP: pick(TOP_P, r),
    minP: pick(MIN_P, r),
    seed: pick(SEEDS, r),
  };
}

describe.skipIf(skip)('sample_rows: the same token as core sampleToken', () => {
  it.each([
    [1, 4],
    [2, 8],
    [37, 24],
    [1000, 48],
    [32000, 24],
    [201088, 16],
  ])('vocab %i, %i rows of mixed settings and shapes', (V, rows) => {
    for (let launch = 0; launch < 3; launch++) {
      const r = rng(V * 7 + launch);
      const logits = new Float32Array(rows * V);
      const list: Row[] = [];
      for (let i = 0; i < rows; i++) {
        fillRow(logits, i * V, V, SHAPES[(i + launch) % SHAPES.length]!, r, pick([0.5, 1, 3, 8], r));
        list.push({ params: randomParams(V, r), seq: 3 * i + launch, position: 1000 + 17 * i, purpose: i % 4 });
      }
      runAndCompare(`V=${V} launch ${launch}`, logits, V, list);
    }
  });

  it('every filter alone and together on gpt-oss-sized rows, many keys', () => {
    const V = 201088;
    const settings: SamplingParams[] = [
      { temperature: 1 },
      { temperature: 0.7, topK: 1 },
      { temperature: 1, topK: 50 },
      { temperature: 1, topP: 0.9 },
      { temperature: 1, topP: 1e-6 },
      { temperature: 1, minP: 0.05 },
      { temperature: 1, minP: 0.999 },
      { temperature: 0.6, topK: 20, topP: 0.95 },
      { temperature: 1.3, topK: 1000, topP: 0.8, minP: 0.02 },
      { temperature: 0 },
    ];
    const r = rng(2024);
    const base = new Float32Array(V);
    fillRow(base, 0, V, 'peaked', r, 2);
    const rows: Row[] = [];
    for (const params of settings) {
      for (let k = 0; k < 3; k++) rows.push({ params: { ...params, seed: SEEDS[k] }, seq: 11 + k, position: 500 + k, purpose: 0 });
    }
    const logits = new Float32Array(rows.length * V);
    for (let i = 0; i < rows.length; i++) logits.set(base, i * V);
    runAndCompare('gpt-oss-sized rows', logits, V, rows);
  });

  it('top-p over long candidate runs (beyond the shared-memory sort) and exact-sum boundaries', () => {
    // 'flat' rows keep most of the vocabulary in top-p's sort: 201088 candidates take the sort's
    // global-memory path, 32000 the shared one near its capacity.
    for (const V of [201088, 32000, 40000]) {
      const r = rng(V + 5);
      const rows: Row[] = [];
      const logits = new Float32Array(6 * V);
      for (let i = 0; i < 6; i++) {
        fillRow(logits, i * V, V, i % 2 === 0 ? 'flat' : 'rounded', r, 1);
        rows.push({ params: { temperature: 1, topP: [0.9, 0.999, 0.5][i % 3], seed: i }, seq: i, position: 7 * i, purpose: 0 });
      }
      runAndCompare(`long top-p runs V=${V}`, logits, V, rows);
    }
    // Equal weights make the reference's sums exact and land cum exactly on p * total, so ties
    // at the cut decide the token: V equal logits, p a multiple of 1 / V.
    const V = 64;
    const rows: Row[] = [];
    for (let i = 0; i < 32; i++) rows.push({ params: { temperature: 1, topP: (i + 1) / 32, seed: i }, seq: i, position: i, purpose: 0 });
    runAndCompare('equal logits, p on the boundary', new Float32Array(rows.length * V).fill(0.25), V, rows);
  });

  it('rows core rejects give -1; greedy rows give argmax (NaN below every number)', () => {
    const V = 1000;
    const r = rng(77);
    const rows: Row[] = [];
    const logits = new Float32Array(8 * V);
    for (let i = 0; i < 8; i++) fillRow(logits, i * V, V, 'normal', r, 2);
    logits[0 * V + 10] = NaN; // sampled: rejected
    logits[1 * V + 20] = Infinity; // sampled: rejected
    logits.fill(-Infinity, 2 * V, 3 * V); // sampled: rejected
    logits[3 * V + 30] = NaN; // greedy: NaN is skipped
    logits[4 * V + 40] = Infinity; // greedy: +Infinity wins
    logits.fill(NaN, 5 * V, 6 * V); // greedy: all NaN gives 0
    logits.fill(-Infinity, 6 * V, 7 * V); // greedy: all -Infinity gives 0
    for (let i = 0; i < V; i += 2) logits[7 * V + i] = -Infinity; // sampled: fine, masked half
    const greedy = new Set([3, 4, 5, 6]);
    for (let i = 0; i < 8; i++) {
      rows.push({ params: { temperature: greedy.has(i) ? 0 : 1, topK: 10, seed: i }, seq: i, position: i, purpose: 0 });
    }
    const got = ops().sample({
      logits,
      rows: 8,
      vocab: V,
      params: rows.map((x) => x.params),
      seqs: rows.map((x) => x.seq),
      positions: rows.map((x) => x.position),
    });
    logCheck('rejected and greedy rows', Array.from(got).join(' '));
    expect(Array.from(got.subarray(0, 3))).toEqual([-1, -1, -1]);
    for (const i of greedy) expect(got[i], `greedy row ${i}`).toBe(argmax(logits, i * V, V));
    expect(got[7]! % 2, 'a masked token is never drawn').toBe(1);
    runAndCompare('rejected and greedy rows', logits, V, rows);
  });

  it('a full batch of 256 rows with per-row settings, and the same rows one at a time', () => {
    const V = 4096;
    const r = rng(256);
    const rows: Row[] = [];
    const logits = new Float32Array(256 * V);
    for (let i = 0; i < 256; i++) {
      fillRow(logits, i * V, V, SHAPES[i % SHAPES.length]!, r, pick([0.5, 1, 3, 8], r));
      rows.push({ params: randomParams(V, r), seq: i, position: 3 * i + 1, purpose: i % 3 });
    }
    runAndCompare('256 rows', logits, V, rows);
    const alone = Int32Array.from({ length: 8 }, (_, i) =>
      ops().sample({
        logits: logits.subarray(i * 31 * V, (i * 31 + 1) * V),
        rows: 1,
        vocab: V,
        params: rows[i * 31]!.params,
        seqs: [rows[i * 31]!.seq],
        positions: [rows[i * 31]!.position],
        purpose: rows[i * 31]!.purpose,
      })[0]!,
    );
    const ref = Int32Array.from({ length: 8 }, (_, i) => reference(logits, V, i * 31, rows[i * 31]!));
    expect(Array.from(alone)).toEqual(Array.from(ref));
  });

  it('a 64-bit seed given as a bigint reaches the uniform unchanged', () => {
    const V = 500;
    const logits = randomNormal(4 * V, rng(9), 1);
    const seeds = [0n, 0xffffffffffffffffn, 0x123456789abcdef0n, 2n ** 53n + 1n];
    const got = ops().sample({ logits, rows: 4, vocab: V, params: { temperature: 1 }, seed: seeds, seqs: [1, 2, 3, 4], positions: [5, 6, 7, 8] });
    const ref = Int32Array.from(seeds, (seed, i) =>
      sampleToken(logits, { temperature: 1 }, rngKey(seed, i + 1, i + 5), { offset: i * V, length: V }),
    );
    expect(Array.from(got)).toEqual(Array.from(ref));
  });
});

describe.skipIf(skip)('CUDA model: StepSequence.sample', () => {
  const fixtures = path.join(__dirname, '..', '..', 'core', 'test', 'fixtures', 'golden');
  const SETTINGS: SamplingParams[] = [
    { temperature: 0 },
    { temperature: 1 },
    { temperature: 0.7, topK: 20, topP: 0.9 },
    { temperature: 1.2, minP: 0.05 },
  ];

  it('eager and graph steps draw the token core draws from the same logits', async () => {
    const { readdirSync } = await import('node:fs');
    const name = readdirSync(fixtures).find((f) => f.startsWith('gpt_oss_mxfp4')) ?? readdirSync(fixtures)[0]!;
    const dir = path.join(fixtures, name);
    const spec = await loadModelSpec(dir);
    const w = await openWeights(dir);
    const gpu = (await createCudaBackend().load(spec, w, { maxSequences: 4, maxSequenceLength: 64, maxStepTokens: 16 })) as CudaModel;
    await w.close();
    const V = spec.vocabSize;
    const draw = (si: number, position: number, seed = 5): StepSample => ({
      params: { ...SETTINGS[si]!, seed },
      key: rngKey(seed, 100 + si, position),
    });
    const check = (label: string, out: { logits: Float32Array; rows: number; sampled?: number }, sample: StepSample) => {
      const row = out.logits.subarray((out.rows - 1) * V, out.rows * V);
      const want = sampleTokenOrReject(row, sample.params, sample.key);
      logCheck(label, `${out.sampled} (core ${want})`);
      expect(out.sampled, label).toBe(want);
    };
    // Prefill (eager), logits returned alongside the draw.
    const prompts = SETTINGS.map((_, i) => [5 + i, 17, 42, 99, 3 + i, 250, 8]);
    const pre = prompts.map((p, i) => draw(i, p.length));
    const a = await gpu.step({ sequences: prompts.map((p, i) => ({ seq: i + 1, tokens: p, logits: 'last' as const, sample: pre[i] })) });
    a.sequences.forEach((o, i) => check(`prefill ${i}`, o, pre[i]!));
    // Decode steps (a CUDA graph with sampling), five in a row, with and without logits.
    const graphs = gpu.stats.graphSteps;
    for (let k = 0; k < 5; k++) {
      const pos = prompts[0]!.length + k + 1;
      const samples = SETTINGS.map((_, i) => draw(i, pos, 7 + k));
      const tokens = SETTINGS.map((_, i) => (k * 31 + i * 7) % V);
      const blind = await gpu.step({ sequences: tokens.map((t, i) => ({ seq: i + 1, tokens: [t], logits: 'none' as const, sample: samples[i] })) });
      for (const o of blind.sequences) {
        expect(o.logits.length).toBe(0);
        expect(o.sampled).toBeGreaterThanOrEqual(0);
      }
      // The same step again, logits returned: the same logits, so the same draw, and core's.
      for (let i = 0; i < SETTINGS.length; i++) gpu.truncate(i + 1, gpu.length(i + 1) - 1);
      const seen = await gpu.step({ sequences: tokens.map((t, i) => ({ seq: i + 1, tokens: [t], logits: 'last' as const, sample: samples[i] })) });
      seen.sequences.forEach((o, i) => {
        check(`decode ${k} row ${i}`, o, samples[i]!);
        expect(o.sampled).toBe(blind.sequences[i]!.sampled);
      });
    }
    expect(gpu.stats.graphSteps).toBeGreaterThan(graphs);
    await gpu.dispose();
  });

  it('an engine on the CUDA backend generates the same tokens whether the device or the host samples', async () => {
    const dir = await tinyModel('gpt_oss');
    const onDevice = await createEngine({ model: dir, backend: createCudaBackend(), log: () => {} });
    const onHost = await createEngine({ model: dir, backend: createCudaBackend(), log: () => {} });
    Object.defineProperty(onHost.model, 'sampling', { value: false });
    try {
      for (const params of [{ temperature: 0 }, { temperature: 1, seed: 3 }, { temperature: 0.8, topK: 40, topP: 0.9, minP: 0.02, seed: 9 }]) {
        const opts = { ...params, maxTokens: 16, ignoreEos: true };
        const prompts = [[5, 6, 7], [11, 12, 13, 14, 15], [1, 2]];
        const got = await Promise.all(prompts.map((p, i) => onDevice.generate(p, { ...opts, stream: i }).result));
        const want = await Promise.all(prompts.map((p, i) => onHost.generate(p, { ...opts, stream: i }).result));
        logCheck(`engine ${JSON.stringify(params)}`, got.map((r) => r.tokens.join(',')).join(' | '));
        expect(got.map((r) => r.tokens)).toEqual(want.map((r) => r.tokens));
      }
    } finally {
      await onDevice.close();
      await onHost.close();
    }
  });
});
