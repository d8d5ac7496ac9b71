import type { AttentionShape } from '../../math/attention.js';

/**
 * `attendOne` of math/attention.ts, computed in an order that keeps several independent sums in
 * flight: scores of two cache rows at once, outputs of four head dimensions at once. Each sum
 * still adds the same terms in the same order, so results are bit-identical; only the
 * interleaving of unrelated sums changes (a lone float64 sum waits on its own latency every term).
 */
export function attendInterleaved(
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
  const n2 = n - (n % 2);
  const d4 = headDim - (headDim % 4);
  for (let h = 0; h < numHeads; h++) {
    const kvOff = Math.floor(h / group) * headDim;
    const qo = qOffset + h * headDim;
    let m = sinks ? sinks[h] : -Infinity;
    let t = 0;
    for (; t < n2; t += 2) {
      const ka = (from + t) * rowStride + kvOff;
      const kb = ka + rowStride;
      let sa = 0;
      let sb = 0;
      for (let d = 0; d < headDim; d++) {
        const qd = q[qo + d];
        sa += qd * keys[ka + d];
        sb += qd * keys[kb + d];
      }
      const ca = Math.fround(Math.fround(sa) * scale);
      const cb = Math.fround(Math.fround(sb) * scale);
      scores[t] = ca;
      scores[t + 1] = cb;
      if (ca > m) m = ca;
      if (cb > m) m = cb;
    }
    if (t < n) {
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
    let d = 0;
    for (; d < d4; d += 4) {
      let a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (let t = 0, vo = from * rowStride + kvOff + d; t < n; t++, vo += rowStride) {
        const p = scores[t];
        a0 += p * values[vo];
        a1 += p * values[vo + 1];
        a2 += p * values[vo + 2];
        a3 += p * values[vo + 3];
      }
      out[oo + d] = a0 / denom;
      out[oo + d + 1] = a1 / denom;
      out[oo + d + 2] = a2 / denom;
      out[oo + d + 3] = a3 / denom;
    }
    for (; d < headDim; d++) {
      let acc = 0;
      for (let t = 0; t < n; t++) acc += scores[t] * values[(from + t) * rowStride + kvOff + d];
      out[oo + d] = acc / denom;
    }
  }
}
