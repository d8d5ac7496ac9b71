import { MoeflashError } from '../../errors.js';
import type { AttentionShape } from '../../math/attention.js';
import { rmsNorm } from '../../math/norm.js';
import { applyRope, ropeTable, type RopeTable } from '../../math/rope.js';
import { route } from '../../math/router.js';
import type { ModelSpec } from '../../model/spec.js';
import { sampleTokenOrReject } from '../../sampling/sample.js';
import type { ModelWeights } from '../../weights/layouts.js';
import type { KvPageStats, LoadedModel, MemoryReport, RoutingTrace, SeqId, SequenceOutput, StepPlan, StepResult } from '../backend.js';
import { attendInterleaved } from './attention.js';
import { linearBatch, mlpBatch, MlpBatchScratch } from './batched.js';
import { KvPagePool, PagedSequence } from './kv-cache.js';
import { MlaAttention } from './mla-attention.js';
import { WasmLinear } from './wasm-linear.js';
import { latentRowSize } from '../../math/mla.js';
import type { AttentionWeights, LayerWeights } from '../../weights/layouts.js';

/** The KV page pool of a CPU model. */
export interface CpuKvOptions {
  pageSize: number;
  pages: number;
  prefixCaching: boolean;
}

export interface CpuModelOptions {
  /**
   * Run matrix products on WebAssembly SIMD (same arithmetic, bit-identical results) where the
   * runtime supports it and the weights fit in its 32-bit memory (default true).
   */
  simd?: boolean;
  /**
   * Move the weights into the WebAssembly memory instead of copying them there: the arrays of
   * `w` are replaced by equal views, so the model does not hold them twice. For a `w` nobody
   * else uses (CpuBackend.load).
   */
  adoptWeights?: boolean;
}

/** One step's tokens of one sequence: rows [first, first + count) of the step. */
interface Span {
  seq: PagedSequence;
  first: number;
  count: number;
  start: number;
}

/**
 * The float32 reference forward pass of every supported family.
 *
 * Each token's arithmetic is the same whatever else shares its step (same operations in the same
 * order): a sequence's logits are bit-identical alone or batched, one token a step or all at once.
 * Matrix products run over all tokens of the step at once, weight row by weight row, which only
 * reorders independent dot products. Experts run on the tokens routed to them, gathered.
 */
export class CpuModel implements LoadedModel {
  private readonly seqs = new Map<SeqId, PagedSequence>();
  private readonly pool: KvPagePool;
  private readonly rope: RopeTable;
  private readonly shape: AttentionShape;
  private readonly weightBytes: number;
  private readonly mlp = new MlpBatchScratch();
  /** The matrix-product kernels over this model's weights, when WebAssembly SIMD is in use. */
  private readonly simd: WasmLinear | null;
  /** Latent attention (deepseek_v3), else null. */
  private readonly mla: MlaAttention | null;
  private keyRun = new Float32Array(0);
  private valueRun = new Float32Array(0);
  private disposed = false;
  /** StepSequence.sample runs core's sampler on the step's own logits. */
  readonly sampling = true;

  constructor(
    readonly spec: ModelSpec,
    private readonly w: ModelWeights,
    kv: CpuKvOptions = { pageSize: 16, pages: 4096, prefixCaching: true },
    opts: CpuModelOptions = {},
  ) {
    this.rope = ropeTable(spec.attention.rope);
    const a = spec.attention;
    this.simd = opts.simd === false ? null : placeWeights(spec, w, opts.adoptWeights === true);
    this.shape = { numHeads: a.numHeads, numKvHeads: a.numKvHeads, headDim: a.headDim, scale: a.scale };
    this.weightBytes = countWeightBytes(w);
    this.mla = a.mla ? new MlaAttention(spec, this.rope, this.simd) : null;
    // Latent attention caches one compressed row a position, serving as key and value.
    const rows = a.mla ? { rowSize: latentRowSize(a.mla), valueRowSize: 0 } : { rowSize: a.numKvHeads * a.headDim };
    this.pool = new KvPagePool({ numLayers: spec.numLayers, ...rows, ...kv });
  }

  /** Where matrix products run: WebAssembly SIMD or plain JavaScript (same results either way). */
  get kernels(): 'wasm-simd' | 'js' {
    return this.simd ? 'wasm-simd' : 'js';
  }

  length(seq: SeqId): number {
    return this.seqs.get(seq)?.length ?? 0;
  }

