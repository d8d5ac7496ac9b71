import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import Ajv from 'ajv';
import path from 'node:path';
import { createEngine, jsonTextMask, maskAllows, MoeflashError, Utf8Guard, Utf8Table, type Engine, type TokenTable } from '@moeflash/core';
import { repoRoot } from './helpers.js';

const MODEL = path.join(repoRoot, 'models', 'moeflash-tiny-coder');

/** JSON schemas with bounded output (strings, arrays and integers have limits), nested up to 2 levels. */
const leafSchema = fc.oneof(
  fc.record({ type: fc.constant('string'), maxLength: fc.integer({ min: 1, max: 8 }) }),
  fc.integer({ min: -50, max: 50 }).chain((lo) => fc.record({ type: fc.constant('integer'), minimum: fc.constant(lo), maximum: fc.integer({ min: lo, max: lo + 1000 }) })),
  fc.constant({ type: 'boolean' }),
  fc.constant({ type: 'null' }),
  fc.uniqueArray(fc.oneof(fc.constantFrom('red', 'green', 'a b', 'ü'), fc.integer({ min: -3, max: 3 })), { minLength: 1, maxLength: 4 }).map((e) => ({ enum: e })),
);
const schemaArb = fc.letrec<{ node: Record<string, unknown> }>((tie) => ({
  node: fc.oneof(
    { depthSize: 'small', maxDepth: 2 },
    leafSchema,
    fc.record({ type: fc.constant('array'), items: tie('node'), maxItems: fc.integer({ min: 0, max: 3 }) }),
    fc.uniqueArray(fc.constantFrom('id', 'name', 'ok', 'x', 'size', 'kind'), { minLength: 1, maxLength: 3 }).chain((keys) =>
      fc.tuple(fc.array(tie('node'), { minLength: keys.length, maxLength: keys.length }), fc.subarray(keys)).map(([values, required]) => ({
        type: 'object',
        properties: Object.fromEntries(keys.map((k, i) => [k, values[i]])),
        required,
      })),
    ),
    fc.tuple(leafSchema, leafSchema).map((anyOf) => ({ anyOf })),
  ),
})).node;

describe('constrained decoding (CPU backend, bundled model)', () => {
  let engine: Engine;
  beforeAll(async () => {
    engine = await createEngine({ model: MODEL, backend: 'cpu', log: () => {} });
  });
  afterAll(() => engine.close());

  it('every output under a JSON schema parses and validates (many schemas and seeds)', async () => {
    const ajv = new Ajv({ strict: false });
    let finished = 0;
    let runs = 0;
    await fc.assert(
      fc.asyncProperty(schemaArb, fc.integer({ min: 0, max: 1000 }), fc.constantFrom(0, 0.7, 1.2), async (schema, seed, temperature) => {
        const r = await engine.generate('value = ', { maxTokens: 96, temperature, seed, responseFormat: { type: 'json_schema', schema } }).result;
        runs++;
        // A run that hits maxTokens is a valid prefix; one that the model ended must be a whole value.
        if (r.finishReason !== 'stop') return;
        finished++;
        const value = JSON.parse(r.text);
        expect(ajv.validate(schema, value), `${JSON.stringify(schema)} -> ${r.text}: ${ajv.errorsText()}`).toBe(true);
      }),
      { numRuns: 120, seed: 20261208 },
    );
    // Bounded schemas leave the model few ways to run long: most runs must end by themselves.
    expect(finished).toBeGreaterThan(runs * 0.8);
  });

  it('json_object gives a JSON object; an EBNF grammar gives a sentence of its language', async () => {
    for (const seed of [1, 2, 3]) {
      const r = await engine.generate('config = ', { maxTokens: 128, temperature: 0.9, seed, responseFormat: { type: 'json_object' } }).result;
      if (r.finishReason === 'stop') expect(typeof JSON.parse(r.text)).toBe('object');
      else expect(r.text.startsWith('{')).toBe(true);
    }
    const grammar = 'root ::= answer " because " reason\nanswer ::= "yes" | "no"\nreason ::= [a-z]+ "."';
    for (const seed of [1, 2]) {
      const r = await engine.generate('# ', { maxTokens: 40, temperature: 1, seed, grammar }).result;
      expect(r.finishReason).toBe('stop');
      expect(r.text).toMatch(/^(yes|no) because [a-z]+\.$/);
    }
  });

  it('OpenAI\'s json_schema wire shape is accepted', async () => {
    const schema = { type: 'object', properties: { ok: { type: 'boolean' } }, required: ['ok'] };
    const r = await engine.generate('x = ', { maxTokens: 16, responseFormat: { type: 'json_schema', json_schema: { name: 'r', schema } } }).result;
    expect(JSON.parse(r.text)).toHaveProperty('ok');
  });

  it('refuses bad options with the fix, and a schema the compiler cannot take through the stream; the engine goes on', async () => {
    const bad = (opts: object) => {
      try {
        engine.generate('x', opts);
      } catch (e) {
        return e as MoeflashError;
      }
      throw new Error('no error');
    };
    expect(bad({ responseFormat: { type: 'xml' } }).message).toContain('"json_object" or "json_schema"');
    expect(bad({ responseFormat: { type: 'json_schema' } }).message).toContain('needs a schema');
    expect(bad({ grammar: 'root ::= "a"', responseFormat: { type: 'json_object' } }).message).toContain('pass one of them');
    expect(bad({ topLogprobs: 3 }).message).toContain('logprobs: true');
    expect(bad({ logprobs: true, topLogprobs: 21 }).code).toBe('INVALID_ARGUMENT');

    const failed = engine.generate('x', { responseFormat: { type: 'json_schema', schema: { type: 'frob' } } });
    const err = await failed.result.catch((e: unknown) => e as MoeflashError);
    expect(err).toBeInstanceOf(MoeflashError);
    expect((err as MoeflashError).code).toBe('INVALID_ARGUMENT');
    expect((err as MoeflashError).message).toContain('Unsupported type "frob"');
    const r = await engine.generate('x = ', { maxTokens: 8, responseFormat: { type: 'json_schema', schema: { enum: ['a', 'b'] } } }).result;
    expect(['"a"', '"b"']).toContain(r.text);
  });
});

