// Where a prefill step's time goes: a prompt of PROMPT tokens (default 512) prefilled on a fresh
// sequence, timed through CudaModel.step (median of REPS), then again with each kernel class left
// out (MOEFLASH_PROFILE_SKIP; the outputs are wrong then, the time is what the class costs).
//   node bench/prefill-profile.mjs MODEL_DIR [out.json]
import fs from 'node:fs';
import { loadModelSpec, openWeights } from '@moeflash/core';
import { createCudaBackend } from '../dist/index.js';

const [dir, out] = process.argv.slice(2);
if (!dir) throw new Error('usage: node bench/prefill-profile.mjs MODEL_DIR [out.json]');
const prompt = Number(process.env.PROMPT ?? 512), reps = Number(process.env.REPS ?? 3);
const classes = (process.env.PROFILE_CLASSES ?? 'qkv,attn,o,router,moe,lm').split(',');
const spec = await loadModelSpec(dir);
const weights = await openWeights(dir);
const model = await createCudaBackend().load(spec, weights, { maxSequences: 1, maxSequenceLength: prompt + 16, maxStepTokens: prompt });
await weights.close();
let state = 777;
const tokens = Array.from({ length: prompt }, () => (state = (state * 1103515245 + 12345) >>> 0) % spec.vocabSize);
const median = (a) => [...a].sort((x, y) => x - y)[a.length >> 1];
let seq = 0;
async function prefillMs() {
  const times = [];
  for (let i = 0; i < reps + 1; i++) {
    const s = seq++;
    const t = performance.now();
    await model.step({ sequences: [{ seq: s, tokens, logits: 'last' }], copyLogits: false });
    times.push(performance.now() - t);
    model.release(s);
  }
  return median(times.slice(1));
}
const base = await prefillMs();
const result = { dir, prompt, baseMs: base, tokensPerSecond: (prompt / base) * 1000, skip: {} };
console.log(`prefill ${prompt} tokens: ${base.toFixed(2)} ms (${result.tokensPerSecond.toFixed(0)} tok/s)`);
for (const cls of classes) {
  process.env.MOEFLASH_PROFILE_SKIP = cls;
  const ms = await prefillMs();
  delete process.env.MOEFLASH_PROFILE_SKIP;
  result.skip[cls] = { ms, share: base - ms };
  console.log(`${cls.padEnd(8)} left out ${ms.toFixed(2)} ms (-${(base - ms).toFixed(2)} ms)`);
}
await model.dispose();
if (out) fs.writeFileSync(out, JSON.stringify(result, null, 2));
