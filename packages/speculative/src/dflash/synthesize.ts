/**
 * Writes a DFlash drafter of random weights in the published format for a given target: the
 * config.json fields and safetensors names of z-lab's releases (README.md), shaped for the target
 * (its hidden size, vocabulary, attention heads and RoPE). Tests and benchmarks use it where no
 * trained drafter exists.
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { loadModelSpec, MoeflashError, writeSafetensors, type DType } from '@moeflash/core';
import { defaultTargetLayerIds } from './config.js';

export interface SynthesizeDflashOptions {
  /** Trained block length in the config (anchor + masks; z-lab ships 16). Default 16. */
  blockSize?: number;
  /** Draft layers. Default 1. */
  numLayers?: number;
  seed?: number;
  /** Default: 2 x the target's hidden size. */
  intermediateSize?: number;
  /** Default: the last vocabulary id. */
  maskTokenId?: number;
  /** Default: z-lab's build_target_layer_ids for the target's depth. */
  targetLayerIds?: number[];
  /** Standard deviation of the random weights (default 0.02); norms are ones. */
  std?: number;
}

/** xorshift32: reproducible weights from a seed. */
function generator(seed: number): () => number {
  let s = seed >>> 0 || 0x9e3779b9;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 4294967296;
  };
}

/** float32 -> bf16 bits, round to nearest even. */
function bf16(values: Float32Array): Uint8Array {
  const u = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < u.length; i++) out[i] = (u[i]! + 0x7fff + ((u[i]! >>> 16) & 1)) >>> 16;
  return new Uint8Array(out.buffer);
}

/** Writes `<outDir>/config.json` and `<outDir>/model.safetensors`; returns outDir. */
export async function synthesizeDflashDraft(targetDir: string, outDir: string, opts: SynthesizeDflashOptions = {}): Promise<string> {
  const spec = await loadModelSpec(targetDir);
  const targetJson = JSON.parse(await readFile(path.join(path.resolve(targetDir), 'config.json'), 'utf8')) as Record<string, unknown>;
  const H = spec.hiddenSize;
  const V = spec.vocabSize;
  const a = spec.attention;
  const numLayers = opts.numLayers ?? 1;
  const blockSize = opts.blockSize ?? 16;
  const I = opts.intermediateSize ?? 2 * H;
  const ids = opts.targetLayerIds ?? defaultTargetLayerIds(spec.numLayers, numLayers);
  const maskTokenId = opts.maskTokenId ?? V - 1;
  if (!Number.isInteger(numLayers) || numLayers < 1) throw new MoeflashError('INVALID_ARGUMENT', `numLayers must be a positive integer; got ${numLayers}`);
  if (!Number.isInteger(blockSize) || blockSize < 2) throw new MoeflashError('INVALID_ARGUMENT', `blockSize must be an integer >= 2; got ${blockSize}`);
  if (ids.some((id) => !Number.isInteger(id) || id < 0 || id >= spec.numLayers)) {
    throw new MoeflashError('INVALID_ARGUMENT', `targetLayerIds ${JSON.stringify(ids)} must be layers of the target, 0 to ${spec.numLayers - 1}`);
  }

  const rope: Record<string, unknown> = {};
  for (const key of ['rope_theta', 'rope_scaling', 'rope_parameters', 'partial_rotary_factor', 'max_position_embeddings']) {
    if (targetJson[key] !== undefined) rope[key] = targetJson[key];
  }
  const config = {
    architectures: ['DFlashDraftModel'],
    auto_map: { AutoModel: 'dflash.DFlashDraftModel' },
    model_type: 'qwen3',
    attention_bias: false,
    attention_dropout: 0,
    block_size: blockSize,
    dflash_config: { mask_token_id: maskTokenId, target_layer_ids: ids },
    dtype: 'bfloat16',
    head_dim: a.headDim,
    hidden_act: 'silu',
    hidden_size: H,
    intermediate_size: I,
    layer_types: Array.from({ length: numLayers }, () => 'full_attention'),
    num_attention_heads: a.numHeads,
    num_hidden_layers: numLayers,
    num_key_value_heads: a.numKvHeads,
    num_target_layers: spec.numLayers,
    rms_norm_eps: spec.rmsNormEps,
    ...rope,
    sliding_window: null,
    tie_word_embeddings: false,
    use_sliding_window: false,
    vocab_size: V,
  };

  const random = generator(opts.seed ?? 1);
  const std = opts.std ?? 0.02;
  const spread = std * Math.sqrt(12);
  const tensors: Record<string, { dtype: DType; shape: number[]; data: Uint8Array }> = {};
  const add = (name: string, shape: number[], kind: 'random' | 'ones') => {
    const n = shape.reduce((x, y) => x * y, 1);
    const v = new Float32Array(n);
    if (kind === 'ones') v.fill(1);
    else for (let i = 0; i < n; i++) v[i] = (random() - 0.5) * spread;
    tensors[name] = { dtype: 'BF16', shape, data: bf16(v) };
  };
  const qDim = a.numHeads * a.headDim;
  const kvDim = a.numKvHeads * a.headDim;
  add('fc.weight', [H, ids.length * H], 'random');
  add('hidden_norm.weight', [H], 'ones');
  for (let l = 0; l < numLayers; l++) {
    const p = `layers.${l}`;
    add(`${p}.input_layernorm.weight`, [H], 'ones');
    add(`${p}.mlp.down_proj.weight`, [H, I], 'random');
    add(`${p}.mlp.gate_proj.weight`, [I, H], 'random');
    add(`${p}.mlp.up_proj.weight`, [I, H], 'random');
    add(`${p}.post_attention_layernorm.weight`, [H], 'ones');
    add(`${p}.self_attn.k_norm.weight`, [a.headDim], 'ones');
    add(`${p}.self_attn.k_proj.weight`, [kvDim, H], 'random');
    add(`${p}.self_attn.o_proj.weight`, [H, qDim], 'random');
    add(`${p}.self_attn.q_norm.weight`, [a.headDim], 'ones');
    add(`${p}.self_attn.q_proj.weight`, [qDim, H], 'random');
    add(`${p}.self_attn.v_proj.weight`, [kvDim, H], 'random');
  }
  add('norm.weight', [H], 'ones');

  const dir = path.resolve(outDir);
  await mkdir(dir, { recursive: true });
  await writeSafetensors(path.join(dir, 'model.safetensors'), tensors, { format: 'pt' });
  await writeFile(path.join(dir, 'config.json'), JSON.stringify(config, null, 2) + '\n');
  return dir;
}
