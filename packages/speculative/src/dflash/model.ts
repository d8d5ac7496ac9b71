/**
 * The DFlash drafter's forward pass on the CPU, with core's reference math.
 *
 * ```
 *  target hidden states at targetLayerIds ──concat──> fc ──> hidden_norm ──> c (one per verified token)
 *        c ──k_proj, k_norm, RoPE / v_proj (every draft layer)──> draft KV cache (context)
 *  [anchor, mask, ..., mask] ──target embedding──> h ──N x layer──> norm ──target LM head──> B rows of logits
 *  layer: h += o(attn(q(norm h) over [context keys | block keys])); h += mlp(norm h)
 * ```
 *
 * The context keys and values of a layer depend on c alone (no draft layer runs on it), so they
 * are computed once when a token is verified and cached; a block's queries, keys and values come
 * from the block's own hidden states. Every block query attends to every context key and to every
 * block key, before or after it (bidirectional, z-lab's `is_causal = False`), unless the config asks
 * for causal or sliding-window attention. Block keys go into the cache past its length and are
 * dropped by leaving the length where it was: the cache only ever holds verified context, exactly
 * what z-lab's reference keeps after `crop(start)`.
 */
import {
  applyRope,
  attendOne,
  linearBatch,
  mlpBatch,
  MlpBatchScratch,
  WasmLinear,
  rmsNorm,
  ropeTable,
  type AttentionShape,
  type RopeTable,
} from '@moeflash/core';
import type { DflashConfig } from './config.js';
import type { DflashWeights } from './weights.js';

/** Per-layer keys and values of the verified context, rows of numKvHeads * headDim. */
export class DflashKvCache {
  keys: Float32Array[];
  values: Float32Array[];
  length = 0;
  private capacity = 0;

  constructor(private readonly numLayers: number, private readonly rowSize: number) {
    this.keys = Array.from({ length: numLayers }, () => new Float32Array(0));
    this.values = Array.from({ length: numLayers }, () => new Float32Array(0));
  }

  reserve(positions: number): void {
    if (positions <= this.capacity) return;
    const cap = Math.max(positions, Math.ceil(this.capacity * 1.5), 64);
    for (let l = 0; l < this.numLayers; l++) {
      const k = new Float32Array(cap * this.rowSize);
      k.set(this.keys[l]!.subarray(0, this.length * this.rowSize));
      this.keys[l] = k;
      const v = new Float32Array(cap * this.rowSize);
      v.set(this.values[l]!.subarray(0, this.length * this.rowSize));
      this.values[l] = v;
    }
    this.capacity = cap;
  }

  /** Forget positions >= length; nothing moves. */
  truncate(length: number): void {
    if (length < 0 || length > this.length) throw new RangeError(`truncate(${length}) on a draft cache of ${this.length} positions`);
    this.length = length;
  }

  bytes(): number {
    return 2 * this.numLayers * this.capacity * this.rowSize * 4;
  }
}

export class DflashDraft {
  private readonly rope: RopeTable;
  private readonly shape: AttentionShape;
  readonly vocabSize: number;
  readonly featureSize: number;
  readonly targetHidden: number;
  /** The draft's matrices in WebAssembly memory (SIMD kernels with linear()'s exact arithmetic), or null. */
  private readonly simd: WasmLinear | null;

  constructor(
    readonly cfg: DflashConfig,
    readonly w: DflashWeights,
    /** The target's shape: each of its layers contributes hiddenSize features. */
    readonly target: { hiddenSize: number; numLayers: number; rmsNormEps: number },
  ) {
    this.targetHidden = target.hiddenSize;
    this.rope = ropeTable(cfg.rope);
    this.shape = { numHeads: cfg.numHeads, numKvHeads: cfg.numKvHeads, headDim: cfg.headDim, scale: 1 / Math.sqrt(cfg.headDim) };
    this.vocabSize = w.lmHead.length / cfg.hiddenSize;
    this.featureSize = cfg.targetLayerIds.length * target.hiddenSize;
    const matrices = [w.fc, w.lmHead, ...w.layers.flatMap((l) => [l.q, l.k, l.v, l.o, l.mlp.gate, l.mlp.up, l.mlp.down])];
    const biases = w.layers.flatMap((l) => [l.qBias, l.kBias, l.vBias, l.oBias]).filter((b): b is Float32Array => b !== null);
    this.simd = WasmLinear.create([...matrices, ...biases], Math.max(this.vocabSize, cfg.intermediateSize, cfg.hiddenSize * 4), Math.max(this.featureSize, cfg.intermediateSize, cfg.hiddenSize * 4));
  }

