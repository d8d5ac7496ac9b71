/**
 * `model_type: "mixtral"` (Mixtral-8x7B, Mixtral-8x22B), read as transformers 5's `MixtralConfig`
 * and `modeling_mixtral.py` read it.
 */
import type { ModelSpec } from '../spec.js';
import type { ConfigFields } from '../fields.js';
import {
  attentionSpec,
  checkTopK,
  readAttentionDims,
  readExpertCount,
  readQuantization,
  readRope,
  readTokenIds,
  requireSiluActivation,
} from './common.js';

export function parseMixtral(f: ConfigFields): ModelSpec {
  const dims = readAttentionDims(f, { headDimWhenAbsent: 'derived', kvHeadsNullMeansHeads: true });
  requireSiluActivation(f);

  const maxPositionEmbeddings = f.optionalInt('max_position_embeddings', 4096 * 32);
  const rope = readRope(f, { defaultTheta: 1e6, headDim: dims.headDim, maxPositionEmbeddings });

  const numExperts = readExpertCount(f, 'num_local_experts', 'num_experts');
  const topK = f.optionalInt('num_experts_per_tok', 2);
  checkTopK(f, topK, numExperts, 'num_local_experts');

  // One window (or none) for every layer.
  const slidingWindow = f.nullableInt('sliding_window', null);

  return {
    family: 'mixtral',
    source: f.source,
    vocabSize: dims.vocabSize,
    hiddenSize: dims.hiddenSize,
    numLayers: dims.numLayers,
    rmsNormEps: f.optionalNumber('rms_norm_eps', 1e-5, { positive: true }),
    tieWordEmbeddings: f.optionalBool('tie_word_embeddings', false),
    attention: attentionSpec(dims, rope, maxPositionEmbeddings, { bias: false, qkNorm: false, sinks: false }),
    moe: {
      numExperts,
      topK,
      // HF takes softmax over all experts, keeps the top k and renormalises them, which is the
      // softmax over the k largest logits; the rule already yields weights that sum to one.
      rule: 'topk_then_softmax',
      normTopkProb: false,
      routerBias: false,
      expertBias: false,
      intermediateSize: f.requireInt('intermediate_size'),
      activation: { kind: 'swiglu' },
    },
    denseIntermediateSize: null,
    layers: Array.from({ length: dims.numLayers }, () => ({ slidingWindow, mlp: 'moe' as const })),
    ...readTokenIds(f, { bos: 1, eos: [2] }),
    quantization: readQuantization(f),
  };
}
