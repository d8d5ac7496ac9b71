/**
 * Tiny random checkpoints in every expert layout the converter reads, written the way the
 * released checkpoints and transformers 5 write them (the same layouts as tools/golden's fixtures):
 * - qwen3_moe: per-expert `mlp.experts.J.{gate,up,down}_proj.weight`, or fused `mlp.experts.
 *   gate_up_proj` [E, 2I, H] (gate rows first) + `down_proj` [E, H, I];
 * - mixtral: released `block_sparse_moe.experts.J.w1/w3/w2` + `block_sparse_moe.gate`, or fused
 *   under `mlp.*`;
 * - gpt_oss: bf16 `gate_up_proj` [E, H, 2I] (interleaved gate / up columns) + `down_proj` [E, I, H]
 *   with biases, or MXFP4 `*_blocks` / `*_scales` as released;
 * - `fp8`: qwen3_moe per-expert with every projection (experts included) block-scaled FP8, as
 *   DeepSeek-V3-style checkpoints store them.
 *
 * Weights are Gaussian with std 1/sqrt(fan_in) (embeddings std 1), so logits spread over a few units
 * and a quantization error shows in the next-token distributions.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseModelConfig, writeSafetensors, type DType, type ModelSpec } from '@moeflash/core';
import { encodeBf16, quantizeFp8Blocked, quantizeMxfp4 } from '../src/index.js';

export type TinyLayout =
  | 'qwen3_moe/per-expert'
  | 'qwen3_moe/fused'
  | 'mixtral/per-expert'
  | 'mixtral/fused'
  | 'gpt_oss/bf16'
  | 'gpt_oss/mxfp4'
  | 'qwen3_moe/fp8';

export const TINY_LAYOUTS: TinyLayout[] = [
  'qwen3_moe/per-expert',
  'qwen3_moe/fused',
  'mixtral/per-expert',
  'mixtral/fused',
  'gpt_oss/bf16',
  'gpt_oss/mxfp4',
  'qwen3_moe/fp8',
];

export interface TinyOptions {
  seed?: number;
  /** Config fields to override (sizes). */
  overrides?: Record<string, unknown>;
}

const repoRoot = path.resolve(__dirname, '../../..');

function baseConfig(family: string): Record<string, unknown> {
  if (family === 'qwen3_moe') {
    return {
      architectures: ['Qwen3MoeForCausalLM'], model_type: 'qwen3_moe', vocab_size: 512, hidden_size: 192,
      intermediate_size: 160, moe_intermediate_size: 64, num_hidden_layers: 3, mlp_only_layers: [1],
      num_attention_heads: 4, num_key_value_heads: 2, head_dim: 48, num_experts: 6, num_experts_per_tok: 2,
      norm_topk_prob: true, rms_norm_eps: 1e-6, rope_theta: 1e6, max_position_embeddings: 4096,
      tie_word_embeddings: false, hidden_act: 'silu', decoder_sparse_step: 1, eos_token_id: 511,
    };
  }
  if (family === 'mixtral') {
    return {
      architectures: ['MixtralForCausalLM'], model_type: 'mixtral', vocab_size: 512, hidden_size: 160,
      intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 1,
      num_local_experts: 4, num_experts_per_tok: 2, rms_norm_eps: 1e-5, rope_theta: 1e6,
      max_position_embeddings: 4096, sliding_window: null, tie_word_embeddings: false, hidden_act: 'silu', eos_token_id: 511,
    };
  }
  return {
    architectures: ['GptOssForCausalLM'], model_type: 'gpt_oss', vocab_size: 512, hidden_size: 128,
    intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 24,
    num_local_experts: 4, num_experts_per_tok: 2, experts_per_token: 2, sliding_window: 8,
    layer_types: ['sliding_attention', 'full_attention'], max_position_embeddings: 4096,
    rope_theta: 150000, rope_scaling: { rope_type: 'yarn', factor: 8.0, beta_fast: 32.0, beta_slow: 1.0, truncate: false, original_max_position_embeddings: 512 },
    attention_bias: true, rms_norm_eps: 1e-5, swiglu_limit: 7.0, tie_word_embeddings: false, hidden_act: 'silu', eos_token_id: 511,
  };
}

class Gaussian {
  private s: number;
  private spare: number | null = null;
  constructor(seed: number) {
    this.s = (seed >>> 0) || 0x9e3779b9;
  }
  private u(): number {
    let x = this.s;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.s = x >>> 0;
    return (this.s + 0.5) / 4294967296;
  }
  next(): number {
    if (this.spare !== null) {
      const v = this.spare;
      this.spare = null;
      return v;
    }
    const r = Math.sqrt(-2 * Math.log(this.u()));
    const t = 2 * Math.PI * this.u();
    this.spare = r * Math.sin(t);
    return r * Math.cos(t);
  }
  fill(n: number, std: number, mean = 0): Float32Array {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = mean + std * this.next();
    return out;
  }
}

