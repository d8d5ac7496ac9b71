import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import path from 'node:path';
import { createEngine, rowLogprobs, type Engine, type TokenLogprob } from '@moeflash/core';
import { repoRoot } from './helpers.js';

const MODEL = path.join(repoRoot, 'models', 'moeflash-tiny-coder');

describe('rowLogprobs', () => {
  it('is the float64 log-softmax of the row, top K most likely first (ties: lower id)', () => {
    const V = 300;
    const logits = new Float32Array(V).map((_, i) => Math.sin(i * 1.7) * 9);
    logits[17] = logits[5]!; // a tie
    let max = -Infinity;
    for (const v of logits) max = Math.max(max, v);
    let sum = 0;
    for (const v of logits) sum += Math.exp(v - max);
    const expected = (i: number) => logits[i]! - max - Math.log(sum);
    const r = rowLogprobs(logits, 42, 6);
    expect(r.logprob).toBeCloseTo(expected(42), 12);
    const order = [...Array(V).keys()].sort((a, b) => logits[b]! - logits[a]! || a - b).slice(0, 6);
    expect(r.top.map((t) => t.token)).toEqual(order);
    r.top.forEach((t) => expect(t.logprob).toBeCloseTo(expected(t.token), 12));
    // A row inside a larger buffer.
    const two = new Float32Array(2 * V);
    two.set(logits, V);
    expect(rowLogprobs(two, 42, 6, V, V)).toEqual(r);
  });
});

describe('generate({ logprobs }) (CPU backend, bundled model)', () => {
  let engine: Engine;
  beforeAll(async () => {
    engine = await createEngine({ model: MODEL, backend: 'cpu', log: () => {} });
  });
  afterAll(() => engine.close());

  it('greedy: each token is its own top alternative; chunks carry the same entries as the result', async () => {
    const stream = engine.generate('def add(a, b):', { maxTokens: 24, temperature: 0, logprobs: true, topLogprobs: 5, ignoreEos: true });
    const fromChunks: TokenLogprob[] = [];
    for await (const c of stream) {
      expect(c.logprobs?.length ?? 0).toBe(c.tokens.length);
      fromChunks.push(...(c.logprobs ?? []));
    }
    const r = await stream.result;
    expect(r.logprobs).toEqual(fromChunks);
    expect(r.logprobs!.map((l) => l.token)).toEqual(r.tokens);
    for (const l of r.logprobs!) {
      expect(l.top).toHaveLength(5);
      expect(l.top[0]!.token).toBe(l.token);
      expect(l.logprob).toBe(l.top[0]!.logprob);
      for (let i = 1; i < 5; i++) expect(l.top[i]!.logprob).toBeLessThanOrEqual(l.top[i - 1]!.logprob);
      expect(l.top.reduce((s, t) => s + Math.exp(t.logprob), 0)).toBeLessThanOrEqual(1 + 1e-9);
      expect(l.text).toBe(engine.tokenizer.decode([l.token]));
      expect(Buffer.from(l.bytes).toString('utf8')).toBe(l.text.includes('\uFFFD') ? Buffer.from(l.bytes).toString('utf8') : l.text);
    }
  });

  it('without topLogprobs reports the chosen token only; without logprobs reports nothing', async () => {
    const a = await engine.generate('import os', { maxTokens: 6, logprobs: true, temperature: 0.8, seed: 3, ignoreEos: true }).result;
    expect(a.logprobs).toHaveLength(6);
    for (const l of a.logprobs!) {
      expect(l.top).toEqual([]);
      expect(l.logprob).toBeLessThanOrEqual(0);
    }
    const b = await engine.generate('import os', { maxTokens: 6, temperature: 0.8, seed: 3, ignoreEos: true }).result;
    expect(b.logprobs).toBeUndefined();
    expect(b.tokens).toEqual(a.tokens);
  });

  it('under a grammar, logprobs are the model\'s own (before the mask)', async () => {
    const r = await engine.generate('def f():', { maxTokens: 12, temperature: 0, logprobs: true, topLogprobs: 3, responseFormat: { type: 'json_schema', schema: { type: 'object', properties: { a: { type: 'integer' } }, required: ['a'] } } }).result;
    expect(r.text.startsWith('{"a": ')).toBe(true);
    // Python code is what the model expects after "def f():", not '{': the chosen token is not its top choice.
    expect(r.logprobs![0]!.token).not.toBe(r.logprobs![0]!.top[0]!.token);
    expect(r.logprobs![0]!.logprob).toBeLessThan(r.logprobs![0]!.top[0]!.logprob);
  });

  it('speculative decoding reports the same logprobs as plain decoding', async () => {
    const spec = await createEngine({ model: MODEL, backend: 'cpu', log: () => {}, speculative: { method: 'prompt-lookup', blockSize: 4 } });
    try {
      const prompt = 'def add(a, b):\n    return a + b\n\ndef add(a, b):\n';
      const a = await engine.generate(prompt, { maxTokens: 24, temperature: 0, logprobs: true, topLogprobs: 2, ignoreEos: true }).result;
      const b = await spec.generate(prompt, { maxTokens: 24, temperature: 0, logprobs: true, topLogprobs: 2, ignoreEos: true }).result;
      expect(b.speculation!.acceptedTokens).toBeGreaterThan(0);
      expect(b.tokens).toEqual(a.tokens);
      expect(b.logprobs).toEqual(a.logprobs);
    } finally {
      await spec.close();
    }
  });
});