  truncate(seq: SeqId, length: number): void {
    const s = this.seqs.get(seq);
    if (!s) return;
    if (!Number.isInteger(length) || length < 0 || length > s.length) {
      throw new MoeflashError('INVALID_ARGUMENT', `truncate(${seq}, ${length}): the sequence holds ${s.length} positions; length must be in [0, ${s.length}]`);
    }
    this.pool.truncate(s, length);
  }

  release(seq: SeqId): void {
    const s = this.seqs.get(seq);
    if (!s) return;
    this.pool.releaseSequence(s);
    this.seqs.delete(seq);
  }

  kvPages(): KvPageStats {
    return this.pool.stats();
  }

  reserve(seq: SeqId, length: number): boolean {
    return this.pool.ensure(this.sequence(seq), length);
  }

  reusePrefix(seq: SeqId, tokens: readonly number[]): number {
    return this.pool.reusePrefix(this.sequence(seq), tokens);
  }

  memory(): MemoryReport {
    const kv = this.pool.bytes();
    return { weights: this.weightBytes, kvCache: kv, activations: 0, total: this.weightBytes + kv };
  }

  async dispose(): Promise<void> {
    for (const id of [...this.seqs.keys()]) this.release(id);
    this.disposed = true;
  }

  private sequence(id: SeqId): PagedSequence {
    let s = this.seqs.get(id);
    if (!s) {
      s = new PagedSequence();
      this.seqs.set(id, s);
    }
    return s;
  }

  /**
   * One grouped-query attention layer over the step's tokens: q, and k/v into the cache, for every
   * token before any attention (later tokens of a sequence see earlier ones of the same step
   * exactly as if those had come in earlier steps), then attention and o_proj into proj [n, H].
   */
  private attendGqa(l: number, attn: AttentionWeights, normed: Float32Array, n: number, spans: readonly Span[], pos: Int32Array, proj: Float32Array): void {
    const { spec, pool } = this;
    const H = spec.hiddenSize;
    const a = spec.attention;
    const qDim = a.numHeads * a.headDim;
    const kvDim = a.numKvHeads * a.headDim;
    const P = pool.pageSize;
    const window = spec.layers[l].slidingWindow;
    const q = new Float32Array(n * qDim);
    const k = new Float32Array(n * kvDim);
    const v = new Float32Array(n * kvDim);
    const attnOut = new Float32Array(n * qDim);
    let maxLen = 0;
    for (const sp of spans) maxLen = Math.max(maxLen, sp.start + sp.count);
    const scores = new Float64Array(maxLen);
    if (this.keyRun.length < maxLen * kvDim) {
      this.keyRun = new Float32Array(maxLen * kvDim);
      this.valueRun = new Float32Array(maxLen * kvDim);
    }
    const keyRun = this.keyRun;
    const valueRun = this.valueRun;
    linearBatch(normed, n, attn.q, qDim, H, attn.qBias, q, this.simd);
    linearBatch(normed, n, attn.k, kvDim, H, attn.kBias, k, this.simd);
    linearBatch(normed, n, attn.v, kvDim, H, attn.vBias, v, this.simd);
    const layerOff = l * pool.layerStride;
    for (const sp of spans) {
      for (let i = sp.first; i < sp.first + sp.count; i++) {
        for (let h = 0; h < a.numHeads; h++) {
          const off = i * qDim + h * a.headDim;
          if (attn.qNorm) rmsNorm(q, attn.qNorm, spec.rmsNormEps, q, off);
          applyRope(q, off, pos[i], this.rope);
        }
        for (let h = 0; h < a.numKvHeads; h++) {
          const off = i * kvDim + h * a.headDim;
          if (attn.kNorm) rmsNorm(k, attn.kNorm, spec.rmsNormEps, k, off);
          applyRope(k, off, pos[i], this.rope);
        }
        const page = pool.page(sp.seq.pages[Math.floor(pos[i] / P)]);
        const at = layerOff + (pos[i] % P) * kvDim;
        page.set(k.subarray(i * kvDim, (i + 1) * kvDim), at);
        page.set(v.subarray(i * kvDim, (i + 1) * kvDim), at + pool.valueOffset);
      }
    }
    // Attention reads a sequence's rows from a contiguous run, gathered from its pages once per
    // layer for all its tokens of the step.
    for (const sp of spans) {
      const end = sp.start + sp.count;
      const lo = window === null ? 0 : Math.max(0, sp.start - window + 1);
      for (let pg = Math.floor(lo / P); pg * P < end; pg++) {
        const page = pool.page(sp.seq.pages[pg]);
        const rows = Math.min(P, end - pg * P);
        keyRun.set(page.subarray(layerOff, layerOff + rows * kvDim), pg * P * kvDim);
        valueRun.set(page.subarray(layerOff + pool.valueOffset, layerOff + pool.valueOffset + rows * kvDim), pg * P * kvDim);
      }
      for (let i = sp.first; i < sp.first + sp.count; i++) {
        const from = window === null ? 0 : Math.max(0, pos[i] - window + 1);
        attendInterleaved(q, i * qDim, keyRun, valueRun, from, pos[i], this.shape, attn.sinks, attnOut, i * qDim, scores);
      }
    }
    linearBatch(attnOut, n, attn.o, H, qDim, attn.oBias, proj, this.simd);
  }

