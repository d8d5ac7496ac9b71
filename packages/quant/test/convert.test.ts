/**
 * The converter on tiny checkpoints of every input layout: output names, dtypes and shapes, the
 * config it writes, the model loading in core, and every converted weight equal, bit for bit, to
 * its original's round trip through the target format (which pins the gate/up order, interleaving,
 * transposition and FP8 block layout); then the output folder's life cycle and the options.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  loadModel,
  loadModelSpec,
  loadModelWeights,
  MoeflashError,
  openWeights,
  type ModelWeights,
} from '@moeflash/core';
import {
  convertCheckpoint,
  dequantizeFp8Blocked,
  dequantizeMxfp4,
  quantizeFp8Blocked,
  quantizeMxfp4,
  roundToBf16,
  type ConvertProgress,
  type DenseFormat,
  type Mxfp4ScaleRule,
} from '../src/index.js';
import { TINY_LAYOUTS, tempDir, writeTinyCheckpoint, type TinyLayout } from './models.js';

const dirs: string[] = [];
function temp(label: string): string {
  const d = tempDir(label);
  dirs.push(d);
  return d;
}
afterAll(() => {
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

async function canonical(dir: string): Promise<ModelWeights> {
  const spec = await loadModelSpec(dir);
  const src = await openWeights(dir);
  try {
    return await loadModelWeights(spec, src);
  } finally {
    await src.close();
  }
}


/** Bit-for-bit equality of two float arrays (fast; toEqual walks typed arrays element by element). */
function same(a: Float32Array | null | undefined, b: Float32Array | null | undefined, label = ''): void {
  if (a == null || b == null) {
    expect(a ?? null, label).toBe(b ?? null);
    return;
  }
  expect(a.length, `${label}: length`).toBe(b.length);
  const x = Buffer.from(a.buffer, a.byteOffset, a.byteLength);
  const y = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  if (!x.equals(y)) {
    let i = 0;
    while (i < a.length && Object.is(a[i], b[i])) i++;
    expect.fail(`${label}: element ${i} differs: ${a[i]} vs ${b[i]}`);
  }
}

const mx = (w: Float32Array, rule: Mxfp4ScaleRule = 'ocp') => {
  const q = quantizeMxfp4(w, { scaleRule: rule });
  return dequantizeMxfp4(q.blocks, q.scales);
};
const f8 = (w: Float32Array, rows: number, cols: number) => {
  const q = quantizeFp8Blocked(w, rows, cols);
  return dequantizeFp8Blocked(q.data, q.scaleInv, rows, cols);
};

/** Every converted weight equals the original's round trip through its target format, bit for bit. */
function expectConverted(orig: ModelWeights, conv: ModelWeights, dense: DenseFormat, expertsWereMxfp4: boolean, rule: Mxfp4ScaleRule = 'ocp'): void {
  same(conv.embed, orig.embed);
  same(conv.lmHead, orig.lmHead);
  same(conv.finalNorm, orig.finalNorm);
  const denseOf = (w: Float32Array, rows: number, cols: number) => (dense === 'fp8' ? f8(w, rows, cols) : roundToBf16(w));
  orig.layers.forEach((ol, l) => {
    const cl = conv.layers[l];
    same(cl.inputNorm, ol.inputNorm);
    const H = ol.inputNorm.length;
    for (const k of ['q', 'k', 'v'] as const) same(cl.attn[k], denseOf(ol.attn[k], ol.attn[k].length / H, H), `layer ${l} ${k}`);
    same(cl.attn.o, denseOf(ol.attn.o, H, ol.attn.o.length / H));
    same(cl.attn.qBias, ol.attn.qBias);
    same(cl.attn.sinks, ol.attn.sinks);
    same(cl.router?.weight, ol.router?.weight);
    same(cl.router?.bias, ol.router?.bias);
    if (ol.dense) {
      const D = ol.dense.inter;
      same(cl.dense!.gate, denseOf(ol.dense.gate, D, H));
      same(cl.dense!.down, denseOf(ol.dense.down, H, D));
    }
    if (ol.experts) {
      expect(cl.experts!.length).toBe(ol.experts.length);
      ol.experts.forEach((oe, j) => {
        const ce = cl.experts![j];
        const q = (w: Float32Array) => (expertsWereMxfp4 ? w : mx(w, rule));
        same(ce.gate, q(oe.gate), `layer ${l} expert ${j} gate`);
        same(ce.up, q(oe.up), `layer ${l} expert ${j} up`);
        same(ce.down, q(oe.down), `layer ${l} expert ${j} down`);
        same(ce.gateBias, oe.gateBias);
        same(ce.upBias, oe.upBias);
        same(ce.downBias, oe.downBias);
      });
    }
  });
}

