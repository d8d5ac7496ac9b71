/**
 * The server facing a network: where it listens, the API key, the cap on concurrent requests,
 * prompts longer than the context, header and idle timeouts, and clients that go away mid-stream.
 */
import net from 'node:net';
import { EventEmitter } from 'node:events';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import OpenAI from 'openai';
import { tinyModel } from '../../../packages/core/test/helpers.js';
import { apiKeyCheck, isLoopback } from '../src/guard.mjs';
import { sseWriter, startServer, type RunningServer } from '../src/server.mjs';
import { raw } from './helpers.js';

const KEY = 'sk-test-0123456789abcdef';
const IDLE_MS = 500;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A raw TCP connection: what it receives, and when the server closes it. */
function connect(url: string): Promise<{ socket: net.Socket; received: () => string; closed: Promise<number> }> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve, reject) => {
    const socket = net.connect(Number(port), hostname, () => {
      const t0 = performance.now();
      let text = '';
      socket.on('data', (d) => (text += d.toString('utf8')));
      const closed = new Promise<number>((r) => socket.on('close', () => r(performance.now() - t0)));
      resolve({ socket, received: () => text, closed });
    });
    socket.on('error', reject);
  });
}

describe('server hardening (CPU, tiny model)', () => {
  let dir: string;
  let srv: RunningServer;
  const logs: string[] = [];

  beforeAll(async () => {
    dir = await tinyModel('qwen3_moe');
    srv = await startServer({
      model: dir, backend: 'cpu', port: 0, modelId: 'tiny', log: (l) => logs.push(l),
      apiKey: KEY, maxConcurrentRequests: 2, headerTimeoutMs: 200, idleTimeoutMs: IDLE_MS,
    });
  });
  afterAll(async () => {
    await srv?.close();
  });

  const auth = { authorization: `Bearer ${KEY}` };

  it('listens on 127.0.0.1 unless told otherwise, and warns when it is exposed without a key', async () => {
    expect((srv.server.address() as net.AddressInfo).address).toBe('127.0.0.1');
    expect(logs.some((l) => /without --api-key/.test(l))).toBe(false);
    const open: string[] = [];
    const exposed = await startServer({ model: dir, backend: 'cpu', host: '0.0.0.0', port: 0, log: (l) => open.push(l) });
    expect((exposed.server.address() as net.AddressInfo).address).toBe('0.0.0.0');
    expect(open.join('\n')).toMatch(/listening on 0\.0\.0\.0 without --api-key: anyone who can reach this address can use the model/);
    await exposed.close();
    expect(['127.0.0.1', '127.3.4.5', '::1', 'localhost'].every(isLoopback)).toBe(true);
    expect(['0.0.0.0', '::', '10.0.0.1', '192.168.1.2'].some(isLoopback)).toBe(false);
  });

  it('requires the API key on every route but /health, from the official client too', async () => {
    const none = await raw(srv.url, 'GET', '/v1/models');
    expect(none.status).toBe(401);
    expect(none.json.error).toMatchObject({ code: 'invalid_api_key', type: 'invalid_request_error' });
    expect(none.json.error.message).toMatch(/Authorization: Bearer/);
    for (const wrong of ['x', KEY.slice(0, -1), `${KEY}0`, KEY.toUpperCase(), 'y'.repeat(10_000)]) {
      const r = await raw(srv.url, 'GET', '/metrics', undefined, { authorization: `Bearer ${wrong}` });
      expect(r.status, wrong.slice(0, 20)).toBe(401);
      expect(r.json.error.message).toBe('incorrect API key');
    }
    const chat = await raw(srv.url, 'POST', '/v1/chat/completions', JSON.stringify({ model: 'tiny', messages: [{ role: 'user', content: 'x' }] }));
    expect(chat.status).toBe(401);
    expect((await raw(srv.url, 'GET', '/health')).status).toBe(200);
    expect((await raw(srv.url, 'GET', '/v1/models', undefined, { 'x-api-key': KEY })).status).toBe(200);

    const good = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: KEY, maxRetries: 0 });
    const r = await good.completions.create({ model: 'tiny', prompt: 'def f(', max_tokens: 3, temperature: 0 });
    expect(r.choices[0].finish_reason).toBeTruthy();
    const bad = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'nope', maxRetries: 0 });
    await expect(bad.models.list()).rejects.toMatchObject({ status: 401 });
  });

  it('compares keys of any length without throwing (both sides hashed before the constant-time compare)', () => {
    const check = apiKeyCheck('short');
    const req = (h: Record<string, string>) => ({ headers: h }) as never;
    expect(() => check(req({ authorization: 'Bearer short' }))).not.toThrow();
    for (const given of ['', 's', 'shorT', 'shor', 'short2', 'a much longer key than the real one']) {
      expect(() => check(req({ authorization: `Bearer ${given}` })), given).toThrow(/API key/);
    }
    expect(() => apiKeyCheck('')).toThrow(TypeError);
  });

  it('answers 429 past the concurrent-request limit, and takes requests again once one ends', async () => {
    // Two requests whose bodies have not all arrived yet hold both slots.
    const body = JSON.stringify({ model: 'tiny', prompt: 'def g(', max_tokens: 2, temperature: 0 });
    const held = await Promise.all([connect(srv.url), connect(srv.url)]);
    for (const c of held) {
      c.socket.write(`POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEY}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body.slice(0, 10)}`);
    }
    await sleep(50);
    const third = await raw(srv.url, 'POST', '/v1/completions', body, auth);
    expect(third.status).toBe(429);
    expect(third.json.error.code).toBe('rate_limit_exceeded');
    expect(third.json.error.message).toMatch(/limit \(--max-concurrent 2\)/);
    for (const c of held) c.socket.write(body.slice(10));
    for (let i = 0; i < 100 && !held.every((c) => c.received().includes('"text_completion"')); i++) await sleep(10);
    for (const c of held) {
      expect(c.received()).toMatch(/^HTTP\/1\.1 200/);
      c.socket.destroy();
    }
    await sleep(20);
    expect((await raw(srv.url, 'POST', '/v1/completions', body, auth)).status).toBe(200);
  });

  it('refuses a prompt longer than the context with a 400 that says so', async () => {
    const context = srv.engine.spec.attention.maxPositionEmbeddings;
    const ids = Array.from({ length: context }, (_, i) => i % 500);
    const r = await raw(srv.url, 'POST', '/v1/completions', JSON.stringify({ model: 'tiny', prompt: ids, max_tokens: 1 }), auth);
    expect(r.status).toBe(400);
    expect(r.json.error).toMatchObject({ code: 'context_length_exceeded', param: 'prompt', type: 'invalid_request_error' });
    expect(r.json.error.message).toBe(`the prompt is ${context} tokens but this model's context is ${context} tokens (the prompt and at least one new token must fit); shorten the prompt`);
    const words = Array.from({ length: context }, () => 'value').join(' ');
    const c = await raw(srv.url, 'POST', '/v1/chat/completions', JSON.stringify({ model: 'tiny', messages: [{ role: 'user', content: words }] }), auth);
    expect(c.status).toBe(400);
    expect(c.json.error).toMatchObject({ code: 'context_length_exceeded', param: 'messages' });
    expect(c.json.error.message).toMatch(/^the prompt is \d+ tokens but this model's context is \d+ tokens/);
  });

  it('closes a connection whose headers do not arrive in time (408)', async () => {
    const c = await connect(srv.url);
    c.socket.write('POST /v1/completions HTTP/1.1\r\nHost: x\r\n');
    const ms = await c.closed;
    expect(c.received()).toMatch(/^HTTP\/1\.1 408/);
    expect(ms).toBeLessThan(2000);
  });

  it('closes silent connections (new and kept alive), but not one whose answer is still being computed', async () => {
    const silent = await connect(srv.url);
    expect(await silent.closed).toBeLessThan(3000);

    const kept = await connect(srv.url);
    kept.socket.write(`GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEY}\r\n\r\n`);
    const ms = await kept.closed;
    expect(kept.received()).toMatch(/^HTTP\/1\.1 200/);
    expect(ms).toBeGreaterThanOrEqual(IDLE_MS - 50);
    expect(ms).toBeLessThan(3000);

    // A non-streamed answer that takes longer than the idle timeout is silent until it is done.
    const t0 = performance.now();
    const long = await raw(srv.url, 'POST', '/v1/completions', JSON.stringify({ model: 'tiny', prompt: 'def f(', max_tokens: 1200, temperature: 0, ignore_eos: true }), auth);
    const took = performance.now() - t0;
    expect(long.status).toBe(200);
    expect(long.json.usage.completion_tokens).toBe(1200);
    expect(took, 'the answer must outlast the idle timeout for this test to mean anything').toBeGreaterThan(IDLE_MS);
  });

  it('frees the request of a client that disconnects mid-stream within one step', async () => {
    const engine = srv.engine;
    let steps = 0;
    const onStep = () => steps++;
    engine.on('step', onStep);
    const done = new Promise<{ finishReason: string; tokens: number[] }>((r) => engine.once('request:done', r));
    const c = await connect(srv.url);
    const body = JSON.stringify({ model: 'tiny', prompt: 'def f(', max_tokens: 1500, temperature: 0, ignore_eos: true, stream: true });
    c.socket.write(`POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEY}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
    while ((c.received().match(/data: /g) ?? []).length < 5) await sleep(1);
    c.socket.destroy();
    const atDisconnect = steps;
    const r = await done;
    const after = steps - atDisconnect;
    engine.off('step', onStep);
    expect(r.finishReason).toBe('abort');
    expect(r.tokens.length).toBeLessThan(1500);
    // The step running when the client left may finish; the next boundary drops the request.
    expect(after).toBeLessThanOrEqual(1);
    expect(engine.stats().kvPages!.used).toBe(0);
  });

  it('cuts off a stream whose reader takes nothing for the idle timeout', async () => {
    const res = Object.assign(new EventEmitter(), { destroyed: false, write: () => false });
    Object.assign(res, { destroy: () => ((res.destroyed = true), res.emit('close')) });
    const send = sseWriter(res as never, 50);
    const t0 = performance.now();
    await send({ x: 1 });
    expect(res.destroyed).toBe(true);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(45);
    // A reader that drains in time is not cut off.
    const ok = Object.assign(new EventEmitter(), { destroyed: false, write: () => false, destroy() { this.destroyed = true; } });
    const sendOk = sseWriter(ok as never, 200);
    setTimeout(() => ok.emit('drain'), 20);
    await sendOk({ x: 1 });
    await sleep(250);
    expect(ok.destroyed).toBe(false);
  });
});