  /** y = W x + b for one row, through the SIMD kernels when the weights are placed there. */
  private linear(x: Float32Array, wm: Float32Array, rows: number, cols: number, bias: Float32Array | null, out: Float32Array): void {
    linearBatch(x, 1, wm, rows, cols, bias, out, this.simd);
  }

  newCache(): DflashKvCache {
    return new DflashKvCache(this.cfg.numLayers, this.cfg.numKvHeads * this.cfg.headDim);
  }

  /**
   * The context features of `rows` tokens from a step's hidden states (per target layer, row-major
   * [tokens, hidden]): rows `from .. from + rows - 1`, concatenated in targetLayerIds order.
   */
  features(hidden: Map<number, Float32Array> | undefined, from: number, rows: number): Float32Array {
    const Ht = this.targetHidden;
    const ids = this.cfg.targetLayerIds;
    const out = new Float32Array(rows * this.featureSize);
    ids.forEach((id, j) => {
      const h = hidden?.get(id);
      if (!h || h.length < (from + rows) * Ht) {
        throw new Error(`DFlash: the target step returned no hidden states of layer ${id} for ${from + rows} tokens; the drafter needs hiddenLayers ${JSON.stringify(ids)}`);
      }
      for (let r = 0; r < rows; r++) {
        const dst = r * this.featureSize + j * Ht;
        out.set(h.subarray((from + r) * Ht, (from + r + 1) * Ht), dst);
        if (id === this.target.numLayers - 1 && this.w.targetNorm) rmsNorm(out, this.w.targetNorm, this.target.rmsNormEps, out, dst);
      }
    });
    return out;
  }

  /** Appends `rows` verified tokens' context keys and values at positions cache.length onward. */
  absorb(cache: DflashKvCache, features: Float32Array, rows: number): void {
    const { cfg, w } = this;
    const H = cfg.hiddenSize;
    const kvDim = cfg.numKvHeads * cfg.headDim;
    cache.reserve(cache.length + rows);
    const fused = new Float32Array(H);
    const c = new Float32Array(H);
    for (let r = 0; r < rows; r++) {
      const pos = cache.length + r;
      this.linear(features.subarray(r * this.featureSize, (r + 1) * this.featureSize), w.fc, H, this.featureSize, null, fused);
      rmsNorm(fused, w.hiddenNorm, cfg.rmsNormEps, c);
      for (let l = 0; l < cfg.numLayers; l++) {
        const lw = w.layers[l]!;
        const k = cache.keys[l]!.subarray(pos * kvDim, (pos + 1) * kvDim);
        const v = cache.values[l]!.subarray(pos * kvDim, (pos + 1) * kvDim);
        this.key(c, lw, pos, k);
        this.linear(c, lw.v, kvDim, H, lw.vBias, v);
      }
    }
    cache.length += rows;
  }

  private key(x: Float32Array, lw: DflashWeights['layers'][number], pos: number, out: Float32Array): void {
    const { cfg } = this;
    this.linear(x, lw.k, cfg.numKvHeads * cfg.headDim, cfg.hiddenSize, lw.kBias, out);
    for (let h = 0; h < cfg.numKvHeads; h++) {
      rmsNorm(out, lw.kNorm, cfg.rmsNormEps, out, h * cfg.headDim);
      applyRope(out, h * cfg.headDim, pos, this.rope);
    }
  }