describe('constrained decoding with speculation (prompt lookup)', () => {
  it('drafts are checked against the grammar and greedy output equals plain greedy output', async () => {
    const plain = await createEngine({ model: MODEL, backend: 'cpu', log: () => {} });
    const spec = await createEngine({ model: MODEL, backend: 'cpu', log: () => {}, speculative: { method: 'prompt-lookup', blockSize: 6 } });
    const schema = { type: 'object', properties: { name: { type: 'string', maxLength: 20 }, id: { type: 'integer' }, tags: { type: 'array', items: { type: 'string', maxLength: 6 }, maxItems: 3 } }, required: ['name', 'id', 'tags'] };
    // The prompt holds text a lookup drafter copies, much of it outside the schema (other keys).
    const prompt = 'rows = [\n{"name": "os.path", "id": 1, "tags": ["io", "fs"]},\n{"name": "os.path", "kind": 2, "size": 7},\n';
    try {
      for (const temperature of [0]) {
        const a = await plain.generate(prompt, { maxTokens: 64, temperature, responseFormat: { type: 'json_schema', schema } }).result;
        const b = await spec.generate(prompt, { maxTokens: 64, temperature, responseFormat: { type: 'json_schema', schema } }).result;
        expect(b.tokens).toEqual(a.tokens);
        expect(b.speculation!.draftedTokens).toBeGreaterThan(0);
        if (b.finishReason === 'stop') expect(JSON.parse(b.text)).toHaveProperty('name');
      }
      // Sampling: every output still parses.
      for (const seed of [1, 2, 3, 4]) {
        const r = await spec.generate(prompt, { maxTokens: 64, temperature: 0.8, seed, responseFormat: { type: 'json_schema', schema } }).result;
        if (r.finishReason === 'stop') expect(Object.keys(JSON.parse(r.text))).toEqual(['name', 'id', 'tags']);
      }
    } finally {
      await plain.close();
      await spec.close();
    }
  });
});

describe('byte guards', () => {
  const table = (pieces: number[][]): TokenTable => ({
    vocabSize: pieces.length,
    bytes: pieces.map((p) => Uint8Array.from(p)),
    special: new Uint8Array(pieces.length),
    encoded: pieces.map(() => 'x'),
  });

  it('allows a token only where its bytes continue valid UTF-8, across tokens', () => {
    // 0 'a', 1 E2, 2 82, 3 AC, 4 C0 85 (overlong), 5 E0, 6 81, 7 F4 B5 (past U+10FFFF), 8 ED A0 (surrogate), 9 special
    const t = table([[0x61], [0xe2], [0x82], [0xac], [0xc0, 0x85], [0xe0], [0x81], [0xf4, 0xb5], [0xed, 0xa0], []]);
    const g = new Utf8Guard(new Utf8Table(t));
    const allowed = () => [...Array(t.vocabSize).keys()].filter((i) => maskAllows(g.mask(), i));
    expect(allowed()).toEqual([0, 1, 5, 9]);
    g.accept(1); // E2: two continuation bytes due
    expect(allowed()).toEqual([2, 3, 6]);
    g.accept(2);
    g.accept(3); // € complete
    expect(allowed()).toEqual([0, 1, 5, 9]);
    g.accept(5); // E0 needs A0-BF next: 81 would be an overlong form
    expect(allowed()).toEqual([3]);
  });

  it('JSON text never holds a raw control byte other than a newline', () => {
    const t = table([[0x7b], [0x0a], [0x09], [0x22, 0x15], [0x20, 0x20]]);
    const m = jsonTextMask(t);
    expect([0, 1, 2, 3, 4].filter((i) => maskAllows(m, i))).toEqual([0, 1, 4]);
  });
});