describe('convertCheckpoint: every input layout to MXFP4 experts', () => {
  for (const layout of TINY_LAYOUTS) {
    for (const dense of ['bf16', 'fp8'] as const) {
      it(`${layout}, dense ${dense}: loads, and each weight is its original's round trip`, async () => {
        const input = temp('in');
        const spec = await writeTinyCheckpoint(input, layout, { seed: 11 });
        const out = path.join(temp('out'), 'converted');
        const res = await convertCheckpoint({ input, output: out, experts: 'mxfp4', dense });
        expect(res.output).toBe(out);
        expect(fs.readdirSync(path.dirname(out))).toEqual(['converted']);
        const moeLayers = spec.layers.flatMap((l, i) => (l.mlp === 'moe' ? [i] : []));
        expect(res.mxfp4Layers).toEqual(moeLayers);

        const w = await openWeights(out);
        const E = spec.moe.numExperts;
        const H = spec.hiddenSize;
        const I = spec.moe.intermediateSize;
        for (const l of moeLayers) {
          const ex = `model.layers.${l}.mlp.experts`;
          expect(w.info(`${ex}.gate_up_proj_blocks`)).toMatchObject({ dtype: 'U8', shape: [E, 2 * I, H / 32, 16] });
          expect(w.info(`${ex}.gate_up_proj_scales`)).toMatchObject({ dtype: 'U8', shape: [E, 2 * I, H / 32] });
          expect(w.info(`${ex}.down_proj_blocks`)).toMatchObject({ dtype: 'U8', shape: [E, H, I / 32, 16] });
          expect(w.info(`${ex}.down_proj_scales`)).toMatchObject({ dtype: 'U8', shape: [E, H, I / 32] });
          const router = spec.family === 'gpt_oss' ? 'router' : 'gate';
          expect(w.has(`model.layers.${l}.mlp.${router}.weight`)).toBe(true);
          if (spec.family === 'gpt_oss') expect(w.info(`${ex}.gate_up_proj_bias`).dtype).toBe('BF16');
        }
        expect(w.names().some((n) => n.includes('block_sparse_moe') || /experts\.\d/.test(n) || n.endsWith('gate_up_proj'))).toBe(false);
        const q = w.info('model.layers.0.self_attn.q_proj.weight');
        if (dense === 'fp8') {
          expect(q.dtype).toBe('F8_E4M3');
          expect(w.info('model.layers.0.self_attn.q_proj.weight_scale_inv')).toMatchObject({
            dtype: 'F32',
            shape: [Math.ceil(q.shape[0] / 128), Math.ceil(H / 128)],
          });
        } else {
          expect(q.dtype).toBe('BF16');
          expect(w.names().some((n) => n.endsWith('_scale_inv'))).toBe(false);
        }
        for (const n of ['model.embed_tokens.weight', 'lm_head.weight', 'model.norm.weight']) expect(w.info(n).dtype).toBe('BF16');
        await w.close();

        const config = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8'));
        expect(config.quantization_config.quant_method).toBe('mxfp4');
        const parsed = await loadModelSpec(out);
        if (dense === 'fp8') {
          expect(config.quantization_config.dense_quantization_config).toMatchObject({ quant_method: 'fp8', weight_block_size: [128, 128] });
          expect(parsed.quantization?.dense).toEqual(expect.objectContaining({ method: 'fp8', weightBlockSize: [128, 128] }));
        } else {
          expect(config.quantization_config.dense_quantization_config).toBeUndefined();
        }
        for (const f of ['tokenizer.json', 'tokenizer_config.json', 'generation_config.json']) {
          expect(fs.readFileSync(path.join(out, f))).toEqual(fs.readFileSync(path.join(input, f)));
        }
        expectConverted(await canonical(input), await canonical(out), dense, layout === 'gpt_oss/mxfp4');
      });
    }
  }

  it('the no-clip rule is applied when asked', async () => {
    const input = temp('in');
    await writeTinyCheckpoint(input, 'qwen3_moe/fused', { seed: 3 });
    const out = path.join(temp('out'), 'm');
    await convertCheckpoint({ input, output: out, scaleRule: 'no-clip' });
    expectConverted(await canonical(input), await canonical(out), 'bf16', false, 'no-clip');
  });
});

async function logitsOf(dir: string, tokens: number[]): Promise<Float32Array> {
  const h = await loadModel({ model: dir, backend: 'cpu' });
  try {
    const r = await h.model.step({ sequences: [{ seq: 0, tokens, logits: 'all' }] });
    return r.sequences[0].logits;
  } finally {
    await h.model.dispose();
  }
}

