/**
 * RMSNorm as HF computes it: x * rsqrt(mean(x^2) + eps), then times the weight.
 * Works on x[offset .. offset + weight.length) and writes the same range of `out`.
 */
export function rmsNorm(
  x: Float32Array,
  weight: Float32Array,
  eps: number,
  out: Float32Array,
  offset = 0,
): Float32Array {
  const n = weight.length;
  let ss = 0;
  for (let i = 0; i < n; i++) {
    const v = x[offset + i];
    ss += v * v;
  }
  const inv = 1 / Math.sqrt(ss / n + eps);
  for (let i = 0; i < n; i++) out[offset + i] = Math.fround(x[offset + i] * inv) * weight[i];
  return out;
}
