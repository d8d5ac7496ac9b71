/**
 * `model_type: "gpt_oss"` (gpt-oss-20b, gpt-oss-120b), read as transformers 5's `GptOssConfig`
 * and `modeling_gpt_oss.py` read it.
 */
import type { LayerSpec, ModelSpec } from '../spec.js';
import { invalidConfig, type ConfigFields } from '../fields.js';
import {
  attentionSpec,
  checkTopK,
  readAttentionDims,
  readExpertCount,
  readQuantization,
  readRope,
  readTokenIds,
} from './common.js';

const LAYER_TYPES = ['sliding_attention', 'full_attention'] as const;
type LayerType = (typeof LAYER_TYPES)[number];

/** GptOssConfig's `rope_parameters` when the file has none. */
const DEFAULT_ROPE_PARAMETERS = {
  rope_type: 'yarn',
  factor: 32.0,
  beta_fast: 32.0,
  beta_slow: 1.0,
  truncate: false,
  original_max_position_embeddings: 4096,
} as const;

function readLayerTypes(f: ConfigFields, numLayers: number): LayerType[] {
  const given = f.maybeStringList('layer_types');
  if (given === undefined) {
    // HF's default: sliding first, then alternating.
    return Array.from({ length: numLayers }, (_, i) => (i % 2 === 0 ? 'sliding_attention' : 'full_attention'));
  }
  const bad = given.findIndex((t) => !(LAYER_TYPES as readonly string[]).includes(t));
  if (bad >= 0) {
    throw f.fail(`layer_types[${bad}]`, LAYER_TYPES.map((t) => `"${t}"`).join(' or '), given[bad]);
  }
  if (given.length !== numLayers) {
    throw invalidConfig(
      f.source,
      `"layer_types" has ${given.length} entries but "num_hidden_layers" is ${numLayers}; it needs one per layer`,
    );
  }
  return given as LayerType[];
}

export function parseGptOss(f: ConfigFields): ModelSpec {
  // GptOssConfig declares head_dim = 64, so an absent key means 64 (not hidden_size / heads,
  // which is 45 for the released models).
  const dims = readAttentionDims(f, { headDimWhenAbsent: 64, kvHeadsNullMeansHeads: true });

  const layerTypes = readLayerTypes(f, dims.numLayers);
  const window = f.nullableInt('sliding_window', 128);
  if (window === null && layerTypes.includes('sliding_attention')) {
    throw invalidConfig(
      f.source,
      '"sliding_window" is null but "layer_types" has sliding_attention layers; give the window size',
    );
  }
  const layers: LayerSpec[] = layerTypes.map((t) => ({
    slidingWindow: t === 'sliding_attention' ? window : null,
    mlp: 'moe',
  }));

  const maxPositionEmbeddings = f.optionalInt('max_position_embeddings', 131072);
  const rope = readRope(f, {
    defaultTheta: 150000,
    defaultParameters: DEFAULT_ROPE_PARAMETERS,
    headDim: dims.headDim,
    maxPositionEmbeddings,
    layerTypes: LAYER_TYPES,
  });

  const numExperts = readExpertCount(f, 'num_local_experts', 'num_experts');
  const topK = f.optionalInt('num_experts_per_tok', 4);
  checkTopK(f, topK, numExperts, 'num_local_experts');

  return {
    family: 'gpt_oss',
    source: f.source,
    vocabSize: dims.vocabSize,
    hiddenSize: dims.hiddenSize,
    numLayers: dims.numLayers,
    rmsNormEps: f.optionalNumber('rms_norm_eps', 1e-5, { positive: true }),
    tieWordEmbeddings: f.optionalBool('tie_word_embeddings', false),
    attention: attentionSpec(dims, rope, maxPositionEmbeddings, {
      bias: f.optionalBool('attention_bias', true),
      qkNorm: false,
      sinks: true,
    }),
    moe: {
      numExperts,
      topK,
      rule: 'topk_then_softmax',
      normTopkProb: false,
      // The router and the experts always carry biases (GptOssTopKRouter, GptOssExperts).
      routerBias: true,
      expertBias: true,
      intermediateSize: f.requireInt('intermediate_size'),
      activation: {
        kind: 'gpt_oss_clamped_swiglu',
        limit: f.optionalNumber('swiglu_limit', 7.0, { positive: true }),
        alpha: f.optionalNumber('swiglu_alpha', 1.702, { positive: true }),
      },
    },
    denseIntermediateSize: null,
    layers,
    ...readTokenIds(f, { bos: null, eos: [] }),
    quantization: readQuantization(f),
  };
}
