/**
 * The weight plan of every golden fixture, on any machine: with the addon replaced by a recorder,
 * a load must upload every piece inside the reserved buffer without overlaps. Float experts are
 * quantized to MXFP4 on load by default where the MXFP4 kernels take the shapes (and stay bf16
 * with the reason reported and logged where they do not); `experts: 'stored'` opts out. The
 * quantized bytes must be those `moeflash quantize` writes for the same checkpoint, for bf16
 * checkpoints and for fp32 ones (quantized from the stored values, not from bf16 roundings).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { loadModelSpec, openWeights, writeSafetensors, type WeightSource } from '@moeflash/core';
import { convertCheckpoint, quantizeMxfp4, roundToBf16 } from '@moeflash/quant';

const uploads: { off: number; n: number }[] = [];
let config: { weightsBytes: number } | undefined;
let layout: Float64Array = new Float64Array(0);
let device: Uint8Array = new Uint8Array(0);
let prepared = 0;
vi.mock('../src/native.js', async (orig) => {
  const real = (await orig()) as Record<string, unknown>;
  class RecordingModel {
    constructor(c: { weightsBytes: number }, l: Float64Array) {
      config = c;
      layout = l;
      device = new Uint8Array(c.weightsBytes);
    }
    upload(off: number, b: Uint8Array) {
      uploads.push({ off, n: b.byteLength });
      device.set(b, off);
    }
    prepare() {
      prepared++;
      return 0;
    }
    info() {
      return { weights: 0, kvCache: 0, activations: 0, graphs: 0 };
    }
    dispose() {}
  }
  return { ...real, loadAddon: () => ({ setDevice() {}, Model: RecordingModel }) };
});
const { createCudaBackend, planExpertLoad } = await import('../src/index.js');
type Load = import('../src/index.js').CudaLoadOptions;
type Model = import('../src/index.js').CudaModel;

// src/model.ts's LAYER_FIELDS (native/model.cc's LayerField).
const FIELDS = [
  'inNorm', 'postNorm', 'qkvW', 'qkvB', 'oW', 'oB', 'qNorm', 'kNorm', 'sinks', 'routerW', 'routerB',
  'gateUp', 'gateUpScales', 'gateUpBias', 'down', 'downScales', 'downBias',
  'mlpKind', 'experts', 'inter', 'window', 'interleaved',
  'qkvScales', 'oScales', 'fp8BlockRows', 'fp8BlockCols',
];
const field = (l: number, f: string) => layout[4 + l * FIELDS.length + FIELDS.indexOf(f)];
const MLP_BF16_EXPERTS = 0;
const MLP_MXFP4_EXPERTS = 1;

const root = path.join(__dirname, '..', '..', 'core', 'test', 'fixtures', 'golden');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'moeflash-load-plan-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

async function load(dir: string, opts: Load): Promise<Model> {
  uploads.length = 0;
  prepared = 0;
  const spec = await loadModelSpec(dir);
  const w = await openWeights(dir);
  try {
    return await createCudaBackend().load(spec, w, opts);
  } finally {
    await w.close();
  }
}

function checkUploads(): void {
  const sorted = [...uploads].sort((a, b) => a.off - b.off);
  for (let i = 1; i < sorted.length; i++) expect(sorted[i].off).toBeGreaterThanOrEqual(sorted[i - 1].off + sorted[i - 1].n);
  const last = sorted[sorted.length - 1];
  expect(last.off + last.n).toBeLessThanOrEqual(config!.weightsBytes);
  // The expert repack reads the uploaded weights: it runs once, after the last upload.
  expect(prepared).toBe(1);
}

// [fixture, experts option ('default': none given), device format, quantized on load, fallback]
// qwen3_moe_fused (expert width 48), qwen3_moe_per_expert (40) and mixtral_per_expert (hidden 72)
// do not fit the MXFP4 kernels.
const cases: [string, Load['experts'] | 'default', 'bf16' | 'mxfp4', boolean, RegExp | null][] = [
  ['qwen3_moe_fused', 'default', 'bf16', false, /expert width 48/],
  ['qwen3_moe_fused', 'stored', 'bf16', false, null],
  ['qwen3_moe_per_expert', 'default', 'bf16', false, /expert width 40/],
  ['qwen3_moe_per_expert', 'stored', 'bf16', false, null],
  ['mixtral_fused', 'default', 'mxfp4', true, null],
  ['mixtral_fused', 'auto', 'mxfp4', true, null],
  ['mixtral_fused', 'stored', 'bf16', false, null],
  ['mixtral_fused', 'mxfp4', 'mxfp4', true, null],
  ['mixtral_per_expert', 'default', 'bf16', false, /hidden 72.*multiples of 32/],
  ['mixtral_per_expert', 'stored', 'bf16', false, null],
  ['gpt_oss_mxfp4', 'default', 'mxfp4', false, null],
  ['gpt_oss_mxfp4', 'stored', 'mxfp4', false, null],
  ['gpt_oss_bf16', 'default', 'mxfp4', true, null],
  ['gpt_oss_bf16', 'stored', 'bf16', false, null],
  ['gpt_oss_bf16', 'mxfp4', 'mxfp4', true, null],
];

describe('CUDA weight plan (no GPU needed)', () => {
  it.each(cases)('%s, experts %s', async (name, experts, format, quantized, fallback) => {
    const lines: string[] = [];
    const opt = experts === 'default' ? undefined : experts;
    const m = await load(path.join(root, name), { experts: opt, log: (l) => lines.push(l) });
    expect(m.expertFormat).toBe(format);
    expect(m.expertLoad).toMatchObject({ option: opt ?? 'auto', format, quantized });
    for (let l = 0; l < m.spec.numLayers; l++) {
      if (m.spec.layers[l].mlp === 'moe') expect(field(l, 'mlpKind')).toBe(format === 'mxfp4' ? MLP_MXFP4_EXPERTS : MLP_BF16_EXPERTS);
    }
    if (fallback) {
      expect(m.expertLoad!.fallback).toMatch(fallback);
      // One line, saying what happened and why.
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(/experts held as bf16, not quantized to MXFP4 on load/);
      expect(lines[0]).toMatch(fallback);
    } else {
      expect(m.expertLoad!.fallback).toBeNull();
      expect(lines).toEqual([]);
    }
    checkUploads();
    await m.dispose();
  });

  it("experts: 'mxfp4' where the shapes do not fit is an error naming them", async () => {
    await expect(load(path.join(root, 'mixtral_per_expert'), { experts: 'mxfp4' })).rejects.toThrow(/multiples of 32/);
  });

  it('MOEFLASH_CUDA_EXPERTS sets the default; an unknown value is an error', async () => {
    vi.stubEnv('MOEFLASH_CUDA_EXPERTS', 'stored');
    try {
      const m = await load(path.join(root, 'mixtral_fused'), {});
      expect(m.expertLoad).toMatchObject({ option: 'stored', format: 'bf16', quantized: false });
      await m.dispose();
      // The option wins over the variable.
      const q = await load(path.join(root, 'mixtral_fused'), { experts: 'auto' });
      expect(q.expertFormat).toBe('mxfp4');
      await q.dispose();
      vi.stubEnv('MOEFLASH_CUDA_EXPERTS', 'fp4');
      await expect(load(path.join(root, 'mixtral_fused'), {})).rejects.toThrow(/MOEFLASH_CUDA_EXPERTS must be 'auto', 'stored' or 'mxfp4'/);
    } finally {
      vi.unstubAllEnvs();
    }
    await expect(load(path.join(root, 'mixtral_fused'), { experts: 'fp4' as never })).rejects.toThrow(/experts must be/);
  });

  it('planExpertLoad tells from the headers alone what a load will do', async () => {
    const plan = async (name: string, experts?: 'auto' | 'stored' | 'mxfp4') => {
      const dir = path.join(root, name);
      const w = await openWeights(dir);
      try {
        return planExpertLoad(await loadModelSpec(dir), w, experts);
      } finally {
        await w.close();
      }
    };
    expect(await plan('mixtral_fused')).toEqual({ option: 'auto', stored: 'bf16', format: 'mxfp4', quantized: true, fallback: null });
    expect(await plan('mixtral_fused', 'stored')).toEqual({ option: 'stored', stored: 'bf16', format: 'bf16', quantized: false, fallback: null });
    expect(await plan('gpt_oss_mxfp4')).toEqual({ option: 'auto', stored: 'mxfp4', format: 'mxfp4', quantized: false, fallback: null });
    expect((await plan('qwen3_moe_per_expert')).fallback).toMatch(/expert width 40/);
  });
});

/** The converter's MXFP4 experts of layer `l`: blocks and scales, gate/up then down. */
async function converted(out: string, l: number): Promise<Uint8Array[]> {
  const w = await openWeights(out);
  try {
    const names = w.names();
    const find = (suffix: string) => names.find((n) => n.startsWith(`model.layers.${l}.`) && n.endsWith(`.experts.${suffix}`))!;
    return await Promise.all(['gate_up_proj_blocks', 'gate_up_proj_scales', 'down_proj_blocks', 'down_proj_scales'].map((s) => w.read(find(s))));
  } finally {
    await w.close();
  }
}

