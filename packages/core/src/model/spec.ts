/**
 * The typed description of a model that every backend works from. Parsed from an HF
 * `config.json` by {@link parseModelConfig}; nothing downstream reads `config.json` again.
 */

/** Model families moeflash runs (HF `model_type`). */
export type ModelFamily = 'qwen3_moe' | 'mixtral' | 'gpt_oss' | 'deepseek_v3';

/** Rotary position embedding parameters. */
export interface RopeSpec {
  /** Base frequency (HF `rope_theta`). */
  theta: number;
  /** `default` (plain RoPE) or `yarn` (YaRN-scaled frequencies and attention factor). */
  type: 'default' | 'yarn';
  /** Number of leading dims of each head that rotate (== headDim unless partial rotary). */
  rotaryDim: number;
  /** YaRN only. */
  yarn?: {
    factor: number;
    betaFast: number;
    betaSlow: number;
    originalMaxPositionEmbeddings: number;
    /** Multiplier applied to cos/sin (HF `attention_factor`; default 0.1*ln(factor)+1). */
    attentionFactor: number;
    /** Whether the correction range is truncated to integers (HF `truncate`, default true). */
    truncate: boolean;
  };
}

/** Attention shared by all layers (per-layer differences live in {@link LayerSpec}). */
export interface AttentionSpec {
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  /** q/k/v/o projections carry biases (gpt-oss). */
  bias: boolean;
  /** Per-head RMSNorm on q and k before RoPE (Qwen3). */
  qkNorm: boolean;
  /** A learned per-head sink logit joins the softmax denominator (gpt-oss). */
  sinks: boolean;
  /** Softmax scale, 1/sqrt(headDim) unless the config says otherwise. */
  scale: number;
  rope: RopeSpec;
  maxPositionEmbeddings: number;
  /**
   * Multi-head latent attention (deepseek_v3). Then `headDim` is the query/key head width
   * (qk_nope_head_dim + qk_rope_head_dim), `numKvHeads` equals `numHeads`, `rope.rotaryDim` is
   * qk_rope_head_dim (the trailing dims of each query head, and one key part shared by all heads),
   * and `scale` includes YaRN's mscale_all_dim correction.
   */
  mla?: MlaSpec;
}

/**
 * DeepSeek-V2/V3 multi-head latent attention: keys and values of all heads come from one
 * compressed latent per token (kv_lora_rank wide, RMS-normed) plus one rotary key part shared by
 * the heads, which is all a KV cache has to hold.
 */
export interface MlaSpec {
  /** Width of the query's low-rank bottleneck (q_a_proj, q_a_layernorm, q_b_proj); null: one q_proj. */
  qLoraRank: number | null;
  kvLoraRank: number;
  /** Query/key dims per head without rotary position (compared through the latent). */
  qkNopeHeadDim: number;
  /** Query/key dims per head that rotate (the key part is shared by every head). */
  qkRopeHeadDim: number;
  vHeadDim: number;
  /**
   * HF `rope_interleave` (default true): the rotary dims come as pairs (2i, 2i+1), which HF
   * de-interleaves to (i, i + d/2) before its rotate-half RoPE.
   */
  ropeInterleave: boolean;
}

/** How router logits become expert weights (exact formulas: refs/FORMATS.md, "Routing"). */
export type RoutingRule =
  /** softmax over all experts, then top-k of the probabilities (Qwen3-MoE). */
  | 'softmax_then_topk'
  /** top-k of the logits, then softmax over those k (Mixtral, gpt-oss). */
  | 'topk_then_softmax'
  /**
   * DeepSeek-V3: s = sigmoid(logits); experts are chosen by s + e_score_correction_bias inside the
   * best `topkGroups` of `numGroups` groups; weights are the chosen s (renormalized when
   * `normTopkProb`) times `routedScalingFactor`. See {@link GroupedRouting}.
   */
  | 'sigmoid_grouped_topk';

/** Expert MLP activation. */
export type ExpertActivation =
  /** y = down(silu(gate x) * up x) */
  | { kind: 'swiglu' }
  /** gpt-oss: gate,up interleaved; gate=min(gate,limit); up=clamp(up,-limit,limit); (up+1)*gate*sigmoid(alpha*gate). */
  | { kind: 'gpt_oss_clamped_swiglu'; limit: number; alpha: number };

export interface MoeSpec {
  numExperts: number;
  topK: number;
  rule: RoutingRule;
  /** Qwen3-MoE: divide the chosen top-k probabilities by their sum. */
  normTopkProb: boolean;
  /** Router linear has a bias (gpt-oss). */
  routerBias: boolean;
  /** Expert projections carry biases (gpt-oss). */
  expertBias: boolean;
  /** Hidden width of one expert. */
  intermediateSize: number;
  activation: ExpertActivation;
  /** Rule `sigmoid_grouped_topk` only. */
  grouped?: GroupedRouting;
  /**
   * Experts every token goes through besides the routed ones (DeepSeek's `n_shared_experts`), run
   * as one SwiGLU MLP of `count * intermediateSize` width and added unweighted.
   */
  sharedExperts?: { count: number; intermediateSize: number };
}

/** DeepSeek-V3's grouped top-k (HF `DeepseekV3MoE.route_tokens_to_experts`). */
export interface GroupedRouting {
  /** `n_group`: the experts split into this many equal groups, in index order. */
  numGroups: number;
  /** `topk_group`: experts are chosen only inside this many groups (ranked by their top-2 sum). */
  topkGroups: number;
  /** Multiplies the routed experts' weights. */
  routedScalingFactor: number;
}

/** One decoder layer. */
export interface LayerSpec {
  /** `null`: full causal attention; a number: a key is visible while (queryPos - keyPos) < window. */
  slidingWindow: number | null;
  /** `moe`: routed experts; `dense`: a plain SwiGLU MLP of width {@link ModelSpec.denseIntermediateSize}. */
  mlp: 'moe' | 'dense';
}

export interface ModelSpec {
  family: ModelFamily;
  /** Path of the config.json this came from (for error messages). */
  source: string;
  vocabSize: number;
  hiddenSize: number;
  numLayers: number;
  rmsNormEps: number;
  /** LM head shares the embedding matrix. */
  tieWordEmbeddings: boolean;
  attention: AttentionSpec;
  moe: MoeSpec;
  /** Width of dense (non-MoE) MLP layers, when any layer is dense. */
  denseIntermediateSize: number | null;
  layers: LayerSpec[];
  /**
   * Multi-token-prediction layers stored after the decoder layers (deepseek_v3's
   * `num_nextn_predict_layers`, as `model.layers.{numLayers + i}.*`): not part of the forward pass,
   * so loaders skip them. Absent: none.
   */
  mtpLayers?: number;
  bosTokenId: number | null;
  /** End-of-sequence ids from config.json (generation_config.json may add more). */
  eosTokenIds: number[];
  /**
   * Checkpoint quantization as declared by `quantization_config`. `dense` is moeflash's mixed form:
   * MXFP4 experts (`quant_method: "mxfp4"`) with block-scaled FP8 dense weights declared by a nested
   * `dense_quantization_config` (one `quant_method` cannot name both).
   */
  quantization: {
    method: 'mxfp4' | 'fp8';
    weightBlockSize?: [number, number];
    modulesToNotConvert?: string[];
    dense?: { method: 'fp8'; weightBlockSize: [number, number]; modulesToNotConvert?: string[] };
  } | null;
}
