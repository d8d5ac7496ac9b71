import type { ExpertActivation } from '../model/spec.js';
import { sigmoid, silu } from './activations.js';
import { linear } from './linear.js';

/**
 * One expert (or a dense MLP) in float32, canonical orientation: gate and up [inter, hidden],
 * down [hidden, inter]. gpt-oss's interleaved gate/up rows are split into these at load.
 */
export interface MlpWeights {
  gate: Float32Array;
  up: Float32Array;
  down: Float32Array;
  gateBias: Float32Array | null;
  upBias: Float32Array | null;
  downBias: Float32Array | null;
  inter: number;
  hidden: number;
}

/** Scratch buffers reused across calls so the hot loop allocates nothing. */
export interface MlpScratch {
  gate: Float32Array;
  up: Float32Array;
  y: Float32Array;
}

export function mlpScratch(inter: number, hidden: number): MlpScratch {
  return { gate: new Float32Array(inter), up: new Float32Array(inter), y: new Float32Array(hidden) };
}

/** y = down(act(gate x, up x)) (+ biases); writes s.y and returns it. */
export function mlpForward(x: Float32Array, w: MlpWeights, act: ExpertActivation, s: MlpScratch): Float32Array {
  const { inter, hidden } = w;
  linear(x, w.gate, inter, hidden, w.gateBias, s.gate);
  linear(x, w.up, inter, hidden, w.upBias, s.up);
  const g = s.gate;
  const u = s.up;
  if (act.kind === 'swiglu') {
    for (let i = 0; i < inter; i++) g[i] = Math.fround(silu(g[i])) * u[i];
  } else {
    const { limit, alpha } = act;
    for (let i = 0; i < inter; i++) {
      const gi = Math.min(g[i], limit);
      const ui = Math.min(Math.max(u[i], -limit), limit);
      g[i] = (ui + 1) * Math.fround(gi * sigmoid(gi * alpha));
    }
  }
  return linear(g, w.down, hidden, inter, w.downBias, s.y);
}
