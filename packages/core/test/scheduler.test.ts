import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createEngine, MoeflashError, type Engine, type EngineOptions, type GenerateOptions, type StepInfo } from '@moeflash/core';
import { synthesizeDflashDraft } from '@moeflash/speculative';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { tinyModel } from './helpers.js';

const greedy: GenerateOptions = { temperature: 0, ignoreEos: true };
const prompt = (seed: number, len: number) => Array.from({ length: len }, (_, i) => (seed * 31 + i * 7) % 500);

describe('scheduler: continuous batching, paged KV, back-pressure (CPU, tiny qwen3_moe)', () => {
  let dir: string;
  let plain: Engine;
  const engines: Engine[] = [];
  const make = async (opts: Partial<EngineOptions> = {}) => {
    const e = await createEngine({ model: dir, backend: 'cpu', log: () => {}, ...opts });
    engines.push(e);
    return e;
  };
  /** Greedy output of each prompt run alone, the reference every batched run must match. */
  const alone = new Map<string, number[]>();
  const reference = async (p: number[], maxTokens: number) => {
    const key = `${p.join()}/${maxTokens}`;
    if (!alone.has(key)) alone.set(key, (await plain.generate(p, { ...greedy, maxTokens }).result).tokens);
    return alone.get(key)!;
  };

  beforeAll(async () => {
    dir = await tinyModel('qwen3_moe');
    plain = await make();
  });
  afterAll(async () => {
    for (const e of engines) await e.close();
  });

  it('requests join a running batch at step boundaries and match their solo output', async () => {
    const e = await make({ maxBatch: 4 });
    const steps: StepInfo[] = [];
    e.on('step', (s) => steps.push(s));
    const first = e.generate(prompt(1, 5), { ...greedy, maxTokens: 24 });
    const late: Promise<number[]>[] = [];
    let n = 0;
    for await (const c of first) {
      n += c.tokens.length;
      if (n === 4 || n === 9) late.push(e.generate(prompt(n, 7), { ...greedy, maxTokens: 6 }).result.then((r) => r.tokens));
    }
    expect((await first.result).tokens).toEqual(await reference(prompt(1, 5), 24));
    expect(await late[0]).toEqual(await reference(prompt(4, 7), 6));
    expect(await late[1]).toEqual(await reference(prompt(9, 7), 6));
    expect(Math.max(...steps.map((s) => s.sequences))).toBeGreaterThan(1);
    expect(steps.every((s) => s.sequences <= 4)).toBe(true);
  });

  it('prefills a long prompt in chunks without stalling running decodes', async () => {
    const e = await make({ maxStepTokens: 16 });
    const steps: StepInfo[] = [];
    e.on('step', (s) => steps.push(s));
    const short = e.generate(prompt(2, 3), { ...greedy, maxTokens: 8 });
    await short[Symbol.asyncIterator]().next(); // the short request is decoding
    let shortDoneAt = 0;
    void short.result.then(() => (shortDoneAt = performance.now()));
    const submitted = performance.now();
    const long = await e.generate(prompt(3, 200), { ...greedy, maxTokens: 3 }).result;
    expect(shortDoneAt).toBeGreaterThan(0);
    expect(shortDoneAt).toBeLessThan(submitted + long.timeToFirstToken * 1000);
    expect((await short.result).tokens).toEqual(await reference(prompt(2, 3), 8));
    expect(long.tokens).toEqual(await reference(prompt(3, 200), 3));
    expect(steps.every((s) => s.tokens <= 16)).toBe(true);
    expect(steps.filter((s) => s.prefillTokens > 0 && s.decodeTokens > 0).length).toBeGreaterThanOrEqual(6);
  });

  it('admits by priority, then first come first served', async () => {
    const e = await make({ maxBatch: 1 });
    const order: number[] = [];
    e.on('request:start', (s) => order.push(s.promptTokens));
    await Promise.all([
      e.generate(prompt(5, 1), { ...greedy, maxTokens: 2 }).result,
      e.generate(prompt(5, 2), { ...greedy, maxTokens: 2 }).result,
      e.generate(prompt(5, 3), { ...greedy, maxTokens: 2, priority: 5 }).result,
      e.generate(prompt(5, 4), { ...greedy, maxTokens: 2 }).result,
      e.generate(prompt(5, 5), { ...greedy, maxTokens: 2, priority: 1 }).result,
    ]);
    expect(order).toEqual([3, 5, 1, 2, 4]);
  });

  it('preempts the youngest sequence when the pool runs dry, recomputes it, and leaks no page', async () => {
    const e = await make({ kvCache: { pageSize: 4, pages: 24 }, maxBatch: 8 });
    const preempted: number[] = [];
    e.on('request:preempted', (p) => preempted.push(p.positions));
    const prompts = Array.from({ length: 8 }, (_, i) => prompt(20 + i, 6 + (i % 3) * 5));
    const results = await Promise.all(prompts.map((p) => e.generate(p, { ...greedy, maxTokens: 20 }).result));
    for (let i = 0; i < prompts.length; i++) expect(results[i].tokens).toEqual(await reference(prompts[i], 20));
    expect(preempted.length).toBeGreaterThan(0);
    expect(results.some((r) => r.preemptions > 0)).toBe(true);
    const s = e.stats();
    expect(s.preemptions).toBe(preempted.length);
    expect(s.kvPages).toMatchObject({ used: 0 });
    expect(s.kvPages!.free + s.kvPages!.cached).toBe(24);
  });

  it('speculative requests keep greedy output through chunked prefill and preemption', async () => {
    const draft = fs.mkdtempSync(path.join(os.tmpdir(), 'moeflash-sched-dflash-'));
    await synthesizeDflashDraft(dir, draft, { blockSize: 4, numLayers: 1, seed: 3, intermediateSize: 64 });
    for (const speculative of [{ method: 'dflash' as const, draft, blockSize: 4 }, { method: 'prompt-lookup' as const, blockSize: 3 }]) {
      const e = await make({ speculative, kvCache: { pageSize: 4, pages: 12 }, maxStepTokens: 12, maxBatch: 6 });
      const prompts = Array.from({ length: 6 }, (_, i) => [...prompt(40 + i, 9 + i * 2), ...prompt(40 + i, 6)]);
      const results = await Promise.all(prompts.map((p) => e.generate(p, { ...greedy, maxTokens: 16 }).result));
      for (let i = 0; i < prompts.length; i++) expect(results[i].tokens).toEqual(await reference(prompts[i], 16));
      expect(e.stats().preemptions).toBeGreaterThan(0);
      expect(e.stats().kvPages!.used).toBe(0);
      await e.close();
    }
  });

  it('rejects a request that could never fit, with a clear error', async () => {
    const e = await make({ kvCache: { pageSize: 4, pages: 8 } });
    let err: unknown;
    try {
      e.generate(prompt(1, 10), { ...greedy, maxTokens: 30 });
    } catch (x) {
      err = x;
    }
    expect(err).toBeInstanceOf(MoeflashError);
    expect((err as MoeflashError).code).toBe('OUT_OF_MEMORY');
    expect((err as Error).message).toMatch(/can never fit.*40 positions.*8 pages/);
    expect(e.stats().requests.rejected).toBe(1);
    expect((await e.generate(prompt(1, 10), { ...greedy, maxTokens: 20 }).result).tokens).toEqual(await reference(prompt(1, 10), 20));
  });

  it('an abort ends a request within a step, queued or running, and frees its pages', async () => {
    const e = await make({ maxBatch: 1 });
    const ac = new AbortController();
    const queuedAc = new AbortController();
    const running = e.generate(prompt(7, 9), { ...greedy, maxTokens: 200, signal: ac.signal });
    const queued = e.generate(prompt(8, 9), { ...greedy, maxTokens: 200, signal: queuedAc.signal });
    queuedAc.abort();
    let n = 0;
    let stepsAfter = -1;
    e.on('step', () => stepsAfter >= 0 && stepsAfter++);
    for await (const c of running) {
      n += c.tokens.length;
      if (n === 5) {
        ac.abort();
        stepsAfter = 0;
      }
    }
    expect((await running.result).finishReason).toBe('abort');
    expect((await queued.result).finishReason).toBe('abort');
    expect((await queued.result).tokens).toEqual([]);
    expect(stepsAfter).toBeLessThanOrEqual(1);
    expect(e.stats().kvPages!.used).toBe(0);
    expect(e.stats().requests.aborted).toBe(2);
  });

  it('breaking out of the stream aborts the request', async () => {
    const e = await make();
    const s = e.generate(prompt(9, 4), { ...greedy, maxTokens: 100 });
    for await (const c of s) if (c.tokens.length) break;
    const r = await s.result;
    expect(r.finishReason).toBe('abort');
    expect(r.tokens.length).toBeLessThan(100);
    expect(e.stats().kvPages!.used).toBe(0);
  });

  it('pauses a slow consumer at its buffer bound without holding back the batch', async () => {
    const e = await make({ streamBuffer: 3 });
    const slow = e.generate(prompt(10, 4), { ...greedy, maxTokens: 30 });
    const it0 = slow[Symbol.asyncIterator]();
    await it0.next(); // iterating: the buffer bound applies from now on
    const fast = await e.generate(prompt(11, 4), { ...greedy, maxTokens: 30 }).result;
    expect(fast.tokens).toEqual(await reference(prompt(11, 4), 30));
    expect(e.stats().requests.paused).toBe(1);
    const tokens: number[] = [];
    const first = await it0.next();
    tokens.push(...(first.value?.tokens ?? []));
    for (let r = await it0.next(); !r.done; r = await it0.next()) {
      tokens.push(...r.value.tokens);
      await new Promise((res) => setTimeout(res, 1));
    }
    const r = await slow.result;
    expect(r.tokens.slice(1)).toEqual(tokens);
    expect(r.tokens).toEqual(await reference(prompt(10, 4), 30));
  });

  it('reuses a shared prompt prefix and reports it in stats and results', async () => {
    const e = await make({ kvCache: { pageSize: 8 } });
    const system = prompt(12, 40);
    const a = await e.generate([...system, 1, 2], { ...greedy, maxTokens: 4 }).result;
    const b = await e.generate([...system, 3, 4, 5], { ...greedy, maxTokens: 4 }).result;
    expect(a.cachedPromptTokens).toBe(0);
    expect(b.cachedPromptTokens).toBe(40);
    expect(b.tokens).toEqual(await reference([...system, 3, 4, 5], 4));
    const s = e.stats();
    expect(s.prefixCache.hitTokens).toBe(40);
    expect(s.prefixCache.hitRate).toBeCloseTo(40 / 85);
    expect(s.requests.completed).toBe(2);
    expect(s.steps).toBeGreaterThan(0);
    expect(s.batchOccupancy).toBeGreaterThan(0);
    expect(s.meanTimeToFirstToken).toBeGreaterThan(0);
    expect(b.queueTime).toBeGreaterThanOrEqual(0);
    expect(b.timeToFirstToken).toBeGreaterThanOrEqual(b.queueTime);
  });

  it('close drains running requests, or fails them, and releases every page', async () => {
    const d = await make();
    const r1 = d.generate(prompt(13, 4), { ...greedy, maxTokens: 10 }).result;
    await d.close({ drain: true });
    expect((await r1).tokens).toEqual(await reference(prompt(13, 4), 10));
    expect(() => d.generate([1], {})).toThrow(/closed/);

    const a = await make();
    const r2 = a.generate(prompt(14, 4), { ...greedy, maxTokens: 1000 });
    const r3 = a.generate(prompt(15, 4), { ...greedy, maxTokens: 1000 });
    await r2[Symbol.asyncIterator]().next();
    const kv = a.model.kvPages!;
    await a.close();
    await expect(r2.result).rejects.toThrow(/closed/);
    await expect(r3.result).rejects.toThrow(/closed/);
    expect(kv.call(a.model).used).toBe(0);
  });
});

describe('scheduler options', () => {
  it('are checked before the model loads', async () => {
    const dir = await tinyModel('qwen3_moe');
    await expect(createEngine({ model: dir, backend: 'cpu', maxStepTokens: 0 })).rejects.toThrow(/maxStepTokens must be a positive integer/);
    await expect(createEngine({ model: dir, backend: 'cpu', streamBuffer: 1.5 })).rejects.toThrow(/streamBuffer/);
  });
});
