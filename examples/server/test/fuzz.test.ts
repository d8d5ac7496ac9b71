/**
 * Fuzzing the server's request parsing: malformed JSON, wrong types, huge numbers, unknown and
 * missing fields. Every answer is a 2xx or a 4xx with OpenAI's error JSON, never a 5xx, and the
 * server keeps serving.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { logprobsRequest, outputGrammar, validateSamplingParams, validateTools, type GenerateOptions } from '@moeflash/core';
import { tinyModel } from '../../../packages/core/test/helpers.js';
import { ApiError, parseChatRequest, parseCompletionRequest, startServer, type RunningServer, type ServerLimits } from '../src/server.mjs';
import { raw } from './helpers.js';

const limits: ServerLimits = { modelId: 'tiny', maxTokensLimit: 4, defaultMaxTokens: 2, vocabSize: 512 };

const validChat = () => ({ model: 'tiny', messages: [{ role: 'system', content: 'be brief' }, { role: 'user', content: 'hi' }], max_tokens: 2, temperature: 0 });
const validCompletion = () => ({ model: 'tiny', prompt: 'def f(x):', max_tokens: 2, temperature: 0 });

/** Values that break parsers: wrong types, extremes, nesting, odd strings. */
const nasty = fc.oneof(
  fc.constantFrom(null, true, false, 0, -0, -1, 1.5, 1e308, -1e308, 2 ** 53, 2 ** 53 + 2, Number.MAX_SAFE_INTEGER, 1e-320, '', ' ', '0', 'NaN', '__proto__', '\u0000', '\ud800', [], {}, [[]], { type: 'text' }),
  // Near-valid values of the tool and output fields, so that their parsers are reached past the type checks.
  fc.constantFrom({ type: 'json_object' }, { type: 'json_schema', json_schema: { schema: {} } }, { type: 'json_schema', json_schema: { schema: { type: 'string' } } }, 'required', 'auto', 'none', { type: 'function', function: { name: 'f' } }, [{ type: 'function', function: { name: 'f' } }], [{ type: 'function', function: { name: 'f', parameters: { type: 'object' } } }, { type: 'function' }], [{ id: 'c', type: 'function', function: { name: 'f', arguments: '{}' } }], 20, 21),
  fc.integer(),
  fc.double({ noNaN: true }),
  fc.string({ unit: 'binary', maxLength: 20 }),
  fc.jsonValue({ maxDepth: 3 }),
);

const FIELDS = ['model', 'messages', 'prompt', 'max_tokens', 'max_completion_tokens', 'temperature', 'top_p', 'top_k', 'min_p', 'seed', 'stop', 'stream', 'stream_options', 'n', 'presence_penalty', 'frequency_penalty', 'logit_bias', 'logprobs', 'top_logprobs', 'response_format', 'tools', 'tool_choice', 'functions', 'user', 'echo', 'suffix', 'best_of', 'ignore_eos', 'priority', 'unknown_field', '__proto__', 'constructor'];

/** A valid body with some fields replaced, deleted or added; messages mutated inside too. */
const mutated = (base: () => Record<string, unknown>) =>
  fc
    .tuple(
      fc.array(fc.tuple(fc.constantFrom(...FIELDS), fc.oneof(nasty, fc.constant(undefined))), { maxLength: 4 }),
      fc.option(fc.tuple(fc.nat(3), fc.constantFrom('role', 'content', 'name', 'tool_calls'), nasty)),
    )
    .map(([edits, msgEdit]) => {
      const body: Record<string, unknown> = base();
      for (const [k, v] of edits) {
        if (v === undefined) delete body[k];
        else Object.defineProperty(body, k, { value: v, enumerable: true, writable: true, configurable: true });
      }
      if (msgEdit && Array.isArray(body.messages)) {
        const [i, k, v] = msgEdit;
        const m = body.messages[i % body.messages.length];
        if (m && typeof m === 'object') (m as Record<string, unknown>)[k] = v;
      }
      return body;
    });

