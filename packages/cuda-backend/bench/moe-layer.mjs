// The MoE layer the MoE benchmarks run alone: gpt-oss-20b shapes (32 experts, top-4, hidden =
// inter = 2880), random MXFP4 weights, random routing, its clamped SwiGLU.
import { randomFillSync } from 'node:crypto';

export const E = 32, K = 4, H = 2880, I = 2880;
export const activation = { kind: 'gpt_oss_clamped_swiglu', limit: 7, alpha: 1.702 };

function experts(rows, cols) {
  const blocks = randomFillSync(new Uint8Array(E * rows * (cols / 32) * 16));
  const scales = new Uint8Array(E * rows * (cols / 32)).map(() => 118 + Math.floor(Math.random() * 5));
  return { blocks, scales, bias: null };
}

/** Gate/up and down weights of all E experts. */
export function layerWeights() {
  return { gateUp: experts(2 * I, H), down: experts(H, I) };
}

/** `sets` routings of T tokens ([sets][T][K] ids, K distinct experts a token). */
export function randomIds(T, sets = 1) {
  const ids = new Int32Array(sets * T * K);
  for (let s = 0; s < sets * T; s++) {
    const perm = [...Array(E).keys()].sort(() => Math.random() - 0.5);
    for (let k = 0; k < K; k++) ids[s * K + k] = perm[k];
  }
  return ids;
}
