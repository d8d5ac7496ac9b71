import { randomFillSync } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { MoeflashError } from '../errors.js';
import { parseModelConfig } from '../model/config.js';
import type { ModelSpec } from '../model/spec.js';
import { createSafetensorsWriter, type SafetensorsEntry } from '../weights/safetensors-writer.js';
import { PRESETS } from './presets.js';

export interface SynthOptions {
  preset: string;
  out: string;
  seed?: number;
  /** Store experts as MXFP4 (default: as the real model ships). */
  mxfp4Experts?: boolean;
  /** Override config fields (e.g. fewer layers for a quick run). */
  overrides?: Record<string, unknown>;
  onProgress?: (writtenBytes: number, totalBytes: number) => void;
}

/** A small fast generator (xorshift32): the weights need to look random, not be cryptographic. */
class Xorshift {
  constructor(private s: number) {
    if (this.s === 0) this.s = 0x9e3779b9;
  }
  next(): number {
    let x = this.s;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (this.s = x >>> 0);
  }
}

/** Uniform bf16 values of the given standard deviation, as little-endian bytes. */
function randomBf16(n: number, std: number, rng: Xorshift): Uint8Array {
  const out = new Uint16Array(n);
  const a = std * Math.sqrt(3) * 2;
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < n; i++) {
    f[0] = (rng.next() / 4294967296 - 0.5) * a;
    out[i] = (u[0] + 0x7fff + ((u[0] >>> 16) & 1)) >>> 16;
  }
  return new Uint8Array(out.buffer);
}

interface Planned extends SafetensorsEntry {
  fill: (bytes: Uint8Array, rng: Xorshift) => void;
  std: number;
}

/** Tensor names, shapes and content of a checkpoint in the family's HF layout. */
function plan(spec: ModelSpec, mxfp4: boolean): Planned[] {
  const H = spec.hiddenSize, V = spec.vocabSize, a = spec.attention, I = spec.moe.intermediateSize, E = spec.moe.numExperts;
  const qDim = a.numHeads * a.headDim, kvDim = a.numKvHeads * a.headDim;
  const out: Planned[] = [];
  const bf16 = (name: string, shape: number[], std: number) => out.push({ name, dtype: 'BF16', shape, std, fill: () => {} });
  const ones = (name: string, shape: number[]) => out.push({ name, dtype: 'BF16', shape, std: -1, fill: () => {} });
  const u8blocks = (name: string, shape: number[]) =>
    out.push({ name, dtype: 'U8', shape, std: 0, fill: (b) => randomFillSync(b) });
  // E2M1 codes average |v|^2 of about 8.6, so scale 2^-7 gives weights of std ~0.02.
  const u8scales = (name: string, shape: number[]) =>
    out.push({ name, dtype: 'U8', shape, std: 0, fill: (b, rng) => { for (let i = 0; i < b.length; i++) b[i] = 119 + (rng.next() % 3); } });

  bf16('model.embed_tokens.weight', [V, H], 0.02);
  for (let l = 0; l < spec.numLayers; l++) {
    const p = `model.layers.${l}`;
    ones(`${p}.input_layernorm.weight`, [H]);
    ones(`${p}.post_attention_layernorm.weight`, [H]);
    bf16(`${p}.self_attn.q_proj.weight`, [qDim, H], 0.02);
    bf16(`${p}.self_attn.k_proj.weight`, [kvDim, H], 0.02);
    bf16(`${p}.self_attn.v_proj.weight`, [kvDim, H], 0.02);
    bf16(`${p}.self_attn.o_proj.weight`, [H, qDim], 0.02);
    if (a.bias) {
      bf16(`${p}.self_attn.q_proj.bias`, [qDim], 0.02);
      bf16(`${p}.self_attn.k_proj.bias`, [kvDim], 0.02);
      bf16(`${p}.self_attn.v_proj.bias`, [kvDim], 0.02);
      bf16(`${p}.self_attn.o_proj.bias`, [H], 0.02);
    }
    if (a.qkNorm) {
      ones(`${p}.self_attn.q_norm.weight`, [a.headDim]);
      ones(`${p}.self_attn.k_norm.weight`, [a.headDim]);
    }
    if (a.sinks) bf16(`${p}.self_attn.sinks`, [a.numHeads], 0.5);
    if (spec.layers[l].mlp === 'dense') {
      const D = spec.denseIntermediateSize!;
      bf16(`${p}.mlp.gate_proj.weight`, [D, H], 0.02);
      bf16(`${p}.mlp.up_proj.weight`, [D, H], 0.02);
      bf16(`${p}.mlp.down_proj.weight`, [H, D], 0.02);
      continue;
    }
    const m = `${p}.mlp`;
    if (spec.family === 'gpt_oss') {
      bf16(`${m}.router.weight`, [E, H], 0.5);
      bf16(`${m}.router.bias`, [E], 0.1);
    } else bf16(`${m}.gate.weight`, [E, H], 0.5);
    if (mxfp4) {
      u8blocks(`${m}.experts.gate_up_proj_blocks`, [E, 2 * I, H / 32, 16]);
      u8scales(`${m}.experts.gate_up_proj_scales`, [E, 2 * I, H / 32]);
      u8blocks(`${m}.experts.down_proj_blocks`, [E, H, I / 32, 16]);
      u8scales(`${m}.experts.down_proj_scales`, [E, H, I / 32]);
    } else if (spec.family === 'gpt_oss') {
      bf16(`${m}.experts.gate_up_proj`, [E, H, 2 * I], 0.02);
      bf16(`${m}.experts.down_proj`, [E, I, H], 0.02);
    } else {
      bf16(`${m}.experts.gate_up_proj`, [E, 2 * I, H], 0.02);
      bf16(`${m}.experts.down_proj`, [E, H, I], 0.02);
    }
    if (spec.moe.expertBias) {
      bf16(`${m}.experts.gate_up_proj_bias`, [E, 2 * I], 0.02);
      bf16(`${m}.experts.down_proj_bias`, [E, H], 0.02);
    }
  }
  ones('model.norm.weight', [H]);
  if (!spec.tieWordEmbeddings) bf16('lm_head.weight', [V, H], 0.02);
  return out;
}

