/**
 * What agent runtimes send through the official client: tools and tool_choice, response_format,
 * logprobs. Against the bundled model on the CPU backend: a json_schema reply validates, a forced
 * call comes back as tool_calls whose arguments validate, its streamed deltas reassemble into the
 * same call, logprobs are consistent, and combinations that cannot work get a 400 naming the field.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import OpenAI from 'openai';
import Ajv from 'ajv';
import { repoRoot } from '../../../packages/core/test/helpers.js';
import { startServer, type RunningServer } from '../src/server.mjs';
import { raw } from './helpers.js';

const MODEL = path.join(repoRoot, 'models', 'moeflash-tiny-coder');
const ajv = new Ajv({ strict: false });

const weather: OpenAI.ChatCompletionFunctionTool = {
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'Weather of a city',
    parameters: { type: 'object', properties: { city: { type: 'string', maxLength: 20 }, days: { type: 'integer', minimum: 1, maximum: 7 } }, required: ['city', 'days'] },
  },
};
const time: OpenAI.ChatCompletionFunctionTool = { type: 'function', function: { name: 'get_time', parameters: { type: 'object', properties: { zone: { enum: ['UTC', 'CET'] } }, required: ['zone'] } } };
const ask = [{ role: 'user' as const, content: 'Weather in Paris?' }];

type Lp = { token: string; logprob: number; bytes: number[] | null; top_logprobs: Array<{ token: string; logprob: number; bytes: number[] | null }> };

/** What a user relies on in every logprobs entry: a log-probability, alternatives most likely first, bytes that spell the token. */
function checkEntry(e: Lp, k: number) {
  expect(e.logprob).toBeLessThanOrEqual(0);
  expect(e.top_logprobs).toHaveLength(k);
  for (let i = 1; i < k; i++) expect(e.top_logprobs[i]!.logprob).toBeLessThanOrEqual(e.top_logprobs[i - 1]!.logprob);
  if (k) expect(e.logprob).toBeLessThanOrEqual(e.top_logprobs[0]!.logprob);
  if (!e.token.includes('\uFFFD')) expect(Buffer.from(e.bytes!).toString('utf8')).toBe(e.token);
}

