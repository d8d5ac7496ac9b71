import { readFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MoeflashError, type ErrorCode } from '../src/errors.js';
import { loadModelSpec, parseModelConfig, SUPPORTED_MODEL_TYPES } from '../src/model/config.js';
import type { ModelSpec } from '../src/model/spec.js';

const CONFIGS = fileURLToPath(new URL('./configs/', import.meta.url));
const QWEN = 'qwen3-30b-a3b';
const MIXTRAL = 'mixtral-8x7b-v0.1';
const GPT_OSS = 'gpt-oss-20b';

type Json = Record<string, unknown>;

/** A fresh copy of a published config, so a test can edit it. */
function fixture(name: string): Json {
  return JSON.parse(readFileSync(join(CONFIGS, name, 'config.json'), 'utf8')) as Json;
}

function parse(json: unknown, source = 'test/config.json'): ModelSpec {
  return parseModelConfig(json, source);
}

function edit(name: string, change: (cfg: Json) => void): Json {
  const cfg = fixture(name);
  change(cfg);
  return cfg;
}

/** The transformers-5 form of a config: rope_theta and rope_scaling folded into rope_parameters. */
function toRopeParameters(cfg: Json): Json {
  const out: Json = { ...cfg };
  const scaling = (cfg.rope_scaling as Json | null | undefined) ?? { rope_type: 'default' };
  out.rope_parameters = { ...scaling, rope_theta: cfg.rope_theta };
  delete out.rope_theta;
  delete out.rope_scaling;
  return out;
}

function caught(fn: () => unknown): MoeflashError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(MoeflashError);
    return err as MoeflashError;
  }
  throw new Error('expected a MoeflashError, nothing was thrown');
}

function expectError(fn: () => unknown, code: ErrorCode, ...fragments: string[]): MoeflashError {
  const err = caught(fn);
  expect(err.code).toBe(code);
  for (const fragment of fragments) expect(err.message).toContain(fragment);
  return err;
}

