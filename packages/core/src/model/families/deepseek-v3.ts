/**
 * `model_type: "deepseek_v3"` (DeepSeek-V3, DeepSeek-R1; Kimi-K2, whose config says `kimi_k2` for
 * the same architecture), read as transformers 5's `DeepseekV3Config` and `modeling_deepseek_v3.py`
 * read it: multi-head latent attention, the first `first_k_dense_replace` layers dense, then routed
 * plus shared experts behind a sigmoid router with grouped top-k.
 */
import type { LayerSpec, ModelSpec } from '../spec.js';
import { invalidConfig, unsupportedConfig, type ConfigFields } from '../fields.js';
import {
  checkTopK,
  readExpertCount,
  readQuantization,
  readRope,
  readTokenIds,
  requireSiluActivation,
  selectRopeParameters,
  yarnMscale,
} from './common.js';

/** A shape-fixing field whose key must be present, though null is a value (q_lora_rank: null = no bottleneck). */
function requireNullableInt(f: ConfigFields, key: string, what: string): number | null {
  if (!f.hasKey(key)) throw f.fail(key, what);
  return f.nullableInt(key, null);
}

/**
 * Keys of the original DeepSeek code that transformers ignores. A value other than the one HF's
 * implementation hard-codes would describe a different model than the one HF (and moeflash) runs.
 */
function refuseOtherVariants(f: ConfigFields): void {
  const fixed: [key: string, value: unknown, what: string][] = [
    ['scoring_func', 'sigmoid', 'the router scores experts with a sigmoid'],
    ['topk_method', 'noaux_tc', 'experts are chosen by score + e_score_correction_bias in the best groups'],
    ['moe_layer_freq', 1, 'every layer from first_k_dense_replace on is a MoE layer'],
  ];
  for (const [key, value, what] of fixed) {
    if (f.has(key) && f.raw(key) !== value) {
      throw unsupportedConfig(
        f.source,
        `"${key}" is ${JSON.stringify(f.raw(key))}; moeflash runs deepseek_v3 as HF transformers does, where ${what} (${key} ${JSON.stringify(value)})`,
      );
    }
  }
  if (f.optionalBool('attention_bias', false)) {
    throw unsupportedConfig(f.source, '"attention_bias" is true; moeflash runs deepseek_v3 attention without biases (as every released checkpoint has it)');
  }
}

