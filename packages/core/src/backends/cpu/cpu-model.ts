import { MoeflashError } from '../../errors.js';
import { attendOne, type AttentionShape } from '../../math/attention.js';
import { mlpForward, mlpScratch, type MlpScratch } from '../../math/experts.js';
import { linear } from '../../math/linear.js';
import { rmsNorm } from '../../math/norm.js';
import { applyRope, ropeTable, type RopeTable } from '../../math/rope.js';
import { route } from '../../math/router.js';
import type { ModelSpec } from '../../model/spec.js';
import type { ModelWeights } from '../../weights/layouts.js';
import type { LoadedModel, MemoryReport, SeqId, SequenceOutput, StepPlan, StepResult } from '../backend.js';
import { CpuKvCache } from './kv-cache.js';

/** A token of the step: which sequence, which id, at which position. */
interface Row {
  seqIndex: number;
  token: number;
  pos: number;
}

/**
 * The float32 reference forward pass of every supported family.
 *
 * Each token's arithmetic is the same whatever else shares its step (same loops, same order):
 * a sequence's logits are bit-identical alone or batched, one token a step or all at once.
 */
export class CpuModel implements LoadedModel {
  private readonly caches = new Map<SeqId, CpuKvCache>();
  private readonly rope: RopeTable;
  private readonly shape: AttentionShape;
  private readonly weightBytes: number;
  private disposed = false;

  constructor(readonly spec: ModelSpec, private readonly w: ModelWeights) {
    this.rope = ropeTable(spec.attention.rope);
    const a = spec.attention;
    this.shape = { numHeads: a.numHeads, numKvHeads: a.numKvHeads, headDim: a.headDim, scale: a.scale };
    this.weightBytes = countWeightBytes(w);
  }

  length(seq: SeqId): number {
    return this.caches.get(seq)?.length ?? 0;
  }

  truncate(seq: SeqId, length: number): void {
    const c = this.caches.get(seq);
    if (!c) return;
    if (length < 0 || length > c.length) {
      throw new MoeflashError('INVALID_ARGUMENT', `truncate(${seq}, ${length}): the sequence holds ${c.length} positions; length must be in [0, ${c.length}]`);
    }
    c.length = length;
  }

  release(seq: SeqId): void {
    this.caches.delete(seq);
  }

  memory(): MemoryReport {
    let kv = 0;
    for (const c of this.caches.values()) kv += c.bytes();
    return { weights: this.weightBytes, kvCache: kv, activations: 0, total: this.weightBytes + kv };
  }

  async dispose(): Promise<void> {
    this.caches.clear();
    this.disposed = true;
  }

