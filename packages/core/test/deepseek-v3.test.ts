/**
 * The deepseek_v3 family (DeepSeek-V3/R1, Kimi-K2) on the CPU: config.json -> spec, the grouped
 * sigmoid router, latent attention's absorbed form against HF's expanded one, the strict loader's
 * view of its tensors (MTP layers skipped), batch invariance over the latent KV cache, the
 * footprint of the real configs, and synth at their shapes. Logit parity with the float64
 * reference: deepseek-v3-reference.test.ts.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import {
  attendOne,
  bytesPerToken,
  expandedKvValuesPerToken,
  footprint,
  kvCacheValuesPerToken,
  loadModel,
  loadModelWeights,
  parseModelConfig,
  ropeTable,
  route,
  synthesizeModel,
  validateCheckpoint,
  type ModelSpec,
  type MoeSpec,
} from '@moeflash/core';
import { absorbQuery, expandValues, latentRow, latentRowSize, splitKvB } from '../src/math/mla.js';
import { applyRope, deinterleaveRotary } from '../src/math/rope.js';
import { info } from '../src/cli/commands/info.js';
import { holdFolder, openCheckpoint, type HeldCheckpoint } from './checkpoint-builder.js';

const configs = path.join(__dirname, 'configs');
const reference = path.join(__dirname, 'fixtures', 'reference');
const readConfig = (name: string) => JSON.parse(fs.readFileSync(path.join(configs, name, 'config.json'), 'utf8')) as Record<string, unknown>;
const parse = (cfg: Record<string, unknown>) => parseModelConfig(cfg, 'test/config.json');

/** Small shapes of the family for synth and load tests. */
const TINY_DS = {
  vocab_size: 128, hidden_size: 64, intermediate_size: 96, moe_intermediate_size: 32, num_hidden_layers: 3,
  num_attention_heads: 4, num_key_value_heads: 4, q_lora_rank: 48, kv_lora_rank: 32, qk_nope_head_dim: 16,
  qk_rope_head_dim: 8, v_head_dim: 24, n_routed_experts: 8, n_group: 4, topk_group: 2, num_experts_per_tok: 2,
  first_k_dense_replace: 1, n_shared_experts: 1, num_nextn_predict_layers: 0, bos_token_id: 0, eos_token_id: 1,
};

afterEach(() => vi.restoreAllMocks());