describe('published configs', () => {
  it('Qwen/Qwen3-30B-A3B', async () => {
    const file = join(CONFIGS, QWEN, 'config.json');
    const spec = await loadModelSpec(join(CONFIGS, QWEN));
    expect(spec.family).toBe('qwen3_moe');
    expect(spec.source).toBe(resolve(file));
    expect(spec).toMatchObject({ vocabSize: 151936, hiddenSize: 2048, numLayers: 48, rmsNormEps: 1e-6 });
    expect(spec.tieWordEmbeddings).toBe(false);
    // head_dim is given (128), not hidden_size / heads (64).
    expect(spec.attention).toMatchObject({
      numHeads: 32,
      numKvHeads: 4,
      headDim: 128,
      bias: false,
      qkNorm: true,
      sinks: false,
      maxPositionEmbeddings: 40960,
    });
    expect(spec.attention.scale).toBeCloseTo(1 / Math.sqrt(128), 15);
    expect(spec.attention.rope).toEqual({ theta: 1e6, type: 'default', rotaryDim: 128 });
    expect(spec.moe).toEqual({
      numExperts: 128,
      topK: 8,
      rule: 'softmax_then_topk',
      normTopkProb: true,
      routerBias: false,
      expertBias: false,
      intermediateSize: 768,
      activation: { kind: 'swiglu' },
    });
    // intermediate_size (6144) is present but no layer is dense.
    expect(spec.denseIntermediateSize).toBeNull();
    expect(spec.layers).toHaveLength(48);
    expect(spec.layers.every((l) => l.mlp === 'moe' && l.slidingWindow === null)).toBe(true);
    expect(spec.bosTokenId).toBe(151643);
    expect(spec.eosTokenIds).toEqual([151645]);
    expect(spec.quantization).toBeNull();
  });

  it('mistralai/Mixtral-8x7B-v0.1', async () => {
    const spec = await loadModelSpec(join(CONFIGS, MIXTRAL));
    expect(spec.family).toBe('mixtral');
    expect(spec).toMatchObject({ vocabSize: 32000, hiddenSize: 4096, numLayers: 32, rmsNormEps: 1e-5 });
    // No head_dim in the file: 4096 / 32.
    expect(spec.attention).toMatchObject({
      numHeads: 32,
      numKvHeads: 8,
      headDim: 128,
      bias: false,
      qkNorm: false,
      sinks: false,
      maxPositionEmbeddings: 32768,
    });
    expect(spec.attention.rope).toEqual({ theta: 1e6, type: 'default', rotaryDim: 128 });
    expect(spec.moe).toEqual({
      numExperts: 8,
      topK: 2,
      rule: 'topk_then_softmax',
      normTopkProb: false,
      routerBias: false,
      expertBias: false,
      intermediateSize: 14336,
      activation: { kind: 'swiglu' },
    });
    expect(spec.denseIntermediateSize).toBeNull();
    expect(spec.layers).toEqual(Array.from({ length: 32 }, () => ({ slidingWindow: null, mlp: 'moe' })));
    expect(spec.bosTokenId).toBe(1);
    expect(spec.eosTokenIds).toEqual([2]);
    expect(spec.quantization).toBeNull();
  });

  it('openai/gpt-oss-20b', async () => {
    const spec = await loadModelSpec(join(CONFIGS, GPT_OSS));
    expect(spec.family).toBe('gpt_oss');
    expect(spec).toMatchObject({ vocabSize: 201088, hiddenSize: 2880, numLayers: 24, rmsNormEps: 1e-5 });
    expect(spec.attention).toMatchObject({
      numHeads: 64,
      numKvHeads: 8,
      headDim: 64,
      bias: true,
      qkNorm: false,
      sinks: true,
      scale: 0.125,
      maxPositionEmbeddings: 131072,
    });
    const rope = spec.attention.rope;
    expect(rope).toMatchObject({ theta: 150000, type: 'yarn', rotaryDim: 64 });
    expect(rope.yarn).toMatchObject({
      factor: 32,
      betaFast: 32,
      betaSlow: 1,
      originalMaxPositionEmbeddings: 4096,
      truncate: false,
    });
    expect(rope.yarn?.attentionFactor).toBeCloseTo(0.1 * Math.log(32) + 1, 15);
    expect(rope.yarn?.attentionFactor).toBeCloseTo(1.3465735902799727, 15);
    expect(spec.moe).toEqual({
      numExperts: 32,
      topK: 4,
      rule: 'topk_then_softmax',
      normTopkProb: false,
      routerBias: true,
      expertBias: true,
      intermediateSize: 2880,
      activation: { kind: 'gpt_oss_clamped_swiglu', limit: 7, alpha: 1.702 },
    });
    expect(spec.layers.map((l) => l.slidingWindow)).toEqual(
      Array.from({ length: 24 }, (_, i) => (i % 2 === 0 ? 128 : null)),
    );
    expect(spec.layers.every((l) => l.mlp === 'moe')).toBe(true);
    expect(spec.bosTokenId).toBeNull();
    expect(spec.eosTokenIds).toEqual([200002]);
    expect(spec.quantization).toEqual({
      method: 'mxfp4',
      modulesToNotConvert: ['model.layers.*.self_attn', 'model.layers.*.mlp.router', 'model.embed_tokens', 'lm_head'],
    });
  });

  it('lists the supported model types', () => {
    expect([...SUPPORTED_MODEL_TYPES].sort()).toEqual(['deepseek_v3', 'gpt_oss', 'mixtral', 'qwen3_moe']);
  });
});

