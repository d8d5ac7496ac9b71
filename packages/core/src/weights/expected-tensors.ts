/**
 * The tensors a {@link ModelSpec} implies: every name a load reads, the shapes config.json allows
 * for it, what kind of data it holds, and why it must be there. This is the checklist
 * {@link validateCheckpoint} holds a checkpoint against before any backend reads a byte, so a
 * missing bias or sink is an error at load instead of a tensor of zeros.
 */
import { MoeflashError } from '../errors.js';
import type { ModelSpec } from '../model/spec.js';
import { detectExpertLayout } from './layouts.js';
import type { WeightSource } from './tensor.js';

/** `float`: weights decoded to numbers; `mxfp4`: U8 blocks or scales of MXFP4 experts. */
export type TensorKind = 'float' | 'mxfp4-blocks' | 'mxfp4-scales';

export interface ExpectedTensor {
  name: string;
  /** Accepted shapes (more than one where a layout comes in two orientations). */
  shapes: number[][];
  kind: TensorKind;
  /** What in config.json asks for it, for messages ("attention_bias is true"). */
  why: string;
}

/** Tensors of one decoder layer that the spec implies, and the layer prefix they live under. */
export interface ExpectedLayer {
  layer: number;
  tensors: ExpectedTensor[];
}

export interface ExpectedCheckpoint {
  /** Outside the decoder layers: embedding, final norm, LM head. */
  top: ExpectedTensor[];
  layers: ExpectedLayer[];
}

function layoutError(spec: ModelSpec, layer: number, message: string): MoeflashError {
  return new MoeflashError('WEIGHTS_INVALID', `layer ${layer}: ${message} (config.json: ${spec.source})`);
}

/** The router's tensor prefix: gpt-oss names it `router`, the others `gate`. */
function routerPrefix(spec: ModelSpec, src: WeightSource, mlp: string): string {
  if (src.has(`${mlp}.router.weight`)) return `${mlp}.router`;
  if (src.has(`${mlp}.gate.weight`)) return `${mlp}.gate`;
  return spec.family === 'gpt_oss' ? `${mlp}.router` : `${mlp}.gate`;
}