  /**
   * One forward pass of the block [anchor, mask x drafts] at positions cache.length onward; returns
   * the logits of the masked positions, row-major [drafts, vocab]. The cache keeps its length.
   */
  block(cache: DflashKvCache, anchor: number, drafts: number): Float32Array {
    const { cfg, w } = this;
    const H = cfg.hiddenSize;
    const V = this.vocabSize;
    const qDim = cfg.numHeads * cfg.headDim;
    const kvDim = cfg.numKvHeads * cfg.headDim;
    const start = cache.length;
    const n = drafts + 1;
    const last = start + drafts;
    cache.reserve(start + n);

    const x = new Float32Array(n * H);
    for (let i = 0; i < n; i++) {
      const token = i === 0 ? anchor : cfg.maskTokenId;
      const row = w.embed.subarray(token * H, (token + 1) * H);
      const dst = x.subarray(i * H, (i + 1) * H);
      if (cfg.inputEmbeddingScale === 1) dst.set(row);
      else for (let d = 0; d < H; d++) dst[d] = row[d]! * cfg.inputEmbeddingScale;
    }
    const normed = new Float32Array(H);
    const q = new Float32Array(n * qDim);
    const attn = new Float32Array(qDim);
    const proj = new Float32Array(H);
    const scores = new Float64Array(last + 1);
    const mlpScratchBatch = new MlpBatchScratch();
    const mlpOut = new Float32Array(H);

    for (let l = 0; l < cfg.numLayers; l++) {
      const lw = w.layers[l]!;
      const window = cfg.windows[l]!;
      for (let i = 0; i < n; i++) {
        const pos = start + i;
        rmsNorm(x.subarray(i * H, (i + 1) * H), lw.inputNorm, cfg.rmsNormEps, normed);
        const qi = q.subarray(i * qDim, (i + 1) * qDim);
        this.linear(normed, lw.q, qDim, H, lw.qBias, qi);
        for (let h = 0; h < cfg.numHeads; h++) {
          rmsNorm(qi, lw.qNorm, cfg.rmsNormEps, qi, h * cfg.headDim);
          applyRope(qi, h * cfg.headDim, pos, this.rope);
        }
        this.key(normed, lw, pos, cache.keys[l]!.subarray(pos * kvDim, (pos + 1) * kvDim));
        this.linear(normed, lw.v, kvDim, H, lw.vBias, cache.values[l]!.subarray(pos * kvDim, (pos + 1) * kvDim));
      }
      for (let i = 0; i < n; i++) {
        const pos = start + i;
        let from = 0;
        let to = cfg.causal ? pos : last;
        if (window !== null) {
          from = Math.max(0, pos - window + 1);
          to = Math.min(to, pos + window - 1);
        }
        attendOne(q, i * qDim, cache.keys[l]!, cache.values[l]!, from, to, this.shape, null, attn, 0, scores);
        this.linear(attn, lw.o, H, qDim, lw.oBias, proj);
        const xi = x.subarray(i * H, (i + 1) * H);
        for (let d = 0; d < H; d++) xi[d]! += proj[d]!;
        rmsNorm(xi, lw.postAttnNorm, cfg.rmsNormEps, normed);
        mlpBatch(normed, 1, lw.mlp, { kind: 'swiglu' }, mlpScratchBatch, mlpOut, this.simd);
        const y = mlpOut;
        for (let d = 0; d < H; d++) xi[d]! += y[d]!;
      }
    }

    const logits = new Float32Array(drafts * V);
    for (let i = 1; i < n; i++) {
      rmsNorm(x.subarray(i * H, (i + 1) * H), w.norm, cfg.rmsNormEps, normed);
      const row = logits.subarray((i - 1) * V, i * V);
      this.linear(normed, w.lmHead, V, H, null, row);
      if (cfg.outputMultiplier !== 1 || cfg.finalLogitSoftcapping !== null) {
        const cap = cfg.finalLogitSoftcapping;
        for (let t = 0; t < V; t++) {
          const v = row[t]! * cfg.outputMultiplier;
          row[t] = cap === null ? v : Math.tanh(v / cap) * cap;
        }
      }
    }
    return logits;
  }
}
