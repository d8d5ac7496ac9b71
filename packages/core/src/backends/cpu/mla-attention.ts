import type { AttentionShape } from '../../math/attention.js';
import { absorbQuery, expandValues, latentRow, latentRowSize, type MlaWeights } from '../../math/mla.js';
import { rmsNorm } from '../../math/norm.js';
import type { RopeTable } from '../../math/rope.js';
import type { ModelSpec } from '../../model/spec.js';
import { attendInterleaved } from './attention.js';
import { linearBatch } from './batched.js';
import type { KvPagePool, PagedSequence } from './kv-cache.js';
import type { WasmLinear } from './wasm-linear.js';

/** One sequence's rows of a step: rows [first, first + count) at positions start, start + 1, ... */
export interface StepRows {
  seq: PagedSequence;
  first: number;
  count: number;
  start: number;
}

/**
 * One latent-attention layer (deepseek_v3) over a step's tokens, on the CPU: projections, the
 * compressed cache rows (math/mla.ts), absorbed attention as one-KV-head attention over those rows,
 * value up-projection and o_proj. The page pool holds one row of kv_lora_rank + qk_rope_head_dim
 * values a position and layer, the same row serving as key and (its first kv_lora_rank values) as
 * value. Each token's arithmetic is independent of what else shares its step.
 */
export class MlaAttention {
  private readonly row: number;
  private readonly shape: AttentionShape;
  private run = new Float32Array(0);
  private readonly scratch: Float32Array;

  constructor(
    private readonly spec: ModelSpec,
    private readonly rope: RopeTable,
    private readonly simd: WasmLinear | null,
  ) {
    const m = spec.attention.mla!;
    this.row = latentRowSize(m);
    // Every query head attends over the same latent rows: multi-query attention of row-wide heads.
    this.shape = { numHeads: spec.attention.numHeads, numKvHeads: 1, headDim: this.row, scale: spec.attention.scale };
    this.scratch = new Float32Array(this.row);
  }

  /** Writes the layer's attention output, after o_proj, to proj [n, hidden]. */
  forward(layer: number, w: MlaWeights, normed: Float32Array, n: number, spans: readonly StepRows[], pos: Int32Array, pool: KvPagePool, proj: Float32Array): void {
    const { spec, rope, row, simd } = this;
    const H = spec.hiddenSize;
    const a = spec.attention;
    const m = a.mla!;
    const heads = a.numHeads;
    const qDim = heads * a.headDim;
    const q = new Float32Array(n * qDim);
    if (w.q) {
      linearBatch(normed, n, w.q, qDim, H, null, q, simd);
    } else {
      const r = m.qLoraRank!;
      const qa = new Float32Array(n * r);
      linearBatch(normed, n, w.qA!, r, H, null, qa, simd);
      for (let i = 0; i < n; i++) rmsNorm(qa, w.qANorm!, spec.rmsNormEps, qa, i * r);
      linearBatch(qa, n, w.qB!, qDim, r, null, q, simd);
    }
    const kv = new Float32Array(n * row);
    linearBatch(normed, n, w.kvA, row, H, null, kv, simd);

    const P = pool.pageSize;
    const layerOff = layer * pool.layerStride;
    const absorbed = new Float32Array(n * heads * row);
    // Every token's row enters the cache before any attention, so later tokens of a sequence see
    // earlier ones of the same step as if those had come in earlier steps.
    for (const sp of spans) {
      for (let i = sp.first; i < sp.first + sp.count; i++) {
        latentRow(kv, i * row, w.kvANorm, spec.rmsNormEps, pos[i], m, rope, this.scratch);
        const page = pool.page(sp.seq.pages[Math.floor(pos[i] / P)]);
        page.set(kv.subarray(i * row, (i + 1) * row), layerOff + (pos[i] % P) * row);
        absorbQuery(q, i * qDim, w, pos[i], m, rope, absorbed, i * heads * row, this.scratch);
      }
    }

    const latentOut = new Float32Array(n * heads * row);
    const values = new Float32Array(n * heads * m.vHeadDim);
    let maxLen = 0;
    for (const sp of spans) maxLen = Math.max(maxLen, sp.start + sp.count);
    if (this.run.length < maxLen * row) this.run = new Float32Array(maxLen * row);
    const scores = new Float64Array(maxLen);
    for (const sp of spans) {
      const end = sp.start + sp.count;
      for (let pg = 0; pg * P < end; pg++) {
        const rows = Math.min(P, end - pg * P);
        this.run.set(pool.page(sp.seq.pages[pg]).subarray(layerOff, layerOff + rows * row), pg * P * row);
      }
      for (let i = sp.first; i < sp.first + sp.count; i++) {
        attendInterleaved(absorbed, i * heads * row, this.run, this.run, 0, pos[i], this.shape, null, latentOut, i * heads * row, scores);
        expandValues(latentOut, i * heads * row, w, m, values, i * heads * m.vHeadDim);
      }
    }
    linearBatch(values, n, w.o, H, heads * m.vHeadDim, null, proj, simd);
  }
}
