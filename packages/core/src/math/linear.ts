/**
 * y = W x + b for one row x, W row-major [rows, cols].
 *
 * Each output is one dot product accumulated in float64 in index order, so the result for a
 * token never depends on which other tokens share its step (batch invariance).
 */
export function linear(
  x: Float32Array,
  w: Float32Array,
  rows: number,
  cols: number,
  bias: Float32Array | null,
  out: Float32Array,
): Float32Array {
  for (let r = 0; r < rows; r++) {
    out[r] = dot(w, r * cols, x, cols) + (bias ? bias[r] : 0);
  }
  return out;
}

/** Dot product of w[offset .. offset+n) with x[0 .. n), float64 accumulation in index order. */
export function dot(w: Float32Array, offset: number, x: Float32Array, n: number): number {
  // Four independent partial sums keep the loop fast; their fixed combination order keeps it deterministic.
  let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  let i = 0;
  const n4 = n - (n % 4);
  for (; i < n4; i += 4) {
    s0 += w[offset + i] * x[i];
    s1 += w[offset + i + 1] * x[i + 1];
    s2 += w[offset + i + 2] * x[i + 2];
    s3 += w[offset + i + 3] * x[i + 3];
  }
  for (; i < n; i++) s0 += w[offset + i] * x[i];
  return (s0 + s1) + (s2 + s3);
}