export function parseDeepseekV3(f: ConfigFields): ModelSpec {
  const vocabSize = f.requireInt('vocab_size');
  const hiddenSize = f.requireInt('hidden_size');
  const numLayers = f.requireInt('num_hidden_layers');
  const numHeads = f.requireInt('num_attention_heads');
  requireSiluActivation(f);
  refuseOtherVariants(f);

  // Every head gets its own keys and values out of the shared latent; HF's attention then repeats
  // them num_attention_heads / num_key_value_heads times, which only works when the two are equal.
  const numKvHeads = f.has('num_key_value_heads') ? f.requireInt('num_key_value_heads') : numHeads;
  if (numKvHeads !== numHeads) {
    throw unsupportedConfig(
      f.source,
      `"num_key_value_heads" (${numKvHeads}) differs from "num_attention_heads" (${numHeads}); latent attention derives keys and values for every head, so they must be equal`,
    );
  }

  const qLoraRank = requireNullableInt(f, 'q_lora_rank', 'a positive integer, or null for a plain q_proj');
  if (qLoraRank !== null && qLoraRank < 1) throw f.fail('q_lora_rank', 'a positive integer or null');
  const kvLoraRank = f.requireInt('kv_lora_rank');
  const qkNopeHeadDim = f.requireInt('qk_nope_head_dim');
  const qkRopeHeadDim = f.requireInt('qk_rope_head_dim');
  const vHeadDim = f.requireInt('v_head_dim');
  if (qkRopeHeadDim % 2 !== 0) throw f.fail('qk_rope_head_dim', 'an even number (RoPE rotates pairs of dims)');
  const headDim = qkNopeHeadDim + qkRopeHeadDim;

  const maxPositionEmbeddings = f.optionalInt('max_position_embeddings', 4096);
  // DeepseekV3Config sets head_dim = qk_rope_head_dim: the rotary table spans the rope part only.
  const ropeOpts = { defaultTheta: 10000, headDim: qkRopeHeadDim, maxPositionEmbeddings };
  const rope = readRope(f, ropeOpts);
  // DeepseekV3Attention: with a scaled RoPE the softmax scale takes mscale(factor, mscale_all_dim)
  // squared (it cancels the attention factor folded into cos/sin for q and k alike).
  let scale = 1 / Math.sqrt(headDim);
  if (rope.type !== 'default' && rope.yarn) {
    const mscaleAllDim = selectRopeParameters(f, ropeOpts).maybeNumber('mscale_all_dim');
    if (mscaleAllDim) {
      const m = yarnMscale(rope.yarn.factor, mscaleAllDim);
      scale *= m * m;
    }
  }

  const numExperts = readExpertCount(f, 'n_routed_experts', 'num_local_experts');
  const topK = f.optionalInt('num_experts_per_tok', 8);
  checkTopK(f, topK, numExperts, 'n_routed_experts');
  const numGroups = f.optionalInt('n_group', 8);
  const topkGroups = f.optionalInt('topk_group', 4);
  if (numExperts % numGroups !== 0 || numExperts / numGroups < 2) {
    throw invalidConfig(
      f.source,
      `"n_routed_experts" (${numExperts}) must split into "n_group" (${numGroups}) equal groups of at least 2 experts (a group is ranked by its two best experts)`,
    );
  }
  if (topkGroups > numGroups) throw invalidConfig(f.source, `"topk_group" (${topkGroups}) must not exceed "n_group" (${numGroups})`);
  const perGroup = numExperts / numGroups;
  if (topK > topkGroups * perGroup) {
    throw invalidConfig(
      f.source,
      `"num_experts_per_tok" (${topK}) exceeds the ${topkGroups * perGroup} experts of the "topk_group" (${topkGroups}) groups it chooses from`,
    );
  }

  const sharedCount = f.optionalInt('n_shared_experts', 1, { min: 0 });
  const moeIntermediate = f.requireInt('moe_intermediate_size');
  const firstDense = f.optionalInt('first_k_dense_replace', 3, { min: 0 });
  const layers: LayerSpec[] = Array.from({ length: numLayers }, (_, i) => ({ slidingWindow: null, mlp: i >= firstDense ? 'moe' : 'dense' }));
  const anyDense = layers.some((l) => l.mlp === 'dense');
  const denseIntermediateSize = anyDense ? f.requireInt('intermediate_size') : null;

  return {
    family: 'deepseek_v3',
    source: f.source,
    vocabSize,
    hiddenSize,
    numLayers,
    rmsNormEps: f.optionalNumber('rms_norm_eps', 1e-6, { positive: true }),
    tieWordEmbeddings: f.optionalBool('tie_word_embeddings', false),
    attention: {
      numHeads,
      numKvHeads,
      headDim,
      bias: false,
      qkNorm: false,
      sinks: false,
      scale,
      rope,
      maxPositionEmbeddings,
      mla: { qLoraRank, kvLoraRank, qkNopeHeadDim, qkRopeHeadDim, vHeadDim, ropeInterleave: f.optionalBool('rope_interleave', true) },
    },
    moe: {
      numExperts,
      topK,
      rule: 'sigmoid_grouped_topk',
      normTopkProb: f.optionalBool('norm_topk_prob', true),
      // e_score_correction_bias steers the choice only; it is not a router bias in the logits.
      routerBias: false,
      expertBias: false,
      intermediateSize: moeIntermediate,
      activation: { kind: 'swiglu' },
      grouped: { numGroups, topkGroups, routedScalingFactor: f.optionalNumber('routed_scaling_factor', 2.5, { positive: true }) },
      ...(sharedCount > 0 ? { sharedExperts: { count: sharedCount, intermediateSize: moeIntermediate } } : {}),
    },
    denseIntermediateSize,
    layers,
    mtpLayers: f.optionalInt('num_nextn_predict_layers', 0, { min: 0 }),
    ...readTokenIds(f, { bos: 0, eos: [1] }),
    quantization: readQuantization(f),
  };
}
