import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import OpenAI from 'openai';
import { createEngine, type Engine } from '@moeflash/core';
import { tinyModel } from '../../../packages/core/test/helpers.js';
import { startServer, type RunningServer } from '../src/server.mjs';
import { raw } from './helpers.js';

describe('OpenAI-compatible server (official client, CPU, tiny model)', () => {
  let srv: RunningServer;
  let client: OpenAI;
  let solo: Engine;

  beforeAll(async () => {
    const dir = await tinyModel('qwen3_moe');
    srv = await startServer({ model: dir, backend: 'cpu', host: '127.0.0.1', port: 0, modelId: 'tiny', log: () => {}, bodyLimit: 64 * 1024, maxTokensLimit: 64 });
    client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'unused', maxRetries: 0 });
    solo = await createEngine({ model: dir, backend: 'cpu', log: () => {} });
  });
  afterAll(async () => {
    await srv?.close();
    await solo?.close();
  });

  it('lists its model', async () => {
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).toEqual(['tiny']);
    expect((await client.models.retrieve('tiny')).id).toBe('tiny');
    await expect(client.models.retrieve('other')).rejects.toMatchObject({ status: 404 });
  });

  it('answers chat completions, whole and streamed, with the engine’s greedy output', async () => {
    const messages = [{ role: 'system' as const, content: 'be brief' }, { role: 'user' as const, content: 'hello there' }];
    const want = await solo.chat(messages, { maxTokens: 12, temperature: 0, ignoreEos: true }).result;
    const whole = await client.chat.completions.create({ model: 'tiny', messages, max_tokens: 12, temperature: 0, ignore_eos: true } as OpenAI.ChatCompletionCreateParamsNonStreaming);
    expect(whole.object).toBe('chat.completion');
    expect(whole.choices[0].message.content).toBe(want.text);
    expect(whole.choices[0].finish_reason).toBe('length');
    expect(whole.usage).toEqual({ prompt_tokens: want.promptTokens, completion_tokens: 12, total_tokens: want.promptTokens + 12 });

    const stream = await client.chat.completions.create({ model: 'tiny', messages, max_completion_tokens: 12, temperature: 0, stream: true, stream_options: { include_usage: true }, ignore_eos: true } as OpenAI.ChatCompletionCreateParamsStreaming);
    let text = '';
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | undefined | null;
    for await (const chunk of stream) {
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices) {
        text += c.delta.content ?? '';
        finish = c.finish_reason ?? finish;
      }
    }
    expect(text).toBe(want.text);
    expect(finish).toBe('length');
    expect(usage?.completion_tokens).toBe(12);
  });

  it('answers text completions from a string or token ids', async () => {
    const want = await solo.generate('def add(a, b):', { maxTokens: 8, temperature: 0, ignoreEos: true }).result;
    const r = await client.completions.create({ model: 'tiny', prompt: 'def add(a, b):', max_tokens: 8, temperature: 0, ignore_eos: true } as OpenAI.CompletionCreateParamsNonStreaming);
    expect(r.choices[0].text).toBe(want.text);
    const ids = await solo.generate([5, 6, 7], { maxTokens: 8, temperature: 0, ignoreEos: true }).result;
    const s = await client.completions.create({ model: 'tiny', prompt: [5, 6, 7], max_tokens: 8, temperature: 0, stream: true, ignore_eos: true } as OpenAI.CompletionCreateParamsStreaming);
    let text = '';
    for await (const c of s) text += c.choices[0]?.text ?? '';
    expect(text).toBe(ids.text);
  });

  it('rejects bad requests with 4xx and OpenAI error JSON naming the field', async () => {
    const cases: Array<[Record<string, unknown>, number, RegExp, string | null]> = [
      [{ model: 'tiny', messages: [] }, 400, /messages/, 'messages'],
      [{ model: 'tiny', messages: [{ role: 'wizard', content: 'x' }] }, 400, /role/, 'messages[0].role'],
      [{ model: 'tiny', messages: [{ role: 'user', content: 'x' }], max_tokens: 1e9 }, 400, /max_tokens/, 'max_tokens'],
      [{ model: 'tiny', messages: [{ role: 'user', content: 'x' }], temperature: 'hot' }, 400, /temperature/, 'temperature'],
      [{ model: 'tiny', messages: [{ role: 'user', content: 'x' }], n: 3 }, 400, /not supported/, 'n'],
      [{ model: 'nope', messages: [{ role: 'user', content: 'x' }] }, 404, /does not exist/, 'model'],
    ];
    for (const [body, status, message, param] of cases) {
      const err = await client.chat.completions.create(body as never).then(
        () => null,
        (e) => e,
      );
      expect(err, JSON.stringify(body)).toBeInstanceOf(OpenAI.APIError);
      expect(err.status).toBe(status);
      expect(err.error.message).toMatch(message);
      expect(err.error.type).toBe('invalid_request_error');
      expect(err.error.param).toBe(param);
    }
    const tooLong = await raw(srv.url, 'POST', '/v1/completions', JSON.stringify({ model: 'tiny', prompt: 'x', max_tokens: 65 }));
    expect(tooLong.status).toBe(400);
    expect(tooLong.json.error.message).toMatch(/max_tokens.*64/);
  });

  it('answers malformed JSON with 400, an oversized body with 413, and unknown routes with 404/405', async () => {
    const bad = await raw(srv.url, 'POST', '/v1/chat/completions', '{"model": "tiny", "messages": [');
    expect(bad.status).toBe(400);
    expect(bad.json.error.message).toMatch(/not valid JSON/);
    const big = await raw(srv.url, 'POST', '/v1/chat/completions', JSON.stringify({ model: 'tiny', messages: [{ role: 'user', content: 'x'.repeat(100_000) }] }));
    expect(big.status).toBe(413);
    expect(big.json.error.code).toBe('request_too_large');
    expect((await raw(srv.url, 'GET', '/v1/nothing')).status).toBe(404);
    expect((await raw(srv.url, 'GET', '/v1/chat/completions')).status).toBe(405);
    expect((await raw(srv.url, 'POST', '/v1/models', '{}')).status).toBe(405);
    const metrics = await raw(srv.url, 'GET', '/metrics');
    expect(metrics.json.requests.completed).toBeGreaterThan(0);
  });

  it('aborts the engine request when the client disconnects', async () => {
    const before = srv.engine.stats().requests.aborted;
    const ac = new AbortController();
    const stream = await client.chat.completions.create(
      { model: 'tiny', messages: [{ role: 'user', content: 'go on' }], max_tokens: 64, temperature: 0, stream: true, ignore_eos: true } as OpenAI.ChatCompletionCreateParamsStreaming,
      { signal: ac.signal },
    );
    let n = 0;
    // The client ends the iteration quietly or with an abort error, depending on timing.
    try {
      for await (const _ of stream) if (++n === 3) ac.abort();
    } catch (e) {
      expect(String(e)).toMatch(/abort/i);
    }
    expect(n).toBe(3);
    for (let i = 0; i < 100 && srv.engine.stats().requests.aborted === before; i++) await new Promise((r) => setTimeout(r, 10));
    expect(srv.engine.stats().requests.aborted).toBe(before + 1);
    expect(srv.engine.stats().kvPages!.used).toBe(0);
  });
});
