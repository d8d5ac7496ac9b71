// Times the tensor-core MoE layer alone at gpt-oss-20b shapes (32 experts, top-4, hidden = inter =
// 2880, MXFP4) for several token counts: device time a launch (plan, gate/up, down + combine), the
// launches queued back to back. Prints a table and writes JSON to argv[2].
//   node packages/cuda-backend/bench/moe-mma-bench.mjs out.json   (MOE_TOKENS=1,8 picks the token counts)
import { writeFileSync } from 'node:fs';

import { cudaOps } from '../dist/index.js';
import { E, H, I, K, activation, layerWeights, randomIds } from './moe-layer.mjs';

const { gateUp, down } = layerWeights();
const ops = cudaOps();
const rows = [];
const bytesPerExpert = (2 * I * H + H * I) * (17 / 32);
const tokenList = process.env.MOE_TOKENS ? process.env.MOE_TOKENS.split(',').map(Number) : [1, 2, 4, 8, 16, 32, 64, 128, 256, 512];
for (const T of tokenList) {
  const x = new Float32Array(T * H).map(() => Math.random() * 2 - 1);
  const ids = randomIds(T);
  const w = new Float32Array(T * K).fill(0.25);
  const res = ops.moeMma({ gateUp, down, x, expertIds: ids, expertWeights: w, tokens: T, topK: K, numExperts: E, hidden: H,
    inter: I, activation, repeat: T <= 32 ? 201 : 21 });
  const us = res.msPerLaunch * 1000;
  const distinct = new Set(ids).size;
  const gbs = (distinct * bytesPerExpert) / (us * 1e-6) / 1e9;
  rows.push({ tokens: T, us_per_layer: +us.toFixed(1), distinct_experts: distinct, GBps: +gbs.toFixed(0) });
  console.log(`T=${String(T).padStart(3)}  ${us.toFixed(1).padStart(8)} us/layer  experts ${distinct}  ${gbs.toFixed(0)} GB/s`);
}
if (process.argv[2]) writeFileSync(process.argv[2], JSON.stringify({ shape: { E, K, H, I }, rows }, null, 2));