describe('tools, response_format and logprobs through the official client (bundled model, CPU)', () => {
  let srv: RunningServer;
  let client: OpenAI;

  beforeAll(async () => {
    srv = await startServer({ model: MODEL, backend: 'cpu', port: 0, modelId: 'coder', log: () => {} });
    client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'unused', maxRetries: 0 });
  });
  afterAll(async () => {
    await srv?.close();
  });

  it('response_format json_schema: the reply parses and validates, whole and streamed; json_object gives an object', async () => {
    const schema = { type: 'object', properties: { name: { type: 'string', maxLength: 12 }, size: { type: 'integer', minimum: 0, maximum: 99 }, ok: { type: 'boolean' } }, required: ['name', 'size', 'ok'] };
    const response_format = { type: 'json_schema' as const, json_schema: { name: 'item', schema, strict: true } };
    for (const seed of [1, 2]) {
      const r = await client.chat.completions.create({ model: 'coder', messages: [{ role: 'user', content: 'describe an item' }], response_format, max_tokens: 64, seed });
      expect(r.choices[0]!.finish_reason).toBe('stop');
      const value = JSON.parse(r.choices[0]!.message.content!);
      expect(ajv.validate(schema, value), ajv.errorsText()).toBe(true);
      // The stream carries the same reply (same seed).
      const s = await client.chat.completions.create({ model: 'coder', messages: [{ role: 'user', content: 'describe an item' }], response_format, max_tokens: 64, seed, stream: true });
      let text = '';
      for await (const c of s) text += c.choices[0]?.delta.content ?? '';
      expect(text).toBe(r.choices[0]!.message.content);
    }
    // /v1/completions takes it too (an extension of OpenAI's legacy endpoint).
    const text = await client.completions.create({ model: 'coder', prompt: 'item = ', max_tokens: 64, seed: 1, response_format } as OpenAI.CompletionCreateParamsNonStreaming);
    expect(text.choices[0]!.finish_reason).toBe('stop');
    expect(ajv.validate(schema, JSON.parse(text.choices[0]!.text)), ajv.errorsText()).toBe(true);
    const obj = await client.chat.completions.create({ model: 'coder', messages: [{ role: 'user', content: 'config' }], response_format: { type: 'json_object' }, max_tokens: 96, temperature: 0.8, seed: 3 });
    if (obj.choices[0]!.finish_reason === 'stop') expect(typeof JSON.parse(obj.choices[0]!.message.content!)).toBe('object');
    else expect(obj.choices[0]!.message.content!.startsWith('{')).toBe(true);
  });

  it('a forced tool call comes back as message.tool_calls with arguments that validate, finish_reason tool_calls', async () => {
    for (const tool_choice of ['required', { type: 'function', function: { name: 'get_time' } }] as const) {
      const r = await client.chat.completions.create({ model: 'coder', messages: ask, tools: [weather, time], tool_choice, max_tokens: 64, seed: 1 });
      const choice = r.choices[0]!;
      expect(choice.finish_reason).toBe('tool_calls');
      expect(choice.message.content).toBeNull();
      expect(choice.message.tool_calls).toHaveLength(1);
      const call = choice.message.tool_calls![0]!;
      if (call.type !== 'function') throw new Error(`call of type ${call.type}`);
      expect(call.id).toMatch(/^call_/);
      if (typeof tool_choice === 'object') expect(call.function.name).toBe('get_time');
      const tool = [weather, time].find((t) => t.function.name === call.function.name)!;
      expect(typeof call.function.arguments).toBe('string');
      expect(ajv.validate(tool.function.parameters!, JSON.parse(call.function.arguments)), ajv.errorsText()).toBe(true);
    }
  });

  it('streamed tool-call deltas reassemble into the same call, by hand and by the client’s own accumulator', async () => {
    const params = { model: 'coder', messages: ask, tools: [weather, time], tool_choice: { type: 'function' as const, function: { name: 'get_weather' } }, max_tokens: 64, seed: 2 };
    const whole = (await client.chat.completions.create(params)).choices[0]!.message.tool_calls![0]!;
    if (whole.type !== 'function') throw new Error('not a function call');

    const calls: Array<{ id?: string; type?: string; name: string; arguments: string }> = [];
    let finish: string | null = null;
    let pieces = 0;
    for await (const chunk of await client.chat.completions.create({ ...params, stream: true })) {
      const c = chunk.choices[0];
      if (!c) continue;
      finish = c.finish_reason ?? finish;
      for (const d of c.delta.tool_calls ?? []) {
        const call = (calls[d.index] ??= { name: '', arguments: '' });
        if (d.id) call.id = d.id;
        if (d.type) call.type = d.type;
        call.name += d.function?.name ?? '';
        if (d.function?.arguments) {
          call.arguments += d.function.arguments;
          pieces++;
        }
      }
    }
    expect(finish).toBe('tool_calls');
    expect(calls).toHaveLength(1);
    expect(calls[0]).toMatchObject({ type: 'function', name: 'get_weather' });
    expect(calls[0]!.id).toMatch(/^call_/);
    expect(pieces).toBeGreaterThan(1); // arguments arrive as they are generated, not at the end
    expect(JSON.parse(calls[0]!.arguments)).toEqual(JSON.parse(whole.function.arguments));

    const final = await client.chat.completions.stream(params).finalChatCompletion();
    const acc = final.choices[0]!.message.tool_calls![0]!;
    if (acc.type !== 'function') throw new Error('not a function call');
    expect(final.choices[0]!.finish_reason).toBe('tool_calls');
    expect([acc.function.name, JSON.parse(acc.function.arguments)]).toEqual([whole.function.name, JSON.parse(whole.function.arguments)]);
  });

  it('a call sent back with its result (arguments as the JSON string the server gave) continues the conversation', async () => {
    const first = await client.chat.completions.create({ model: 'coder', messages: ask, tools: [weather], tool_choice: 'required', max_tokens: 64, seed: 1 });
    const call = first.choices[0]!.message.tool_calls![0]!;
    const messages: OpenAI.ChatCompletionMessageParam[] = [...ask, first.choices[0]!.message as OpenAI.ChatCompletionMessageParam, { role: 'tool', tool_call_id: call.id, content: '{"temp": 21}' }];
    const next = await client.chat.completions.create({ model: 'coder', messages, tools: [weather], max_tokens: 8, temperature: 0 });
    expect(next.usage!.prompt_tokens).toBeGreaterThan(first.usage!.prompt_tokens);
    expect(['stop', 'length', 'tool_calls']).toContain(next.choices[0]!.finish_reason);
  });

  it('chat logprobs: one entry a generated token, alternatives sorted, greedy picks the top one; streamed chunks carry the same', async () => {
    const params = { model: 'coder', messages: [{ role: 'user' as const, content: 'def add(a, b):' }], max_tokens: 16, temperature: 0, logprobs: true, top_logprobs: 4, ignore_eos: true };
    const r = await client.chat.completions.create(params as OpenAI.ChatCompletionCreateParamsNonStreaming);
    const content = r.choices[0]!.logprobs!.content! as Lp[];
    expect(content).toHaveLength(r.usage!.completion_tokens);
    for (const e of content) {
      checkEntry(e, 4);
      expect(e.token).toBe(e.top_logprobs[0]!.token);
      expect(e.logprob).toBe(e.top_logprobs[0]!.logprob);
    }
    // The tokens' bytes spell the reply.
    expect(Buffer.concat(content.map((e) => Buffer.from(e.bytes!))).toString('utf8')).toBe(r.choices[0]!.message.content);

    const streamed: Lp[] = [];
    for await (const chunk of await client.chat.completions.create({ ...params, stream: true } as OpenAI.ChatCompletionCreateParamsStreaming)) {
      streamed.push(...((chunk.choices[0]?.logprobs?.content ?? []) as Lp[]));
    }
    expect(streamed).toEqual(content);

    // Sampled, and under a forced call: the chosen token is not always the top one, but never above it.
    const sampled = await client.chat.completions.create({ model: 'coder', messages: ask, tools: [weather], tool_choice: 'required', max_tokens: 64, temperature: 1, seed: 5, logprobs: true, top_logprobs: 2 });
    const entries = sampled.choices[0]!.logprobs!.content! as Lp[];
    expect(entries).toHaveLength(sampled.usage!.completion_tokens);
    for (const e of entries) checkEntry(e, 2);
    const plain = await client.chat.completions.create({ model: 'coder', messages: ask, max_tokens: 4, logprobs: true });
    for (const e of plain.choices[0]!.logprobs!.content! as Lp[]) checkEntry(e, 0);
    const none = await client.chat.completions.create({ model: 'coder', messages: ask, max_tokens: 4 });
    expect(none.choices[0]!.logprobs).toBeNull();
  });

  it('/v1/completions logprobs: tokens, their log-probabilities, alternatives with the chosen one among them, text offsets; streamed the same', async () => {
    const params = { model: 'coder', prompt: 'import os\n', max_tokens: 12, temperature: 0.7, seed: 4, logprobs: 3, ignore_eos: true };
    const r = await client.completions.create(params as OpenAI.CompletionCreateParamsNonStreaming);
    const lp = r.choices[0]!.logprobs!;
    const n = r.usage!.completion_tokens;
    expect(lp.tokens).toHaveLength(n);
    expect(lp.token_logprobs).toHaveLength(n);
    expect(lp.text_offset).toHaveLength(n);
    const text = r.choices[0]!.text;
    lp.tokens!.forEach((token, i) => {
      expect(lp.token_logprobs![i]).toBeLessThanOrEqual(0);
      const alternatives = lp.top_logprobs![i]!;
      expect(alternatives[token]).toBe(lp.token_logprobs![i]);
      expect(Object.keys(alternatives).length).toBeGreaterThanOrEqual(3);
      expect(Math.max(...Object.values(alternatives))).toBeGreaterThanOrEqual(lp.token_logprobs![i]!);
      if (i > 0) expect(lp.text_offset![i]).toBeGreaterThanOrEqual(lp.text_offset![i - 1]!);
      if (!token.includes('\uFFFD')) expect(text.slice(lp.text_offset![i], lp.text_offset![i]! + token.length)).toBe(token);
    });
    const streamed = { tokens: [] as string[], token_logprobs: [] as number[], text_offset: [] as number[] };
    for await (const c of await client.completions.create({ ...params, stream: true } as OpenAI.CompletionCreateParamsStreaming)) {
      const l = c.choices[0]?.logprobs;
      if (!l) continue;
      streamed.tokens.push(...l.tokens!);
      streamed.token_logprobs.push(...l.token_logprobs!);
      streamed.text_offset.push(...l.text_offset!);
    }
    expect(streamed).toEqual({ tokens: lp.tokens, token_logprobs: lp.token_logprobs, text_offset: lp.text_offset });
  });

  it('answers combinations that cannot work with a 400 that names the field and the fix', async () => {
    const chat = { model: 'coder', messages: ask, max_tokens: 4 };
    const schemaFormat = { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'object' } } };
    const cases: Array<[string, Record<string, unknown>, string, RegExp]> = [
      ['/v1/chat/completions', { ...chat, tool_choice: 'required' }, 'tool_choice', /only allowed when 'tools' are given/],
      ['/v1/chat/completions', { ...chat, tools: [weather], tool_choice: { type: 'function', function: { name: 'nope' } } }, 'tool_choice.function.name', /one of the tools \(get_weather\)/],
      ['/v1/chat/completions', { ...chat, tools: [{ type: 'function', function: { name: 'has space' } }] }, 'tools[0].function.name', /letters, digits/],
      ['/v1/chat/completions', { ...chat, tools: [weather, weather] }, 'tools[1].function.name', /unique/],
      ['/v1/chat/completions', { ...chat, tools: [{ type: 'custom', custom: { name: 'x' } }] }, 'tools[0].type', /only 'function'/],
      ['/v1/chat/completions', { ...chat, tools: [weather], tool_choice: 'required', response_format: schemaFormat }, 'response_format', /both constrain the reply; leave out 'response_format'/],
      ['/v1/chat/completions', { ...chat, tools: [weather], response_format: { type: 'json_object' } }, 'response_format', /set 'tool_choice' to 'none' or leave out 'tools'/],
      ['/v1/chat/completions', { ...chat, response_format: { type: 'json_schema', schema: { type: 'object' } } }, 'response_format.json_schema', /put the schema under 'json_schema'/],
      ['/v1/chat/completions', { ...chat, response_format: { type: 'json_schema', json_schema: { name: 'x' } } }, 'response_format.json_schema.schema', /JSON Schema object/],
      ['/v1/chat/completions', { ...chat, response_format: { type: 'regex' } }, 'response_format.type', /'text', 'json_object' or 'json_schema'/],
      ['/v1/chat/completions', { ...chat, response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'object', properties: { a: { type: 'no-such-type' } } } } } }, 'response_format', /cannot be compiled/],
      ['/v1/chat/completions', { ...chat, top_logprobs: 3 }, 'top_logprobs', /needs 'logprobs': true/],
      ['/v1/chat/completions', { ...chat, logprobs: true, top_logprobs: 21 }, 'top_logprobs', /\[0, 20\]/],
      ['/v1/chat/completions', { ...chat, functions: [{ name: 'f' }] }, 'functions', /send 'tools' and 'tool_choice' instead/],
      ['/v1/chat/completions', { ...chat, messages: [...ask, { role: 'assistant', tool_calls: [{ id: 'c', type: 'function', function: { name: 'get_weather', arguments: '{city' } }] }] }, 'messages[1].tool_calls[0].function.arguments', /as a JSON string/],
      ['/v1/completions', { model: 'coder', prompt: 'x', logprobs: true }, 'logprobs', /integer from 0 to 20/],
      ['/v1/completions', { model: 'coder', prompt: 'x', response_format: { type: 'json_object' }, ignore_eos: true }, 'ignore_eos', /leave out 'ignore_eos' or 'response_format'/],
      ['/v1/chat/completions', { ...chat, tools: [weather], tool_choice: 'required', ignore_eos: true }, 'ignore_eos', /leave out 'ignore_eos' or 'tool_choice'/],
    ];
    for (const [route, body, param, message] of cases) {
      for (const stream of [false, true]) {
        const r = await raw(srv.url, 'POST', route, JSON.stringify({ ...body, stream }));
        expect(r.status, `${JSON.stringify(body)}: ${r.text}`).toBe(400);
        expect(r.json.error.param).toBe(param);
        expect(r.json.error.message).toMatch(message);
      }
    }
    // Each failed request let go of its slot and pages.
    expect(srv.engine.stats().kvPages!.used).toBe(0);
  });

  it('shuts down at once after requests that failed to start (a schema that does not compile)', async () => {
    const t0 = performance.now();
    await srv.close({ timeoutMs: 20_000 });
    expect(performance.now() - t0).toBeLessThan(2000);
  });
});

