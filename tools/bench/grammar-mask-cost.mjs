// Host cost of a grammar mask per generated token on the CPU backend, against the step itself.
//
//   node tools/bench/grammar-mask-cost.mjs [--model models/moeflash-tiny-coder] [--runs 12] [--json OUT]
//
// Runs schema-constrained requests (greedy and sampled), then replays each output's tokens through
// a fresh TokenConstraint, timing what the engine adds a token: waiting for the mask (xgrammar's
// bitmask AND the byte guards), masking the logits row, accepting the token. Plain decode steps of
// the same engine give the time a token costs without a grammar.
import fs from 'node:fs';
import { parseArgs } from 'node:util';
import { createEngine, GrammarCompiler, TokenConstraint, tokenTable, applyTokenMasks } from '@moeflash/core';

const { values } = parseArgs({ options: { model: { type: 'string', default: 'models/moeflash-tiny-coder' }, runs: { type: 'string', default: '12' }, json: { type: 'string' } } });
const engine = await createEngine({ model: values.model, backend: 'cpu', log: () => {} });
const V = engine.spec.vocabSize;
const schemas = [
  { type: 'object', properties: { name: { type: 'string', maxLength: 16 }, age: { type: 'integer', minimum: 0, maximum: 150 }, tags: { type: 'array', items: { type: 'string', maxLength: 8 }, maxItems: 3 } }, required: ['name', 'age', 'tags'] },
  { type: 'object', properties: { ok: { type: 'boolean' }, kind: { enum: ['file', 'dir', 'link'] }, size: { type: 'integer' } }, required: ['ok', 'kind'] },
];
const eos = engine.spec.eosTokenIds;
const compiler = new GrammarCompiler(engine.tokenizer, tokenTable(engine.tokenizer, V), eos);
const logits = new Float32Array(V).map((_, i) => Math.sin(i));
let tokens = 0;
let maskMs = 0;
const t0 = performance.now();
const outputs = [];
for (let r = 0; r < Number(values.runs); r++) {
  const schema = schemas[r % schemas.length];
  const res = await engine.generate('data = ', { maxTokens: 96, temperature: r % 3 === 0 ? 0 : 0.8, seed: r, responseFormat: { type: 'json_schema', schema } }).result;
  outputs.push({ schema, tokens: res.tokens, finishReason: res.finishReason });
}
const genMs = performance.now() - t0;
const genTokens = outputs.reduce((s, o) => s + o.tokens.length, 0);
for (const o of outputs) {
  const c = new TokenConstraint(compiler, { kind: 'json_schema', schema: o.schema }, new Set(eos));
  await c.prepare();
  for (const t of o.tokens) {
    const a = performance.now();
    await c.prepare();
    applyTokenMasks(logits, V, [c.mask()]);
    c.accept(t);
    maskMs += performance.now() - a;
    tokens++;
  }
  c.dispose();
}
const plain = await engine.generate('data = ', { maxTokens: 256, ignoreEos: true }).result;
await engine.close();
const result = {
  model: values.model,
  vocabSize: V,
  tokens,
  maskUsPerToken: (maskMs * 1000) / tokens,
  constrainedTokensPerSecond: (genTokens * 1000) / genMs,
  plainTokensPerSecond: plain.tokensPerSecond,
  finished: outputs.filter((o) => o.finishReason === 'stop').length,
  runs: outputs.length,
};
result.maskShareOfPlainToken = result.maskUsPerToken / (1e6 / result.plainTokensPerSecond);
console.log(JSON.stringify(result, null, 2));
if (values.json) fs.writeFileSync(values.json, JSON.stringify(result, null, 2) + '\n');
