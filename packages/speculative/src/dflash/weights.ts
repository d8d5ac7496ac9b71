/**
 * A DFlash drafter's tensors in float32, plus what it shares with its target: the token embedding
 * (the block's input) and the LM head (its output), read from the target's own checkpoint.
 */
import { MoeflashError, openWeights, type MlpWeights, type ModelSpec, type WeightSource } from '@moeflash/core';
import type { DflashConfig } from './config.js';

export interface DflashLayerWeights {
  inputNorm: Float32Array;
  postAttnNorm: Float32Array;
  q: Float32Array;
  k: Float32Array;
  v: Float32Array;
  o: Float32Array;
  qBias: Float32Array | null;
  kBias: Float32Array | null;
  vBias: Float32Array | null;
  oBias: Float32Array | null;
  qNorm: Float32Array;
  kNorm: Float32Array;
  mlp: MlpWeights;
}

export interface DflashWeights {
  /** [hidden, targetLayerIds.length * hidden]: fuses the concatenated target features. */
  fc: Float32Array;
  hiddenNorm: Float32Array;
  norm: Float32Array;
  layers: DflashLayerWeights[];
  /** The target's token embedding [vocab, hidden] and LM head [vocab, hidden]. */
  embed: Float32Array;
  lmHead: Float32Array;
  /**
   * The target's final norm: HF's hidden_states[L] (what a target layer id of L - 1 reads) is the
   * last layer's output after it, while the backend returns the residual stream before it.
   */
  targetNorm: Float32Array | null;
}

export async function tensor(src: WeightSource, name: string, shape: number[]): Promise<Float32Array> {
  if (!src.has(name)) {
    throw new MoeflashError('WEIGHTS_MISSING', `tensor ${name} is missing from ${src.origin}; is this a DFlash drafter checkpoint?`);
  }
  const info = src.info(name);
  if (info.shape.length !== shape.length || info.shape.some((d, i) => d !== shape[i])) {
    throw new MoeflashError(
      'WEIGHTS_INVALID',
      `tensor ${name} in ${info.file} has shape [${info.shape}] but config.json implies [${shape}]; the weights and config.json do not belong together`,
    );
  }
  const data = await src.readFloat32(name);
  // Block-scaled FP8 (DeepSeek-V3 style) carries a float32 scale per 128 x 128 tile.
  const scaleName = `${name}_scale_inv`;
  if (shape.length === 2 && src.has(scaleName)) {
    const sInfo = src.info(scaleName);
    const scale = await src.readFloat32(scaleName);
    const [rows, cols] = shape as [number, number];
    const br = Math.ceil(rows / sInfo.shape[0]!);
    const bc = Math.ceil(cols / sInfo.shape[1]!);
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) data[r * cols + c]! *= scale[Math.floor(r / br) * sInfo.shape[1]! + Math.floor(c / bc)]!;
    }
  }
  return data;
}

async function optional(src: WeightSource, name: string, shape: number[]): Promise<Float32Array | null> {
  return src.has(name) ? tensor(src, name, shape) : null;
}

/** Released checkpoints name tensors bare (`fc.weight`); some exporters add `model.`. */
export function prefixOf(src: WeightSource): string {
  if (src.has('fc.weight')) return '';
  if (src.has('model.fc.weight')) return 'model.';
  throw new MoeflashError('WEIGHTS_MISSING', `${src.origin} holds no fc.weight: it is not a DFlash drafter checkpoint (expected fc.weight, hidden_norm.weight, layers.N.*, norm.weight)`);
}

export async function loadDflashWeights(cfg: DflashConfig, draftDir: string, targetDir: string, target: ModelSpec): Promise<DflashWeights> {
  const H = cfg.hiddenSize;
  const V = target.vocabSize;
  const qDim = cfg.numHeads * cfg.headDim;
  const kvDim = cfg.numKvHeads * cfg.headDim;
  const I = cfg.intermediateSize;
  const src = await openWeights(draftDir);
  let layers: DflashLayerWeights[];
  let fc: Float32Array, hiddenNorm: Float32Array, norm: Float32Array;
  try {
    const p = prefixOf(src);
    fc = await tensor(src, `${p}fc.weight`, [H, cfg.targetLayerIds.length * target.hiddenSize]);
    hiddenNorm = await tensor(src, `${p}hidden_norm.weight`, [H]);
    norm = await tensor(src, `${p}norm.weight`, [H]);
    layers = [];
    for (let l = 0; l < cfg.numLayers; l++) {
      const at = `${p}layers.${l}.self_attn`;
      const ml = `${p}layers.${l}.mlp`;
      layers.push({
        inputNorm: await tensor(src, `${p}layers.${l}.input_layernorm.weight`, [H]),
        postAttnNorm: await tensor(src, `${p}layers.${l}.post_attention_layernorm.weight`, [H]),
        q: await tensor(src, `${at}.q_proj.weight`, [qDim, H]),
        k: await tensor(src, `${at}.k_proj.weight`, [kvDim, H]),
        v: await tensor(src, `${at}.v_proj.weight`, [kvDim, H]),
        o: await tensor(src, `${at}.o_proj.weight`, [H, qDim]),
        qBias: cfg.attentionBias ? await tensor(src, `${at}.q_proj.bias`, [qDim]) : await optional(src, `${at}.q_proj.bias`, [qDim]),
        kBias: cfg.attentionBias ? await tensor(src, `${at}.k_proj.bias`, [kvDim]) : await optional(src, `${at}.k_proj.bias`, [kvDim]),
        vBias: cfg.attentionBias ? await tensor(src, `${at}.v_proj.bias`, [kvDim]) : await optional(src, `${at}.v_proj.bias`, [kvDim]),
        oBias: cfg.attentionBias ? await tensor(src, `${at}.o_proj.bias`, [H]) : await optional(src, `${at}.o_proj.bias`, [H]),
        qNorm: await tensor(src, `${at}.q_norm.weight`, [cfg.headDim]),
        kNorm: await tensor(src, `${at}.k_norm.weight`, [cfg.headDim]),
        mlp: {
          gate: await tensor(src, `${ml}.gate_proj.weight`, [I, H]),
          up: await tensor(src, `${ml}.up_proj.weight`, [I, H]),
          down: await tensor(src, `${ml}.down_proj.weight`, [H, I]),
          gateBias: null,
          upBias: null,
          downBias: null,
          inter: I,
          hidden: H,
        },
      });
    }
  } finally {
    await src.close();
  }

  const tsrc = await openWeights(targetDir);
  try {
    const embed = await tensor(tsrc, 'model.embed_tokens.weight', [V, target.hiddenSize]);
    let lmHead: Float32Array;
    if (tsrc.has('lm_head.weight')) lmHead = await tensor(tsrc, 'lm_head.weight', [V, target.hiddenSize]);
    else if (target.tieWordEmbeddings) lmHead = embed;
    else throw new MoeflashError('WEIGHTS_MISSING', `tensor lm_head.weight is missing from ${tsrc.origin} and its config.json does not tie it to the embedding`);
    const needsNorm = cfg.targetLayerIds.includes(target.numLayers - 1);
    const targetNorm = needsNorm ? await tensor(tsrc, 'model.norm.weight', [target.hiddenSize]) : null;
    return { fc, hiddenNorm, norm, layers, embed, lmHead, targetNorm };
  } finally {
    await tsrc.close();
  }
}