  async step(plan: StepPlan): Promise<StepResult> {
    if (this.disposed) throw new MoeflashError('CLOSED', 'step() on a disposed model');
    const { spec, w, pool } = this;
    const H = spec.hiddenSize;
    const V = spec.vocabSize;
    const P = pool.pageSize;

    const seen = new Set<SeqId>();
    for (const s of plan.sequences) {
      if (seen.has(s.seq)) throw new MoeflashError('INVALID_ARGUMENT', `sequence ${s.seq} appears twice in one step`);
      seen.add(s.seq);
      for (const token of s.tokens) {
        if (!Number.isInteger(token) || token < 0 || token >= V) {
          throw new MoeflashError('INVALID_ARGUMENT', `token id ${token} of sequence ${s.seq} is outside the vocabulary [0, ${V})`);
        }
      }
    }
    const spans: Span[] = [];
    let n = 0;
    for (const s of plan.sequences) {
      const seq = this.sequence(s.seq);
      if (!pool.ensure(seq, seq.length + s.tokens.length)) {
        const st = pool.stats();
        throw new MoeflashError(
          'OUT_OF_MEMORY',
          `KV cache full: sequence ${s.seq} needs room for ${seq.length + s.tokens.length} positions but only ${st.free + st.cached} of ${st.total} pages of ${P} positions are free; load with a larger kvCache.pages, or let the engine's scheduler preempt`,
        );
      }
      spans.push({ seq, first: n, count: s.tokens.length, start: seq.length });
      n += s.tokens.length;
    }
    const pos = new Int32Array(n);
    const tokens = new Int32Array(n);
    spans.forEach((sp, si) => {
      plan.sequences[si].tokens.forEach((t, i) => {
        pos[sp.first + i] = sp.start + i;
        tokens[sp.first + i] = t;
      });
    });

    const x = new Float32Array(n * H);
    for (let i = 0; i < n; i++) x.set(w.embed.subarray(tokens[i] * H, (tokens[i] + 1) * H), i * H);

    const hiddenOut = plan.sequences.map((s) => (s.hiddenLayers?.length ? new Map<number, Float32Array>() : undefined));
    const traces = plan.sequences.map((s): RoutingTrace | undefined => (s.traceRouting ? { logits: [], experts: [] } : undefined));
    const normed = new Float32Array(n * H);
    const proj = new Float32Array(n * H);
    const E = spec.moe.numExperts;
    const topK = spec.moe.topK;
    const routerLogits = new Float32Array(n * E);
    const expertOut = new Float32Array(n * topK * H);
    const mlpOut = new Float32Array(n * H);
    const mlpAcc = new Float64Array(H);
    const routedTo: number[][] = Array.from({ length: E }, () => []);
    const routeWeights: Float32Array[] = new Array(n);
    const gathered = new Float32Array(n * H);

    for (let l = 0; l < spec.numLayers; l++) {
      const lw = w.layers[l];
      for (let i = 0; i < n; i++) rmsNorm(x, lw.inputNorm, spec.rmsNormEps, normed, i * H);
      if (this.mla) this.mla.forward(l, lw.mla!, normed, n, spans, pos, pool, proj);
      else this.attendGqa(l, lw.attn, normed, n, spans, pos, proj);
      for (let j = 0; j < n * H; j++) x[j] += proj[j];
      for (let i = 0; i < n; i++) rmsNorm(x, lw.postAttnNorm, spec.rmsNormEps, normed, i * H);

      if (lw.dense) {
        mlpBatch(normed, n, lw.dense, { kind: 'swiglu' }, this.mlp, mlpOut, this.simd);
        for (let j = 0; j < n * H; j++) x[j] += mlpOut[j];
      } else {
        const router = lw.router!;
        linearBatch(normed, n, router.weight, E, H, router.bias, routerLogits, this.simd);
        for (const list of routedTo) list.length = 0;
        for (let i = 0; i < n; i++) {
          const { experts, weights } = route(routerLogits.subarray(i * E, (i + 1) * E), spec.moe, router.correctionBias ?? null);
          routeWeights[i] = weights;
          for (let j = 0; j < experts.length; j++) routedTo[experts[j]].push(i * topK + j);
        }
        for (let e = 0; e < E; e++) {
          const slots = routedTo[e];
          if (!slots.length) continue;
          const m = slots.length;
          for (let r = 0; r < m; r++) {
            const i = Math.floor(slots[r] / topK);
            gathered.set(normed.subarray(i * H, (i + 1) * H), r * H);
          }
          mlpBatch(gathered, m, lw.experts![e], spec.moe.activation, this.mlp, mlpOut, this.simd);
          for (let r = 0; r < m; r++) expertOut.set(mlpOut.subarray(r * H, (r + 1) * H), slots[r] * H);
        }
        // Shared experts (deepseek_v3) see every token, unweighted.
        if (lw.shared) mlpBatch(normed, n, lw.shared, { kind: 'swiglu' }, this.mlp, mlpOut, this.simd);
        // Each token sums its experts in routing order, exactly as one token alone would.
        for (let i = 0; i < n; i++) {
          const weights = routeWeights[i];
          mlpAcc.fill(0);
          for (let j = 0; j < weights.length; j++) {
            const y = (i * topK + j) * H;
            const wj = weights[j];
            for (let d = 0; d < H; d++) mlpAcc[d] += Math.fround(expertOut[y + d] * wj);
          }
          if (lw.shared) for (let d = 0; d < H; d++) mlpAcc[d] += mlpOut[i * H + d];
          for (let d = 0; d < H; d++) x[i * H + d] += mlpAcc[d];
        }
        traces.forEach((t, si) => {
          if (!t) return;
          const sp = spans[si];
          const ids = new Int32Array(sp.count * topK);
          for (let j = 0; j < sp.count * topK; j++) ids[j] = -1;
          routedTo.forEach((slots, e) => {
            for (const slot of slots) {
              const i = Math.floor(slot / topK);
              if (i >= sp.first && i < sp.first + sp.count) ids[(i - sp.first) * topK + (slot % topK)] = e;
            }
          });
          t.logits[l] = routerLogits.slice(sp.first * E, (sp.first + sp.count) * E);
          t.experts[l] = ids;
        });
      }
      traces.forEach((t) => {
        if (t && !t.logits[l]) {
          t.logits[l] = new Float32Array(0);
          t.experts[l] = new Int32Array(0);
        }
      });
      plan.sequences.forEach((s, si) => {
        if (!s.hiddenLayers?.includes(l)) return;
        const sp = spans[si];
        hiddenOut[si]!.set(l, x.slice(sp.first * H, (sp.first + sp.count) * H));
      });
    }

    spans.forEach((sp, si) => {
      const seq = sp.seq;
      for (const t of plan.sequences[si].tokens) seq.tokens.push(t);
      seq.length += sp.count;
    });

    // The LM head over every row any sequence asked logits for, in one pass over its rows. A
    // sequence to sample needs its last row even when it returns no logits.
    const want = plan.sequences.map((s) => (s.logits === 'none' || s.tokens.length === 0 ? 0 : s.logits === 'all' ? s.tokens.length : 1));
    const rowsOf = plan.sequences.map((s, si) => (s.sample && s.tokens.length > 0 ? Math.max(want[si], 1) : want[si]));
    const m = rowsOf.reduce((t, c) => t + c, 0);
    const finalIn = new Float32Array(m * H);
    let r = 0;
    spans.forEach((sp, si) => {
      for (let j = sp.count - rowsOf[si]; j < sp.count; j++, r++) {
        finalIn.set(x.subarray((sp.first + j) * H, (sp.first + j + 1) * H), r * H);
        rmsNorm(finalIn, w.finalNorm, spec.rmsNormEps, finalIn, r * H);
      }
    });
    const logits = new Float32Array(m * V);
    linearBatch(finalIn, m, w.lmHead, V, H, null, logits, this.simd);

    const outputs: SequenceOutput[] = [];
    r = 0;
    plan.sequences.forEach((s, si) => {
      const end = r + rowsOf[si];
      const out: SequenceOutput = { seq: s.seq, logits: logits.slice((end - want[si]) * V, end * V), rows: want[si], hidden: hiddenOut[si] };
      if (traces[si]) out.routing = traces[si];
      if (s.sample && rowsOf[si] > 0) out.sampled = sampleTokenOrReject(logits, s.sample.params, s.sample.key, { offset: (end - 1) * V, length: V });
      outputs.push(out);
      r = end;
    });
    return { sequences: outputs };
  }
}

