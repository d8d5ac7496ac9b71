import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { loadModel, loadModelSpec, openWeights, type ModelSpec } from '@moeflash/core';
import {
  createSpeculator,
  defaultTargetLayerIds,
  DflashDraft,
  loadDflashConfig,
  loadDflashWeights,
  parseDflashConfig,
  synthesizeDflashDraft,
  type DflashConfig,
  type DflashWeights,
} from '@moeflash/speculative';
import { tinyPair } from './helpers.js';

/** A config.json shaped like z-lab/Qwen3-8B-DFlash-b16's (the fields and layout of the release). */
const QWEN3_8B_B16 = {
  architectures: ['DFlashDraftModel'],
  auto_map: { AutoModel: 'dflash.DFlashDraftModel' },
  attention_bias: false,
  attention_dropout: 0.0,
  block_size: 16,
  dflash_config: { mask_token_id: 151669, target_layer_ids: [1, 9, 17, 25, 33] },
  head_dim: 128,
  hidden_act: 'silu',
  hidden_size: 4096,
  intermediate_size: 12288,
  layer_types: ['full_attention', 'full_attention', 'full_attention', 'full_attention', 'full_attention'],
  max_position_embeddings: 40960,
  max_window_layers: 5,
  model_type: 'qwen3',
  num_attention_heads: 32,
  num_hidden_layers: 5,
  num_key_value_heads: 8,
  num_target_layers: 36,
  rms_norm_eps: 1e-6,
  rope_scaling: null,
  rope_theta: 1000000,
  sliding_window: null,
  tie_word_embeddings: false,
  use_cache: true,
  use_sliding_window: false,
  vocab_size: 151936,
};

describe('DFlash config.json', () => {
  it('reads a released drafter config', () => {
    const c = parseDflashConfig(QWEN3_8B_B16, 'config.json');
    expect(c).toMatchObject({
      hiddenSize: 4096, numLayers: 5, numHeads: 32, numKvHeads: 8, headDim: 128, intermediateSize: 12288,
      blockSize: 16, maskTokenId: 151669, targetLayerIds: [1, 9, 17, 25, 33], numTargetLayers: 36, vocabSize: 151936,
      causal: false, windows: [null, null, null, null, null], inputEmbeddingScale: 1, outputMultiplier: 1, finalLogitSoftcapping: null,
    });
    expect(c.rope).toEqual({ theta: 1000000, type: 'default', rotaryDim: 128 });
  });

  it('derives target layers as z-lab build_target_layer_ids does', () => {
    expect(defaultTargetLayerIds(36, 5)).toEqual([1, 9, 17, 25, 33]);
    expect(defaultTargetLayerIds(48, 5)).toEqual([1, 12, 23, 34, 45]);
    expect(defaultTargetLayerIds(64, 2)).toEqual([1, 61]);
    expect(defaultTargetLayerIds(24, 1)).toEqual([12]);
    const { dflash_config: _, ...noIds } = QWEN3_8B_B16;
    expect(parseDflashConfig({ ...noIds, dflash_config: { mask_token_id: 5 } }, 'c').targetLayerIds).toEqual([1, 9, 17, 25, 33]);
  });

  it('reads sliding-window layers, causality, YaRN and the later scalings', () => {
    const c = parseDflashConfig(
      {
        ...QWEN3_8B_B16,
        num_hidden_layers: 2,
        layer_types: ['sliding_attention', 'full_attention'],
        sliding_window: 64,
        is_causal: true,
        rope_scaling: { rope_type: 'yarn', factor: 32, beta_fast: 32, beta_slow: 1, original_max_position_embeddings: 4096, truncate: false },
        dflash_config: { mask_token_id: 3, target_layer_ids: [2, 4], block_size: 8, output_multiplier: 0.5, final_logit_softcapping: 20 },
      },
      'c',
    );
    expect(c.windows).toEqual([64, null]);
    expect(c.causal).toBe(true);
    expect(c.blockSize).toBe(8);
    expect(c.rope.type).toBe('yarn');
    expect(c.outputMultiplier).toBe(0.5);
    expect(c.finalLogitSoftcapping).toBe(20);
  });

  it('refuses what it cannot run, naming the field', () => {
    expect(() => parseDflashConfig({ ...QWEN3_8B_B16, architectures: ['DFlash2DraftModel'] }, 'c')).toThrow(/DFlash2DraftModel/);
    expect(() => parseDflashConfig({ ...QWEN3_8B_B16, dflash_config: { target_layer_ids: [1] } }, 'c')).toThrow(/mask_token_id/);
    expect(() => parseDflashConfig({ ...QWEN3_8B_B16, hidden_size: undefined }, 'c')).toThrow(/hidden_size/);
  });
});