function expertTensors(spec: ModelSpec, src: WeightSource, l: number): ExpectedTensor[] {
  const E = spec.moe.numExperts;
  const H = spec.hiddenSize;
  const I = spec.moe.intermediateSize;
  const layout = detectExpertLayout(src, l);
  const ex = `${layout.prefix}.experts`;
  const why = `num_experts ${E}, hidden_size ${H}, expert intermediate size ${I}`;
  const out: ExpectedTensor[] = [];
  const router = routerPrefix(spec, src, layout.prefix);
  out.push({ name: `${router}.weight`, shapes: [[E, H]], kind: 'float', why: `the router of a MoE layer (${why})` });
  if (spec.moe.routerBias) out.push({ name: `${router}.bias`, shapes: [[E]], kind: 'float', why: `a ${spec.family} router carries a bias` });
  if (spec.moe.rule === 'sigmoid_grouped_topk') {
    out.push({ name: `${router}.e_score_correction_bias`, shapes: [[E]], kind: 'float', why: `the ${spec.family} router's expert-selection bias (n_routed_experts ${E})` });
  }
  const shared = spec.moe.sharedExperts;
  if (shared) {
    const S = shared.count * shared.intermediateSize;
    const sw = `n_shared_experts ${shared.count} x moe_intermediate_size ${shared.intermediateSize}, hidden_size ${H}`;
    out.push({ name: `${layout.prefix}.shared_experts.gate_proj.weight`, shapes: [[S, H]], kind: 'float', why: sw });
    out.push({ name: `${layout.prefix}.shared_experts.up_proj.weight`, shapes: [[S, H]], kind: 'float', why: sw });
    out.push({ name: `${layout.prefix}.shared_experts.down_proj.weight`, shapes: [[H, S]], kind: 'float', why: sw });
  }

  if (layout.kind === 'per-expert') {
    const [g, u, d] = layout.names;
    for (let j = 0; j < E; j++) {
      out.push({ name: `${ex}.${j}.${g}.weight`, shapes: [[I, H]], kind: 'float', why: `expert ${j} of ${E}` });
      out.push({ name: `${ex}.${j}.${u}.weight`, shapes: [[I, H]], kind: 'float', why: `expert ${j} of ${E}` });
      out.push({ name: `${ex}.${j}.${d}.weight`, shapes: [[H, I]], kind: 'float', why: `expert ${j} of ${E}` });
    }
  } else if (layout.kind === 'mxfp4-fused') {
    if (H % 32 !== 0 || I % 32 !== 0) {
      throw layoutError(spec, l, `MXFP4 experts need hidden_size (${H}) and the expert intermediate size (${I}) to be multiples of 32, the MXFP4 block`);
    }
    const mx = `MXFP4 experts (${why})`;
    out.push({ name: `${ex}.gate_up_proj_blocks`, shapes: [[E, 2 * I, H / 32, 16]], kind: 'mxfp4-blocks', why: mx });
    out.push({ name: `${ex}.gate_up_proj_scales`, shapes: [[E, 2 * I, H / 32]], kind: 'mxfp4-scales', why: mx });
    out.push({ name: `${ex}.down_proj_blocks`, shapes: [[E, H, I / 32, 16]], kind: 'mxfp4-blocks', why: mx });
    out.push({ name: `${ex}.down_proj_scales`, shapes: [[E, H, I / 32]], kind: 'mxfp4-scales', why: mx });
  } else {
    // gpt-oss keeps dequantized experts input-major ([E, H, 2I], x @ W); the others W x ([E, 2I, H]).
    // The loader tells them apart by shape, so both are accepted where they differ, and down_proj
    // must then be in the same orientation.
    const info = src.info(`${ex}.gate_up_proj`);
    const interleaved = spec.family === 'gpt_oss';
    const inputMajor = info.shape[1] === H && info.shape[2] === 2 * I && (interleaved || 2 * I !== H);
    const fused = `fused experts (${why})`;
    const gateUp = inputMajor || interleaved || 2 * I !== H ? [[E, 2 * I, H], [E, H, 2 * I]] : [[E, 2 * I, H]];
    out.push({ name: `${ex}.gate_up_proj`, shapes: gateUp, kind: 'float', why: fused });
    out.push({ name: `${ex}.down_proj`, shapes: [inputMajor ? [E, I, H] : [E, H, I]], kind: 'float', why: `${fused}, oriented as gate_up_proj` });
  }
  if (spec.moe.expertBias) {
    out.push({ name: `${ex}.gate_up_proj_bias`, shapes: [[E, 2 * I]], kind: 'float', why: `${spec.family} experts carry biases` });
    out.push({ name: `${ex}.down_proj_bias`, shapes: [[E, H]], kind: 'float', why: `${spec.family} experts carry biases` });
  }
  return out;
}

/**
 * Lists what a checkpoint for `spec` must hold. `src` is consulted only where the format leaves a
 * choice (the expert layout of each MoE layer, the router's name, the experts' orientation).
 *
 * @throws MoeflashError `WEIGHTS_MISSING` when a MoE layer has no experts in any known layout
 */
/** deepseek_v3's latent attention (DeepseekV3Attention's modules). */
function mlaTensors(spec: ModelSpec, at: string): ExpectedTensor[] {
  const H = spec.hiddenSize;
  const a = spec.attention;
  const m = a.mla!;
  const qDim = a.numHeads * a.headDim;
  const dims = `num_attention_heads ${a.numHeads}, qk_nope_head_dim ${m.qkNopeHeadDim}, qk_rope_head_dim ${m.qkRopeHeadDim}, v_head_dim ${m.vHeadDim}, kv_lora_rank ${m.kvLoraRank}, hidden_size ${H}`;
  const t: ExpectedTensor[] = [];
  if (m.qLoraRank === null) {
    t.push({ name: `${at}.q_proj.weight`, shapes: [[qDim, H]], kind: 'float', why: `q_lora_rank is null (${dims})` });
  } else {
    const why = `q_lora_rank ${m.qLoraRank} (${dims})`;
    t.push({ name: `${at}.q_a_proj.weight`, shapes: [[m.qLoraRank, H]], kind: 'float', why });
    t.push({ name: `${at}.q_a_layernorm.weight`, shapes: [[m.qLoraRank]], kind: 'float', why });
    t.push({ name: `${at}.q_b_proj.weight`, shapes: [[qDim, m.qLoraRank]], kind: 'float', why });
  }
  t.push({ name: `${at}.kv_a_proj_with_mqa.weight`, shapes: [[m.kvLoraRank + m.qkRopeHeadDim, H]], kind: 'float', why: dims });
  t.push({ name: `${at}.kv_a_layernorm.weight`, shapes: [[m.kvLoraRank]], kind: 'float', why: dims });
  t.push({ name: `${at}.kv_b_proj.weight`, shapes: [[a.numHeads * (m.qkNopeHeadDim + m.vHeadDim), m.kvLoraRank]], kind: 'float', why: dims });
  t.push({ name: `${at}.o_proj.weight`, shapes: [[H, a.numHeads * m.vHeadDim]], kind: 'float', why: dims });
  return t;
}

