#!/usr/bin/env node
// Measures speculative decoding on held-out prompts: mean tokens emitted per verify round and the
// speed-up over plain decoding of the same engine, per block size and temperature.
//   node tools/bench/spec-acceptance.mjs --model models/moeflash-tiny-coder \
//     --draft models/moeflash-tiny-coder-dflash --blocks 4,8,16 --temps 0,0.8 --out bench/results/NAME
// Writes NAME.json and NAME.md (device, date, commit, command). Needs `pnpm build` first.
import { execSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { createEngine } from '@moeflash/core';

const { values: v } = parseArgs({
  options: {
    model: { type: 'string', default: 'models/moeflash-tiny-coder' },
    draft: { type: 'string' },
    method: { type: 'string', default: 'dflash' },
    prompts: { type: 'string', default: 'bench/prompts/heldout-stdlib.jsonl' },
    count: { type: 'string', default: '12' },
    blocks: { type: 'string', default: '4,8,16' },
    temps: { type: 'string', default: '0,0.8' },
    'max-tokens': { type: 'string', default: '64' },
    backend: { type: 'string', default: 'cpu' },
    out: { type: 'string' },
  },
});
const prompts = fs.readFileSync(v.prompts, 'utf8').trim().split('\n').map((l) => JSON.parse(l).prompt).slice(0, Number(v.count));
const blocks = v.blocks.split(',').map(Number);
const temps = v.temps.split(',').map(Number);
const maxTokens = Number(v['max-tokens']);
// Fixed block sizes per row (the policy off), and with --adaptive one more row where it chooses.
const speculative = v.method === 'dflash' ? { method: 'dflash', draft: v.draft, blockSize: blocks[0], adaptive: false } : { method: v.method, blockSize: blocks[0], adaptive: false };

const engine = await createEngine({ model: v.model, backend: v.backend, speculative, log: () => {} });

async function runAll(temperature, spec) {
  let tokens = 0, ms = 0, rounds = 0, emitted = 0, drafted = 0, accepted = 0;
  for (let i = 0; i < prompts.length; i++) {
    const t0 = performance.now();
    const r = await engine.generate(prompts[i], { maxTokens, temperature, topP: temperature ? 0.95 : undefined, seed: i + 1, ignoreEos: true, speculative: spec }).result;
    ms += performance.now() - t0;
    tokens += r.tokens.length;
    if (r.speculation) {
      rounds += r.speculation.rounds;
      emitted += r.speculation.meanAcceptedPerRound * r.speculation.rounds;
      drafted += r.speculation.draftedTokens;
      accepted += r.speculation.acceptedTokens;
    }
  }
  return { tokens, seconds: ms / 1000, tokensPerSecond: (tokens * 1000) / ms, rounds, meanPerRound: rounds ? emitted / rounds : null, draftAcceptance: drafted ? accepted / drafted : null };
}

const rows = [];
for (const temperature of temps) {
  await runAll(temperature, false); // warm-up
  const plain = await runAll(temperature, false);
  rows.push({ temperature, blockSize: 0, ...plain, speedup: 1 });
  for (const blockSize of blocks) {
    const r = await runAll(temperature, { blockSize });
    rows.push({ temperature, blockSize, ...r, speedup: r.tokensPerSecond / plain.tokensPerSecond });
  }
}
await engine.close();

const commit = (() => { try { return execSync('git rev-parse --short HEAD').toString().trim(); } catch { return 'unknown'; } })();
let gpu = v.backend;
if (v.backend === 'cuda') {
  try {
    const a = (await import('@moeflash/cuda-backend')).isCudaAvailable();
    if (a.ok) gpu = `${a.devices[0].name} (CUDA backend)`;
  } catch {}
}
const meta = {
  device: v.backend === 'cpu' ? `CPU: ${os.cpus()[0]?.model} x${os.cpus().length}` : gpu,
  date: new Date().toISOString(),
  commit,
  command: `node tools/bench/spec-acceptance.mjs ${process.argv.slice(2).join(' ')}`,
  model: v.model, draft: v.draft ?? null, method: v.method, prompts: prompts.length, maxTokens,
};
const md = [
  `| temperature | block size | tokens per verify round | drafts accepted | tokens/s | speed-up |`,
  `| --- | --- | --- | --- | --- | --- |`,
  ...rows.map((r) => `| ${r.temperature} | ${r.blockSize || 'plain'} | ${r.meanPerRound?.toFixed(2) ?? '1.00'} | ${r.draftAcceptance === null ? '-' : (100 * r.draftAcceptance).toFixed(1) + ' %'} | ${r.tokensPerSecond.toFixed(1)} | ${r.speedup.toFixed(2)}x |`),
].join('\n');
console.log(md);
if (v.out) {
  fs.mkdirSync(path.dirname(v.out), { recursive: true });
  fs.writeFileSync(`${v.out}.json`, JSON.stringify({ ...meta, rows }, null, 2) + '\n');
  fs.writeFileSync(`${v.out}.md`, `${Object.entries(meta).map(([k, x]) => `- ${k}: ${x}`).join('\n')}\n\n${md}\n`);
}