describe('tool calls on a harmony (gpt-oss) template, through the official client', () => {
  let dir: string;
  let srv: RunningServer;
  let client: OpenAI;

  beforeAll(async () => {
    // The bundled weights with gpt-oss's harmony template: only the prompt format and the parser change.
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moeflash-server-harmony-'));
    for (const f of fs.readdirSync(MODEL)) fs.copyFileSync(path.join(MODEL, f), path.join(dir, f));
    fs.copyFileSync(path.join(repoRoot, 'packages/core/test/fixtures/chat-templates/harmony.jinja'), path.join(dir, 'chat_template.jinja'));
    srv = await startServer({ model: dir, backend: 'cpu', port: 0, modelId: 'harmony', log: () => {} });
    client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'unused', maxRetries: 0 });
  });
  afterAll(async () => {
    await srv?.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('a named call validates, whole and streamed; required with several tools asks for the name', async () => {
    const params = { model: 'harmony', messages: ask, tools: [weather, time], tool_choice: { type: 'function' as const, function: { name: 'get_weather' } }, max_tokens: 64, seed: 1 };
    const r = await client.chat.completions.create(params);
    expect(r.choices[0]!.finish_reason).toBe('tool_calls');
    const call = r.choices[0]!.message.tool_calls![0]!;
    if (call.type !== 'function') throw new Error('not a function call');
    expect(call.function.name).toBe('get_weather');
    expect(ajv.validate(weather.function.parameters!, JSON.parse(call.function.arguments)), ajv.errorsText()).toBe(true);
    const final = await client.chat.completions.stream(params).finalChatCompletion();
    const streamed = final.choices[0]!.message.tool_calls![0]!;
    if (streamed.type !== 'function') throw new Error('not a function call');
    expect(JSON.parse(streamed.function.arguments)).toEqual(JSON.parse(call.function.arguments));

    const err = await client.chat.completions.create({ ...params, tool_choice: 'required' }).catch((e) => e);
    expect(err.status).toBe(400);
    expect(err.error.param).toBe('tool_choice');
    expect(err.error.message).toMatch(/name one, \{ type: 'function', function: \{ name \} \}/);
  });
});