describe('the converted model runs on the CPU backend', () => {
  for (const layout of ['qwen3_moe/fused', 'mixtral/per-expert', 'gpt_oss/bf16'] as TinyLayout[]) {
    it(`${layout}: logits close to the original's`, async () => {
      const input = temp('in');
      const spec = await writeTinyCheckpoint(input, layout, { seed: 5 });
      const out = path.join(temp('out'), 'm');
      await convertCheckpoint({ input, output: out, dense: 'fp8' });
      const tokens = Array.from({ length: 24 }, (_, i) => (i * 37 + 11) % spec.vocabSize);
      const a = await logitsOf(input, tokens);
      const b = await logitsOf(out, tokens);
      const V = spec.vocabSize;
      let err = 0;
      let norm = 0;
      let agree = 0;
      for (let t = 0; t < tokens.length; t++) {
        let ia = 0;
        let ib = 0;
        for (let v = 0; v < V; v++) {
          const x = a[t * V + v];
          const y = b[t * V + v];
          err += (x - y) ** 2;
          norm += x * x;
          if (x > a[t * V + ia]) ia = v;
          if (y > b[t * V + ib]) ib = v;
        }
        if (ia === ib) agree++;
      }
      // MXFP4 moves a weight by ~10% of its size (RMS); the logits move much less than that.
      expect(Math.sqrt(err / norm)).toBeLessThan(0.3);
      expect(agree / tokens.length).toBeGreaterThan(0.6);
    });
  }
});

describe('convertCheckpoint: options, output folder and failures', () => {
  it('refuses an existing output without force, replaces it with force', async () => {
    const input = temp('in');
    await writeTinyCheckpoint(input, 'qwen3_moe/fused');
    const out = temp('existing');
    fs.writeFileSync(path.join(out, 'marker'), 'x');
    await expect(convertCheckpoint({ input, output: out })).rejects.toThrow(/already exists.*--force/);
    await convertCheckpoint({ input, output: out, force: true });
    expect(fs.existsSync(path.join(out, 'marker'))).toBe(false);
    expect(fs.existsSync(path.join(out, 'model.safetensors'))).toBe(true);
    expect(fs.readdirSync(path.dirname(out)).filter((n) => n.startsWith(path.basename(out)))).toEqual([path.basename(out)]);
  });

  it('a failure mid-way leaves neither the output nor a partial folder', async () => {
    const input = temp('in');
    await writeTinyCheckpoint(input, 'qwen3_moe/fused');
    // Cut the file short: the header still describes every tensor, the last ones cannot be read.
    const file = path.join(input, 'model.safetensors');
    const size = fs.statSync(file).size;
    fs.truncateSync(file, size - 1000);
    const parent = temp('out');
    const out = path.join(parent, 'm');
    await expect(convertCheckpoint({ input, output: out })).rejects.toBeInstanceOf(MoeflashError);
    expect(fs.readdirSync(parent)).toEqual([]);
  });

  it('rejects bad options and inputs with clear errors', async () => {
    const input = temp('in');
    await writeTinyCheckpoint(input, 'qwen3_moe/fused');
    const out = path.join(temp('out'), 'm');
    await expect(convertCheckpoint({ input, output: out, dense: 'fp16' as DenseFormat })).rejects.toThrow(/dense must be 'fp8' or 'bf16'/);
    await expect(convertCheckpoint({ input, output: out, scaleRule: 'max' as Mxfp4ScaleRule })).rejects.toThrow(/scaleRule/);
    await expect(convertCheckpoint({ input, output: input, force: true })).rejects.toThrow(/is the input folder/);
    await expect(convertCheckpoint({ input: temp('empty'), output: out })).rejects.toThrow(/no config\.json/);
  });

  it('shards the output with an index when asked for small shards', async () => {
    const input = temp('in');
    const spec = await writeTinyCheckpoint(input, 'mixtral/fused', { seed: 2 });
    const out = path.join(temp('out'), 'm');
    const res = await convertCheckpoint({ input, output: out, shardBytes: 200_000, dense: 'fp8' });
    expect(res.shards.length).toBeGreaterThan(2);
    const index = JSON.parse(fs.readFileSync(path.join(out, 'model.safetensors.index.json'), 'utf8'));
    expect(new Set(Object.values(index.weight_map))).toEqual(new Set(res.shards));
    expect(index.metadata.total_size).toBe(res.outputBytes);
    // A weight and its scale are written together, so they share a shard.
    expect(index.weight_map['model.layers.0.self_attn.q_proj.weight']).toBe(index.weight_map['model.layers.0.self_attn.q_proj.weight_scale_inv']);
    expectConverted(await canonical(input), await canonical(out), 'fp8', false);
    expect(spec.numLayers).toBe(2);
  });

  it('keeps experts whose sizes are not multiples of 32, with a warning, and the model still loads', async () => {
    const input = temp('in');
    await writeTinyCheckpoint(input, 'mixtral/per-expert', { overrides: { intermediate_size: 40 } });
    const out = path.join(temp('out'), 'm');
    const lines: string[] = [];
    const res = await convertCheckpoint({ input, output: out, dense: 'fp8', log: (l) => lines.push(l) });
    expect(res.mxfp4Layers).toEqual([]);
    expect(res.keptExpertLayers.map((k) => k.layer)).toEqual([0, 1]);
    expect(lines.join('\n')).toMatch(/layer 0: experts kept.*intermediate size 40/);
    const w = await openWeights(out);
    expect(w.info('model.layers.0.block_sparse_moe.experts.0.w1.weight').dtype).toBe('BF16');
    expect(w.has('model.layers.0.block_sparse_moe.gate.weight')).toBe(true);
    await w.close();
    const config = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8'));
    expect(config.quantization_config.quant_method).toBe('fp8');
    const orig = await canonical(input);
    const conv = await canonical(out);
    same(conv.layers[1].experts![2].up, orig.layers[1].experts![2].up);
  });

  it('--experts keep leaves the experts alone', async () => {
    const input = temp('in');
    await writeTinyCheckpoint(input, 'qwen3_moe/per-expert');
    const out = path.join(temp('out'), 'm');
    const res = await convertCheckpoint({ input, output: out, experts: 'keep', dense: 'fp8' });
    expect(res.mxfp4Layers).toEqual([]);
    const w = await openWeights(out);
    expect(w.has('model.layers.0.mlp.experts.3.up_proj.weight')).toBe(true);
    await w.close();
  });

  it('reports progress up to the whole input', async () => {
    const input = temp('in');
    await writeTinyCheckpoint(input, 'gpt_oss/bf16');
    const out = path.join(temp('out'), 'm');
    const seen: ConvertProgress[] = [];
    const res = await convertCheckpoint({ input, output: out, onProgress: (p) => seen.push({ ...p }) });
    expect(seen.length).toBeGreaterThan(10);
    const last = seen[seen.length - 1];
    expect(last.totalInputBytes).toBe(res.inputBytes);
    expect(last.inputBytes).toBe(res.inputBytes);
    for (let i = 1; i < seen.length; i++) expect(seen[i].inputBytes).toBeGreaterThanOrEqual(seen[i - 1].inputBytes);
    expect(res.outputBytes).toBe(fs.statSync(path.join(out, 'model.safetensors')).size - headerBytes(path.join(out, 'model.safetensors')));
  });
});