describe('transformers 5 rope_parameters', () => {
  for (const name of [QWEN, MIXTRAL, GPT_OSS]) {
    it(`${name}: the rope_parameters form gives the same spec as rope_theta + rope_scaling`, () => {
      const old = fixture(name);
      const v5 = toRopeParameters(old);
      expect(v5).not.toHaveProperty('rope_theta');
      expect(parse(v5)).toEqual(parse(old));
    });
  }

  it('accepts the legacy "type" key in place of "rope_type"', () => {
    const cfg = edit(GPT_OSS, (c) => {
      const { rope_type: _dropped, ...rest } = c.rope_scaling as Json;
      c.rope_scaling = { ...rest, type: 'yarn' };
    });
    expect(parse(cfg)).toEqual(parse(fixture(GPT_OSS)));
  });

  it('takes rope_theta from the family default when the file gives none', () => {
    const drop = (name: string) =>
      edit(name, (c) => {
        delete c.rope_theta;
        delete c.rope_scaling;
      });
    expect(parse(drop(MIXTRAL)).attention.rope.theta).toBe(1e6);
    expect(parse(drop(QWEN)).attention.rope.theta).toBe(10000);
    expect(parse(drop(GPT_OSS)).attention.rope.theta).toBe(150000);
  });

  it('prefers rope_theta inside rope_parameters to the top-level key', () => {
    const cfg = edit(MIXTRAL, (c) => {
      c.rope_theta = 5;
      c.rope_parameters = { rope_type: 'default', rope_theta: 2e6 };
    });
    expect(parse(cfg).attention.rope.theta).toBe(2e6);
  });

  it('gpt-oss without any rope dict gets GptOssConfig\'s default YaRN (truncate false)', () => {
    const cfg = edit(GPT_OSS, (c) => {
      delete c.rope_scaling;
    });
    expect(parse(cfg).attention.rope).toEqual(parse(fixture(GPT_OSS)).attention.rope);
  });

  it('YaRN defaults: truncate true, attention_factor 0.1 ln(factor) + 1, betas 32 / 1, original length = max positions', () => {
    const cfg = edit(MIXTRAL, (c) => {
      c.rope_parameters = { rope_type: 'yarn', rope_theta: 1e6, factor: 4 };
    });
    expect(parse(cfg).attention.rope).toEqual({
      theta: 1e6,
      type: 'yarn',
      rotaryDim: 128,
      yarn: {
        factor: 4,
        betaFast: 32,
        betaSlow: 1,
        originalMaxPositionEmbeddings: 32768,
        attentionFactor: 0.1 * Math.log(4) + 1,
        truncate: true,
      },
    });
  });

  it('YaRN: explicit attention_factor wins; mscale / mscale_all_dim set it otherwise', () => {
    const withFactor = edit(GPT_OSS, (c) => {
      (c.rope_scaling as Json).attention_factor = 1.25;
    });
    expect(parse(withFactor).attention.rope.yarn?.attentionFactor).toBe(1.25);
    const withMscale = edit(GPT_OSS, (c) => {
      Object.assign(c.rope_scaling as Json, { mscale: 1, mscale_all_dim: 0.5 });
    });
    const m = (s: number) => 0.1 * s * Math.log(32) + 1;
    expect(parse(withMscale).attention.rope.yarn?.attentionFactor).toBeCloseTo(m(1) / m(0.5), 15);
  });

  it('accepts a per-layer-type rope_parameters when every layer type has the same RoPE', () => {
    const cfg = edit(GPT_OSS, (c) => {
      const one = { ...(c.rope_scaling as Json), rope_theta: c.rope_theta };
      c.rope_parameters = { sliding_attention: one, full_attention: { ...one } };
      delete c.rope_scaling;
      delete c.rope_theta;
    });
    expect(parse(cfg)).toEqual(parse(fixture(GPT_OSS)));
  });

  it('partial_rotary_factor rotates the leading part of each head', () => {
    const top = edit(QWEN, (c) => {
      c.partial_rotary_factor = 0.5;
    });
    expect(parse(top).attention.rope.rotaryDim).toBe(64);
    const inside = edit(QWEN, (c) => {
      c.rope_parameters = { rope_type: 'default', rope_theta: 1e6, partial_rotary_factor: 0.25 };
    });
    expect(parse(inside).attention.rope.rotaryDim).toBe(32);
  });
});

