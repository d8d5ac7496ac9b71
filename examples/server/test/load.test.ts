/**
 * 200 concurrent requests of mixed kinds and lengths through the server on loopback, 30% of them
 * aborted at random points: every request that is not aborted returns exactly what it returns
 * alone (greedy), the KV pool ends with no page held, and nothing rejects unhandled.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import OpenAI from 'openai';
import { createEngine, type Engine, type GenerateResult } from '@moeflash/core';
import { tinyModel } from '../../../packages/core/test/helpers.js';
import { startServer, type RunningServer } from '../src/server.mjs';

const REQUESTS = 200;
const ABORTED = 0.3;
const WORDS = ['def', 'return', 'class', 'import', 'print', 'self', 'value', 'for', 'in', 'range', 'if', 'else', 'list', 'dict', 'x', 'y', '(', ')', ':', '=', '+', '1', '2', 'hello', 'world'];
const SYSTEM = 'You are a careful assistant. Answer with code only. Tools: search(query), read(path), write(path, text).';

function rng(seed: number) {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

interface Spec {
  kind: 'chat' | 'completion';
  stream: boolean;
  text: string;
  /** A completion prompt given as token ids instead of text. */
  ids?: number[];
  system: boolean;
  maxTokens: number;
  ignoreEos: boolean;
  stop?: string[];
  abort?: { after: 'delay'; ms: number } | { after: 'chunks'; n: number };
}

function makeSpecs(): Spec[] {
  const r = rng(2024);
  const pick = <T,>(a: T[]) => a[Math.floor(r() * a.length)];
  return Array.from({ length: REQUESTS }, (_, i) => {
    const len = r() < 0.2 ? 20 + Math.floor(r() * 40) : 1 + Math.floor(r() * 8);
    const text = Array.from({ length: len }, () => pick(WORDS)).join(' ');
    const kind = r() < 0.5 ? 'chat' : 'completion';
    const stream = r() < 0.6;
    const spec: Spec = {
      kind,
      stream,
      text,
      system: kind === 'chat' && r() < 0.5,
      maxTokens: 1 + Math.floor(r() * 16),
      ignoreEos: r() < 0.7,
      stop: r() < 0.15 ? [pick(WORDS)] : undefined,
    };
    if (kind === 'completion' && r() < 0.3) spec.ids = Array.from({ length: len }, (_, j) => (i * 13 + j * 7) % 500);
    if (r() < ABORTED) spec.abort = stream && r() < 0.6 ? { after: 'chunks', n: 1 + Math.floor(r() * 4) } : { after: 'delay', ms: Math.floor(r() * 150) };
    return spec;
  });
}

function body(s: Spec) {
  const common = { model: 'tiny', max_tokens: s.maxTokens, temperature: 0, ignore_eos: s.ignoreEos, ...(s.stop && { stop: s.stop }) };
  if (s.kind === 'chat') {
    const messages = [...(s.system ? [{ role: 'system', content: SYSTEM }] : []), { role: 'user', content: s.text }];
    return { ...common, messages, stream: s.stream };
  }
  return { ...common, prompt: s.ids ?? s.text, stream: s.stream };
}

function alone(engine: Engine, s: Spec): Promise<GenerateResult> {
  const opts = { maxTokens: s.maxTokens, temperature: 0, ignoreEos: s.ignoreEos, stop: s.stop };
  if (s.kind === 'chat') {
    const messages = [...(s.system ? [{ role: 'system' as const, content: SYSTEM }] : []), { role: 'user' as const, content: s.text }];
    return engine.chat(messages, opts).result;
  }
  return engine.generate(s.ids ?? s.text, opts).result;
}

interface Outcome {
  text: string;
  finish: string | null;
  completionTokens?: number;
}

