/**
 * Real model shapes as HF config.json objects, for synthetic checkpoints that stand in for real
 * weights in speed measurements (no download is possible on a GPU host without network).
 */
export type SynthFamily = 'gpt_oss' | 'qwen3_moe' | 'mixtral' | 'deepseek_v3';

const gptOss = (layers: number, experts: number) => ({
  architectures: ['GptOssForCausalLM'],
  model_type: 'gpt_oss',
  vocab_size: 201088,
  hidden_size: 2880,
  intermediate_size: 2880,
  num_hidden_layers: layers,
  num_attention_heads: 64,
  num_key_value_heads: 8,
  head_dim: 64,
  num_local_experts: experts,
  num_experts_per_tok: 4,
  experts_per_token: 4,
  sliding_window: 128,
  layer_types: Array.from({ length: layers }, (_, i) => (i % 2 === 0 ? 'sliding_attention' : 'full_attention')),
  max_position_embeddings: 131072,
  initial_context_length: 4096,
  rope_theta: 150000,
  rope_scaling: { rope_type: 'yarn', factor: 32.0, beta_fast: 32.0, beta_slow: 1.0, truncate: false, original_max_position_embeddings: 4096 },
  attention_bias: true,
  attention_dropout: 0.0,
  rms_norm_eps: 1e-5,
  swiglu_limit: 7.0,
  tie_word_embeddings: false,
  hidden_act: 'silu',
  eos_token_id: 200002,
  pad_token_id: 199999,
  torch_dtype: 'bfloat16',
  quantization_config: { quant_method: 'mxfp4', modules_to_not_convert: ['model.layers.*.self_attn', 'model.layers.*.mlp.router', 'model.embed_tokens', 'lm_head'] },
});

const qwen3Moe = (o: Record<string, unknown>) => ({
  architectures: ['Qwen3MoeForCausalLM'],
  model_type: 'qwen3_moe',
  attention_bias: false,
  attention_dropout: 0.0,
  decoder_sparse_step: 1,
  mlp_only_layers: [],
  norm_topk_prob: true,
  rms_norm_eps: 1e-6,
  rope_theta: 1000000.0,
  rope_scaling: null,
  tie_word_embeddings: false,
  use_sliding_window: false,
  sliding_window: null,
  hidden_act: 'silu',
  torch_dtype: 'bfloat16',
  ...o,
});

/** DeepSeek-V3's config.json (deepseek-ai/DeepSeek-V3, as DeepSeek-R1 shares it); `o` overrides. */
const deepseekV3 = (o: Record<string, unknown>) => ({
  architectures: ['DeepseekV3ForCausalLM'],
  model_type: 'deepseek_v3',
  attention_bias: false,
  attention_dropout: 0.0,
  bos_token_id: 0,
  eos_token_id: 1,
  first_k_dense_replace: 3,
  hidden_act: 'silu',
  hidden_size: 7168,
  intermediate_size: 18432,
  kv_lora_rank: 512,
  max_position_embeddings: 163840,
  moe_intermediate_size: 2048,
  moe_layer_freq: 1,
  n_group: 8,
  n_routed_experts: 256,
  n_shared_experts: 1,
  norm_topk_prob: true,
  num_attention_heads: 128,
  num_experts_per_tok: 8,
  num_hidden_layers: 61,
  num_key_value_heads: 128,
  num_nextn_predict_layers: 1,
  q_lora_rank: 1536,
  qk_nope_head_dim: 128,
  qk_rope_head_dim: 64,
  quantization_config: { activation_scheme: 'dynamic', fmt: 'e4m3', quant_method: 'fp8', weight_block_size: [128, 128] },
  rms_norm_eps: 1e-6,
  rope_scaling: { beta_fast: 32, beta_slow: 1, factor: 40, mscale: 1.0, mscale_all_dim: 1.0, original_max_position_embeddings: 4096, type: 'yarn' },
  rope_theta: 10000,
  routed_scaling_factor: 2.5,
  scoring_func: 'sigmoid',
  tie_word_embeddings: false,
  topk_group: 4,
  topk_method: 'noaux_tc',
  torch_dtype: 'bfloat16',
  v_head_dim: 128,
  vocab_size: 129280,
  ...o,
});

export interface SynthPreset {
  family: SynthFamily;
  config: Record<string, unknown>;
  mxfp4Experts: boolean;
  /**
   * Every projection inside the decoder layers (attention, dense MLPs, shared and routed experts;
   * not the router) as block-scaled FP8 E4M3 with `weight_scale_inv`, as DeepSeek ships them.
   */
  fp8?: boolean;
}

export const PRESETS: Record<string, SynthPreset> = {
  'gpt-oss-20b': { family: 'gpt_oss', config: gptOss(24, 32), mxfp4Experts: true },
  'gpt-oss-120b': { family: 'gpt_oss', config: gptOss(36, 128), mxfp4Experts: true },
  'qwen3-30b-a3b': {
    family: 'qwen3_moe',
    mxfp4Experts: false,
    config: qwen3Moe({
      vocab_size: 151936, hidden_size: 2048, intermediate_size: 6144, moe_intermediate_size: 768,
      num_hidden_layers: 48, num_attention_heads: 32, num_key_value_heads: 4, head_dim: 128,
      num_experts: 128, num_experts_per_tok: 8, max_position_embeddings: 40960,
      bos_token_id: 151643, eos_token_id: 151645,
    }),
  },
  'deepseek-v3': { family: 'deepseek_v3', mxfp4Experts: false, fp8: true, config: deepseekV3({}) },
  /** moonshotai/Kimi-K2-Instruct: the deepseek_v3 architecture at 384 experts, one expert group, 64 heads. */
  'kimi-k2': {
    family: 'deepseek_v3',
    mxfp4Experts: false,
    fp8: true,
    config: deepseekV3({
      model_type: 'kimi_k2', bos_token_id: 163584, eos_token_id: 163585, first_k_dense_replace: 1, max_position_embeddings: 131072,
      n_group: 1, topk_group: 1, n_routed_experts: 384, num_attention_heads: 64, num_key_value_heads: 64, num_nextn_predict_layers: 0,
      rope_scaling: { beta_fast: 1.0, beta_slow: 1.0, factor: 32.0, mscale: 1.0, mscale_all_dim: 1.0, original_max_position_embeddings: 4096, type: 'yarn' },
      rope_theta: 50000.0, routed_scaling_factor: 2.827, vocab_size: 163840,
    }),
  },
  /** The bundled demo model's shape: small enough for the CPU backend. */
  'tiny-demo': {
    family: 'qwen3_moe',
    mxfp4Experts: false,
    config: qwen3Moe({
      vocab_size: 512, hidden_size: 128, intermediate_size: 256, moe_intermediate_size: 96,
      num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 32,
      num_experts: 8, num_experts_per_tok: 2, max_position_embeddings: 2048,
      bos_token_id: null, eos_token_id: 511, pad_token_id: 509, tie_word_embeddings: true,
    }),
  },
};