describe('HF defaults for absent fields', () => {
  it('qwen3_moe: decoder_sparse_step and mlp_only_layers choose the dense layers', () => {
    const cfg = edit(QWEN, (c) => {
      c.num_hidden_layers = 6;
      c.decoder_sparse_step = 2;
      c.mlp_only_layers = [3];
    });
    const spec = parse(cfg);
    // (i + 1) % 2 == 0 -> sparse, except layer 3.
    expect(spec.layers.map((l) => l.mlp)).toEqual(['dense', 'moe', 'dense', 'dense', 'dense', 'moe']);
    expect(spec.denseIntermediateSize).toBe(6144);
  });

  it('qwen3_moe: minimal file gets sparse_step 1, no mlp_only_layers, norm_topk_prob false, no window', () => {
    const cfg = {
      model_type: 'qwen3_moe',
      vocab_size: 100,
      hidden_size: 64,
      num_hidden_layers: 2,
      num_attention_heads: 4,
      num_key_value_heads: 2,
      num_experts: 8,
      moe_intermediate_size: 32,
    };
    const spec = parse(cfg);
    expect(spec.attention.headDim).toBe(16);
    expect(spec.attention.maxPositionEmbeddings).toBe(32768);
    expect(spec.attention.rope).toEqual({ theta: 10000, type: 'default', rotaryDim: 16 });
    expect(spec.rmsNormEps).toBe(1e-6);
    expect(spec.moe).toMatchObject({ topK: 8, normTopkProb: false, rule: 'softmax_then_topk' });
    expect(spec.layers).toEqual([
      { slidingWindow: null, mlp: 'moe' },
      { slidingWindow: null, mlp: 'moe' },
    ]);
    expect(spec.bosTokenId).toBeNull();
    expect(spec.eosTokenIds).toEqual([]);
  });

  it('qwen3_moe: sliding_window counts only with use_sliding_window, then on every layer', () => {
    const off = edit(QWEN, (c) => {
      c.sliding_window = 4096;
    });
    expect(parse(off).layers.every((l) => l.slidingWindow === null)).toBe(true);
    const on = edit(QWEN, (c) => {
      c.use_sliding_window = true;
      delete c.sliding_window;
    });
    expect(parse(on).layers.every((l) => l.slidingWindow === 4096)).toBe(true);
  });

  it('mixtral: sliding_window applies to every layer; bos 1 / eos 2 by default', () => {
    const cfg = edit(MIXTRAL, (c) => {
      c.sliding_window = 4096;
      delete c.bos_token_id;
      delete c.eos_token_id;
    });
    const spec = parse(cfg);
    expect(spec.layers.every((l) => l.slidingWindow === 4096)).toBe(true);
    expect(spec.bosTokenId).toBe(1);
    expect(spec.eosTokenIds).toEqual([2]);
  });

  it('mixtral and gpt_oss: a null num_key_value_heads means one per query head', () => {
    const m = edit(MIXTRAL, (c) => {
      c.num_key_value_heads = null;
    });
    expect(parse(m).attention.numKvHeads).toBe(32);
    const g = edit(GPT_OSS, (c) => {
      c.num_key_value_heads = null;
    });
    expect(parse(g).attention.numKvHeads).toBe(64);
  });

  it('gpt_oss: absent head_dim is the class default 64; null derives hidden_size // heads', () => {
    const absent = edit(GPT_OSS, (c) => {
      delete c.head_dim;
    });
    expect(parse(absent).attention.headDim).toBe(64);
    const nul = edit(GPT_OSS, (c) => {
      c.head_dim = null;
      c.num_attention_heads = 48;
    });
    expect(parse(nul).attention.headDim).toBe(60);
    // With the released head count the derived 2880 // 64 = 45 cannot carry RoPE.
    const odd = edit(GPT_OSS, (c) => {
      c.head_dim = null;
    });
    expectError(() => parse(odd), 'CONFIG_INVALID', 'even');
  });

  it('gpt_oss: layer_types default alternates sliding / full starting with sliding; swiglu defaults', () => {
    const cfg = edit(GPT_OSS, (c) => {
      delete c.layer_types;
      delete c.sliding_window;
      delete c.swiglu_limit;
      delete c.attention_bias;
      c.num_hidden_layers = 5;
    });
    const spec = parse(cfg);
    expect(spec.layers.map((l) => l.slidingWindow)).toEqual([128, null, 128, null, 128]);
    expect(spec.moe.activation).toEqual({ kind: 'gpt_oss_clamped_swiglu', limit: 7, alpha: 1.702 });
    expect(spec.attention.bias).toBe(true);
  });

  it('eos_token_id may be a list, an int or null; bos_token_id may be absent', () => {
    const list = edit(QWEN, (c) => {
      c.eos_token_id = [151645, 151643];
      delete c.bos_token_id;
    });
    expect(parse(list).eosTokenIds).toEqual([151645, 151643]);
    expect(parse(list).bosTokenId).toBeNull();
    const nul = edit(QWEN, (c) => {
      c.eos_token_id = null;
    });
    expect(parse(nul).eosTokenIds).toEqual([]);
  });

  it('num_experts / num_local_experts are aliases', () => {
    const cfg = edit(MIXTRAL, (c) => {
      c.num_experts = c.num_local_experts;
      delete c.num_local_experts;
    });
    expect(parse(cfg).moe.numExperts).toBe(8);
  });
});