describe('deepseek_v3 config.json', () => {
  it('DeepSeek-V3: latent attention, YaRN mscale in the softmax scale, 3 dense layers, grouped routing, MTP, FP8', () => {
    const spec = parse(readConfig('deepseek-v3'));
    expect(spec.family).toBe('deepseek_v3');
    const a = spec.attention;
    expect(a.mla).toEqual({ qLoraRank: 1536, kvLoraRank: 512, qkNopeHeadDim: 128, qkRopeHeadDim: 64, vHeadDim: 128, ropeInterleave: true });
    expect([a.numHeads, a.numKvHeads, a.headDim]).toEqual([128, 128, 192]);
    // 192^-0.5 * (0.1 ln 40 + 1)^2; the cos/sin factor mscale / mscale_all_dim is 1.
    expect(a.scale).toBeCloseTo((1 / Math.sqrt(192)) * (0.1 * Math.log(40) + 1) ** 2, 12);
    expect(a.rope).toMatchObject({ type: 'yarn', theta: 10000, rotaryDim: 64, yarn: { factor: 40, originalMaxPositionEmbeddings: 4096, attentionFactor: 1, truncate: true } });
    expect(spec.layers.map((l) => l.mlp).indexOf('moe')).toBe(3);
    expect(spec.layers.filter((l) => l.mlp === 'moe')).toHaveLength(58);
    expect(spec.moe).toMatchObject({
      numExperts: 256, topK: 8, rule: 'sigmoid_grouped_topk', normTopkProb: true, intermediateSize: 2048,
      grouped: { numGroups: 8, topkGroups: 4, routedScalingFactor: 2.5 }, sharedExperts: { count: 1, intermediateSize: 2048 },
    });
    expect(spec.denseIntermediateSize).toBe(18432);
    expect(spec.mtpLayers).toBe(1);
    expect(spec.quantization).toEqual({ method: 'fp8', weightBlockSize: [128, 128] });
    expect([spec.bosTokenId, spec.eosTokenIds]).toEqual([0, [1]]);
  });

  it('Kimi-K2 (model_type kimi_k2): the same family with 384 experts in one group and 64 heads', () => {
    const spec = parse(readConfig('kimi-k2'));
    expect(spec.family).toBe('deepseek_v3');
    expect(spec.moe).toMatchObject({ numExperts: 384, grouped: { numGroups: 1, topkGroups: 1, routedScalingFactor: 2.827 } });
    expect(spec.attention.numHeads).toBe(64);
    expect(spec.layers[0].mlp).toBe('dense');
    expect(spec.layers[1].mlp).toBe('moe');
    expect(spec.mtpLayers).toBe(0);
  });

  it('q_lora_rank null means a plain q_proj; rope_interleave false and transformers-5 rope_parameters read', () => {
    const cfg = { ...readConfig('deepseek-v3'), q_lora_rank: null, rope_interleave: false, rope_scaling: undefined, rope_theta: undefined, rope_parameters: { rope_type: 'default', rope_theta: 10000 } };
    const spec = parse(cfg);
    expect(spec.attention.mla).toMatchObject({ qLoraRank: null, ropeInterleave: false });
    expect(spec.attention.scale).toBeCloseTo(1 / Math.sqrt(192), 15);
  });

  it('refuses what it cannot run, naming the field', () => {
    const base = readConfig('deepseek-v3');
    const err = (over: Record<string, unknown>) => {
      try {
        parse({ ...base, ...over });
      } catch (e) {
        return e as { code: string; message: string };
      }
      throw new Error('parsed');
    };
    expect(err({ num_key_value_heads: 64 })).toMatchObject({ code: 'CONFIG_UNSUPPORTED', message: expect.stringMatching(/"num_key_value_heads" \(64\) differs/) });
    expect(err({ q_lora_rank: undefined })).toMatchObject({ code: 'CONFIG_INVALID', message: expect.stringMatching(/"q_lora_rank" is required/) });
    expect(err({ n_group: 3 })).toMatchObject({ code: 'CONFIG_INVALID', message: expect.stringMatching(/"n_group" \(3\)/) });
    expect(err({ topk_group: 9 })).toMatchObject({ code: 'CONFIG_INVALID', message: expect.stringMatching(/"topk_group" \(9\) must not exceed/) });
    expect(err({ n_group: 8, topk_group: 1, num_experts_per_tok: 40 })).toMatchObject({ code: 'CONFIG_INVALID', message: expect.stringMatching(/exceeds the 32 experts/) });
    expect(err({ scoring_func: 'softmax' })).toMatchObject({ code: 'CONFIG_UNSUPPORTED', message: expect.stringMatching(/"scoring_func" is "softmax"/) });
    expect(err({ qk_rope_head_dim: 63 })).toMatchObject({ code: 'CONFIG_INVALID', message: expect.stringMatching(/qk_rope_head_dim/) });
    expect(err({ attention_bias: true })).toMatchObject({ code: 'CONFIG_UNSUPPORTED' });
  });
});