/** The matrices and biases of every matrix product, in a WebAssembly memory (see CpuModelOptions). */
function placeWeights(spec: ModelSpec, w: ModelWeights, adopt: boolean): WasmLinear | null {
  const arrays: Float32Array[] = [w.lmHead];
  const a = spec.attention;
  const dims = [spec.vocabSize, spec.hiddenSize, a.numHeads * a.headDim, a.numKvHeads * a.headDim, spec.moe.numExperts];
  const m = a.mla;
  if (m) dims.push(m.qLoraRank ?? 0, m.kvLoraRank + m.qkRopeHeadDim, a.numHeads * m.vHeadDim);
  for (const l of w.layers) {
    for (const x of [...attentionMatrices(l), l.router?.weight, l.router?.bias]) if (x) arrays.push(x);
    for (const mlp of mlpsOf(l)) {
      dims.push(mlp.inter);
      for (const x of [mlp.gate, mlp.up, mlp.down, mlp.gateBias, mlp.upBias, mlp.downBias]) if (x) arrays.push(x);
    }
  }
  const max = Math.max(...dims);
  const simd = WasmLinear.create(arrays, max, max);
  if (!simd || !adopt) return simd;
  const v = <T extends Float32Array | null | undefined>(x: T): T => (x ? (simd.view(x) as T) : x);
  if (w.embed === w.lmHead) w.embed = v(w.embed);
  w.lmHead = v(w.lmHead);
  for (const l of w.layers) {
    const t = l.attn;
    const la = l.mla;
    if (la) [la.q, la.qA, la.qB, la.kvA, la.o] = [v(la.q), v(la.qA), v(la.qB), v(la.kvA), v(la.o)];
    else [t.q, t.k, t.v, t.o, t.qBias, t.kBias, t.vBias, t.oBias] = [v(t.q), v(t.k), v(t.v), v(t.o), v(t.qBias), v(t.kBias), v(t.vBias), v(t.oBias)];
    if (l.router) l.router = { ...l.router, weight: v(l.router.weight), bias: v(l.router.bias) };
    for (const mlp of mlpsOf(l)) [mlp.gate, mlp.up, mlp.down, mlp.gateBias, mlp.upBias, mlp.downBias] = [v(mlp.gate), v(mlp.up), v(mlp.down), v(mlp.gateBias), v(mlp.upBias), v(mlp.downBias)];
  }
  return simd;
}