describe('quantization_config', () => {
  it('fp8 with weight_block_size', () => {
    const cfg = edit(QWEN, (c) => {
      c.quantization_config = {
        activation_scheme: 'dynamic',
        fmt: 'e4m3',
        quant_method: 'fp8',
        weight_block_size: [128, 128],
        modules_to_not_convert: ['lm_head'],
      };
    });
    expect(parse(cfg).quantization).toEqual({
      method: 'fp8',
      weightBlockSize: [128, 128],
      modulesToNotConvert: ['lm_head'],
    });
  });

  it('fp8 without weight_block_size gets FineGrainedFP8Config\'s 128 x 128', () => {
    const cfg = edit(QWEN, (c) => {
      c.quantization_config = { quant_method: 'fp8' };
    });
    expect(parse(cfg).quantization).toEqual({ method: 'fp8', weightBlockSize: [128, 128] });
  });

  it('refuses per-tensor fp8, static activations and unknown methods', () => {
    const perTensor = edit(QWEN, (c) => {
      c.quantization_config = { quant_method: 'fp8', weight_block_size: null };
    });
    expectError(() => parse(perTensor), 'CONFIG_UNSUPPORTED', 'quantization_config.weight_block_size');
    const staticAct = edit(QWEN, (c) => {
      c.quantization_config = { quant_method: 'fp8', activation_scheme: 'static' };
    });
    expectError(() => parse(staticAct), 'CONFIG_UNSUPPORTED', 'quantization_config.activation_scheme');
    const awq = edit(QWEN, (c) => {
      c.quantization_config = { quant_method: 'awq', bits: 4 };
    });
    expectError(() => parse(awq), 'CONFIG_UNSUPPORTED', 'quantization_config.quant_method', '"awq"', 'mxfp4', 'fp8');
  });
});