describe('grouped sigmoid routing (math/router.ts)', () => {
  const moe = (o: Partial<MoeSpec> = {}): MoeSpec => ({
    numExperts: 8, topK: 2, rule: 'sigmoid_grouped_topk', normTopkProb: true, routerBias: false, expertBias: false,
    intermediateSize: 4, activation: { kind: 'swiglu' }, grouped: { numGroups: 4, topkGroups: 2, routedScalingFactor: 2 }, ...o,
  });
  const logit = (p: number) => Math.log(p / (1 - p));
  const logits = (ps: number[]) => Float32Array.from(ps.map(logit));

  it('ranks groups by their top-2 sum, picks inside the kept groups, weights by the sigmoid scores', () => {
    // Groups (0,1) (2,3) (4,5) (6,7) sum their top two to 1.0, 0.95, 1.2 and 0.991.
    const r = route(logits([0.5, 0.5, 0.9, 0.05, 0.6, 0.6, 0.99, 0.001]), moe());
    // Kept: groups 2 and 0; experts 6 and 2 are out despite the highest scores.
    expect(Array.from(r.experts).sort()).toEqual([4, 5]);
    // Each 0.6 / (0.6 + 0.6), times routed_scaling_factor 2.
    for (const w of r.weights) expect(w).toBeCloseTo(1, 6);
  });

  it('e_score_correction_bias steers the choice, not the weights', () => {
    const ps = [0.5, 0.5, 0.9, 0.05, 0.6, 0.6, 0.99, 0.01];
    const bias = Float32Array.from([0, 0, 0, 0, 0, 0, 0, 0.5]);
    const r = route(logits(ps), moe({ normTopkProb: false, grouped: { numGroups: 4, topkGroups: 1, routedScalingFactor: 1 } }), bias);
    // Group 3 now sums 0.99 + 0.51 = 1.5: kept alone; weights are the unbiased scores.
    expect(Array.from(r.experts)).toEqual([6, 7]);
    expect(r.weights[0]).toBeCloseTo(0.99, 6);
    expect(r.weights[1]).toBeCloseTo(0.01, 6);
  });

  it('as HF, dropped groups score 0.0 (not -inf): a kept expert with a negative choice loses to them', () => {
    const bias = Float32Array.from([0, 0, -0.9, -0.9, 0, 0, 0, 0]);
    const r = route(logits([0.1, 0.1, 0.8, 0.8, 0.05, 0.05, 0.05, 0.05]), moe({ topK: 3, grouped: { numGroups: 4, topkGroups: 1, routedScalingFactor: 1 } }), bias);
    // Group 0 (0.2) beats group 1 (-0.2): kept; its two experts, then expert 2 (choice 0.0 vs -0.1).
    expect(Array.from(r.experts)).toEqual([0, 1, 2]);
  });
});

/** HF's expanded latent attention for one query position in float64 (the formula math/mla.ts absorbs). */
function expandedAttention(spec: ModelSpec, kvB: Float32Array, qRows: Float32Array[], cacheRows: Float32Array[], t: number): Float64Array {
  const a = spec.attention;
  const m = a.mla!;
  const { kvLoraRank: c, qkNopeHeadDim: nope, qkRopeHeadDim: r, vHeadDim: v } = m;
  const out = new Float64Array(a.numHeads * v);
  for (let h = 0; h < a.numHeads; h++) {
    const base = h * (nope + v) * c;
    const up = (row: number, lat: Float32Array) => {
      let s = 0;
      for (let j = 0; j < c; j++) s += kvB[base + row * c + j] * lat[j];
      return s;
    };
    const scores: number[] = [];
    for (let u = 0; u <= t; u++) {
      let s = 0;
      for (let d = 0; d < nope; d++) s += qRows[t][h * (nope + r) + d] * up(d, cacheRows[u]);
      for (let d = 0; d < r; d++) s += qRows[t][h * (nope + r) + nope + d] * cacheRows[u][c + d];
      scores.push(s * a.scale);
    }
    const mx = Math.max(...scores);
    const p = scores.map((s) => Math.exp(s - mx));
    const z = p.reduce((x, y) => x + y, 0);
    for (let d = 0; d < v; d++) {
      let acc = 0;
      for (let u = 0; u <= t; u++) acc += (p[u] / z) * up(nope + d, cacheRows[u]);
      out[h * v + d] = acc;
    }
  }
  return out;
}

