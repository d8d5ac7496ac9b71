#!/usr/bin/env node
// Total decode throughput of the engine's continuous batching at several concurrency levels:
// N requests in flight at once (each replaced by the next as it finishes), greedy, fixed length.
//   node tools/bench/batching.mjs --model models/moeflash-tiny-coder --concurrency 1,2,4,8,16 \
//     --kernels wasm,js --out bench/results/cpu-batching
// --kernels picks the CPU backend's matrix-product kernels: WebAssembly SIMD, plain JavaScript, or
// both in turn (same results bit for bit; only the speed differs).
// Writes NAME.json and NAME.md (device, date, commit, command). Needs `pnpm build` first.
import { execSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { CpuBackend, createEngine } from '@moeflash/core';

const { values: v } = parseArgs({
  options: {
    model: { type: 'string', default: 'models/moeflash-tiny-coder' },
    prompts: { type: 'string', default: 'bench/prompts/heldout-stdlib.jsonl' },
    concurrency: { type: 'string', default: '1,2,4,8,16' },
    requests: { type: 'string', default: '32' },
    'prompt-tokens': { type: 'string', default: '64' },
    'max-tokens': { type: 'string', default: '64' },
    repeats: { type: 'string', default: '3' },
    backend: { type: 'string', default: 'cpu' },
    kernels: { type: 'string', default: 'wasm' },
    out: { type: 'string' },
  },
});
const levels = v.concurrency.split(',').map(Number);
const requests = Number(v.requests);
const maxTokens = Number(v['max-tokens']);
const promptTokens = Number(v['prompt-tokens']);
const repeats = Number(v.repeats);

const texts = fs.readFileSync(v.prompts, 'utf8').trim().split('\n').map((l) => JSON.parse(l).prompt);

/** The CPU backend with its matrix products in plain JavaScript. */
function jsCpuBackend() {
  const cpu = new CpuBackend();
  return { name: 'cpu', devices: () => cpu.devices(), load: (spec, weights, opts) => cpu.load(spec, weights, { ...opts, simd: false }) };
}

const rows = [];
for (const kernels of v.kernels.split(',')) {
  const backend = v.backend === 'cpu' && kernels === 'js' ? jsCpuBackend() : v.backend;
  // Prefix caching off: every level must do the same prompt work, not reuse the previous level's.
  const engine = await createEngine({ model: v.model, backend, maxBatch: Math.max(...levels), kvCache: { prefixCaching: false }, log: () => {} });
  // Token prompts of one length, so that every level does the same work.
  const prompts = texts.map((t) => engine.tokenizer.encode(t).slice(0, promptTokens)).filter((p) => p.length === promptTokens);
  if (!prompts.length) throw new Error(`no prompt in ${v.prompts} has ${promptTokens} tokens`);
  let steps = [];
  engine.on('step', (s) => steps.push(s));

  /** `requests` requests, at most `c` in flight; returns throughput and latency figures. */
  const run = async (c) => {
    steps = [];
    const ttft = [];
    const perRequest = [];
    let next = 0;
    let tokens = 0;
    const t0 = performance.now();
    const worker = async () => {
      while (next < requests) {
        const i = next++;
        const r = await engine.generate(prompts[i % prompts.length], { maxTokens, temperature: 0, ignoreEos: true }).result;
        tokens += r.tokens.length;
        ttft.push(r.timeToFirstToken);
        perRequest.push(r.tokensPerSecond);
      }
    };
    await Promise.all(Array.from({ length: c }, worker));
    const seconds = (performance.now() - t0) / 1000;
    const mean = (a) => a.reduce((s, x) => s + x, 0) / a.length;
    const decodeSteps = steps.filter((s) => s.prefillTokens === 0);
    return {
      kernels: v.backend === 'cpu' ? kernels : v.backend,
      concurrency: c,
      tokens,
      seconds,
      tokensPerSecond: tokens / seconds,
      perRequestTokensPerSecond: mean(perRequest),
      meanTimeToFirstToken: mean(ttft),
      meanSequencesPerStep: mean(steps.map((s) => s.sequences)),
      meanDecodeStepMs: decodeSteps.length ? mean(decodeSteps.map((s) => s.ms)) : null,
    };
  };

  await run(Math.max(...levels)); // warm-up: JIT and page memory
  const mine = [];
  for (const c of levels) {
    const runs = [];
    for (let k = 0; k < repeats; k++) runs.push(await run(c));
    // The median run by throughput stands for the level.
    runs.sort((a, b) => a.tokensPerSecond - b.tokensPerSecond);
    mine.push(runs[Math.floor(runs.length / 2)]);
  }
  await engine.close();
  const base = mine.find((r) => r.concurrency === 1)?.tokensPerSecond ?? mine[0].tokensPerSecond;
  for (const r of mine) r.speedup = r.tokensPerSecond / base;
  rows.push(...mine);
}


const commit = (() => {
  try {
    return execSync('git rev-parse --short HEAD').toString().trim() + (execSync('git status --porcelain --untracked-files=no').toString().trim() ? ' (uncommitted changes)' : '');
  } catch {
    return 'unknown';
  }
})();
const meta = {
  device: v.backend === 'cpu' ? `CPU: ${os.cpus()[0]?.model} x${os.cpus().length}, Node ${process.version}` : v.backend,
  date: new Date().toISOString(),
  commit,
  command: `node tools/bench/batching.mjs ${process.argv.slice(2).join(' ')}`,
  model: v.model,
  requests,
  promptTokens,
  maxTokens,
  repeats,
};
const md = [
  `| kernels | concurrent requests | total tokens/s | vs 1 | tokens/s per request | mean sequences per step | decode step ms | mean time to first token |`,
  `| --- | --- | --- | --- | --- | --- | --- | --- |`,
  ...rows.map(
    (r) =>
      `| ${r.kernels} | ${r.concurrency} | ${r.tokensPerSecond.toFixed(1)} | ${r.speedup.toFixed(2)}x | ${r.perRequestTokensPerSecond.toFixed(1)} | ${r.meanSequencesPerStep.toFixed(2)} | ${r.meanDecodeStepMs?.toFixed(2) ?? '-'} | ${(r.meanTimeToFirstToken * 1000).toFixed(0)} ms |`,
  ),
].join('\n');
console.log(md);
if (v.out) {
  fs.mkdirSync(path.dirname(v.out), { recursive: true });
  fs.writeFileSync(`${v.out}.json`, JSON.stringify({ ...meta, rows }, null, 2) + '\n');
  fs.writeFileSync(`${v.out}.md`, `${Object.entries(meta).map(([k, x]) => `- ${k}: ${x}`).join('\n')}\n\n${md}\n`);
}