describe('errors name the field and the file', () => {
  const SOURCE = '/models/broken/config.json';

  it('a missing required field', () => {
    const cfg = edit(QWEN, (c) => {
      delete c.hidden_size;
    });
    expectError(() => parse(cfg, SOURCE), 'CONFIG_INVALID', SOURCE, '"hidden_size"', 'missing', 'positive integer');
  });

  it('a field of the wrong type shows the expected type and the value found', () => {
    const cfg = edit(MIXTRAL, (c) => {
      c.num_attention_heads = '32';
    });
    expectError(
      () => parse(cfg, SOURCE),
      'CONFIG_INVALID',
      SOURCE,
      '"num_attention_heads"',
      'positive integer',
      '"32" (a string)',
    );
  });

  it('a non-positive size', () => {
    const cfg = edit(GPT_OSS, (c) => {
      c.intermediate_size = 0;
    });
    expectError(() => parse(cfg, SOURCE), 'CONFIG_INVALID', SOURCE, '"intermediate_size"', 'found 0');
  });

  it('a wrong boolean', () => {
    const cfg = edit(QWEN, (c) => {
      c.norm_topk_prob = 'yes';
    });
    expectError(() => parse(cfg, SOURCE), 'CONFIG_INVALID', SOURCE, '"norm_topk_prob"', 'true or false', '"yes"');
  });

  it('a nested field is named with its path', () => {
    const cfg = edit(GPT_OSS, (c) => {
      (c.rope_scaling as Json).factor = 'big';
    });
    expectError(() => parse(cfg, SOURCE), 'CONFIG_INVALID', SOURCE, '"rope_scaling.factor"', '"big"');
    const v5 = toRopeParameters(
      edit(GPT_OSS, (c) => {
        (c.rope_scaling as Json).truncate = 'no';
      }),
    );
    expectError(() => parse(v5, SOURCE), 'CONFIG_INVALID', SOURCE, '"rope_parameters.truncate"', 'true or false');
  });

  it('YaRN without factor', () => {
    const cfg = edit(GPT_OSS, (c) => {
      delete (c.rope_scaling as Json).factor;
    });
    expectError(() => parse(cfg, SOURCE), 'CONFIG_INVALID', SOURCE, '"rope_scaling.factor"', 'missing');
  });

  it('an unknown model_type lists the supported ones', () => {
    const cfg = edit(MIXTRAL, (c) => {
      c.model_type = 'llama';
    });
    expectError(() => parse(cfg, SOURCE), 'CONFIG_UNSUPPORTED', SOURCE, '"llama"', 'qwen3_moe', 'mixtral', 'gpt_oss');
  });

  it('a missing model_type', () => {
    const cfg = edit(MIXTRAL, (c) => {
      delete c.model_type;
    });
    expectError(() => parse(cfg, SOURCE), 'CONFIG_INVALID', SOURCE, '"model_type"');
  });

  it('a rope type moeflash does not implement', () => {
    const cfg = edit(MIXTRAL, (c) => {
      c.rope_scaling = { rope_type: 'linear', factor: 2 };
    });
    expectError(() => parse(cfg, SOURCE), 'CONFIG_UNSUPPORTED', SOURCE, '"rope_scaling.rope_type"', '"linear"', 'yarn');
  });

  it('num_attention_heads not divisible by num_key_value_heads', () => {
    const cfg = edit(QWEN, (c) => {
      c.num_key_value_heads = 5;
    });
    expectError(
      () => parse(cfg, SOURCE),
      'CONFIG_INVALID',
      SOURCE,
      '"num_attention_heads" (32)',
      '"num_key_value_heads" (5)',
    );
  });

  it('top-k larger than the number of experts', () => {
    const cfg = edit(MIXTRAL, (c) => {
      c.num_experts_per_tok = 9;
    });
    expectError(() => parse(cfg, SOURCE), 'CONFIG_INVALID', SOURCE, '"num_experts_per_tok" (9)', '"num_local_experts" (8)');
  });

  it('layer_types of the wrong length or with an unknown kind', () => {
    const short = edit(GPT_OSS, (c) => {
      (c.layer_types as string[]).pop();
    });
    expectError(() => parse(short, SOURCE), 'CONFIG_INVALID', SOURCE, '"layer_types" has 23 entries', '"num_hidden_layers" is 24');
    const odd = edit(GPT_OSS, (c) => {
      (c.layer_types as string[])[3] = 'chunked_attention';
    });
    expectError(() => parse(odd, SOURCE), 'CONFIG_INVALID', SOURCE, '"layer_types[3]"', '"chunked_attention"');
  });

  it('sliding layers without a window', () => {
    const cfg = edit(GPT_OSS, (c) => {
      c.sliding_window = null;
    });
    expectError(() => parse(cfg, SOURCE), 'CONFIG_INVALID', SOURCE, '"sliding_window"', 'layer_types');
  });

  it('mlp_only_layers outside the model', () => {
    const cfg = edit(QWEN, (c) => {
      c.mlp_only_layers = [48];
    });
    expectError(() => parse(cfg, SOURCE), 'CONFIG_INVALID', SOURCE, '"mlp_only_layers[0]"', 'from 0 to 47', 'found 48');
  });

  it('dense layers without intermediate_size', () => {
    const cfg = edit(QWEN, (c) => {
      c.mlp_only_layers = [0];
      delete c.intermediate_size;
    });
    expectError(() => parse(cfg, SOURCE), 'CONFIG_INVALID', SOURCE, '"intermediate_size"', 'missing');
  });

  it('eos_token_id of the wrong type', () => {
    const cfg = edit(QWEN, (c) => {
      c.eos_token_id = ['</s>'];
    });
    expectError(() => parse(cfg, SOURCE), 'CONFIG_INVALID', SOURCE, '"eos_token_id[0]"', '"</s>" (a string)');
  });

  it('expert counts that disagree across the alias', () => {
    const cfg = edit(MIXTRAL, (c) => {
      c.num_experts = 16;
    });
    expectError(() => parse(cfg, SOURCE), 'CONFIG_INVALID', SOURCE, '"num_local_experts"', '"num_experts"');
  });

  it('an unsupported activation', () => {
    const cfg = edit(MIXTRAL, (c) => {
      c.hidden_act = 'gelu';
    });
    expectError(() => parse(cfg, SOURCE), 'CONFIG_UNSUPPORTED', SOURCE, '"hidden_act"', '"gelu"');
  });

  it('a top level that is not an object', () => {
    expectError(() => parse([1, 2], SOURCE), 'CONFIG_INVALID', SOURCE, 'JSON object', '[1,2] (a list)');
  });
});