describe('latent attention (math/mla.ts)', () => {
  it('the absorbed form over the compressed rows equals HF expanded keys and values (1e-5)', () => {
    const spec = parse({ ...readConfig('deepseek-v3'), ...TINY_DS });
    const a = spec.attention;
    const m = a.mla!;
    let s = 12345;
    const rnd = () => ((s = (s * 1103515245 + 12345) >>> 0) / 2 ** 32 - 0.5) * 2;
    const fill = (n: number, k = 1) => Float32Array.from({ length: n }, () => rnd() * k);
    const kvB = fill(a.numHeads * (m.qkNopeHeadDim + m.vHeadDim) * m.kvLoraRank, 0.3);
    const w = splitKvB(kvB, a.numHeads, m);
    const rope = ropeTable(a.rope);
    const row = latentRowSize(m);
    const T = 6;
    const scratch = new Float32Array(row);
    const cache = new Float32Array(T * row);
    const qRot: Float32Array[] = [];
    const cacheRows: Float32Array[] = [];
    const absorbed = new Float32Array(T * a.numHeads * row);
    const norm = fill(m.kvLoraRank).map((x) => 1 + 0.1 * x);
    for (let t = 0; t < T; t++) {
      const kvA = fill(row);
      latentRow(kvA, 0, norm, 1e-6, t, m, rope, scratch);
      cache.set(kvA, t * row);
      cacheRows.push(kvA);
      const q = fill(a.numHeads * a.headDim);
      absorbQuery(q, 0, w, t, m, rope, absorbed, t * a.numHeads * row, scratch);
      qRot.push(q); // rotated in place: the expanded form uses the same rotated query
    }
    const shape = { numHeads: a.numHeads, numKvHeads: 1, headDim: row, scale: a.scale };
    const lat = new Float32Array(a.numHeads * row);
    const got = new Float32Array(a.numHeads * m.vHeadDim);
    for (let t = 0; t < T; t++) {
      attendOne(absorbed, t * a.numHeads * row, cache, cache, 0, t, shape, null, lat, 0, new Float64Array(T));
      expandValues(lat, 0, w, m, got, 0);
      const want = expandedAttention(spec, kvB, qRot, cacheRows, t);
      for (let i = 0; i < want.length; i++) expect(Math.abs(got[i] - want[i])).toBeLessThan(1e-5);
    }
  });

  it('interleaved rotary dims: de-interleaving then rotate-half is rotating each stored pair', () => {
    const table = ropeTable({ theta: 10000, type: 'default', rotaryDim: 8 });
    const x = Float32Array.from([1, 2, 3, 4, 5, 6, 7, 8]);
    const y = x.slice();
    deinterleaveRotary(y, 0, 8, new Float32Array(8));
    expect(Array.from(y)).toEqual([1, 3, 5, 7, 2, 4, 6, 8]);
    applyRope(y, 0, 5, table);
    for (let i = 0; i < 4; i++) {
      const ang = Math.fround(5 * table.invFreq[i]);
      expect(y[i]).toBeCloseTo(x[2 * i] * Math.cos(ang) - x[2 * i + 1] * Math.sin(ang), 5);
      expect(y[i + 4]).toBeCloseTo(x[2 * i + 1] * Math.cos(ang) + x[2 * i] * Math.sin(ang), 5);
    }
  });
});

/** A copy of the fixture's last layer renamed to layer `to`, as a stand-in for an MTP layer's tensors. */
function withExtraLayer(tensors: HeldCheckpoint, from: number, to: number): HeldCheckpoint {
  const out: HeldCheckpoint = new Map(tensors);
  for (const [name, t] of tensors) {
    if (name.startsWith(`model.layers.${from}.`)) out.set(name.replace(`model.layers.${from}.`, `model.layers.${to}.`), t);
  }
  out.set(`model.layers.${to}.eh_proj.weight`, { dtype: 'BF16', shape: [4, 4], data: { zeros: 32 } });
  return out;
}

