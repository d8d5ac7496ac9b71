/**
 * Reads shared by the family parsers: the attention shape, RoPE (both the transformers-4
 * `rope_theta` + `rope_scaling` form and the transformers-5 `rope_parameters` form), token ids and
 * `quantization_config`. Defaults and precedence follow HF transformers 5 (configuration classes,
 * `RotaryEmbeddingConfigMixin` and `modeling_rope_utils.py`), so a config means here what it means
 * to the reference implementation that produces our golden fixtures.
 */
import type { AttentionSpec, ModelSpec, RopeSpec } from '../spec.js';
import { ConfigFields, describeValue, invalidConfig, isPlainObject, unsupportedConfig } from '../fields.js';

/** Sizes that fix the attention tensors' shapes. */
export interface AttentionDims {
  vocabSize: number;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
}

export interface AttentionDimsOptions {
  /**
   * `head_dim` when the key is absent: the family's HF class default (gpt-oss: 64), or `'derived'`
   * for hidden_size // num_attention_heads. An explicit null always derives it.
   */
  headDimWhenAbsent: number | 'derived';
  /** An explicit null `num_key_value_heads` means one KV head per query head (HF `__post_init__`). */
  kvHeadsNullMeansHeads: boolean;
}

/**
 * Fields that fix tensor shapes are required even where HF has a class default: those defaults
 * describe one reference checkpoint, and silently applying them to a hand-written config would
 * only fail later, at weight loading, with a less helpful message. Configs written by HF's
 * `save_pretrained` always carry them.
 */
export function readAttentionDims(f: ConfigFields, opts: AttentionDimsOptions): AttentionDims {
  const vocabSize = f.requireInt('vocab_size');
  const hiddenSize = f.requireInt('hidden_size');
  const numLayers = f.requireInt('num_hidden_layers');
  const numHeads = f.requireInt('num_attention_heads');

  const numKvHeads =
    opts.kvHeadsNullMeansHeads && f.hasKey('num_key_value_heads') && f.raw('num_key_value_heads') === null
      ? numHeads
      : f.requireInt('num_key_value_heads');
  if (numHeads % numKvHeads !== 0) {
    throw invalidConfig(
      f.source,
      `"num_attention_heads" (${numHeads}) must be a multiple of "num_key_value_heads" (${numKvHeads}): ` +
        'each key/value head serves a whole group of query heads',
    );
  }

  let headDim: number;
  if (f.has('head_dim')) {
    headDim = f.requireInt('head_dim');
  } else if (!f.hasKey('head_dim') && opts.headDimWhenAbsent !== 'derived') {
    headDim = opts.headDimWhenAbsent;
  } else {
    // HF floors this division; the checkpoint's projections are shaped by the floored value.
    headDim = Math.floor(hiddenSize / numHeads);
    if (headDim < 1) {
      throw invalidConfig(
        f.source,
        `"head_dim" is not set and "hidden_size" (${hiddenSize}) // "num_attention_heads" (${numHeads}) is 0; set "head_dim"`,
      );
    }
  }
  return { vocabSize, hiddenSize, numLayers, numHeads, numKvHeads, headDim };
}

/** HF's `hidden_act` for the SwiGLU MLPs of Qwen3-MoE and Mixtral; only SiLU is implemented. */
export function requireSiluActivation(f: ConfigFields): void {
  const act = f.optionalString('hidden_act', 'silu');
  if (act !== 'silu' && act !== 'swish') {
    throw unsupportedConfig(
      f.source,
      `"hidden_act" is ${JSON.stringify(act)}; moeflash runs SwiGLU experts with "silu" only`,
    );
  }
}

/**
 * The expert count under its own key or under HF's `attribute_map` alias (`num_experts` <->
 * `num_local_experts`), refusing a file that gives both with different values.
 */
export function readExpertCount(f: ConfigFields, key: string, alias: string): number {
  if (f.has(key) && f.has(alias) && f.raw(key) !== f.raw(alias)) {
    throw invalidConfig(
      f.source,
      `"${key}" (${describeValue(f.raw(key))}) and its alias "${alias}" (${describeValue(f.raw(alias))}) disagree`,
    );
  }
  return f.requireInt(!f.has(key) && f.has(alias) ? alias : key);
}

export function checkTopK(f: ConfigFields, topK: number, numExperts: number, expertsKey: string): void {
  if (topK > numExperts) {
    throw invalidConfig(
      f.source,
      `"num_experts_per_tok" (${topK}) must not exceed the number of experts "${expertsKey}" (${numExperts})`,
    );
  }
}

/** Rope types {@link RopeSpec} can describe. */
export const SUPPORTED_ROPE_TYPES = ['default', 'yarn'] as const;

export interface RopeOptions {
  /** HF `default_theta` of the family's config class, used when no `rope_theta` is given. */
  defaultTheta: number;
  /** The family's default `rope_parameters`, used when the file has neither rope dict (gpt-oss). */
  defaultParameters?: Readonly<Record<string, unknown>>;
  headDim: number;
  maxPositionEmbeddings: number;
  /** The model's per-layer attention kinds, to recognise a per-layer-type `rope_parameters`. */
  layerTypes?: readonly string[];
}

