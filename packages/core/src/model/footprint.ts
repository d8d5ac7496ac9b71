import type { ModelSpec } from './spec.js';

/** Parameter counts by role, the inputs of the bandwidth model (DESIGN.md, "Performance model"). */
export interface Footprint {
  embedding: number;
  lmHead: number;
  attention: number;
  router: number;
  denseMlp: number;
  /** Shared experts of all MoE layers (deepseek_v3): read by every token, like dense weights. */
  sharedExperts: number;
  /** All routed experts of all layers. */
  expertsTotal: number;
  /** Experts one token routes to (top-k per MoE layer). */
  expertsPerToken: number;
  norms: number;
  total: number;
}

/** Attention parameters of one layer, and the norms inside it (latent attention has two). */
function attentionParams(spec: ModelSpec): { weights: number; norms: number } {
  const H = spec.hiddenSize;
  const a = spec.attention;
  const qDim = a.numHeads * a.headDim;
  const m = a.mla;
  if (m) {
    const q = m.qLoraRank === null ? H * qDim : H * m.qLoraRank + m.qLoraRank * qDim;
    const kv = H * (m.kvLoraRank + m.qkRopeHeadDim) + m.kvLoraRank * a.numHeads * (m.qkNopeHeadDim + m.vHeadDim);
    return { weights: q + kv + a.numHeads * m.vHeadDim * H, norms: (m.qLoraRank ?? 0) + m.kvLoraRank };
  }
  const kvDim = a.numKvHeads * a.headDim;
  return {
    weights: 2 * H * qDim + 2 * H * kvDim + (a.bias ? qDim + 2 * kvDim + H : 0) + (a.sinks ? a.numHeads : 0),
    norms: a.qkNorm ? 2 * a.headDim : 0,
  };
}

export function footprint(spec: ModelSpec): Footprint {
  const H = spec.hiddenSize;
  const I = spec.moe.intermediateSize;
  const E = spec.moe.numExperts;
  const perExpert = 3 * H * I + (spec.moe.expertBias ? 2 * I + H : 0);
  const attn = attentionParams(spec);
  const shared = spec.moe.sharedExperts;
  const routerBiases = (spec.moe.routerBias ? E : 0) + (spec.moe.rule === 'sigmoid_grouped_topk' ? E : 0);
  let attention = 0, router = 0, denseMlp = 0, sharedExperts = 0, expertsTotal = 0, expertsPerToken = 0, norms = H;
  for (const l of spec.layers) {
    attention += attn.weights;
    norms += 2 * H + attn.norms;
    if (l.mlp === 'dense') denseMlp += 3 * H * (spec.denseIntermediateSize ?? 0);
    else {
      router += E * H + routerBiases;
      if (shared) sharedExperts += 3 * H * shared.count * shared.intermediateSize;
      expertsTotal += E * perExpert;
      expertsPerToken += spec.moe.topK * perExpert;
    }
  }
  const embedding = spec.vocabSize * H;
  const lmHead = spec.tieWordEmbeddings ? 0 : spec.vocabSize * H;
  const total = embedding + lmHead + attention + router + denseMlp + sharedExperts + expertsTotal + norms;
  return { embedding, lmHead, attention, router, denseMlp, sharedExperts, expertsTotal, expertsPerToken, norms, total };
}

/** Weight formats of the bandwidth model. */
export const WEIGHT_FORMATS = {
  'bf16': { experts: 2, rest: 2 },
  'mxfp4 experts + bf16': { experts: 4.25 / 8, rest: 2 },
  'mxfp4 experts + fp8': { experts: 4.25 / 8, rest: 1 },
} as const;

/**
 * Values one token keeps in the KV cache, over all layers. Grouped-query attention keeps a key
 * and a value per KV head; latent attention (deepseek_v3) keeps one compressed row of
 * kv_lora_rank + qk_rope_head_dim, whatever the head count (DeepSeek-V3: 576 against the 40,960
 * of the expanded keys and values of its 128 heads).
 */
export function kvCacheValuesPerToken(spec: ModelSpec): number {
  const a = spec.attention;
  const perLayer = a.mla ? a.mla.kvLoraRank + a.mla.qkRopeHeadDim : 2 * a.numKvHeads * a.headDim;
  return spec.numLayers * perLayer;
}

/**
 * Values a token's keys and values would take expanded to every head (what a cache of plain
 * multi-head attention holds): for latent attention, numHeads x (qk head dim + v_head_dim) a layer.
 */
export function expandedKvValuesPerToken(spec: ModelSpec): number {
  const a = spec.attention;
  const perLayer = a.mla ? a.numHeads * (a.headDim + a.mla.vHeadDim) : 2 * a.numKvHeads * a.headDim;
  return spec.numLayers * perLayer;
}

export interface BytesPerTokenOptions {
  /**
   * Cached positions the step attends over: their KV rows are read too (default 0: weights only).
   * Sliding-window layers are counted at the full context (an upper bound).
   */
  context?: number;
  /** Bytes of one cached value (default 2: a bf16 cache). */
  kvBytesPerValue?: number;
}

/**
 * Bytes a batch-1 decode step reads: every dense weight once, the routed experts, the LM head
 * (the tied embedding is read as the LM head; one embedding row is negligible), and with
 * `context` the KV cache rows of that many positions.
 */
export function bytesPerToken(spec: ModelSpec, format: keyof typeof WEIGHT_FORMATS, opts: BytesPerTokenOptions = {}): number {
  const f = footprint(spec);
  const fm = WEIGHT_FORMATS[format];
  const head = spec.tieWordEmbeddings ? f.embedding : f.lmHead;
  const weights = f.expertsPerToken * fm.experts + (f.attention + f.router + f.denseMlp + f.sharedExperts + head + f.norms) * fm.rest;
  return weights + (opts.context ?? 0) * kvCacheValuesPerToken(spec) * (opts.kvBytesPerValue ?? 2);
}
