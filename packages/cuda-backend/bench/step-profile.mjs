// Where a decode step's time goes, measured inside the captured CUDA graph: the step is timed as a
// graph replay (CUDA events, no host share), then again with each kernel class launched twice
// (MOEFLASH_PROFILE_TWICE: every class is idempotent) and, for the classes that only read weights
// and activations, left out (MOEFLASH_PROFILE_SKIP; the outputs are wrong then). A class's share is
// the time it adds or takes away, its launch boundary included; a second run of a class whose
// weights fit the L2 cache reads part of them from there, so for those the skip is the better
// measure. Also: the wall time of a step through CudaModel.step (host share included) and the
// same graph with other launch settings (MOEFLASH_PDL=0, MOEFLASH_ATTENTION_FUSED=0).
//
//   node bench/step-profile.mjs MODEL_DIR [batch=1] [context=640] [out.json]
import fs from 'node:fs';
import { loadModelSpec, openWeights } from '@moeflash/core';
import { createCudaBackend } from '../dist/index.js';

const [dir, batchArg = '1', ctxArg = '640', out] = process.argv.slice(2);
if (!dir) throw new Error('usage: node bench/step-profile.mjs MODEL_DIR [batch] [context] [out.json]');
const batch = Number(batchArg), ctx = Number(ctxArg);
const classes = (process.env.PROFILE_CLASSES ??
  'qkv,prep,attn,attn_split,attn_combine,o,router,moe,moe_gu,moe_down,final,gather,lm,argmax').split(',');
const skippable = new Set((process.env.PROFILE_SKIPPABLE ?? 'qkv,o,router,moe,moe_gu,moe_down,lm').split(','));

const spec = await loadModelSpec(dir);
const weights = await openWeights(dir);
const backend = createCudaBackend();
const model = await backend.load(spec, weights, { maxSequences: batch, maxSequenceLength: ctx + 512 });
await weights.close();

const seqs = Array.from({ length: batch }, (_, i) => 100 + i);
let state = 12345;
const rand = () => ((state = (state * 1103515245 + 12345) >>> 0) % spec.vocabSize);
const plan = (tokens) => ({ sequences: seqs.map((seq, i) => ({ seq, tokens: tokens[i], logits: 'last' })), copyLogits: false });
let res = await model.step(plan(seqs.map(() => Array.from({ length: ctx }, rand))));
const step = async () => {
  res = await model.step(plan(res.sequences.map((s) => [s.argmax[s.argmax.length - 1]])));
};
const median = (a) => [...a].sort((x, y) => x - y)[a.length >> 1];

// Wall time through the JS API: 40 steps after the capture.
for (let i = 0; i < 4; i++) await step();
const wall = [];
for (let i = 0; i < 40; i++) {
  const t = performance.now();
  await step();
  wall.push(performance.now() - t);
}
const graphMs = () => median([0, 1, 2].map(() => model.timeDecodeGraph(batch, 100)));
const base = graphMs();
const result = { dir, batch, context: ctx, device: backend.devices()[0]?.name, wallMs: median(wall), graphMs: base, twice: {}, skip: {}, env: {} };
console.log(`batch ${batch}, context ~${ctx}: step ${result.wallMs.toFixed(3)} ms wall, ${base.toFixed(3)} ms graph replay`);

async function variant(env) {
  const saved = {};
  for (const [k, v] of Object.entries(env)) {
    saved[k] = process.env[k];
    process.env[k] = v;
  }
  model.dropGraphs();
  await step();
  await step();
  const ms = graphMs();
  for (const [k, v] of Object.entries(saved)) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
  model.dropGraphs();
  await step();
  return ms;
}

for (const cls of classes) {
  const twice = await variant({ MOEFLASH_PROFILE_TWICE: cls });
  result.twice[cls] = { ms: twice, share: twice - base };
  let line = `${cls.padEnd(13)} twice ${twice.toFixed(3)} ms (+${((twice - base) * 1000).toFixed(1)} us)`;
  if (skippable.has(cls)) {
    const skip = await variant({ MOEFLASH_PROFILE_SKIP: cls });
    result.skip[cls] = { ms: skip, share: base - skip };
    line += `, left out ${skip.toFixed(3)} ms (-${((base - skip) * 1000).toFixed(1)} us)`;
  }
  console.log(line);
}
// PROFILE_ENV="name:K=V,K=V;name2:K=V" replaces the default settings compared; each is measured
// between two replays of the default graph, so that drift over the run shows.
const envVariants = process.env.PROFILE_ENV
  ? Object.fromEntries(
      process.env.PROFILE_ENV.split(';').filter(Boolean).map((v) => {
        const [name, kv = ''] = v.split(':');
        return [name, Object.fromEntries(kv.split(',').filter(Boolean).map((p) => p.split('=')))];
      }),
    )
  : { pdlOff: { MOEFLASH_PDL: '0' }, attentionUnfused: { MOEFLASH_ATTENTION_FUSED: '0' } };
for (const [name, env] of Object.entries(envVariants)) {
  const before = await variant({});
  const ms = await variant(env);
  const after = await variant({});
  result.env[name] = { ms, defaultBefore: before, defaultAfter: after, settings: env };
  console.log(`${name}: ${ms.toFixed(3)} ms graph replay (default ${before.toFixed(3)} before, ${after.toFixed(3)} after)`);
}
await model.dispose();
if (out) fs.writeFileSync(out, JSON.stringify(result, null, 2));