/** YaRN's attention scaling as a function of the context extension (`get_mscale` in HF). */
export function yarnMscale(scale: number, mscale = 1): number {
  return scale <= 1 ? 1 : 0.1 * mscale * Math.log(scale) + 1;
}

/**
 * The dict of RoPE parameters HF would end up with. transformers 5 takes `rope_scaling` when it is
 * a non-empty dict and `rope_parameters` otherwise (`convert_rope_params_to_dict`); the family
 * default applies only when the file has neither.
 */
export function selectRopeParameters(f: ConfigFields, opts: RopeOptions): ConfigFields {
  const scaling = f.maybeObject('rope_scaling');
  let chosen: ConfigFields | null = scaling !== null && Object.keys(scaling.data).length > 0 ? scaling : null;
  chosen ??= f.maybeObject('rope_parameters');
  chosen ??= new ConfigFields(opts.defaultParameters ?? {}, f.source, 'rope_parameters (default).');

  // transformers 5 also allows one dict per attention kind, keyed by layer type.
  const keys = Object.keys(chosen.data);
  const layerTypes = new Set(opts.layerTypes ?? []);
  if (keys.length > 0 && layerTypes.size > 0 && keys.every((k) => layerTypes.has(k))) {
    for (const k of keys) {
      if (!isPlainObject(chosen.data[k])) throw chosen.fail(k, 'an object');
    }
    const first = JSON.stringify(chosen.data[keys[0]]);
    if (!keys.every((k) => JSON.stringify(chosen.data[k]) === first)) {
      throw unsupportedConfig(
        f.source,
        `"${chosen.prefix.slice(0, -1)}" gives different RoPE parameters per layer type (${keys.join(', ')}); ` +
          'moeflash supports one RoPE for all layers',
      );
    }
    return chosen.maybeObject(keys[0]) as ConfigFields;
  }
  return chosen;
}

export function readRope(f: ConfigFields, opts: RopeOptions): RopeSpec {
  const rp = selectRopeParameters(f, opts);

  // Precedence as in HF: the value inside the rope dict, then the top-level key, then the default.
  const theta = rp.has('rope_theta')
    ? rp.requireNumber('rope_theta', { positive: true })
    : f.optionalNumber('rope_theta', opts.defaultTheta, { positive: true });
  const type = rp.has('rope_type') ? rp.requireString('rope_type') : rp.optionalString('type', 'default');
  const partial = rp.has('partial_rotary_factor')
    ? rp.requireNumber('partial_rotary_factor', { positive: true, max: 1 })
    : f.optionalNumber('partial_rotary_factor', 1, { positive: true, max: 1 });

  const rotaryDim = Math.floor(opts.headDim * partial);
  if (rotaryDim < 2 || rotaryDim % 2 !== 0) {
    throw invalidConfig(
      f.source,
      `RoPE would rotate ${rotaryDim} of each head's ${opts.headDim} dims ("partial_rotary_factor" ${partial}); ` +
        'the rotated part must be a positive even number of dims',
    );
  }

  if (type === 'default') return { theta, type: 'default', rotaryDim };
  if (type !== 'yarn') {
    throw unsupportedConfig(
      f.source,
      `"${rp.name(rp.has('rope_type') ? 'rope_type' : 'type')}" is ${JSON.stringify(type)}; ` +
        `moeflash supports the RoPE types ${SUPPORTED_ROPE_TYPES.join(', ')}`,
    );
  }

  const originalMaxPositionEmbeddings = rp.has('original_max_position_embeddings')
    ? rp.requireInt('original_max_position_embeddings')
    : f.optionalInt('original_max_position_embeddings', opts.maxPositionEmbeddings);

  // HF requires the key for YaRN; an explicit null asks for the ratio of the context lengths.
  if (!rp.hasKey('factor')) throw rp.fail('factor', 'a positive number (YaRN needs its scaling factor)');
  const factor =
    rp.raw('factor') === null
      ? opts.maxPositionEmbeddings / originalMaxPositionEmbeddings
      : rp.requireNumber('factor', { positive: true });

  let attentionFactor = rp.maybeNumber('attention_factor', { positive: true });
  if (attentionFactor === undefined) {
    const mscale = rp.maybeNumber('mscale');
    const mscaleAllDim = rp.maybeNumber('mscale_all_dim');
    attentionFactor =
      mscale && mscaleAllDim ? yarnMscale(factor, mscale) / yarnMscale(factor, mscaleAllDim) : yarnMscale(factor);
  }

  // HF reads these with `or`, so 0 and null fall back to the paper's defaults too.
  const betaFast = rp.maybeNumber('beta_fast') || 32;
  const betaSlow = rp.maybeNumber('beta_slow') || 1;

  // HF reads `.get("truncate", True)`: absent means true, but an explicit null is falsy.
  const truncate = rp.hasKey('truncate') && rp.raw('truncate') === null ? false : rp.optionalBool('truncate', true);

  return {
    theta,
    type: 'yarn',
    rotaryDim,
    yarn: { factor, betaFast, betaSlow, originalMaxPositionEmbeddings, attentionFactor, truncate },
  };
}