type Tensor = { dtype: DType; shape: number[]; data: Uint8Array | Float32Array };

function bf16(values: Float32Array, shape: number[]): Tensor {
  const bits = encodeBf16(values);
  return { dtype: 'BF16', shape, data: new Uint8Array(bits.buffer) };
}

function fp8(name: string, out: Record<string, Tensor>, values: Float32Array, rows: number, cols: number): void {
  const q = quantizeFp8Blocked(values, rows, cols);
  out[name] = { dtype: 'F8_E4M3', shape: [rows, cols], data: q.data };
  out[`${name}_scale_inv`] = { dtype: 'F32', shape: [Math.ceil(rows / 128), Math.ceil(cols / 128)], data: q.scaleInv };
}

/** [rows, cols] row-major -> [cols, rows]. */
function transpose(m: Float32Array, rows: number, cols: number): Float32Array {
  const t = new Float32Array(m.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) t[c * rows + r] = m[r * cols + c];
  return t;
}

/** Writes a tiny random model of the given layout into `dir` (created); returns its spec. */
export async function writeTinyCheckpoint(dir: string, layout: TinyLayout, opts: TinyOptions = {}): Promise<ModelSpec> {
  const [family, kind] = layout.split('/') as [string, string];
  const config: Record<string, unknown> = { ...baseConfig(family), ...(opts.overrides ?? {}) };
  if (kind === 'mxfp4') {
    config.quantization_config = { quant_method: 'mxfp4', modules_to_not_convert: ['model.layers.*.self_attn', 'model.layers.*.mlp.router', 'model.embed_tokens', 'lm_head'] };
  }
  if (kind === 'fp8') config.quantization_config = { quant_method: 'fp8', activation_scheme: 'dynamic', weight_block_size: [128, 128] };
  fs.mkdirSync(dir, { recursive: true });
  const spec = parseModelConfig(config, path.join(dir, 'config.json'));
  const rng = new Gaussian(opts.seed ?? 1);
  const H = spec.hiddenSize;
  const V = spec.vocabSize;
  const a = spec.attention;
  const E = spec.moe.numExperts;
  const I = spec.moe.intermediateSize;
  const qDim = a.numHeads * a.headDim;
  const kvDim = a.numKvHeads * a.headDim;
  const t: Record<string, Tensor> = {};
  const proj = (name: string, rows: number, cols: number) => {
    const w = rng.fill(rows * cols, 1 / Math.sqrt(cols));
    if (kind === 'fp8') fp8(name, t, w, rows, cols);
    else t[name] = bf16(w, [rows, cols]);
  };
  const vec = (name: string, n: number, std: number, mean = 0) => (t[name] = bf16(rng.fill(n, std, mean), [n]));

  t['model.embed_tokens.weight'] = bf16(rng.fill(V * H, 1), [V, H]);
  for (let l = 0; l < spec.numLayers; l++) {
    const p = `model.layers.${l}`;
    vec(`${p}.input_layernorm.weight`, H, 0.1, 1);
    vec(`${p}.post_attention_layernorm.weight`, H, 0.1, 1);
    proj(`${p}.self_attn.q_proj.weight`, qDim, H);
    proj(`${p}.self_attn.k_proj.weight`, kvDim, H);
    proj(`${p}.self_attn.v_proj.weight`, kvDim, H);
    proj(`${p}.self_attn.o_proj.weight`, H, qDim);
    if (a.bias) {
      vec(`${p}.self_attn.q_proj.bias`, qDim, 0.1);
      vec(`${p}.self_attn.k_proj.bias`, kvDim, 0.1);
      vec(`${p}.self_attn.v_proj.bias`, kvDim, 0.1);
      vec(`${p}.self_attn.o_proj.bias`, H, 0.1);
    }
    if (a.qkNorm) {
      vec(`${p}.self_attn.q_norm.weight`, a.headDim, 0.1, 1);
      vec(`${p}.self_attn.k_norm.weight`, a.headDim, 0.1, 1);
    }
    if (a.sinks) vec(`${p}.self_attn.sinks`, a.numHeads, 0.5);
    if (spec.layers[l].mlp === 'dense') {
      const D = spec.denseIntermediateSize!;
      proj(`${p}.mlp.gate_proj.weight`, D, H);
      proj(`${p}.mlp.up_proj.weight`, D, H);
      proj(`${p}.mlp.down_proj.weight`, H, D);
      continue;
    }
    const moe = family === 'mixtral' && kind === 'per-expert' ? `${p}.block_sparse_moe` : `${p}.mlp`;
    const router = family === 'gpt_oss' ? `${moe}.router` : `${moe}.gate`;
    t[`${router}.weight`] = bf16(rng.fill(E * H, 1 / Math.sqrt(H)), [E, H]);
    if (family === 'gpt_oss') vec(`${router}.bias`, E, 0.1);
    const ex = `${moe}.experts`;
    const gate = Array.from({ length: E }, () => rng.fill(I * H, 1 / Math.sqrt(H)));
    const up = Array.from({ length: E }, () => rng.fill(I * H, 1 / Math.sqrt(H)));
    const down = Array.from({ length: E }, () => rng.fill(H * I, 1 / Math.sqrt(I)));
    if (kind === 'per-expert' || kind === 'fp8') {
      const names = family === 'mixtral' ? ['w1', 'w3', 'w2'] : ['gate_proj', 'up_proj', 'down_proj'];
      for (let j = 0; j < E; j++) {
        const put = (n: string, w: Float32Array, rows: number, cols: number) =>
          kind === 'fp8' ? fp8(`${ex}.${j}.${n}.weight`, t, w, rows, cols) : (t[`${ex}.${j}.${n}.weight`] = bf16(w, [rows, cols]));
        put(names[0], gate[j], I, H);
        put(names[1], up[j], I, H);
        put(names[2], down[j], H, I);
      }
      continue;
    }
    // The fused [2I, H] matrix of each expert in the family's row order.
    const fused = new Float32Array(E * 2 * I * H);
    for (let j = 0; j < E; j++) {
      for (let r = 0; r < I; r++) {
        const g = gate[j].subarray(r * H, (r + 1) * H);
        const u = up[j].subarray(r * H, (r + 1) * H);
        const [gr, ur] = family === 'gpt_oss' ? [2 * r, 2 * r + 1] : [r, I + r];
        fused.set(g, (j * 2 * I + gr) * H);
        fused.set(u, (j * 2 * I + ur) * H);
      }
    }
    const downAll = new Float32Array(E * H * I);
    down.forEach((d, j) => downAll.set(d, j * H * I));
    if (family === 'gpt_oss') {
      vec(`${ex}.gate_up_proj_bias`, E * 2 * I, 0.1);
      t[`${ex}.gate_up_proj_bias`].shape = [E, 2 * I];
      vec(`${ex}.down_proj_bias`, E * H, 0.1);
      t[`${ex}.down_proj_bias`].shape = [E, H];
    }
    if (kind === 'mxfp4') {
      const gq = quantizeMxfp4(fused);
      const dq = quantizeMxfp4(downAll);
      t[`${ex}.gate_up_proj_blocks`] = { dtype: 'U8', shape: [E, 2 * I, H / 32, 16], data: gq.blocks };
      t[`${ex}.gate_up_proj_scales`] = { dtype: 'U8', shape: [E, 2 * I, H / 32], data: gq.scales };
      t[`${ex}.down_proj_blocks`] = { dtype: 'U8', shape: [E, H, I / 32, 16], data: dq.blocks };
      t[`${ex}.down_proj_scales`] = { dtype: 'U8', shape: [E, H, I / 32], data: dq.scales };
    } else if (family === 'gpt_oss') {
      const gu = new Float32Array(E * H * 2 * I);
      const dn = new Float32Array(E * I * H);
      for (let j = 0; j < E; j++) {
        gu.set(transpose(fused.subarray(j * 2 * I * H, (j + 1) * 2 * I * H), 2 * I, H), j * H * 2 * I);
        dn.set(transpose(downAll.subarray(j * H * I, (j + 1) * H * I), H, I), j * I * H);
      }
      t[`${ex}.gate_up_proj`] = bf16(gu, [E, H, 2 * I]);
      t[`${ex}.down_proj`] = bf16(dn, [E, I, H]);
    } else {
      t[`${ex}.gate_up_proj`] = bf16(fused, [E, 2 * I, H]);
      t[`${ex}.down_proj`] = bf16(downAll, [E, H, I]);
    }
  }
  vec('model.norm.weight', H, 0.1, 1);
  t['lm_head.weight'] = bf16(rng.fill(V * H, 2 / Math.sqrt(H)), [V, H]);
  await writeSafetensors(path.join(dir, 'model.safetensors'), t, { format: 'pt' });
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config, null, 2) + '\n');
  for (const f of ['tokenizer.json', 'tokenizer_config.json', 'generation_config.json']) {
    fs.copyFileSync(path.join(repoRoot, 'packages', 'core', 'test', 'fixtures', 'demo-tokenizer', f), path.join(dir, f));
  }
  return spec;
}

/** A fresh temporary folder. */
export function tempDir(label: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `moeflash-quant-${label}-`));
}