/** A layer's MLPs: routed experts, shared experts, the dense MLP. */
function mlpsOf(l: LayerWeights) {
  return [...(l.experts ?? []), ...(l.shared ? [l.shared] : []), ...(l.dense ? [l.dense] : [])];
}

/** The attention matrices of a layer that go through linearBatch (the per-head MLA up-projections do not). */
function attentionMatrices(l: LayerWeights): (Float32Array | null)[] {
  const m = l.mla;
  if (m) return [m.q, m.qA, m.qB, m.kvA, m.o];
  const t = l.attn;
  return [t.q, t.k, t.v, t.o, t.qBias, t.kBias, t.vBias, t.oBias];
}

function countWeightBytes(w: ModelWeights): number {
  const seen = new Set<Float32Array>();
  let bytes = 0;
  const add = (a: Float32Array | null | undefined) => {
    if (a && !seen.has(a)) {
      seen.add(a);
      bytes += a.byteLength;
    }
  };
  add(w.embed);
  add(w.lmHead);
  add(w.finalNorm);
  for (const l of w.layers) {
    add(l.inputNorm);
    add(l.postAttnNorm);
    Object.values(l.attn).forEach(add);
    if (l.mla) {
      const m = l.mla;
      [m.q, m.qA, m.qANorm, m.qB, m.kvA, m.kvANorm, m.o, ...m.kUpT, ...m.vUp].forEach(add);
    }
    add(l.router?.weight);
    add(l.router?.bias);
    add(l.router?.correctionBias);
    for (const m of mlpsOf(l)) [m.gate, m.up, m.down, m.gateBias, m.upBias, m.downBias].forEach(add);
  }
  return bytes;
}