function checkParse(parse: (b: unknown, l: ServerLimits) => { options: GenerateOptions & { maxTokens: number }; tools?: unknown; toolChoice?: unknown }, body: unknown) {
  try {
    const r = parse(body, limits);
    expect(Number.isSafeInteger(r.options.maxTokens) && r.options.maxTokens >= 1 && r.options.maxTokens <= limits.maxTokensLimit).toBe(true);
    validateSamplingParams(r.options);
    // What passes validation, the engine takes: no engine error for a field the server let through.
    outputGrammar(r.options.responseFormat, undefined);
    logprobsRequest(r.options.logprobs, r.options.topLogprobs);
    validateTools(r.tools, r.toolChoice);
  } catch (e) {
    expect(e).toBeInstanceOf(ApiError);
    const a = e as ApiError;
    expect([400, 404]).toContain(a.status);
    expect(a.message.length).toBeGreaterThan(0);
    expect(a.message.length).toBeLessThan(1000);
  }
}

describe('request parsing fuzz', () => {
  it('validation returns engine-valid options or a 4xx ApiError, for any JSON', () => {
    fc.assert(
      fc.property(fc.oneof(fc.jsonValue(), mutated(validChat), mutated(validCompletion)), (body) => {
        checkParse(parseChatRequest, body);
        checkParse(parseCompletionRequest, body);
      }),
      { numRuns: 3000 },
    );
  });

  describe('over HTTP', () => {
    let srv: RunningServer;
    beforeAll(async () => {
      srv = await startServer({ model: await tinyModel('qwen3_moe'), backend: 'cpu', host: '127.0.0.1', port: 0, modelId: 'tiny', log: () => {}, maxTokensLimit: 4, bodyLimit: 4096 });
    });
    afterAll(() => srv?.close());

    const bodies = fc.oneof(
      mutated(validChat).map((b) => JSON.stringify(b)),
      mutated(validCompletion).map((b) => JSON.stringify(b)),
      // Valid JSON cut short, or with bytes spliced in.
      fc.tuple(mutated(validChat), fc.nat(), fc.string({ unit: 'binary', maxLength: 4 })).map(([b, cut, junk]) => {
        const s = JSON.stringify(b);
        const at = cut % (s.length + 1);
        return s.slice(0, at) + junk + s.slice(at + (cut % 3));
      }),
      fc.string({ unit: 'binary', maxLength: 64 }),
      fc.uint8Array({ maxLength: 64 }).map((a) => Buffer.from(a)),
      fc.jsonValue({ maxDepth: 4 }).map((v) => JSON.stringify(v)),
      fc.nat(9000).map((n) => JSON.stringify({ ...validChat(), messages: [{ role: 'user', content: 'x'.repeat(n) }] })),
    );

    it('answers every body with 2xx or a 4xx error JSON, and keeps serving', async () => {
      await fc.assert(
        fc.asyncProperty(bodies, fc.constantFrom('/v1/chat/completions', '/v1/completions'), async (body, path) => {
          const r = await raw(srv.url, 'POST', path, body);
          if (r.status >= 500) throw new Error(`${r.status} for ${JSON.stringify(String(body).slice(0, 300))}: ${r.text}`);
          if (r.status === 200) return;
          expect(r.status).toBeGreaterThanOrEqual(400);
          expect(typeof r.json?.error?.message).toBe('string');
          expect(typeof r.json.error.type).toBe('string');
          expect('param' in r.json.error && 'code' in r.json.error).toBe(true);
        }),
        { numRuns: 150 },
      );
      expect((await raw(srv.url, 'GET', '/v1/models')).status).toBe(200);
      const st = srv.engine.stats();
      expect(st.requests.failed).toBe(0);
      expect(st.kvPages!.used).toBe(0);
    });
  });
});