/**
 * Writes a checkpoint of random weights at a preset's real shapes and layout (`moeflash synth`).
 * Large tensors are generated and written in chunks, so memory stays bounded.
 */
export async function synthesizeModel(opts: SynthOptions): Promise<{ dir: string; bytes: number; spec: ModelSpec }> {
  const preset = PRESETS[opts.preset];
  if (!preset) {
    throw new MoeflashError('INVALID_ARGUMENT', `unknown preset '${opts.preset}'; choose one of ${Object.keys(PRESETS).join(', ')}`);
  }
  const config = { ...preset.config, ...(opts.overrides ?? {}) };
  const mxfp4 = opts.mxfp4Experts ?? preset.mxfp4Experts;
  if (!mxfp4 && preset.family === 'gpt_oss') delete (config as Record<string, unknown>).quantization_config;
  const dir = path.resolve(opts.out);
  await fs.mkdir(dir, { recursive: true });
  const spec = parseModelConfig(config, path.join(dir, 'config.json'));
  if (mxfp4 && (spec.hiddenSize % 32 || spec.moe.intermediateSize % 32)) {
    throw new MoeflashError('INVALID_ARGUMENT', `MXFP4 experts need hidden and expert sizes divisible by 32 (got ${spec.hiddenSize}, ${spec.moe.intermediateSize})`);
  }
  const entries = plan(spec, mxfp4);
  const writer = await createSafetensorsWriter(path.join(dir, 'model.safetensors'), entries.map(({ name, dtype, shape }) => ({ name, dtype, shape })), { format: 'pt', producer: `moeflash synth ${opts.preset}` });
  const rng = new Xorshift((opts.seed ?? 1) >>> 0);
  const total = entries.reduce((s, e) => s + e.shape.reduce((x, y) => x * y, 1) * (e.dtype === 'BF16' ? 2 : 1), 0);
  let written = 0;
  const CHUNK = 1 << 24;
  try {
    for (const e of entries) {
      const count = e.shape.reduce((x, y) => x * y, 1);
      const elemBytes = e.dtype === 'BF16' ? 2 : 1;
      for (let start = 0; start < count; start += CHUNK) {
        const n = Math.min(CHUNK, count - start);
        let bytes: Uint8Array;
        if (e.dtype === 'BF16') {
          bytes = e.std < 0 ? new Uint8Array(new Uint16Array(n).fill(0x3f80).buffer) : randomBf16(n, e.std, rng);
        } else {
          bytes = new Uint8Array(n);
          e.fill(bytes, rng);
        }
        await writer.write(e.name, bytes);
        written += n * elemBytes;
        opts.onProgress?.(written, total);
      }
    }
    await writer.close();
  } catch (err) {
    await writer.abort();
    throw err;
  }
  await fs.writeFile(path.join(dir, 'config.json'), JSON.stringify(config, null, 2) + '\n');
  return { dir, bytes: total, spec };
}