  async step(plan: StepPlan): Promise<StepResult> {
    if (this.disposed) throw new MoeflashError('CLOSED', 'step() on a disposed model');
    const { spec, w } = this;
    const H = spec.hiddenSize;
    const V = spec.vocabSize;
    const a = spec.attention;
    const qDim = a.numHeads * a.headDim;
    const kvDim = a.numKvHeads * a.headDim;

    const rows: Row[] = [];
    const caches: CpuKvCache[] = [];
    const seen = new Set<SeqId>();
    plan.sequences.forEach((s, seqIndex) => {
      if (seen.has(s.seq)) throw new MoeflashError('INVALID_ARGUMENT', `sequence ${s.seq} appears twice in one step`);
      seen.add(s.seq);
      let cache = this.caches.get(s.seq);
      if (!cache) {
        cache = new CpuKvCache(spec.numLayers, kvDim);
        this.caches.set(s.seq, cache);
      }
      caches.push(cache);
      const start = cache.length;
      s.tokens.forEach((token, i) => {
        if (!Number.isInteger(token) || token < 0 || token >= V) {
          throw new MoeflashError('INVALID_ARGUMENT', `token id ${token} of sequence ${s.seq} is outside the vocabulary [0, ${V})`);
        }
        rows.push({ seqIndex, token, pos: start + i });
      });
      cache.reserve(start + s.tokens.length);
    });

    const n = rows.length;
    const x = new Float32Array(n * H);
    rows.forEach((r, i) => x.set(w.embed.subarray(r.token * H, (r.token + 1) * H), i * H));

    const hiddenOut = plan.sequences.map((s) => (s.hiddenLayers?.length ? new Map<number, Float32Array>() : undefined));
    const normed = new Float32Array(H);
    const q = new Float32Array(n * qDim);
    const attnOut = new Float32Array(qDim);
    const proj = new Float32Array(H);
    const kRow = new Float32Array(kvDim);
    const vRow = new Float32Array(kvDim);
    const maxLen = Math.max(0, ...rows.map((r) => r.pos + 1));
    const scores = new Float64Array(maxLen);
    const scratch: MlpScratch = mlpScratch(Math.max(spec.moe.intermediateSize, spec.denseIntermediateSize ?? 0), H);
    const routerLogits = new Float32Array(spec.moe.numExperts);
    const mlpAcc = new Float64Array(H);

    for (let l = 0; l < spec.numLayers; l++) {
      const lw = w.layers[l];
      const window = spec.layers[l].slidingWindow;
      // Pass 1: every token's q, and its k/v into the cache, so that later tokens of the same
      // sequence see earlier ones in pass 2 exactly as if they had come in earlier steps.
      for (let i = 0; i < n; i++) {
        const r = rows[i];
        const xi = x.subarray(i * H, (i + 1) * H);
        rmsNorm(xi, lw.inputNorm, spec.rmsNormEps, normed);
        const qi = q.subarray(i * qDim, (i + 1) * qDim);
        linear(normed, lw.attn.q, qDim, H, lw.attn.qBias, qi);
        linear(normed, lw.attn.k, kvDim, H, lw.attn.kBias, kRow);
        linear(normed, lw.attn.v, kvDim, H, lw.attn.vBias, vRow);
        for (let h = 0; h < a.numHeads; h++) {
          if (lw.attn.qNorm) rmsNorm(qi, lw.attn.qNorm, spec.rmsNormEps, qi, h * a.headDim);
          applyRope(qi, h * a.headDim, r.pos, this.rope);
        }
        for (let h = 0; h < a.numKvHeads; h++) {
          if (lw.attn.kNorm) rmsNorm(kRow, lw.attn.kNorm, spec.rmsNormEps, kRow, h * a.headDim);
          applyRope(kRow, h * a.headDim, r.pos, this.rope);
        }
        const c = caches[r.seqIndex];
        c.keys[l].set(kRow, r.pos * kvDim);
        c.values[l].set(vRow, r.pos * kvDim);
      }
      // Pass 2: attention, output projection, residual; then the MLP.
      for (let i = 0; i < n; i++) {
        const r = rows[i];
        const c = caches[r.seqIndex];
        const from = window === null ? 0 : Math.max(0, r.pos - window + 1);
        attendOne(q, i * qDim, c.keys[l], c.values[l], from, r.pos, this.shape, lw.attn.sinks, attnOut, 0, scores);
        linear(attnOut, lw.attn.o, H, qDim, lw.attn.oBias, proj);
        const xi = x.subarray(i * H, (i + 1) * H);
        for (let d = 0; d < H; d++) xi[d] += proj[d];

        rmsNorm(xi, lw.postAttnNorm, spec.rmsNormEps, normed);
        if (lw.dense) {
          const y = mlpForward(normed, lw.dense, { kind: 'swiglu' }, scratch);
          for (let d = 0; d < H; d++) xi[d] += y[d];
        } else {
          const router = lw.router!;
          linear(normed, router.weight, spec.moe.numExperts, H, router.bias, routerLogits);
          const { experts, weights } = route(routerLogits, spec.moe);
          mlpAcc.fill(0);
          for (let j = 0; j < experts.length; j++) {
            const y = mlpForward(normed, lw.experts![experts[j]], spec.moe.activation, scratch);
            const wj = weights[j];
            for (let d = 0; d < H; d++) mlpAcc[d] += Math.fround(y[d] * wj);
          }
          for (let d = 0; d < H; d++) xi[d] += mlpAcc[d];
        }
      }
      plan.sequences.forEach((s, si) => {
        if (!s.hiddenLayers?.includes(l)) return;
        const own = rows.map((r, i) => [r, i] as const).filter(([r]) => r.seqIndex === si);
        const h = new Float32Array(own.length * H);
        own.forEach(([, i], j) => h.set(x.subarray(i * H, (i + 1) * H), j * H));
        hiddenOut[si]!.set(l, h);
      });
    }

    for (let si = 0; si < plan.sequences.length; si++) caches[si].length += plan.sequences[si].tokens.length;

    const outputs: SequenceOutput[] = [];
    let rowBase = 0;
    plan.sequences.forEach((s, si) => {
      const count = s.tokens.length;
      const first = s.logits === 'all' ? 0 : count - 1;
      const want = s.logits === 'none' || count === 0 ? 0 : count - first;
      const logits = new Float32Array(want * V);
      const row = new Float32Array(V);
      for (let j = 0; j < want; j++) {
        const i = rowBase + first + j;
        rmsNorm(x.subarray(i * H, (i + 1) * H), w.finalNorm, spec.rmsNormEps, normed);
        linear(normed, w.lmHead, V, H, null, row);
        logits.set(row, j * V);
      }
      rowBase += count;
      outputs.push({ seq: s.seq, logits, rows: want, hidden: hiddenOut[si] });
    });
    return { sequences: outputs };
  }
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
    add(l.router?.weight);
    add(l.router?.bias);
    for (const m of [...(l.experts ?? []), ...(l.dense ? [l.dense] : [])]) {
      [m.gate, m.up, m.down, m.gateBias, m.upBias, m.downBias].forEach(add);
    }
  }
  return bytes;
}
