import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createEngine, type Engine, type LoadProgress } from '@moeflash/core';
import { tinyModel } from './helpers.js';

describe('Engine (CPU backend, tiny qwen3_moe)', () => {
  let engine: Engine;
  const progress: LoadProgress[] = [];
  let steps = 0;

  beforeAll(async () => {
    const dir = await tinyModel('qwen3_moe');
    engine = await createEngine({ model: dir, backend: 'cpu', on: { 'load:progress': (p) => progress.push(p) } });
    engine.on('step', () => steps++);
  });
  afterAll(() => engine.close());

  it('reports load progress up to every byte', () => {
    expect(progress.length).toBeGreaterThan(5);
    const last = progress[progress.length - 1];
    expect(last.loadedBytes).toBe(last.totalBytes);
    expect(last.loadedTensors).toBe(last.totalTensors);
  });

  it('streams chunks whose text and tokens add up to the result', async () => {
    const stream = engine.generate('def add(a, b):', { maxTokens: 12, ignoreEos: true });
    let text = '';
    const tokens: number[] = [];
    for await (const c of stream) {
      text += c.text;
      tokens.push(...c.tokens);
    }
    const r = await stream.result;
    expect(r.tokens).toEqual(tokens);
    expect(r.text).toBe(text);
    expect(r.tokens.length).toBe(12);
    expect(r.finishReason).toBe('length');
    expect(text).toBe(engine.tokenizer.decode(tokens));
    expect(steps).toBeGreaterThan(0);
  });

  it('greedy decoding is deterministic and a seed reproduces a sampled run', async () => {
    const run = async (opts: object) => (await engine.generate([5, 6, 7], { maxTokens: 10, ignoreEos: true, ...opts }).result).tokens;
    expect(await run({ temperature: 0 })).toEqual(await run({ temperature: 0 }));
    const a = await run({ temperature: 1, seed: 42 });
    expect(await run({ temperature: 1, seed: 42 })).toEqual(a);
    const others = await Promise.all([1, 2, 3].map((seed) => run({ temperature: 1, seed })));
    expect(others.some((o) => o.join() !== a.join())).toBe(true);
  });

  it('concurrent requests give the same output as alone (greedy)', async () => {
    const prompts = [[1, 2, 3], [100, 200], [7, 7, 7, 7, 7]];
    const alone: number[][] = [];
    for (const p of prompts) alone.push((await engine.generate(p, { maxTokens: 8, ignoreEos: true, temperature: 0 }).result).tokens);
    const together = await Promise.all(prompts.map((p) => engine.generate(p, { maxTokens: 8, ignoreEos: true, temperature: 0 }).result));
    expect(together.map((r) => r.tokens)).toEqual(alone);
  });

  it('an AbortSignal ends the stream within a step with finishReason abort', async () => {
    const ac = new AbortController();
    const stream = engine.generate([1, 2, 3], { maxTokens: 200, ignoreEos: true, signal: ac.signal });
    let n = 0;
    for await (const c of stream) {
      n += c.tokens.length;
      if (n === 3) ac.abort();
    }
    const r = await stream.result;
    expect(r.finishReason).toBe('abort');
    expect(r.tokens.length).toBeLessThanOrEqual(4);
  });

  it('stop strings end generation and never appear in the output', async () => {
    const free = await engine.generate([9, 10, 11], { maxTokens: 24, ignoreEos: true, temperature: 0 }).result;
    const stop = free.text.slice(5, 7);
    if (stop.length < 2) return; // the random model produced too little text to cut
    const cut = await engine.generate([9, 10, 11], { maxTokens: 24, ignoreEos: true, temperature: 0, stop: [stop] }).result;
    expect(cut.finishReason).toBe('stop');
    expect(cut.text).toBe(free.text.slice(0, free.text.indexOf(stop)));
  });

  it('chat applies the template and generates', async () => {
    const r = await engine.chat([{ role: 'user', content: 'hi' }], { maxTokens: 4, ignoreEos: true }).result;
    expect(r.tokens.length).toBe(4);
    expect(r.promptTokens).toBeGreaterThan(3);
  });

  it('stops at the end of the context and rejects prompts that do not fit', async () => {
    const context = engine.spec.attention.maxPositionEmbeddings;
    const long = Array.from({ length: context - 3 }, (_, i) => (i * 7) % 500);
    const r = await engine.generate(long, { maxTokens: 10, ignoreEos: true, temperature: 0 }).result;
    expect(r.tokens.length).toBe(3);
    expect(r.finishReason).toBe('length');
    expect(() => engine.generate([...long, 1, 2, 3], { maxTokens: 1 })).toThrow(/context holds/);
  });

  it('rejects bad options with errors naming the field', () => {
    expect(() => engine.generate('x', { temperature: -1 })).toThrow(/temperature/);
    expect(() => engine.generate('x', { maxTokens: -3 })).toThrow(/maxTokens/);
    expect(() => engine.generate([], {})).toThrow(/empty/);
  });
});

describe('createEngine errors', () => {
  it('names the missing config.json', async () => {
    await expect(createEngine({ model: '/nonexistent/model', backend: 'cpu' })).rejects.toThrow(/config\.json|tokenizer/);
  });
  it('names an unknown backend', async () => {
    const dir = await tinyModel('qwen3_moe');
    await expect(createEngine({ model: dir, backend: 'tpu' as never })).rejects.toThrow(/unknown backend 'tpu'/);
  });
  it('backend cuda without a GPU or addon says why', async () => {
    const dir = await tinyModel('qwen3_moe');
    await expect(createEngine({ model: dir, backend: 'cuda' })).rejects.toThrow(/cuda.*unavailable/i);
  });
});