function headerBytes(file: string): number {
  const fd = fs.openSync(file, 'r');
  const b = Buffer.alloc(8);
  fs.readSync(fd, b, 0, 8, 0);
  fs.closeSync(fd);
  return 8 + Number(b.readBigUInt64LE(0));
}



describe('config.json of a converted model', () => {
  it("core's parser reads the nested FP8 config and refuses a nested non-FP8 one", async () => {
    const { parseModelConfig } = await import('@moeflash/core');
    const input = temp('cfg');
    await writeTinyCheckpoint(input, 'qwen3_moe/fused');
    const base = JSON.parse(fs.readFileSync(path.join(input, 'config.json'), 'utf8'));
    const spec = parseModelConfig({
      ...base,
      quantization_config: { quant_method: 'mxfp4', dense_quantization_config: { quant_method: 'fp8', weight_block_size: [64, 128] } },
    }, '/m/config.json');
    expect(spec.quantization).toEqual({ method: 'mxfp4', dense: { method: 'fp8', weightBlockSize: [64, 128] } });
    expect(() =>
      parseModelConfig({ ...base, quantization_config: { quant_method: 'mxfp4', dense_quantization_config: { quant_method: 'mxfp4' } } }, '/m/config.json'),
    ).toThrow(/quantization_config\.dense_quantization_config\.quant_method.*only a plain "fp8"/);
    expect(() =>
      parseModelConfig({ ...base, quantization_config: { quant_method: 'mxfp4', dense_quantization_config: { quant_method: 'fp8', weight_block_size: null } } }, '/m/config.json'),
    ).toThrow(/dense_quantization_config\.weight_block_size/);
  });
});
