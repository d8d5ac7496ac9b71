/**
 * The `config.json` of a published DFlash drafter (z-lab, e.g. z-lab/Qwen3-8B-DFlash-b16,
 * z-lab/Qwen3-Coder-30B-A3B-DFlash, z-lab/gpt-oss-20b-DFlash): a Qwen3 config
 * (`model_type: "qwen3"`, `architectures: ["DFlashDraftModel"]`) plus the drafter's own fields,
 * read as z-lab's reference `DFlashDraftModel` reads them. README.md lists every field used.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { MoeflashError, parseModelConfig, type RopeSpec } from '@moeflash/core';

export interface DflashConfig {
  source: string;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  intermediateSize: number;
  rmsNormEps: number;
  attentionBias: boolean;
  rope: RopeSpec;
  /** Per draft layer: null for full attention, else the sliding window (keys within window - 1 positions). */
  windows: (number | null)[];
  /** Attention inside the block is bidirectional unless the config sets `is_causal: true`. */
  causal: boolean;
  /** Block the drafter was trained on: the anchor token and blockSize - 1 masks. */
  blockSize: number;
  maskTokenId: number;
  /** Target layers (0-based) whose outputs, concatenated in this order, are the context feature. */
  targetLayerIds: number[];
  numTargetLayers: number | null;
  vocabSize: number;
  /** Optional scalings of later z-lab drafters (identity when absent). */
  inputEmbeddingScale: number;
  outputMultiplier: number;
  finalLogitSoftcapping: number | null;
}

