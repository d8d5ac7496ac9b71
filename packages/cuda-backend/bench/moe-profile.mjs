// Runs the tensor-core MoE layer at gpt-oss-20b shapes for a profiler: T tokens (argv[2]), launched
// `repeat` times (argv[3]).
import { randomFillSync } from 'node:crypto';
import { cudaOps } from '../dist/index.js';
const E = 32, K = 4, H = 2880, I = 2880, T = Number(process.argv[2] ?? 1), repeat = Number(process.argv[3] ?? 3);
const mx = (rows, cols) => ({
  blocks: randomFillSync(new Uint8Array(E * rows * (cols / 32) * 16)),
  scales: new Uint8Array(E * rows * (cols / 32)).map(() => 118 + Math.floor(Math.random() * 5)),
  bias: null,
});
const ids = new Int32Array(T * K);
for (let t = 0; t < T; t++) {
  const perm = [...Array(E).keys()].sort(() => Math.random() - 0.5);
  for (let k = 0; k < K; k++) ids[t * K + k] = perm[k];
}
const r = cudaOps().moeMma({ gateUp: mx(2 * I, H), down: mx(H, I), x: new Float32Array(T * H).map(() => Math.random() - 0.5),
  expertIds: ids, expertWeights: new Float32Array(T * K).fill(0.25), tokens: T, topK: K, numExperts: E, hidden: H, inter: I,
  activation: { kind: 'gpt_oss_clamped_swiglu', limit: 7, alpha: 1.702 }, repeat });
console.log(`T=${T}: ${(r.msPerLaunch * 1000).toFixed(1)} us a layer`);
