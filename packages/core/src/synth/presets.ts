/**
 * Real model shapes as HF config.json objects, for synthetic checkpoints that stand in for real
 * weights in speed measurements (no download is possible on a GPU host without network).
 */
export type SynthFamily = 'gpt_oss' | 'qwen3_moe' | 'mixtral';

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

export const PRESETS: Record<string, { family: SynthFamily; config: Record<string, unknown>; mxfp4Experts: boolean }> = {
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
