// Where the time of the decode MoE kernels goes, block by block: the layer alone at gpt-oss-20b
// shapes (32 experts, top-4, H = I = 2880, one token), launches back to back with each launch
// routed to 4 other experts (so the weights come from DRAM, as in a model), and in the last
// launch every block's thread 0 stamps %globaltimer at entry, wait passed, plan built, staged,
// stream done and exit (down: + combine done). Prints, per kernel and point, the spread over
// blocks in microseconds from the first stamp of that launch.
//   MOEFLASH_MOE_TRACE=1 node packages/cuda-backend/bench/moe-trace.mjs [out.json]
import { writeFileSync } from 'node:fs';

import { cudaOps } from '../dist/index.js';
import { E, H, I, K, activation, layerWeights, randomIds } from './moe-layer.mjs';

process.env.MOEFLASH_MOE_TRACE = '1';
const T = Number(process.env.MOE_TOKENS ?? 1);
const { gateUp, down } = layerWeights();
const x = new Float32Array(T * H).map(() => Math.random() * 2 - 1);
const ids = randomIds(T, 8);
const w = new Float32Array(T * K).fill(0.25);
const ops = cudaOps();
const res = ops.moeMma({ gateUp, down, x, expertIds: ids, expertWeights: w, tokens: T, topK: K, numExperts: E, hidden: H,
  inter: I, activation, repeat: 64 });
const tr = res.trace;
if (!tr) throw new Error('no trace: was the addon built with the trace points?');
const names = ['entry', 'waited', 'planned', 'staged', 'streamed', 'exit', 'combined'];
// trace: [gate/up, down][block][point] (moe_mma.h: kMoeTraceBlocks, kMoeTracePoints).
const points = 8, traced = tr.length / (2 * points);
const q = (a, f) => a[Math.min(a.length - 1, Math.floor(f * a.length))];
const out = { us_per_layer: res.msPerLaunch * 1000, kernels: {} };
console.log(`T=${T}: ${(res.msPerLaunch * 1000).toFixed(1)} us a layer (launches back to back, experts rotating)`);
for (const [k, name] of [[0, 'gate/up'], [1, 'down']]) {
  out.kernels[name] = {};
  for (let p = 0; p < names.length; p++) {
    const v = [];
    for (let b = 0; b < traced; b++) {
      const t = tr[(k * traced + b) * points + p];
      if (t >= 0) v.push(t / 1000);
    }
    if (!v.length) continue;
    v.sort((a, b) => a - b);
    const row = { blocks: v.length, min: v[0], p10: q(v, 0.1), median: q(v, 0.5), p90: q(v, 0.9), max: v[v.length - 1] };
    out.kernels[name][names[p]] = row;
    console.log(`${name.padEnd(8)} ${names[p].padEnd(9)} blocks ${String(v.length).padStart(4)}  min ${row.min.toFixed(2).padStart(6)}  p10 ${row.p10.toFixed(2).padStart(6)}  median ${row.median.toFixed(2).padStart(6)}  p90 ${row.p90.toFixed(2).padStart(6)}  max ${row.max.toFixed(2).padStart(6)} us`);
  }
}
if (process.argv[2]) writeFileSync(process.argv[2], JSON.stringify(out, null, 2));