describe('synthesizeDflashDraft writes the published format', () => {
  it('config.json fields and safetensors names of z-lab releases, no embedding or LM head', async () => {
    const { target } = await tinyPair('qwen3_moe');
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'moeflash-dflash-fmt-'));
    await synthesizeDflashDraft(target, out, { blockSize: 16, numLayers: 2, seed: 5 });
    const cfg = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8'));
    expect(cfg.architectures).toEqual(['DFlashDraftModel']);
    expect(cfg.model_type).toBe('qwen3');
    expect(cfg.block_size).toBe(16);
    expect(cfg.num_target_layers).toBe(2);
    expect(Object.keys(cfg.dflash_config).sort()).toEqual(['mask_token_id', 'target_layer_ids']);
    const w = await openWeights(out);
    const names = w.names().sort();
    await w.close();
    const layer = (l: number) =>
      ['input_layernorm', 'mlp.down_proj', 'mlp.gate_proj', 'mlp.up_proj', 'post_attention_layernorm', 'self_attn.k_norm', 'self_attn.k_proj', 'self_attn.o_proj', 'self_attn.q_norm', 'self_attn.q_proj', 'self_attn.v_proj'].map(
        (n) => `layers.${l}.${n}.weight`,
      );
    expect(names).toEqual(['fc.weight', 'hidden_norm.weight', ...layer(0), ...layer(1), 'norm.weight'].sort());
    const c = await loadDflashConfig(out);
    expect(c.numLayers).toBe(2);
  });
});

/**
 * A second, deliberately plain implementation of the drafter's forward pass, written the way the
 * reference PyTorch module reads (concatenate context and block, project, normalize, rotate,
 * softmax over every key), in float64 with its own RoPE. The cached implementation must agree.
 */
function referenceLogits(cfg: DflashConfig, w: DflashWeights, ctx: Float64Array[], anchor: number, drafts: number): Float64Array[] {
  const H = cfg.hiddenSize;
  const hd = cfg.headDim;
  const eps = cfg.rmsNormEps;
  const matvec = (m: Float32Array, rows: number, x: ArrayLike<number>, bias?: Float32Array | null) =>
    Float64Array.from({ length: rows }, (_, r) => {
      let s = 0;
      for (let c = 0; c < x.length; c++) s += m[r * x.length + c]! * x[c]!;
      return s + (bias ? bias[r]! : 0);
    });
  const norm = (x: Float64Array, g: Float32Array) => {
    let ss = 0;
    for (const v of x) ss += v * v;
    const inv = 1 / Math.sqrt(ss / x.length + eps);
    return x.map((v, i) => v * inv * g[i]!);
  };
  const perHead = (x: Float64Array, heads: number, g: Float32Array, pos: number) => {
    const out = new Float64Array(x.length);
    for (let h = 0; h < heads; h++) {
      const head = norm(x.slice(h * hd, (h + 1) * hd), g);
      const half = hd / 2;
      for (let i = 0; i < half; i++) {
        const angle = pos / Math.pow(cfg.rope.theta, (2 * i) / hd);
        out[h * hd + i] = head[i]! * Math.cos(angle) - head[i + half]! * Math.sin(angle);
        out[h * hd + i + half] = head[i + half]! * Math.cos(angle) + head[i]! * Math.sin(angle);
      }
    }
    return out;
  };
  const c = ctx.map((f) => norm(matvec(w.fc, H, f), w.hiddenNorm));
  const m = c.length;
  let h = [anchor, ...Array<number>(drafts).fill(cfg.maskTokenId)].map((t) => Float64Array.from(w.embed.subarray(t * H, (t + 1) * H)));
  const group = cfg.numHeads / cfg.numKvHeads;
  for (const lw of w.layers) {
    const x = h.map((v) => norm(v, lw.inputNorm));
    const src = [...c, ...x];
    const K = src.map((v, j) => perHead(matvec(lw.k, cfg.numKvHeads * hd, v, lw.kBias), cfg.numKvHeads, lw.kNorm, j));
    const Vv = src.map((v) => matvec(lw.v, cfg.numKvHeads * hd, v, lw.vBias));
    h = h.map((hi, i) => {
      const q = perHead(matvec(lw.q, cfg.numHeads * hd, x[i]!, lw.qBias), cfg.numHeads, lw.qNorm, m + i);
      const attn = new Float64Array(cfg.numHeads * hd);
      for (let head = 0; head < cfg.numHeads; head++) {
        const kv = Math.floor(head / group) * hd;
        const s = K.map((k) => {
          let d = 0;
          for (let e = 0; e < hd; e++) d += q[head * hd + e]! * k[kv + e]!;
          return d / Math.sqrt(hd);
        });
        const mx = Math.max(...s);
        const ex = s.map((v) => Math.exp(v - mx));
        const z = ex.reduce((a, b) => a + b, 0);
        for (let e = 0; e < hd; e++) attn[head * hd + e] = ex.reduce((a, p, j) => a + (p / z) * Vv[j]![kv + e]!, 0);
      }
      const o = matvec(lw.o, H, attn, lw.oBias);
      const r = hi.map((v, d) => v + o[d]!);
      const y = norm(r, lw.postAttnNorm);
      const g = matvec(lw.mlp.gate, lw.mlp.inter, y);
      const u = matvec(lw.mlp.up, lw.mlp.inter, y);
      const act = g.map((v, j) => (v / (1 + Math.exp(-v))) * u[j]!);
      const down = matvec(lw.mlp.down, H, act);
      return r.map((v, d) => v + down[d]!);
    });
  }
  return h.slice(1).map((v) => matvec(w.lmHead, w.lmHead.length / H, norm(v, w.norm)));
}

