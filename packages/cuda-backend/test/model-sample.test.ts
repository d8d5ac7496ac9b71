/**
 * CudaModel's side of StepSequence.sample, against a stand-in for the native model (no GPU): which
 * rows become logits rows, the settings each gets, whether logits leave the device, and where the
 * drawn ids land. sample.gpu.test.ts checks the device side.
 */
import { describe, expect, it } from 'vitest';

import { rngKey, seedKey, type ModelSpec, type StepSample } from '@moeflash/core';

import { CudaModel } from '../src/index.js';
import type { NativeModel } from '../src/native.js';

const V = 10;
const H = 4;

interface Call {
  tokens: number;
  logitRows: number;
  copyLogits: boolean;
  decode: boolean;
  sample: Float64Array | null;
  logitIdx: number[];
}

function fakeModel(graphTokens = 4) {
  const calls: Call[] = [];
  const cfg = { maxTokens: 8, maxLogitRows: 8, pageSize: 4, numPages: 32, maxPagesPerSeq: 8, maxSeqLen: 32, graphTokens };
  const native: NativeModel = {
    upload() {},
    prepare: () => 0,
    step(inputs, tokens, logitRows, _maxLen, copyLogits, _hidden, decode, sample) {
      const logitIdx = Array.from(inputs.subarray(4 * cfg.maxTokens, 4 * cfg.maxTokens + logitRows));
      calls.push({ tokens, logitRows, copyLogits, decode, sample: sample?.slice() ?? null, logitIdx });
      return {
        // Each logits row's ids tell which token row it was: argmax 100 + row, drawn 200 + row.
        ids: Int32Array.from(logitIdx, (t) => 100 + t),
        logits: copyLogits ? new Float32Array(logitRows * V).fill(1) : null,
        hidden: null,
        sampled: sample ? Int32Array.from(logitIdx, (t) => 200 + t) : null,
        graph: decode,
      };
    },
    info: () => ({ weights: 0, kvCache: 0, activations: 0, graphs: 0, kvF32: false, drafter: 0, drafterKvCache: 0 }),
    timeGraphs: () => 0,
    dropGraphs() {},
    dispose() {},
    attachDrafter() {},
    uploadDrafter() {},
    round: () => {
      throw new Error('no drafter in this fake');
    },
  };
  const spec = { vocabSize: V, hiddenSize: H, numLayers: 2 } as unknown as ModelSpec;
  const Model = CudaModel as unknown as new (...a: unknown[]) => CudaModel;
  return { model: new Model(spec, native, cfg, 'bf16'), calls };
}

const draw = (temperature: number, position: number, extra: object = {}): StepSample => ({
  params: { temperature, seed: 2 ** 40 + 3, ...extra },
  key: rngKey(2 ** 40 + 3, 9, position, 2),
});

describe('CudaModel: StepSequence.sample', () => {
  it('reports sampling', () => {
    expect(fakeModel().model.sampling).toBe(true);
  });

  it('a prefill that returns no logits still computes its last row, draws from it and copies no logits', async () => {
    const { model, calls } = fakeModel();
    const s = draw(0.7, 5, { topK: 20, topP: 0.9, minP: 0.05 });
    const r = await model.step({ sequences: [{ seq: 1, tokens: [1, 2, 3, 4, 5], logits: 'none', sample: s }] });
    expect(calls).toHaveLength(1);
    expect(calls[0]!.logitIdx).toEqual([4]);
    expect(calls[0]!.copyLogits).toBe(false);
    const [lo, hi] = seedKey(2 ** 40 + 3);
    expect(Array.from(calls[0]!.sample!)).toEqual([0.7, 20, 0.9, 0.05, lo, hi, 9, 5, 2]);
    expect(r.sequences[0]!.sampled).toBe(204);
    expect(r.sequences[0]!.rows).toBe(0);
    expect(r.sequences[0]!.logits.length).toBe(0);
  });

  it('a decode batch mixes drawn, greedy-drawn and plain rows in one call', async () => {
    const { model, calls } = fakeModel();
    for (const seq of [1, 2, 3]) await model.step({ sequences: [{ seq, tokens: [1, 2], logits: 'none' }] });
    calls.length = 0;
    const r = await model.step({
      sequences: [
        { seq: 1, tokens: [7], logits: 'none', sample: draw(1, 3) },
        { seq: 2, tokens: [8], logits: 'last' },
        { seq: 3, tokens: [9], logits: 'last', sample: draw(0, 3) },
      ],
    });
    expect(calls).toHaveLength(1);
    const c = calls[0]!;
    expect(c.decode).toBe(true);
    expect(c.logitIdx).toEqual([0, 1, 2]);
    expect(c.copyLogits).toBe(true); // sequence 2 wants its logits
    expect(c.sample!.length).toBe(3 * 9);
    expect(c.sample![0]).toBe(1);
    expect(Array.from(c.sample!.subarray(9, 18))).toEqual(new Array(9).fill(0)); // not drawn: greedy filler
    expect(c.sample![18]).toBe(0);
    expect(r.sequences.map((o) => o.sampled)).toEqual([200, undefined, 202]);
    expect(r.sequences.map((o) => o.rows)).toEqual([0, 1, 1]);
    expect(r.sequences[1]!.logits.length).toBe(V);
  });

  it('steps without sample pass no settings and return no sampled ids', async () => {
    const { model, calls } = fakeModel();
    const r = await model.step({ sequences: [{ seq: 1, tokens: [1, 2, 3], logits: 'all' }] });
    expect(calls[0]!.sample).toBeNull();
    expect(calls[0]!.logitIdx).toEqual([0, 1, 2]);
    expect('sampled' in r.sequences[0]!).toBe(false);
  });

  it('rejects bad settings before anything runs', async () => {
    const { model, calls } = fakeModel();
    await expect(model.step({ sequences: [{ seq: 1, tokens: [1], logits: 'none', sample: draw(-1, 1) }] })).rejects.toThrow(/temperature/);
    await expect(
      model.step({ sequences: [{ seq: 1, tokens: [1], logits: 'none', sample: { params: { temperature: 1 }, key: { seed: 1, seq: -1, position: 1 } } }] }),
    ).rejects.toThrow(/seq/);
    expect(calls).toHaveLength(0);
    expect(model.length(1)).toBe(0);
  });
});