async function call(client: OpenAI, s: Spec): Promise<Outcome | 'aborted'> {
  const ac = new AbortController();
  let timer: NodeJS.Timeout | undefined;
  if (s.abort?.after === 'delay') timer = setTimeout(() => ac.abort(), s.abort.ms);
  const b = body(s) as never;
  try {
    if (!s.stream) {
      const r: any = s.kind === 'chat' ? await client.chat.completions.create(b, { signal: ac.signal }) : await client.completions.create(b, { signal: ac.signal });
      const c = r.choices[0];
      return { text: s.kind === 'chat' ? c.message.content : c.text, finish: c.finish_reason, completionTokens: r.usage.completion_tokens };
    }
    const stream = (s.kind === 'chat' ? await client.chat.completions.create(b, { signal: ac.signal }) : await client.completions.create(b, { signal: ac.signal })) as unknown as AsyncIterable<any>;
    let text = '';
    let finish: string | null = null;
    let chunks = 0;
    for await (const chunk of stream) {
      for (const c of chunk.choices) {
        text += (s.kind === 'chat' ? c.delta?.content : c.text) ?? '';
        finish = c.finish_reason ?? finish;
      }
      if (s.abort?.after === 'chunks' && ++chunks === s.abort.n) {
        ac.abort();
        break;
      }
    }
    return ac.signal.aborted ? 'aborted' : { text, finish };
  } catch (e) {
    if (ac.signal.aborted) return 'aborted';
    throw e;
  } finally {
    clearTimeout(timer);
  }
}

describe('server under load: 200 concurrent requests, 30% aborted', () => {
  let srv: RunningServer;
  let solo: Engine;
  const unhandled: unknown[] = [];
  const onUnhandled = (e: unknown) => unhandled.push(e);

  beforeAll(async () => {
    process.on('unhandledRejection', onUnhandled);
    const dir = await tinyModel('qwen3_moe');
    // A pool too small for the whole load at once, so the run also preempts and recomputes.
    srv = await startServer({ model: dir, backend: 'cpu', host: '127.0.0.1', port: 0, modelId: 'tiny', log: () => {}, maxBatch: 32, maxStepTokens: 192, kvCache: { pageSize: 2, pages: 110 } });
    solo = await createEngine({ model: dir, backend: 'cpu', log: () => {} });
  });
  afterAll(async () => {
    process.off('unhandledRejection', onUnhandled);
    await srv?.close();
    await solo?.close();
  });

  it('every request that is not aborted matches its solo run; no page leaks; no unhandled rejection', async () => {
    const specs = makeSpecs();
    const client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 120_000 });
    const outcomes = await Promise.all(specs.map((s) => call(client, s)));

    let compared = 0;
    for (let i = 0; i < specs.length; i++) {
      const got = outcomes[i];
      if (got === 'aborted') {
        expect(specs[i].abort, `request ${i} was not meant to abort`).toBeDefined();
        continue;
      }
      const want = await alone(solo, specs[i]);
      expect(got.text, `request ${i}: ${JSON.stringify(specs[i])}`).toBe(want.text);
      expect(got.finish).toBe(want.finishReason === 'length' ? 'length' : 'stop');
      if (got.completionTokens !== undefined) expect(got.completionTokens).toBe(want.tokens.length);
      compared++;
    }
    expect(compared).toBeGreaterThanOrEqual(REQUESTS * (1 - ABORTED) - 20);

    // Aborts reach the scheduler at its next step (a request aborted before its body arrived
    // never reaches the engine); then the pool must be whole again.
    const engine = srv.engine;
    for (let quiet = 0, i = 0; quiet < 5 && i < 500; i++) {
      await new Promise((r) => setTimeout(r, 10));
      const q = engine.stats().requests;
      quiet = q.running + q.queued === 0 ? quiet + 1 : 0;
    }
    const st = engine.stats();
    if (process.env.MOEFLASH_LOAD_STATS) console.log(JSON.stringify(st));
    expect(st.requests.completed).toBeGreaterThanOrEqual(compared);
    expect(st.requests.completed + st.requests.aborted).toBeLessThanOrEqual(REQUESTS);
    expect(st.requests.failed).toBe(0);
    expect(st.requests.running + st.requests.queued).toBe(0);
    expect(st.kvPages!.used).toBe(0);
    expect(st.kvPages!.free + st.kvPages!.cached).toBe(st.kvPages!.total);
    expect(st.requests.aborted).toBeGreaterThan(10);
    expect(st.preemptions).toBeGreaterThan(0);
    expect(st.batchOccupancy * st.maxBatch).toBeGreaterThan(4);
    expect(st.prefixCache.hitTokens).toBeGreaterThan(0);
    expect(unhandled).toEqual([]);
  });
});