describe('loadModelSpec', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'moeflash-config-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('a folder without config.json names the path and what a model folder needs', async () => {
    const err = await loadModelSpec(dir).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MoeflashError);
    expect((err as MoeflashError).code).toBe('CONFIG_INVALID');
    expect((err as MoeflashError).message).toContain(join(dir, 'config.json'));
    expect((err as MoeflashError).message).toContain('a model folder needs the config.json');
  });

  it('a folder that does not exist', async () => {
    const missing = join(dir, 'nope');
    const err = (await loadModelSpec(missing).catch((e: unknown) => e)) as MoeflashError;
    expect(err.code).toBe('CONFIG_INVALID');
    expect(err.message).toContain(missing);
    expect(err.message).toContain('does not exist');
  });

  it('a file that is not JSON', async () => {
    const folder = join(dir, 'bad-json');
    await mkdir(folder);
    await writeFile(join(folder, 'config.json'), '{ "model_type": ');
    const err = (await loadModelSpec(folder).catch((e: unknown) => e)) as MoeflashError;
    expect(err.code).toBe('CONFIG_INVALID');
    expect(err.message).toContain(join(folder, 'config.json'));
    expect(err.message).toContain('not valid JSON');
  });

  it('errors from a loaded file name that file', async () => {
    const folder = join(dir, 'bad-field');
    await mkdir(folder);
    const cfg = edit(QWEN, (c) => {
      c.num_experts = -1;
    });
    await writeFile(join(folder, 'config.json'), JSON.stringify(cfg));
    const err = (await loadModelSpec(folder).catch((e: unknown) => e)) as MoeflashError;
    expect(err.code).toBe('CONFIG_INVALID');
    expect(err.message).toContain(join(folder, 'config.json'));
    expect(err.message).toContain('"num_experts"');
  });
});
