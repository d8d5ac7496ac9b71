import type { ModelSpec } from './spec.js';

/** Parameter counts by role, the inputs of the bandwidth model (DESIGN.md, "Performance model"). */
export interface Footprint {
  embedding: number;
  lmHead: number;
  attention: number;
  router: number;
  denseMlp: number;
  /** All experts of all layers. */
  expertsTotal: number;
  /** Experts one token routes to (top-k per MoE layer). */
  expertsPerToken: number;
  norms: number;
  total: number;
}

export function footprint(spec: ModelSpec): Footprint {
  const H = spec.hiddenSize;
  const a = spec.attention;
  const qDim = a.numHeads * a.headDim;
  const kvDim = a.numKvHeads * a.headDim;
  const I = spec.moe.intermediateSize;
  const perExpert = 3 * H * I + (spec.moe.expertBias ? 2 * I + H : 0);
  let attention = 0, router = 0, denseMlp = 0, expertsTotal = 0, expertsPerToken = 0, norms = H;
  for (const l of spec.layers) {
    attention += 2 * H * qDim + 2 * H * kvDim + (a.bias ? qDim + 2 * kvDim + H : 0) + (a.sinks ? a.numHeads : 0);
    norms += 2 * H + (a.qkNorm ? 2 * a.headDim : 0);
    if (l.mlp === 'dense') denseMlp += 3 * H * (spec.denseIntermediateSize ?? 0);
    else {
      router += spec.moe.numExperts * H + (spec.moe.routerBias ? spec.moe.numExperts : 0);
      expertsTotal += spec.moe.numExperts * perExpert;
      expertsPerToken += spec.moe.topK * perExpert;
    }
  }
  const embedding = spec.vocabSize * H;
  const lmHead = spec.tieWordEmbeddings ? 0 : spec.vocabSize * H;
  const total = embedding + lmHead + attention + router + denseMlp + expertsTotal + norms;
  return { embedding, lmHead, attention, router, denseMlp, expertsTotal, expertsPerToken, norms, total };
}

/** Weight formats of the bandwidth model. */
export const WEIGHT_FORMATS = {
  'bf16': { experts: 2, rest: 2 },
  'mxfp4 experts + bf16': { experts: 4.25 / 8, rest: 2 },
  'mxfp4 experts + fp8': { experts: 4.25 / 8, rest: 1 },
} as const;

/**
 * Bytes a batch-1 decode step reads: every dense weight once, the routed experts, the LM head
 * (the tied embedding is read as the LM head; one embedding row is negligible).
 */
export function bytesPerToken(spec: ModelSpec, format: keyof typeof WEIGHT_FORMATS): number {
  const f = footprint(spec);
  const fm = WEIGHT_FORMATS[format];
  const head = spec.tieWordEmbeddings ? f.embedding : f.lmHead;
  return f.expertsPerToken * fm.experts + (f.attention + f.router + f.denseMlp + head + f.norms) * fm.rest;
}
