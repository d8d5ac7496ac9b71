import type { ExpertActivation } from '../../model/spec.js';
import type { MlpWeights } from '../../math/experts.js';
import { sigmoid, silu } from '../../math/activations.js';
import { linear } from '../../math/linear.js';
import type { WasmLinear } from './wasm-linear.js';

/*
 * Matrix products over all tokens of a step, reading each weight row once for all of them.
 *
 * Every output element is computed by exactly the arithmetic of `linear` in math/linear.ts (one
 * float64 dot product with four partial sums combined as (s0 + s1) + (s2 + s3), then the bias):
 * only the loop order differs, so a token's result stays bit-identical to computing it alone.
 * Two tokens share each pass over a row so that the row's values are loaded once per pair.
 * Where WebAssembly SIMD is available the same arithmetic runs there (wasm-linear.ts).
 */

/**
 * out[t * rows + r] = W[r] . x[t] + bias[r] for t < n; x is [n, cols], W is [rows, cols].
 */
export function linearBatch(
  x: Float32Array,
  n: number,
  w: Float32Array,
  rows: number,
  cols: number,
  bias: Float32Array | null,
  out: Float32Array,
  simd: WasmLinear | null = null,
): void {
  if (simd?.linear(x, n, w, rows, cols, bias, out)) return;
  if (n === 1) {
    linear(x, w, rows, cols, bias, out);
    return;
  }
  const pairs = n - (n % 2);
  for (let r = 0; r < rows; r++) {
    const wo = r * cols;
    const b = bias ? bias[r] : 0;
    let t = 0;
    for (; t < pairs; t += 2) dotPair(w, wo, x, t * cols, cols, b, out, t * rows + r, (t + 1) * rows + r);
    if (t < n) out[t * rows + r] = dotAt(w, wo, x, t * cols, cols) + b;
  }
}

/** `dot` of math/linear.ts with x read from an offset. */
function dotAt(w: Float32Array, wo: number, x: Float32Array, xo: number, cols: number): number {
  let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  let i = 0;
  const n4 = cols - (cols % 4);
  for (; i < n4; i += 4) {
    s0 += w[wo + i] * x[xo + i];
    s1 += w[wo + i + 1] * x[xo + i + 1];
    s2 += w[wo + i + 2] * x[xo + i + 2];
    s3 += w[wo + i + 3] * x[xo + i + 3];
  }
  for (; i < cols; i++) s0 += w[wo + i] * x[xo + i];
  return (s0 + s1) + (s2 + s3);
}

/** Two tokens' `dot` with one row, each with its own four partial sums, plus the bias. */
function dotPair(w: Float32Array, wo: number, x: Float32Array, xa: number, cols: number, b: number, out: Float32Array, oa: number, ob: number): void {
  const xb = xa + cols;
  let a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  let b0 = 0, b1 = 0, b2 = 0, b3 = 0;
  let i = 0;
  const n4 = cols - (cols % 4);
  for (; i < n4; i += 4) {
    const w0 = w[wo + i], w1 = w[wo + i + 1], w2 = w[wo + i + 2], w3 = w[wo + i + 3];
    a0 += w0 * x[xa + i];
    a1 += w1 * x[xa + i + 1];
    a2 += w2 * x[xa + i + 2];
    a3 += w3 * x[xa + i + 3];
    b0 += w0 * x[xb + i];
    b1 += w1 * x[xb + i + 1];
    b2 += w2 * x[xb + i + 2];
    b3 += w3 * x[xb + i + 3];
  }
  for (; i < cols; i++) {
    a0 += w[wo + i] * x[xa + i];
    b0 += w[wo + i] * x[xb + i];
  }
  out[oa] = (a0 + a1) + (a2 + a3) + b;
  out[ob] = (b0 + b1) + (b2 + b3) + b;
}

/** Buffers of the batched MLP, grown on demand and reused across steps. */
export class MlpBatchScratch {
  gate = new Float32Array(0);
  up = new Float32Array(0);

  fit(n: number, inter: number): void {
    if (this.gate.length < n * inter) {
      this.gate = new Float32Array(n * inter);
      this.up = new Float32Array(n * inter);
    }
  }
}

/**
 * y[t] = down(act(gate x[t], up x[t])) for t < n, as `mlpForward` computes each token; x is
 * [n, hidden], y is [n, hidden].
 */
export function mlpBatch(x: Float32Array, n: number, w: MlpWeights, act: ExpertActivation, s: MlpBatchScratch, y: Float32Array, simd: WasmLinear | null = null): void {
  const { inter, hidden } = w;
  s.fit(n, inter);
  const g = s.gate;
  const u = s.up;
  linearBatch(x, n, w.gate, inter, hidden, w.gateBias, g, simd);
  linearBatch(x, n, w.up, inter, hidden, w.upBias, u, simd);
  const m = n * inter;
  if (act.kind === 'swiglu') {
    for (let i = 0; i < m; i++) g[i] = Math.fround(silu(g[i])) * u[i];
  } else {
    const { limit, alpha } = act;
    for (let i = 0; i < m; i++) {
      const gi = Math.min(g[i], limit);
      const ui = Math.min(Math.max(u[i], -limit), limit);
      g[i] = (ui + 1) * Math.fround(gi * sigmoid(gi * alpha));
    }
  }
  linearBatch(g, n, w.down, hidden, inter, w.downBias, y, simd);
}