describe('deepseek_v3 checkpoints: strict checks and MTP layers', () => {
  it('skips the multi-token-prediction layer with one log line; a layer past it is still an error', async () => {
    const f = await holdFolder(path.join(reference, 'deepseek_v3_fp8'));
    const L = f.spec.numLayers;
    const src = await openCheckpoint(withExtraLayer(f.tensors, L - 1, L));
    const spec: ModelSpec = { ...f.spec, mtpLayers: 1 };
    await validateCheckpoint(spec, src);
    const lines: string[] = [];
    await loadModelWeights(spec, src, undefined, (l) => lines.push(l));
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(new RegExp(`ignoring \\d+ tensors of the multi-token-prediction layer \\(model.layers.${L}, num_nextn_predict_layers 1\\)`));
    await expect(validateCheckpoint({ ...f.spec, mtpLayers: 0 }, src)).rejects.toMatchObject({ code: 'WEIGHTS_INVALID', message: expect.stringMatching(/num_hidden_layers 3/) });
    const past = await openCheckpoint(withExtraLayer(f.tensors, L - 1, L + 1));
    await expect(validateCheckpoint(spec, past)).rejects.toMatchObject({ code: 'WEIGHTS_INVALID', message: expect.stringMatching(/num_nextn_predict_layers 1/) });
  });

  it('names a missing e_score_correction_bias, a missing shared expert, an FP8 weight without its scales and a mis-shaped kv_b_proj', async () => {
    const f = await holdFolder(path.join(reference, 'deepseek_v3_bf16'));
    const without = (name: string) => {
      const t: HeldCheckpoint = new Map(f.tensors);
      t.delete(name);
      return openCheckpoint(t);
    };
    const moe = f.spec.layers.findIndex((l) => l.mlp === 'moe');
    await expect(validateCheckpoint(f.spec, await without(`model.layers.${moe}.mlp.gate.e_score_correction_bias`))).rejects.toMatchObject({
      code: 'WEIGHTS_MISSING', message: expect.stringMatching(/e_score_correction_bias' is missing .*expert-selection bias/),
    });
    await expect(validateCheckpoint(f.spec, await without(`model.layers.${moe}.mlp.shared_experts.up_proj.weight`))).rejects.toMatchObject({
      code: 'WEIGHTS_MISSING', message: expect.stringMatching(/n_shared_experts 2/),
    });
    const fp8 = await holdFolder(path.join(reference, 'deepseek_v3_fp8'));
    const noScale: HeldCheckpoint = new Map(fp8.tensors);
    noScale.delete('model.layers.1.mlp.experts.3.down_proj.weight_scale_inv');
    await expect(validateCheckpoint(fp8.spec, await openCheckpoint(noScale))).rejects.toMatchObject({
      code: 'WEIGHTS_MISSING', message: expect.stringMatching(/experts.3.down_proj.weight_scale_inv' is missing .* is F8_E4M3 and config.json .* declares block-scaled FP8/),
    });
    const bad: HeldCheckpoint = new Map(f.tensors);
    const kvB = `model.layers.0.self_attn.kv_b_proj.weight`;
    bad.set(kvB, { ...f.tensors.get(kvB)!, shape: [...f.tensors.get(kvB)!.shape].reverse() });
    await expect(validateCheckpoint(f.spec, await openCheckpoint(bad))).rejects.toMatchObject({ code: 'WEIGHTS_INVALID', message: expect.stringMatching(/kv_b_proj.weight.*kv_lora_rank 40/) });
  });
});

describe('deepseek_v3 on the CPU backend', () => {
  it('is batch invariant over the latent cache: token by token across pages equals the whole prompt, alone or batched', async () => {
    const dir = path.join(reference, 'deepseek_v3_fp8');
    const { sequences } = JSON.parse(fs.readFileSync(path.join(dir, 'input.json'), 'utf8')) as { sequences: number[][] };
    const h = await loadModel({ model: dir, backend: 'cpu', kvCache: { pageSize: 4 } });
    try {
      const V = h.spec.vocabSize;
      const prompt = sequences[1];
      const whole = (await h.model.step({ sequences: [{ seq: 0, tokens: prompt, logits: 'all' }] })).sequences[0].logits;
      for (let i = 0; i < prompt.length; i++) {
        const step = await h.model.step({
          sequences: [
            { seq: 1, tokens: [prompt[i]], logits: 'last' },
            { seq: 2 + i, tokens: sequences[0], logits: 'none' },
          ],
        });
        expect(Array.from(step.sequences[0].logits)).toEqual(Array.from(whole.subarray(i * V, (i + 1) * V)));
        h.model.release(2 + i);
      }
    } finally {
      await h.model.dispose();
    }
  });

  it('keeps kv_lora_rank + qk_rope_head_dim values a position and layer in its KV pages', async () => {
    const dir = path.join(reference, 'deepseek_v3_bf16');
    const h = await loadModel({ model: dir, backend: 'cpu', kvCache: { pageSize: 8, pages: 4 } });
    try {
      await h.model.step({ sequences: [{ seq: 0, tokens: [1, 2, 3], logits: 'none' }] });
      const m = h.spec.attention.mla!;
      expect(h.model.memory().kvCache).toBe(h.spec.numLayers * 8 * (m.kvLoraRank + m.qkRopeHeadDim) * 4);
    } finally {
      await h.model.dispose();
    }
  });
});

describe('deepseek_v3 footprint (moeflash info)', () => {
  it('DeepSeek-V3: 671 B parameters, 37.5 B active; 576 cached values a token and layer', () => {
    const spec = parse(readConfig('deepseek-v3'));
    const f = footprint(spec);
    expect(f.total / 1e9).toBeCloseTo(671.0, 0);
    expect((f.total - f.expertsTotal + f.expertsPerToken) / 1e9).toBeCloseTo(37.5, 0);
    expect(kvCacheValuesPerToken(spec)).toBe(61 * 576);
    expect(expandedKvValuesPerToken(spec)).toBe(61 * 128 * (192 + 128));
    // Weights a decode step reads: MXFP4 experts + FP8 rest 27.0 GB; a 32k bf16 latent cache adds 2.3 GB.
    expect(bytesPerToken(spec, 'mxfp4 experts + fp8') / 1e9).toBeCloseTo(27.05, 1);
    expect((bytesPerToken(spec, 'mxfp4 experts + fp8', { context: 32768 }) - bytesPerToken(spec, 'mxfp4 experts + fp8')) / 1e9).toBeCloseTo(2.30, 2);
  });

  it('Kimi-K2: 1.03 T parameters, 32.9 B active', () => {
    const f = footprint(parse(readConfig('kimi-k2')));
    expect(f.total / 1e12).toBeCloseTo(1.03, 2);
    expect((f.total - f.expertsTotal + f.expertsPerToken) / 1e9).toBeCloseTo(32.9, 1);
  });

  it('info prints latent attention, grouped routing and the compressed KV cache of a config-only folder', async () => {
    const out: string[] = [];
    vi.spyOn(console, 'log').mockImplementation((...a) => void out.push(a.join(' ')));
    await info(['--model', path.join(configs, 'deepseek-v3')]);
    const text = out.join('\n');
    expect(text).toMatch(/latent attention \(q_lora_rank 1536, kv_lora_rank 512, qk 128 \+ 64 rope, v 128\)/);
    expect(text).toMatch(/top-8 \(sigmoid_grouped_topk: 4 of 8 groups, weights x 2.5\), expert width 2048, 1 shared/);
    expect(text).toMatch(/671\.\d+ G total, 37\.\d+ G active/);
    expect(text).toMatch(/kv cache {4}35,136 values a token over 61 layers/);
    expect(text).toMatch(/expanded to every head would be 2,498,560, 71x/);
  });
});

describe('moeflash synth --preset deepseek-v3 / kimi-k2', () => {
  for (const preset of ['deepseek-v3', 'kimi-k2']) {
    it(`${preset}: FP8 per-expert checkpoint at the preset's layout passes the strict checks and runs`, async () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), `moeflash-${preset}-`));
      const overrides = { ...TINY_DS, model_type: preset === 'kimi-k2' ? 'kimi_k2' : 'deepseek_v3', ...(preset === 'kimi-k2' ? { n_group: 1, topk_group: 1 } : {}) };
      const { spec } = await synthesizeModel({ preset, out: dir, overrides, seed: 5 });
      const h = await loadModel({ model: dir, backend: 'cpu', checkFiniteWeights: true });
      try {
        expect(spec.quantization?.method).toBe('fp8');
        const res = await h.model.step({ sequences: [{ seq: 0, tokens: [3, 1, 4, 1, 5], logits: 'all' }] });
        expect(res.sequences[0].logits.every(Number.isFinite)).toBe(true);
      } finally {
        await h.model.dispose();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });
  }
});
