/**
 * Sampling on the backend (StepSequence.sample): the engine hands the draw to a model that
 * reports `sampling`, and gets the very token it would have drawn from the returned logits.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  argmax,
  createEngine,
  MoeflashError,
  rngKey,
  sampleToken,
  sampleTokenOrReject,
  type Engine,
  type SamplingParams,
  type StepPlan,
} from '@moeflash/core';
import { tinyModel } from './helpers.js';

describe('sampleTokenOrReject', () => {
  const row = Float32Array.from({ length: 50 }, (_, i) => Math.sin(i * 1.7) * 3);
  const key = rngKey(5, 1, 9);

  it('is sampleToken, and argmax when greedy', () => {
    for (const params of [{ temperature: 0.8 }, { temperature: 1, topK: 5, topP: 0.9, minP: 0.05 }] as SamplingParams[]) {
      expect(sampleTokenOrReject(row, params, key)).toBe(sampleToken(row, params, key));
    }
    expect(sampleTokenOrReject(row, { temperature: 0 }, key)).toBe(argmax(row));
  });

  it('gives -1 where sampleToken throws on the logits, and still throws on bad settings', () => {
    const bad = row.slice();
    bad[3] = NaN;
    expect(() => sampleToken(bad, { temperature: 1 }, key)).toThrow(MoeflashError);
    expect(sampleTokenOrReject(bad, { temperature: 1 }, key)).toBe(-1);
    expect(sampleTokenOrReject(bad, { temperature: 0 }, key)).toBe(argmax(bad));
    expect(sampleTokenOrReject(new Float32Array(4).fill(-Infinity), { temperature: 1 }, key)).toBe(-1);
    expect(() => sampleTokenOrReject(row, { temperature: -1 }, key)).toThrow(/temperature/);
    expect(() => sampleTokenOrReject(row, { temperature: 1 }, key, { offset: 60 })).toThrow(/offset/);
  });
});

describe('engine: the CPU backend samples in its step, token for token as the engine did', () => {
  let onBackend: Engine;
  let onHost: Engine;
  const plans: StepPlan[] = [];

  beforeAll(async () => {
    const dir = await tinyModel('qwen3_moe');
    onBackend = await createEngine({ model: dir, backend: 'cpu', log: () => {} });
    onHost = await createEngine({ model: dir, backend: 'cpu', log: () => {} });
    // The second engine's model stops offering to sample: the engine draws from the logits.
    Object.defineProperty(onHost.model, 'sampling', { value: false });
    const step = onBackend.model.step.bind(onBackend.model);
    onBackend.model.step = (plan) => {
      plans.push(plan);
      return step(plan);
    };
  });
  afterAll(async () => {
    await onBackend.close();
    await onHost.close();
  });

  it.each([
    [{ temperature: 0 }],
    [{ temperature: 1, seed: 3 }],
    [{ temperature: 0.7, topK: 20, topP: 0.9, minP: 0.05, seed: 11 }],
    [{ temperature: 1.3, topP: 0.5, seed: 2 ** 40 }],
  ] as [SamplingParams][])('%j', async (params) => {
    plans.length = 0;
    const opts = { ...params, maxTokens: 12, ignoreEos: true };
    const prompts = [[5, 6, 7], [11, 12, 13, 14, 15]];
    const got = await Promise.all(prompts.map((p, i) => onBackend.generate(p, { ...opts, stream: i }).result));
    const want = await Promise.all(prompts.map((p, i) => onHost.generate(p, { ...opts, stream: i }).result));
    expect(got.map((r) => r.tokens)).toEqual(want.map((r) => r.tokens));
    // Every step that produced a token asked the backend for it and for no logits.
    const drawn = plans.flatMap((p) => p.sequences).filter((s) => s.sample);
    expect(drawn.length).toBe(2 * 12);
    expect(drawn.every((s) => s.logits === 'none')).toBe(true);
  });
});
