import { randomFillSync } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { MoeflashError } from '../errors.js';
import { parseModelConfig } from '../model/config.js';
import type { ModelSpec } from '../model/spec.js';
import { DTYPE_SIZES } from '../weights/dtypes.js';
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

/**
 * Random FP8 E4M3 codes of magnitude 2^-3 .. 3.75 (exponent fields 4..8, never the NaN code),
 * which with a block scale of 0.01 make weights of about the std real checkpoints have.
 */
function fillFp8(bytes: Uint8Array, rng: Xorshift): void {
  for (let i = 0; i < bytes.length; i++) {
    const r = rng.next();
    bytes[i] = (r & 0x80) | ((4 + (r % 5)) << 3) | ((r >>> 8) & 7);
  }
}

const FP8_BLOCK = 128;
const FP8_SCALE = 0.01;

/** Tensor names, shapes and content of a checkpoint in the family's HF layout. */
function plan(spec: ModelSpec, mxfp4: boolean, fp8: boolean): Planned[] {
  const H = spec.hiddenSize, V = spec.vocabSize, a = spec.attention, I = spec.moe.intermediateSize, E = spec.moe.numExperts;
  const qDim = a.numHeads * a.headDim, kvDim = a.numKvHeads * a.headDim;
  const out: Planned[] = [];
  const bf16 = (name: string, shape: number[], std: number) => out.push({ name, dtype: 'BF16', shape, std, fill: () => {} });
  /** A projection inside a layer: FP8 with its block scales where the preset ships FP8, else bf16. */
  const proj = (name: string, shape: [number, number]) => {
    if (!fp8) return bf16(name, shape, 0.02);
    out.push({ name, dtype: 'F8_E4M3', shape, std: 0, fill: fillFp8 });
    const scales = [Math.ceil(shape[0] / FP8_BLOCK), Math.ceil(shape[1] / FP8_BLOCK)];
    out.push({ name: `${name}_scale_inv`, dtype: 'F32', shape: scales, std: 0, fill: (b) => new Float32Array(b.buffer, b.byteOffset, b.length / 4).fill(FP8_SCALE) });
  };
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
    if (a.mla) planMla(spec, `${p}.self_attn`, proj, ones);
    else {
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
    }
    if (spec.layers[l].mlp === 'dense') {
      const D = spec.denseIntermediateSize!;
      proj(`${p}.mlp.gate_proj.weight`, [D, H]);
      proj(`${p}.mlp.up_proj.weight`, [D, H]);
      proj(`${p}.mlp.down_proj.weight`, [H, D]);
      continue;
    }
    const m = `${p}.mlp`;
    if (spec.family === 'deepseek_v3') {
      // As released: per-expert tensors, the router's selection bias, one shared-experts MLP.
      bf16(`${m}.gate.weight`, [E, H], 0.5);
      bf16(`${m}.gate.e_score_correction_bias`, [E], 0.01);
      for (let j = 0; j < E; j++) {
        proj(`${m}.experts.${j}.gate_proj.weight`, [I, H]);
        proj(`${m}.experts.${j}.up_proj.weight`, [I, H]);
        proj(`${m}.experts.${j}.down_proj.weight`, [H, I]);
      }
      const sh = spec.moe.sharedExperts;
      if (sh) {
        const S = sh.count * sh.intermediateSize;
        proj(`${m}.shared_experts.gate_proj.weight`, [S, H]);
        proj(`${m}.shared_experts.up_proj.weight`, [S, H]);
        proj(`${m}.shared_experts.down_proj.weight`, [H, S]);
      }
      continue;
    }
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

/** deepseek_v3's latent attention projections and their two norms. */
function planMla(spec: ModelSpec, at: string, proj: (name: string, shape: [number, number]) => void, ones: (name: string, shape: number[]) => void): void {
  const H = spec.hiddenSize, a = spec.attention, m = a.mla!;
  const qDim = a.numHeads * a.headDim;
  if (m.qLoraRank === null) proj(`${at}.q_proj.weight`, [qDim, H]);
  else {
    proj(`${at}.q_a_proj.weight`, [m.qLoraRank, H]);
    ones(`${at}.q_a_layernorm.weight`, [m.qLoraRank]);
    proj(`${at}.q_b_proj.weight`, [qDim, m.qLoraRank]);
  }
  proj(`${at}.kv_a_proj_with_mqa.weight`, [m.kvLoraRank + m.qkRopeHeadDim, H]);
  ones(`${at}.kv_a_layernorm.weight`, [m.kvLoraRank]);
  proj(`${at}.kv_b_proj.weight`, [a.numHeads * (m.qkNopeHeadDim + m.vHeadDim), m.kvLoraRank]);
  proj(`${at}.o_proj.weight`, [H, a.numHeads * m.vHeadDim]);
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
  // FP8 presets ship FP8 experts; `--experts bf16` writes every weight bf16, without quantization_config.
  if (mxfp4 && preset.fp8) {
    throw new MoeflashError('INVALID_ARGUMENT', `preset '${opts.preset}' stores its experts in FP8 as released (or bf16 with --experts bf16); MXFP4 experts are not offered for it`);
  }
  const fp8 = preset.fp8 === true && opts.mxfp4Experts === undefined;
  if (preset.fp8 && !fp8) delete (config as Record<string, unknown>).quantization_config;
  const dir = path.resolve(opts.out);
  await fs.mkdir(dir, { recursive: true });
  const spec = parseModelConfig(config, path.join(dir, 'config.json'));
  if (mxfp4 && (spec.hiddenSize % 32 || spec.moe.intermediateSize % 32)) {
    throw new MoeflashError('INVALID_ARGUMENT', `MXFP4 experts need hidden and expert sizes divisible by 32 (got ${spec.hiddenSize}, ${spec.moe.intermediateSize})`);
  }
  const entries = plan(spec, mxfp4, fp8);
  const writer = await createSafetensorsWriter(path.join(dir, 'model.safetensors'), entries.map(({ name, dtype, shape }) => ({ name, dtype, shape })), { format: 'pt', producer: `moeflash synth ${opts.preset}` });
  const rng = new Xorshift((opts.seed ?? 1) >>> 0);
  const total = entries.reduce((s, e) => s + e.shape.reduce((x, y) => x * y, 1) * DTYPE_SIZES[e.dtype], 0);
  let written = 0;
  const CHUNK = 1 << 24;
  try {
    for (const e of entries) {
      const count = e.shape.reduce((x, y) => x * y, 1);
      const elemBytes = DTYPE_SIZES[e.dtype];
      for (let start = 0; start < count; start += CHUNK) {
        const n = Math.min(CHUNK, count - start);
        let bytes: Uint8Array;
        if (e.dtype === 'BF16') {
          bytes = e.std < 0 ? new Uint8Array(new Uint16Array(n).fill(0x3f80).buffer) : randomBf16(n, e.std, rng);
        } else {
          bytes = new Uint8Array(n * elemBytes);
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