export function expectedTensors(spec: ModelSpec, src: WeightSource): ExpectedCheckpoint {
  const H = spec.hiddenSize;
  const V = spec.vocabSize;
  const a = spec.attention;
  const qDim = a.numHeads * a.headDim;
  const kvDim = a.numKvHeads * a.headDim;
  const heads = `num_attention_heads ${a.numHeads}, num_key_value_heads ${a.numKvHeads}, head_dim ${a.headDim}, hidden_size ${H}`;

  const top: ExpectedTensor[] = [
    { name: 'model.embed_tokens.weight', shapes: [[V, H]], kind: 'float', why: `the token embedding (vocab_size ${V}, hidden_size ${H})` },
    { name: 'model.norm.weight', shapes: [[H]], kind: 'float', why: 'the final norm' },
  ];
  // A tied checkpoint may still carry the head (the loader then uses it), so check its shape too.
  if (!spec.tieWordEmbeddings || src.has('lm_head.weight')) {
    top.push({ name: 'lm_head.weight', shapes: [[V, H]], kind: 'float', why: 'the LM head, since tie_word_embeddings is false' });
  }

  const layers: ExpectedLayer[] = [];
  for (let l = 0; l < spec.numLayers; l++) {
    const p = `model.layers.${l}`;
    const at = `${p}.self_attn`;
    const t: ExpectedTensor[] = [
      { name: `${p}.input_layernorm.weight`, shapes: [[H]], kind: 'float', why: 'every layer has an input norm' },
      { name: `${p}.post_attention_layernorm.weight`, shapes: [[H]], kind: 'float', why: 'every layer has a post-attention norm' },
    ];
    if (a.mla) {
      t.push(...mlaTensors(spec, at));
    } else {
      t.push(
        { name: `${at}.q_proj.weight`, shapes: [[qDim, H]], kind: 'float', why: heads },
        { name: `${at}.k_proj.weight`, shapes: [[kvDim, H]], kind: 'float', why: heads },
        { name: `${at}.v_proj.weight`, shapes: [[kvDim, H]], kind: 'float', why: heads },
        { name: `${at}.o_proj.weight`, shapes: [[H, qDim]], kind: 'float', why: heads },
      );
    }
    if (a.bias) {
      const why = 'config.json sets attention_bias (or the family always has attention biases)';
      t.push({ name: `${at}.q_proj.bias`, shapes: [[qDim]], kind: 'float', why });
      t.push({ name: `${at}.k_proj.bias`, shapes: [[kvDim]], kind: 'float', why });
      t.push({ name: `${at}.v_proj.bias`, shapes: [[kvDim]], kind: 'float', why });
      t.push({ name: `${at}.o_proj.bias`, shapes: [[H]], kind: 'float', why });
    }
    if (a.qkNorm) {
      t.push({ name: `${at}.q_norm.weight`, shapes: [[a.headDim]], kind: 'float', why: `${spec.family} normalizes q and k per head` });
      t.push({ name: `${at}.k_norm.weight`, shapes: [[a.headDim]], kind: 'float', why: `${spec.family} normalizes q and k per head` });
    }
    if (a.sinks) t.push({ name: `${at}.sinks`, shapes: [[a.numHeads]], kind: 'float', why: `${spec.family} attention has one sink logit per head` });
    if (spec.layers[l].mlp === 'dense') {
      const I = spec.denseIntermediateSize!;
      const why = `layer ${l} is dense (${spec.family === 'deepseek_v3' ? 'first_k_dense_replace' : 'mlp_only_layers / decoder_sparse_step'}), intermediate_size ${I}`;
      t.push({ name: `${p}.mlp.gate_proj.weight`, shapes: [[I, H]], kind: 'float', why });
      t.push({ name: `${p}.mlp.up_proj.weight`, shapes: [[I, H]], kind: 'float', why });
      t.push({ name: `${p}.mlp.down_proj.weight`, shapes: [[H, I]], kind: 'float', why });
    } else {
      t.push(...expertTensors(spec, src, l));
    }
    layers.push({ layer: l, tensors: t });
  }
  return { top, layers };
}