function invalid(source: string, message: string): MoeflashError {
  return new MoeflashError('CONFIG_INVALID', `${source}: ${message}`);
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * z-lab's `build_target_layer_ids`: one layer in the middle for a one-layer drafter, else evenly
 * from layer 1 to layer numTargetLayers - 3. Targets too shallow for that range (test models) get
 * layers spread evenly over all of them.
 */
export function defaultTargetLayerIds(numTargetLayers: number, numDraftLayers: number): number[] {
  if (numDraftLayers === 1) return [Math.floor(numTargetLayers / 2)];
  const start = 1;
  const end = numTargetLayers - 3;
  if (end > start) {
    const span = end - start;
    return Array.from({ length: numDraftLayers }, (_, i) => Math.round(start + (i * span) / (numDraftLayers - 1)));
  }
  return Array.from({ length: numDraftLayers }, (_, i) =>
    Math.min(numTargetLayers - 1, Math.round((i * (numTargetLayers - 1)) / (numDraftLayers - 1))),
  );
}

/** Parses a DFlash drafter's config.json contents. */
export function parseDflashConfig(json: unknown, source: string): DflashConfig {
  if (!isObject(json)) throw invalid(source, 'expected a JSON object at the top level');
  const arch = Array.isArray(json.architectures) ? json.architectures.map(String) : [];
  if (arch.some((a) => a !== 'DFlashDraftModel')) {
    throw new MoeflashError(
      'CONFIG_UNSUPPORTED',
      `${source}: architectures ${JSON.stringify(arch)}; moeflash runs "DFlashDraftModel" drafters (DFlash 2's convolutions and candidate selector are not implemented)`,
    );
  }
  const d = isObject(json.dflash_config) ? json.dflash_config : {};
  const pick = (key: string): unknown => (d[key] !== undefined ? d[key] : json[key]);
  const int = (key: string, value: unknown, min = 0): number => {
    if (!Number.isSafeInteger(value) || (value as number) < min) throw invalid(source, `"${key}" must be an integer >= ${min}; got ${JSON.stringify(value)}`);
    return value as number;
  };
  const num = (key: string, value: unknown, fallback: number): number => {
    if (value === undefined || value === null) return fallback;
    if (typeof value !== 'number' || !Number.isFinite(value)) throw invalid(source, `"${key}" must be a number; got ${JSON.stringify(value)}`);
    return value;
  };

  // The attention shape and RoPE mean here what they mean to a Qwen3 model: reuse core's reading
  // of them through a Qwen3-MoE config whose every layer is dense.
  const numLayers = int('num_hidden_layers', json.num_hidden_layers, 1);
  const asQwen: Record<string, unknown> = {
    ...json,
    model_type: 'qwen3_moe',
    num_experts: 1,
    num_experts_per_tok: 1,
    moe_intermediate_size: 1,
    mlp_only_layers: Array.from({ length: numLayers }, (_, i) => i),
  };
  delete asQwen.quantization_config;
  const spec = parseModelConfig(asQwen, source);
  if (typeof json.hidden_act === 'string' && json.hidden_act !== 'silu') {
    throw new MoeflashError('CONFIG_UNSUPPORTED', `${source}: "hidden_act" is ${JSON.stringify(json.hidden_act)}; DFlash drafters use "silu"`);
  }

  const layerTypes = Array.isArray(json.layer_types) ? json.layer_types.map(String) : null;
  if (layerTypes && layerTypes.length !== numLayers) {
    throw invalid(source, `"layer_types" has ${layerTypes.length} entries for ${numLayers} layers`);
  }
  const window = json.sliding_window === null || json.sliding_window === undefined ? null : int('sliding_window', json.sliding_window, 1);
  // Qwen3Config derives layer_types when absent: sliding from max_window_layers on, if enabled.
  const maxWindowLayers = json.max_window_layers === undefined ? 28 : int('max_window_layers', json.max_window_layers);
  const windows = Array.from({ length: numLayers }, (_, i) => {
    const sliding = layerTypes ? layerTypes[i] === 'sliding_attention' : json.use_sliding_window === true && i >= maxWindowLayers;
    if (!sliding) return null;
    if (window === null) throw invalid(source, `layer ${i} is "sliding_attention" but "sliding_window" is not set`);
    return window;
  });

  const maskRaw = pick('mask_token_id');
  if (maskRaw === undefined || maskRaw === null) {
    throw invalid(source, '"dflash_config.mask_token_id" is missing: the drafter cannot fill a block without its mask token');
  }
  const maskTokenId = int('dflash_config.mask_token_id', maskRaw);
  const blockRaw = pick('block_size');
  const blockSize = blockRaw === undefined || blockRaw === null ? 16 : int('block_size', blockRaw, 2);
  const numTargetRaw = pick('num_target_layers');
  const numTargetLayers = numTargetRaw === undefined || numTargetRaw === null ? null : int('num_target_layers', numTargetRaw, 1);
  const idsRaw = pick('target_layer_ids');
  let targetLayerIds: number[];
  if (Array.isArray(idsRaw)) {
    targetLayerIds = idsRaw.map((v, i) => int(`dflash_config.target_layer_ids[${i}]`, v));
  } else if (numTargetLayers !== null) {
    targetLayerIds = defaultTargetLayerIds(numTargetLayers, numLayers);
  } else {
    throw invalid(source, '"dflash_config.target_layer_ids" is missing and there is no "num_target_layers" to derive it from');
  }
  if (targetLayerIds.length === 0) throw invalid(source, '"dflash_config.target_layer_ids" is empty');
  const softcap = pick('final_logit_softcapping');

  const a = spec.attention;
  return {
    source,
    hiddenSize: spec.hiddenSize,
    numLayers,
    numHeads: a.numHeads,
    numKvHeads: a.numKvHeads,
    headDim: a.headDim,
    intermediateSize: spec.denseIntermediateSize!,
    rmsNormEps: spec.rmsNormEps,
    attentionBias: a.bias,
    rope: a.rope,
    windows,
    causal: json.is_causal === true,
    blockSize,
    maskTokenId,
    targetLayerIds,
    numTargetLayers,
    vocabSize: spec.vocabSize,
    inputEmbeddingScale: num('input_embedding_scale', pick('input_embedding_scale'), 1),
    outputMultiplier: num('output_multiplier', pick('output_multiplier'), 1),
    finalLogitSoftcapping: softcap === undefined || softcap === null || softcap === 0 ? null : num('final_logit_softcapping', softcap, 0),
  };
}

/** Reads `<dir>/config.json` of a DFlash drafter. */
export async function loadDflashConfig(dir: string): Promise<DflashConfig> {
  const file = path.join(path.resolve(dir), 'config.json');
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw new MoeflashError('CONFIG_INVALID', `${file} cannot be read (${(e as Error).message}); options.draft must be a DFlash drafter folder (config.json + model.safetensors)`, { cause: e });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new MoeflashError('CONFIG_INVALID', `${file} is not valid JSON: ${(e as Error).message}`, { cause: e });
  }
  return parseDflashConfig(json, file);
}