/** The bytes the load uploaded for layer `l`'s experts, in the same order. */
function uploaded(m: Model, l: number): Uint8Array[] {
  const E = m.spec.moe.numExperts;
  const H = m.spec.hiddenSize;
  const I = m.spec.moe.intermediateSize;
  const at = (f: string, n: number) => device.slice(field(l, f), field(l, f) + n);
  return [at('gateUp', E * 2 * I * (H / 32) * 16), at('gateUpScales', E * 2 * I * (H / 32)), at('down', E * H * (I / 32) * 16), at('downScales', E * H * (I / 32))];
}

/** mulberry32 */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * An fp32 copy of a fixture whose expert values are moved off the bf16 grid (by up to 2^-7
 * relative), so that quantizing bf16 roundings of them would give other bytes. `perExpert` splits
 * the fused experts into per-expert gate | up | down tensors (Mixtral's w1 | w3 | w2 names).
 */
async function fp32Copy(name: string, perExpert: boolean): Promise<string> {
  const dir = path.join(tmp, `${name}-f32${perExpert ? '-per-expert' : ''}`);
  fs.mkdirSync(dir, { recursive: true });
  fs.copyFileSync(path.join(root, name, 'config.json'), path.join(dir, 'config.json'));
  const spec = await loadModelSpec(path.join(root, name));
  const [E, H, I] = [spec.moe.numExperts, spec.hiddenSize, spec.moe.intermediateSize];
  const interleaved = spec.family === 'gpt_oss';
  const [g, u, d] = spec.family === 'mixtral' ? ['w1', 'w3', 'w2'] : ['gate_proj', 'up_proj', 'down_proj'];
  const w: WeightSource = await openWeights(path.join(root, name));
  const r = rng(7);
  const tensors: Record<string, { dtype: 'F32'; shape: number[]; data: Float32Array }> = {};
  // Expert j's [rows, cols] matrix of a fused [E, rows, cols] tensor, or of an [E, cols, rows] one.
  const matrix = (v: Float32Array, shape: number[], j: number, rows: number, cols: number) => {
    const m = new Float32Array(rows * cols);
    const inputMajor = shape[1] !== rows;
    for (let a = 0; a < rows; a++) for (let b = 0; b < cols; b++) m[a * cols + b] = inputMajor ? v[(j * cols + b) * rows + a] : v[(j * rows + a) * cols + b];
    return m;
  };
  try {
    for (const n of w.names()) {
      const v = await w.readFloat32(n);
      const shape = w.info(n).shape;
      const fused = /\.experts\.(gate_up|down)_proj$/.exec(n);
      if (fused) {
        for (let i = 0; i < v.length; i++) v[i] *= 1 + (r() - 0.5) / 64;
        if (perExpert) {
          const ex = n.slice(0, n.lastIndexOf('.'));
          for (let j = 0; j < E; j++) {
            if (fused[1] === 'down') {
              tensors[`${ex}.${j}.${d}.weight`] = { dtype: 'F32', shape: [H, I], data: matrix(v, shape, j, H, I) };
              continue;
            }
            const m = matrix(v, shape, j, 2 * I, H);
            const gate = new Float32Array(I * H);
            const up = new Float32Array(I * H);
            for (let k = 0; k < I; k++) {
              gate.set(m.subarray((interleaved ? 2 * k : k) * H, (interleaved ? 2 * k + 1 : k + 1) * H), k * H);
              up.set(m.subarray((interleaved ? 2 * k + 1 : I + k) * H, (interleaved ? 2 * k + 2 : I + k + 1) * H), k * H);
            }
            tensors[`${ex}.${j}.${g}.weight`] = { dtype: 'F32', shape: [I, H], data: gate };
            tensors[`${ex}.${j}.${u}.weight`] = { dtype: 'F32', shape: [I, H], data: up };
          }
          continue;
        }
      }
      tensors[n] = { dtype: 'F32', shape, data: v };
    }
  } finally {
    await w.close();
  }
  await writeSafetensors(path.join(dir, 'model.safetensors'), tensors);
  return dir;
}

/** Layer `l`'s down matrices as [E, H, I] rows, from per-expert tensors or a fused one of either orientation. */
async function downRows(dir: string, l: number): Promise<Float32Array> {
  const spec = await loadModelSpec(dir);
  const [E, H, I] = [spec.moe.numExperts, spec.hiddenSize, spec.moe.intermediateSize];
  const w = await openWeights(dir);
  try {
    const ex = `model.layers.${l}.mlp.experts`;
    const d = ['w2', 'down_proj'].find((n) => w.has(`${ex}.0.${n}.weight`));
    if (d) {
      const rows = new Float32Array(E * H * I);
      for (let j = 0; j < E; j++) rows.set(await w.readFloat32(`${ex}.${j}.${d}.weight`), j * H * I);
      return rows;
    }
    const all = await w.readFloat32(`${ex}.down_proj`);
    if (w.info(`${ex}.down_proj`).shape[1] === H) return all;
    const rows = new Float32Array(E * H * I); // stored [E, I, H]
    for (let j = 0; j < E; j++) for (let i = 0; i < I; i++) for (let h = 0; h < H; h++) rows[(j * H + h) * I + i] = all[(j * I + i) * H + h];
    return rows;
  } finally {
    await w.close();
  }
}

describe('quantize-on-load is bit-exact with moeflash quantize (no GPU needed)', () => {
  it.each([
    ['mixtral_fused', 'bf16 [E, 2I, H]'],
    ['gpt_oss_bf16', 'bf16 [E, H, 2I], interleaved'],
  ])('%s (%s)', async (name) => {
    const dir = path.join(root, name);
    const out = path.join(tmp, `${name}-mxfp4`);
    await convertCheckpoint({ input: dir, output: out, experts: 'mxfp4', dense: 'bf16' });
    const m = await load(dir, {});
    expect(m.expertLoad).toMatchObject({ stored: 'bf16', quantized: true });
    for (let l = 0; l < m.spec.numLayers; l++) expect(uploaded(m, l)).toEqual(await converted(out, l));
    await m.dispose();
  });

  it.each([
    ['mixtral_fused', 'fp32 per-expert w1 | w3 | w2', true],
    ['gpt_oss_bf16', 'fp32 [E, H, 2I], interleaved', false],
    ['gpt_oss_bf16', 'fp32 per-expert gate_proj | up_proj | down_proj, interleaved on the device', true],
  ] as const)('%s as %s', async (name, _, perExpert) => {
    const dir = await fp32Copy(name, perExpert);
    const out = `${dir}-mxfp4`;
    await convertCheckpoint({ input: dir, output: out, experts: 'mxfp4', dense: 'bf16' });
    const m = await load(dir, {});
    expect(m.expertLoad).toMatchObject({ stored: 'f32', format: 'mxfp4', quantized: true, fallback: null });
    let viaBf16 = 0;
    for (let l = 0; l < m.spec.numLayers; l++) {
      const want = await converted(out, l);
      expect(uploaded(m, l)).toEqual(want);
      // Quantizing bf16 roundings of the same values gives other down blocks: the test tells.
      const q = quantizeMxfp4(roundToBf16(await downRows(dir, l)));
      for (let i = 0; i < q.blocks.length; i++) if (q.blocks[i] !== want[2][i]) viaBf16++;
    }
    expect(viaBf16).toBeGreaterThan(0);
    await m.dispose();
  });
});
