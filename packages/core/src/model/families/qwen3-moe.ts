/**
 * `model_type: "qwen3_moe"` (Qwen3-30B-A3B, Qwen3-235B-A22B, ...), read as transformers 5's
 * `Qwen3MoeConfig` and `modeling_qwen3_moe.py` read it.
 */
import type { LayerSpec, ModelSpec } from '../spec.js';
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

export function parseQwen3Moe(f: ConfigFields): ModelSpec {
  const dims = readAttentionDims(f, { headDimWhenAbsent: 'derived', kvHeadsNullMeansHeads: false });
  requireSiluActivation(f);

  const maxPositionEmbeddings = f.optionalInt('max_position_embeddings', 32768);
  const rope = readRope(f, { defaultTheta: 10000, headDim: dims.headDim, maxPositionEmbeddings });

  const numExperts = readExpertCount(f, 'num_experts', 'num_local_experts');
  const topK = f.optionalInt('num_experts_per_tok', 8);
  checkTopK(f, topK, numExperts, 'num_experts');

  // A layer is sparse unless listed in mlp_only_layers or skipped by decoder_sparse_step
  // (Qwen3MoeDecoderLayer: `(i + 1) % decoder_sparse_step == 0`).
  const sparseStep = f.optionalInt('decoder_sparse_step', 1);
  const mlpOnly = new Set(f.optionalIntList('mlp_only_layers', [], { min: 0, max: dims.numLayers - 1 }));

  // HF keeps `sliding_window` only when `use_sliding_window`; it then applies to every layer.
  const configuredWindow = f.nullableInt('sliding_window', 4096);
  const slidingWindow = f.optionalBool('use_sliding_window', false) ? configuredWindow : null;

  const layers: LayerSpec[] = [];
  for (let i = 0; i < dims.numLayers; i++) {
    const sparse = !mlpOnly.has(i) && (i + 1) % sparseStep === 0;
    layers.push({ slidingWindow, mlp: sparse ? 'moe' : 'dense' });
  }

  // Only dense layers use intermediate_size; Qwen3-30B-A3B carries one it never uses.
  const configuredDense = f.has('intermediate_size') ? f.requireInt('intermediate_size') : null;
  const anyDense = layers.some((l) => l.mlp === 'dense');
  if (anyDense && configuredDense === null) {
    throw f.fail('intermediate_size', 'a positive integer (the width of the dense MLP layers this config declares)');
  }

  return {
    family: 'qwen3_moe',
    source: f.source,
    vocabSize: dims.vocabSize,
    hiddenSize: dims.hiddenSize,
    numLayers: dims.numLayers,
    rmsNormEps: f.optionalNumber('rms_norm_eps', 1e-6, { positive: true }),
    tieWordEmbeddings: f.optionalBool('tie_word_embeddings', false),
    attention: attentionSpec(dims, rope, maxPositionEmbeddings, {
      bias: f.optionalBool('attention_bias', false),
      qkNorm: true,
      sinks: false,
    }),
    moe: {
      numExperts,
      topK,
      rule: 'softmax_then_topk',
      normTopkProb: f.optionalBool('norm_topk_prob', false),
      routerBias: false,
      expertBias: false,
      intermediateSize: f.requireInt('moe_intermediate_size'),
      activation: { kind: 'swiglu' },
    },
    denseIntermediateSize: anyDense ? configuredDense : null,
    layers,
    ...readTokenIds(f, { bos: null, eos: [] }),
    quantization: readQuantization(f),
  };
}