describe('the DFlash forward pass', () => {
  let spec: ModelSpec;
  let cfg: DflashConfig;
  let weights: DflashWeights;
  let target: string;

  beforeAll(async () => {
    const pair = await tinyPair('qwen3_moe', 2);
    target = pair.target;
    spec = await loadModelSpec(pair.target);
    cfg = await loadDflashConfig(pair.draft);
    weights = await loadDflashWeights(cfg, pair.draft, pair.target, spec);
  });

  const features = (rows: number, size: number) => {
    let s = 12345;
    return Array.from({ length: rows }, () =>
      Float64Array.from({ length: size }, () => {
        s = (s * 1103515245 + 12345) % 2147483648;
        return Math.fround((s / 2147483648 - 0.5) * 2);
      }),
    );
  };

  it('matches a plain reference: context injected into every layer\'s keys and values, bidirectional block', () => {
    const draft = new DflashDraft(cfg, weights, spec);
    const ctx = features(6, draft.featureSize);
    const cache = draft.newCache();
    // In two pieces, as verify rounds deliver them.
    draft.absorb(cache, Float32Array.from(ctx.slice(0, 4).flatMap((r) => [...r])), 4);
    draft.absorb(cache, Float32Array.from(ctx.slice(4).flatMap((r) => [...r])), 2);
    for (const drafts of [1, 4]) {
      const got = draft.block(cache, 42, drafts);
      const want = referenceLogits(cfg, weights, ctx, 42, drafts);
      const V = draft.vocabSize;
      let maxErr = 0;
      let scale = 0;
      want.forEach((row, i) => row.forEach((v, t) => {
        maxErr = Math.max(maxErr, Math.abs(v - got[i * V + t]!));
        scale = Math.max(scale, Math.abs(v));
      }));
      expect(maxErr).toBeLessThan(1e-5 * Math.max(1, scale));
      expect(cache.length).toBe(6);
    }
  });

  it('every block position sees the whole block: more masks change earlier rows; causal configs do not', () => {
    const bidi = new DflashDraft(cfg, weights, spec);
    const cache = bidi.newCache();
    bidi.absorb(cache, Float32Array.from(features(3, bidi.featureSize).flatMap((r) => [...r])), 3);
    const V = bidi.vocabSize;
    expect(bidi.block(cache, 9, 2).subarray(0, V)).not.toEqual(bidi.block(cache, 9, 5).subarray(0, V));
    const causal = new DflashDraft({ ...cfg, causal: true }, weights, spec);
    expect(causal.block(cache, 9, 2).subarray(0, V)).toEqual(causal.block(cache, 9, 5).subarray(0, V));
  });

  it('the shared embedding and LM head are the target\'s own tensors', async () => {
    const w = await openWeights(target);
    const embed = await w.readFloat32('model.embed_tokens.weight');
    await w.close();
    expect(weights.embed).toEqual(embed);
    expect(weights.lmHead).toEqual(embed); // tie_word_embeddings: true in the tiny qwen3_moe
  });
});

describe('createSpeculator', () => {
  it('checks that the drafter belongs to the target and the options make sense', async () => {
    const q = await tinyPair('qwen3_moe');
    const g = await tinyPair('gpt_oss');
    const h = await loadModel({ model: q.target, backend: 'cpu', log: () => {} });
    const make = (options: Record<string, unknown>) => createSpeculator({ target: h.model, targetSpec: h.spec, targetDir: q.target, options });
    await expect(make({ method: 'dflash', draft: g.draft })).rejects.toThrow(/hidden_size is 64 but the target's is 128/);
    await expect(make({ method: 'dflash' })).rejects.toThrow(/speculative.draft/);
    await expect(make({ method: 'dflash', draft: q.draft, blockSize: 17 })).rejects.toThrow(/blockSize must be an integer from 0/);
    await expect(make({ method: 'medusa' })).rejects.toThrow(/'dflash' or 'prompt-lookup'/);
    await expect(make({ method: 'prompt-lookup', minNgram: 4, maxNgram: 2 })).rejects.toThrow(/minNgram/);
    const s = await make({ method: 'dflash', draft: q.draft });
    expect(() => s.forRequest({ blockSize: -1 })).toThrow(/blockSize/);
    expect(s.forRequest({}).hiddenLayers).toEqual([1]);
    await h.model.dispose();
  });
});