export function attentionSpec(
  dims: AttentionDims,
  rope: RopeSpec,
  maxPositionEmbeddings: number,
  flags: { bias: boolean; qkNorm: boolean; sinks: boolean },
): AttentionSpec {
  return {
    numHeads: dims.numHeads,
    numKvHeads: dims.numKvHeads,
    headDim: dims.headDim,
    bias: flags.bias,
    qkNorm: flags.qkNorm,
    sinks: flags.sinks,
    // Equals HF's `head_dim ** -0.5` once rounded to float32, the precision it is applied in.
    scale: 1 / Math.sqrt(dims.headDim),
    rope,
    maxPositionEmbeddings,
  };
}

export function readTokenIds(
  f: ConfigFields,
  defaults: { bos: number | null; eos: number[] },
): { bosTokenId: number | null; eosTokenIds: number[] } {
  const bosTokenId = f.nullableInt('bos_token_id', defaults.bos, { min: 0 });

  let eosTokenIds: number[];
  const eos = f.raw('eos_token_id');
  if (eos === undefined) {
    eosTokenIds = [...defaults.eos];
  } else if (eos === null) {
    eosTokenIds = [];
  } else if (Array.isArray(eos)) {
    eosTokenIds = f.optionalIntList('eos_token_id', [], { min: 0 });
  } else {
    eosTokenIds = [f.requireInt('eos_token_id', { min: 0 })];
  }
  return { bosTokenId, eosTokenIds: [...new Set(eosTokenIds)] };
}

/** Quantization methods moeflash loads. */
export const SUPPORTED_QUANT_METHODS = ['mxfp4', 'fp8'] as const;

export function readQuantization(f: ConfigFields): ModelSpec['quantization'] {
  const q = f.maybeObject('quantization_config');
  return q === null ? null : readQuantizationObject(q, f.source);
}

function readQuantizationObject(q: ConfigFields, source: string): NonNullable<ModelSpec['quantization']> {
  const method = q.requireString('quant_method');

  if (method === 'mxfp4') {
    const modulesToNotConvert = q.maybeStringList('modules_to_not_convert');
    const out: NonNullable<ModelSpec['quantization']> = modulesToNotConvert === undefined ? { method } : { method, modulesToNotConvert };
    // `moeflash quantize --dense fp8` writes MXFP4 experts with FP8 dense weights; one quant_method
    // cannot say both, so the FP8 part is a nested fp8 config.
    const nested = q.maybeObject('dense_quantization_config');
    if (nested !== null) {
      const dense = readQuantizationObject(nested, source);
      if (dense.method !== 'fp8' || dense.dense) {
        throw unsupportedConfig(source, `"${nested.name('quant_method')}" is ${JSON.stringify(dense.method)}; only a plain "fp8" config can be nested in an mxfp4 one`);
      }
      out.dense = { method: 'fp8', weightBlockSize: dense.weightBlockSize!, ...(dense.modulesToNotConvert ? { modulesToNotConvert: dense.modulesToNotConvert } : {}) };
    }
    return out;
  }

  if (method === 'fp8') {
    const scheme = q.optionalString('activation_scheme', 'dynamic').toLowerCase();
    if (scheme !== 'dynamic') {
      throw unsupportedConfig(
        source,
        `"${q.name('activation_scheme')}" is ${JSON.stringify(scheme)}; moeflash supports FP8 checkpoints with "dynamic" activations only`,
      );
    }
    let weightBlockSize: [number, number] = [128, 128]; // FineGrainedFP8Config's default
    if (q.hasKey('weight_block_size')) {
      const raw = q.raw('weight_block_size');
      if (raw === null) {
        throw unsupportedConfig(
          source,
          `"${q.name('weight_block_size')}" is null (one FP8 scale per tensor); moeflash supports block-scaled FP8 only`,
        );
      }
      const sizes = q.optionalIntList('weight_block_size', []);
      if (sizes.length !== 2) throw q.fail('weight_block_size', 'a list of two positive integers');
      weightBlockSize = [sizes[0], sizes[1]];
    }
    // transformers also accepts `ignored_layers` (the name other tools write) for this list.
    const modulesToNotConvert = q.maybeStringList('modules_to_not_convert') ?? q.maybeStringList('ignored_layers');
    return modulesToNotConvert === undefined ? { method, weightBlockSize } : { method, weightBlockSize, modulesToNotConvert };
  }

  throw unsupportedConfig(
    source,
    `"${q.name('quant_method')}" is ${JSON.stringify(method)}; moeflash loads ${SUPPORTED_QUANT_METHODS.join(', ')} checkpoints ` +
      '(or unquantized ones, without quantization_config)',
  );
}
