export function silu(x: number): number {
  return x / (1 + Math.exp(-x));
}

export function sigmoid(x: number): number {
  return 1 / (1 + Math.exp(-x));
}

/** Softmax over v[0..n) in place, max-subtracted, float64 sums. */
export function softmaxInPlace(v: Float32Array | Float64Array, n = v.length): void {
  let m = -Infinity;
  for (let i = 0; i < n; i++) if (v[i] > m) m = v[i];
  let s = 0;
  for (let i = 0; i < n; i++) {
    const e = Math.exp(v[i] - m);
    v[i] = e;
    s += e;
  }
  for (let i = 0; i < n; i++) v[i] /= s;
}
