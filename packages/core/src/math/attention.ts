/** Shapes one attention call needs; the cache holds rows of numKvHeads * headDim. */
export interface AttentionShape {
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  scale: number;
}

/**
 * Attention of one query token over cache rows [from, to] (inclusive), grouped-query: query head h
 * reads kv head floor(h / (numHeads / numKvHeads)). With `sinks`, head h's sink logit joins the
 * softmax denominator and contributes nothing to the output (gpt-oss).
 * Writes numHeads * headDim values to out[outOffset ..].
 */
export function attendOne(
  q: Float32Array,
  qOffset: number,
  keys: Float32Array,
  values: Float32Array,
  from: number,
  to: number,
  shape: AttentionShape,
  sinks: Float32Array | null,
  out: Float32Array,
  outOffset: number,
  scores: Float64Array,
): void {
  const { numHeads, numKvHeads, headDim, scale } = shape;
  const group = numHeads / numKvHeads;
  const rowStride = numKvHeads * headDim;
  const n = to - from + 1;
  for (let h = 0; h < numHeads; h++) {
    const kvOff = Math.floor(h / group) * headDim;
    const qo = qOffset + h * headDim;
    let m = sinks ? sinks[h] : -Infinity;
    for (let t = 0; t < n; t++) {
      const ko = (from + t) * rowStride + kvOff;
      let s = 0;
      for (let d = 0; d < headDim; d++) s += q[qo + d] * keys[ko + d];
      const sc = Math.fround(Math.fround(s) * scale);
      scores[t] = sc;
      if (sc > m) m = sc;
    }
    let denom = sinks ? Math.exp(sinks[h] - m) : 0;
    for (let t = 0; t < n; t++) denom += (scores[t] = Math.exp(scores[t] - m));
    const oo = outOffset + h * headDim;
    for (let d = 0; d < headDim; d++) {
      let acc = 0;
      for (let t = 0; t < n; t++) acc += scores[t] * values[(from + t) * rowStride + kvOff + d];
      out[oo + d] = acc / denom;
    }
  }
}
