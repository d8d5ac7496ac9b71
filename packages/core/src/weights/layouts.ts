import { MoeflashError } from '../errors.js';
import type { MlpWeights } from '../math/experts.js';
import { splitKvB, type MlaWeights } from '../math/mla.js';
import type { ModelSpec } from '../model/spec.js';
import type { LoadProgress } from '../backends/backend.js';
import { dequantizeMxfp4Rows } from './mxfp4.js';
import { mtpTensorNames } from './mtp.js';
import type { WeightSource } from './tensor.js';

/**
 * Every family's checkpoint, brought to one canonical float32 form:
 * matrices row-major [out, in]; experts as separate gate / up / down.
 */
export interface AttentionWeights {
  q: Float32Array; k: Float32Array; v: Float32Array; o: Float32Array;
  qBias: Float32Array | null; kBias: Float32Array | null; vBias: Float32Array | null; oBias: Float32Array | null;
  qNorm: Float32Array | null; kNorm: Float32Array | null;
  sinks: Float32Array | null;
}

export interface LayerWeights {
  inputNorm: Float32Array;
  postAttnNorm: Float32Array;
  /**
   * Grouped-query attention (every family but deepseek_v3). Where {@link mla} holds the layer's
   * attention this is {@link NO_ATTENTION}, all arrays empty.
   */
  attn: AttentionWeights;
  /** Multi-head latent attention (deepseek_v3), else null. */
  mla: MlaWeights | null;
  /**
   * `bias` joins the logits (gpt-oss); `correctionBias` (deepseek_v3's `e_score_correction_bias`)
   * only steers which experts are chosen.
   */
  router: { weight: Float32Array; bias: Float32Array | null; correctionBias?: Float32Array | null } | null;
  experts: MlpWeights[] | null;
  /** Shared experts every token goes through (deepseek_v3), as one MLP. */
  shared?: MlpWeights | null;
  dense: MlpWeights | null;
}

export interface ModelWeights {
  embed: Float32Array;
  lmHead: Float32Array;
  finalNorm: Float32Array;
  layers: LayerWeights[];
}

/** The `attn` of a latent-attention layer: no grouped-query weights (zero-length arrays). */
export const NO_ATTENTION: Readonly<AttentionWeights> = Object.freeze({
  q: new Float32Array(0), k: new Float32Array(0), v: new Float32Array(0), o: new Float32Array(0),
  qBias: null, kBias: null, vBias: null, oBias: null, qNorm: null, kNorm: null, sinks: null,
});

/** Where a layer's MoE block keeps its experts, and in which form. */
export type ExpertLayout =
  | { kind: 'mxfp4-fused'; prefix: string }
  | { kind: 'fused'; prefix: string }
  | { kind: 'per-expert'; prefix: string; names: [gate: string, up: string, down: string] };

/** Finds the expert layout of one MoE layer among those found in the wild (DESIGN.md, "Model families"). */
export function detectExpertLayout(src: WeightSource, layer: number): ExpertLayout {
  const candidates = [`model.layers.${layer}.mlp`, `model.layers.${layer}.block_sparse_moe`];
  for (const p of candidates) {
    if (src.has(`${p}.experts.gate_up_proj_blocks`)) return { kind: 'mxfp4-fused', prefix: p };
    if (src.has(`${p}.experts.gate_up_proj`)) return { kind: 'fused', prefix: p };
    if (src.has(`${p}.experts.0.gate_proj.weight`)) return { kind: 'per-expert', prefix: p, names: ['gate_proj', 'up_proj', 'down_proj'] };
    if (src.has(`${p}.experts.0.w1.weight`)) return { kind: 'per-expert', prefix: p, names: ['w1', 'w3', 'w2'] };
  }
  throw new MoeflashError(
    'WEIGHTS_MISSING',
    `layer ${layer}: no expert weights found in ${src.origin} (looked for ${candidates
      .map((p) => `${p}.experts.{gate_up_proj,gate_up_proj_blocks,0.gate_proj.weight,0.w1.weight}`)
      .join(', ')}); is this checkpoint of the family its config.json declares?`,
  );
}

class Reader {
  loadedBytes = 0;
  loadedTensors = 0;
  constructor(
    readonly src: WeightSource,
    readonly totalBytes: number,
    readonly totalTensors: number,
    readonly onProgress?: (p: LoadProgress) => void,
    /** FP8 scale blocks [rows, cols]: config.json's `weight_block_size` (edge blocks are partial). */
    readonly fp8Block: [number, number] = [128, 128],
  ) {}

  private tick(name: string): void {
    const info = this.src.info(name);
    this.loadedBytes += info.byteLength;
    this.loadedTensors++;
    this.onProgress?.({
      tensor: name,
      loadedBytes: this.loadedBytes,
      totalBytes: this.totalBytes,
      loadedTensors: this.loadedTensors,
      totalTensors: this.totalTensors,
    });
  }

  expectShape(name: string, shape: number[]): void {
    const info = this.src.info(name);
    if (info.shape.length !== shape.length || info.shape.some((d, i) => d !== shape[i])) {
      throw new MoeflashError(
        'WEIGHTS_INVALID',
        `tensor ${name} in ${info.file} has shape [${info.shape}] but the model's config.json implies [${shape}]; the weights and config.json do not belong together`,
      );
    }
  }

  /** A float tensor of the given shape, decoded to float32; FP8 block scales applied when present. */
  async float(name: string, shape: number[]): Promise<Float32Array> {
    this.expectShape(name, shape);
    const data = await this.src.readFloat32(name);
    this.tick(name);
    const scaleName = `${name}_scale_inv`;
    if (this.src.has(scaleName) && shape.length === 2) {
      const sinfo = this.src.info(scaleName);
      const scale = await this.src.readFloat32(scaleName);
      this.tick(scaleName);
      const [rows, cols] = shape;
      const bCols = sinfo.shape[1];
      // The block size cannot be recovered from the shapes: with partial edge blocks, rows / scale
      // rows is not the block height (2880 rows in 128-row blocks give 23 scale rows, and 2880 / 23
      // is not 128).
      const [br, bc] = this.fp8Block;
      if (sinfo.shape.length !== 2 || sinfo.shape[0] !== Math.ceil(rows / br) || bCols !== Math.ceil(cols / bc)) {
        throw new MoeflashError(
          'WEIGHTS_INVALID',
          `tensor ${scaleName} in ${sinfo.file} has shape [${sinfo.shape}] but a [${shape}] weight in ${br}x${bc} blocks needs [${Math.ceil(rows / br)},${Math.ceil(cols / bc)}]; check weight_block_size in config.json`,
        );
      }
      for (let r = 0; r < rows; r++) {
        for (let c = 0; c < cols; c++) data[r * cols + c] *= scale[Math.floor(r / br) * bCols + Math.floor(c / bc)];
      }
    }
    return data;
  }

  async optional(name: string, shape: number[]): Promise<Float32Array | null> {
    return this.src.has(name) ? this.float(name, shape) : null;
  }

  async bytes(name: string, shape: number[]): Promise<Uint8Array> {
    this.expectShape(name, shape);
    const info = this.src.info(name);
    if (info.dtype !== 'U8') {
      throw new MoeflashError('WEIGHTS_INVALID', `tensor ${name} in ${info.file} has dtype ${info.dtype}; MXFP4 blocks and scales are stored as U8`);
    }
    const data = await this.src.read(name);
    this.tick(name);
    return data;
  }
}

/** The tensors a load will read, to size progress reports before reading. */
function tensorsToRead(src: WeightSource, skipped: ReadonlySet<string>): string[] {
  return src.names().filter((n) => !n.includes('rotary_emb') && !skipped.has(n));
}

/**
 * Reads a checkpoint of any supported family and layout into canonical float32 weights.
 * Multi-token-prediction layers stored with the model are skipped, with one `log` line.
 */
export async function loadModelWeights(
  spec: ModelSpec,
  src: WeightSource,
  onProgress?: (p: LoadProgress) => void,
  log?: (line: string) => void,
): Promise<ModelWeights> {
  const mtp = mtpTensorNames(spec, src);
  if (mtp.length > 0) {
    log?.(
      `moeflash: ignoring ${mtp.length} tensors of the multi-token-prediction layer${spec.mtpLayers === 1 ? '' : 's'} ` +
        `(model.layers.${spec.numLayers}${spec.mtpLayers === 1 ? '' : `..${spec.numLayers + spec.mtpLayers! - 1}`}, num_nextn_predict_layers ${spec.mtpLayers}): they are not part of the forward pass`,
    );
  }
  const names = tensorsToRead(src, new Set(mtp));
  const total = names.reduce((s, n) => s + src.info(n).byteLength, 0);
  const q = spec.quantization;
  const fp8Block = q?.method === 'fp8' ? q.weightBlockSize : q?.dense?.weightBlockSize;
  const rd = new Reader(src, total, names.length, onProgress, fp8Block);
  const H = spec.hiddenSize;
  const V = spec.vocabSize;
  const a = spec.attention;

  const embed = await rd.float('model.embed_tokens.weight', [V, H]);
  const finalNorm = await rd.float('model.norm.weight', [H]);
  let lmHead: Float32Array;
  if (src.has('lm_head.weight')) lmHead = await rd.float('lm_head.weight', [V, H]);
  else if (spec.tieWordEmbeddings) lmHead = embed;
  else {
    throw new MoeflashError('WEIGHTS_MISSING', `tensor lm_head.weight is missing from ${src.origin} and config.json does not set tie_word_embeddings; the checkpoint is incomplete`);
  }

  const layers: LayerWeights[] = [];
  for (let l = 0; l < spec.numLayers; l++) {
    const p = `model.layers.${l}`;
    const at = `${p}.self_attn`;
    const layer: LayerWeights = {
      inputNorm: await rd.float(`${p}.input_layernorm.weight`, [H]),
      postAttnNorm: await rd.float(`${p}.post_attention_layernorm.weight`, [H]),
      attn: a.mla ? NO_ATTENTION : await loadAttention(rd, spec, at),
      mla: a.mla ? await loadMla(rd, spec, at) : null,
      router: null,
      experts: null,
      dense: null,
    };
    if (spec.layers[l].mlp === 'dense') {
      const I = spec.denseIntermediateSize!;
      layer.dense = await loadMlp(rd, `${p}.mlp`, I, H);
    } else {
      const layout = detectExpertLayout(src, l);
      layer.router = await loadRouter(rd, spec, layout.prefix);
      layer.experts = await loadExperts(rd, spec, layout);
      const shared = spec.moe.sharedExperts;
      if (shared) layer.shared = await loadMlp(rd, `${layout.prefix}.shared_experts`, shared.count * shared.intermediateSize, H);
    }
    layers.push(layer);
  }
  return { embed, lmHead, finalNorm, layers };
}

/** A SwiGLU MLP stored as `{prefix}.{gate,up,down}_proj.weight` (dense layers, shared experts). */
async function loadMlp(rd: Reader, prefix: string, inter: number, hidden: number): Promise<MlpWeights> {
  return {
    gate: await rd.float(`${prefix}.gate_proj.weight`, [inter, hidden]),
    up: await rd.float(`${prefix}.up_proj.weight`, [inter, hidden]),
    down: await rd.float(`${prefix}.down_proj.weight`, [hidden, inter]),
    gateBias: null, upBias: null, downBias: null, inter, hidden,
  };
}

/** deepseek_v3's latent attention projections (names as HF's DeepseekV3Attention has them). */
async function loadMla(rd: Reader, spec: ModelSpec, at: string): Promise<MlaWeights> {
  const H = spec.hiddenSize;
  const a = spec.attention;
  const m = a.mla!;
  const qDim = a.numHeads * a.headDim;
  const q = m.qLoraRank === null ? await rd.float(`${at}.q_proj.weight`, [qDim, H]) : null;
  const qA = m.qLoraRank === null ? null : await rd.float(`${at}.q_a_proj.weight`, [m.qLoraRank, H]);
  const qANorm = m.qLoraRank === null ? null : await rd.float(`${at}.q_a_layernorm.weight`, [m.qLoraRank]);
  const qB = m.qLoraRank === null ? null : await rd.float(`${at}.q_b_proj.weight`, [qDim, m.qLoraRank]);
  const kvA = await rd.float(`${at}.kv_a_proj_with_mqa.weight`, [m.kvLoraRank + m.qkRopeHeadDim, H]);
  const kvANorm = await rd.float(`${at}.kv_a_layernorm.weight`, [m.kvLoraRank]);
  const kvB = await rd.float(`${at}.kv_b_proj.weight`, [a.numHeads * (m.qkNopeHeadDim + m.vHeadDim), m.kvLoraRank]);
  const o = await rd.float(`${at}.o_proj.weight`, [H, a.numHeads * m.vHeadDim]);
  return { q, qA, qANorm, qB, kvA, kvANorm, ...splitKvB(kvB, a.numHeads, m), o };
}

async function loadAttention(rd: Reader, spec: ModelSpec, at: string): Promise<AttentionWeights> {
  const H = spec.hiddenSize;
  const a = spec.attention;
  const qDim = a.numHeads * a.headDim;
  const kvDim = a.numKvHeads * a.headDim;
  return {
      q: await rd.float(`${at}.q_proj.weight`, [qDim, H]),
      k: await rd.float(`${at}.k_proj.weight`, [kvDim, H]),
      v: await rd.float(`${at}.v_proj.weight`, [kvDim, H]),
      o: await rd.float(`${at}.o_proj.weight`, [H, qDim]),
      qBias: await rd.optional(`${at}.q_proj.bias`, [qDim]),
      kBias: await rd.optional(`${at}.k_proj.bias`, [kvDim]),
      vBias: await rd.optional(`${at}.v_proj.bias`, [kvDim]),
      oBias: await rd.optional(`${at}.o_proj.bias`, [H]),
      qNorm: a.qkNorm ? await rd.float(`${at}.q_norm.weight`, [a.headDim]) : null,
      kNorm: a.qkNorm ? await rd.float(`${at}.k_norm.weight`, [a.headDim]) : null,
      sinks: a.sinks ? await rd.float(`${at}.sinks`, [a.numHeads]) : null,
  };
}

async function loadRouter(rd: Reader, spec: ModelSpec, prefix: string): Promise<LayerWeights['router']> {
  const E = spec.moe.numExperts;
  const H = spec.hiddenSize;
  const name = rd.src.has(`${prefix}.router.weight`) ? `${prefix}.router` : `${prefix}.gate`;
  return {
    weight: await rd.float(`${name}.weight`, [E, H]),
    bias: spec.moe.routerBias ? await rd.float(`${name}.bias`, [E]) : await rd.optional(`${name}.bias`, [E]),
    ...(spec.moe.rule === 'sigmoid_grouped_topk' ? { correctionBias: await rd.float(`${name}.e_score_correction_bias`, [E]) } : {}),
  };
}

/**
 * Fused gate/up rows come in two orders: gpt-oss interleaves them (row 2j gate, 2j+1 up); the
 * transformers-5 layout of the other families puts all gate rows first.
 */
function splitGateUp(gu: Float32Array, inter: number, hidden: number, interleaved: boolean): [Float32Array, Float32Array] {
  const gate = new Float32Array(inter * hidden);
  const up = new Float32Array(inter * hidden);
  for (let j = 0; j < inter; j++) {
    const gRow = interleaved ? 2 * j : j;
    const uRow = interleaved ? 2 * j + 1 : inter + j;
    gate.set(gu.subarray(gRow * hidden, (gRow + 1) * hidden), j * hidden);
    up.set(gu.subarray(uRow * hidden, (uRow + 1) * hidden), j * hidden);
  }
  return [gate, up];
}

function splitBias(b: Float32Array | null, inter: number, interleaved: boolean): [Float32Array | null, Float32Array | null] {
  if (!b) return [null, null];
  const g = new Float32Array(inter);
  const u = new Float32Array(inter);
  for (let j = 0; j < inter; j++) {
    g[j] = interleaved ? b[2 * j] : b[j];
    u[j] = interleaved ? b[2 * j + 1] : b[inter + j];
  }
  return [g, u];
}

function transpose(m: Float32Array, rows: number, cols: number): Float32Array {
  const t = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) t[c * rows + r] = m[r * cols + c];
  return t;
}

async function loadExperts(rd: Reader, spec: ModelSpec, layout: ExpertLayout): Promise<MlpWeights[]> {
  const E = spec.moe.numExperts;
  const H = spec.hiddenSize;
  const I = spec.moe.intermediateSize;
  const interleaved = spec.family === 'gpt_oss';
  const ex = `${layout.prefix}.experts`;
  const experts: MlpWeights[] = [];

  // gpt-oss experts carry biases in every layout; per-expert weights keep them fused ([E, 2I], [E, H]).
  const readBiases = async () => ({
    guBias: spec.moe.expertBias ? await rd.float(`${ex}.gate_up_proj_bias`, [E, 2 * I]) : await rd.optional(`${ex}.gate_up_proj_bias`, [E, 2 * I]),
    dBias: spec.moe.expertBias ? await rd.float(`${ex}.down_proj_bias`, [E, H]) : await rd.optional(`${ex}.down_proj_bias`, [E, H]),
  });

  if (layout.kind === 'per-expert') {
    const [g, u, d] = layout.names;
    const { guBias, dBias } = await readBiases();
    for (let j = 0; j < E; j++) {
      const [gateBias, upBias] = splitBias(guBias ? guBias.subarray(j * 2 * I, (j + 1) * 2 * I) : null, I, interleaved);
      experts.push({
        gate: await rd.float(`${ex}.${j}.${g}.weight`, [I, H]),
        up: await rd.float(`${ex}.${j}.${u}.weight`, [I, H]),
        down: await rd.float(`${ex}.${j}.${d}.weight`, [H, I]),
        gateBias, upBias,
        downBias: dBias ? dBias.slice(j * H, (j + 1) * H) : null,
        inter: I, hidden: H,
      });
    }
    return experts;
  }

  let gateUp: Float32Array; // [E, 2I, H]
  let down: Float32Array; // [E, H, I]
  if (layout.kind === 'mxfp4-fused') {
    const gub = await rd.bytes(`${ex}.gate_up_proj_blocks`, [E, 2 * I, H / 32, 16]);
    const gus = await rd.bytes(`${ex}.gate_up_proj_scales`, [E, 2 * I, H / 32]);
    const db = await rd.bytes(`${ex}.down_proj_blocks`, [E, H, I / 32, 16]);
    const ds = await rd.bytes(`${ex}.down_proj_scales`, [E, H, I / 32]);
    gateUp = dequantizeMxfp4Rows(gub, gus, E * 2 * I, H);
    down = dequantizeMxfp4Rows(db, ds, E * H, I);
  } else {
    // gpt-oss keeps its dequantized experts as x @ W ([E, H, 2I]); the other families as W x ([E, 2I, H]).
    const info = rd.src.info(`${ex}.gate_up_proj`);
    const inputMajor = info.shape[1] === H && info.shape[2] === 2 * I && (interleaved || 2 * I !== H);
    if (inputMajor) {
      const t = await rd.float(`${ex}.gate_up_proj`, [E, H, 2 * I]);
      const d = await rd.float(`${ex}.down_proj`, [E, I, H]);
      gateUp = new Float32Array(E * 2 * I * H);
      down = new Float32Array(E * H * I);
      for (let j = 0; j < E; j++) {
        gateUp.set(transpose(t.subarray(j * H * 2 * I, (j + 1) * H * 2 * I), H, 2 * I), j * 2 * I * H);
        down.set(transpose(d.subarray(j * I * H, (j + 1) * I * H), I, H), j * H * I);
      }
    } else {
      gateUp = await rd.float(`${ex}.gate_up_proj`, [E, 2 * I, H]);
      down = await rd.float(`${ex}.down_proj`, [E, H, I]);
    }
  }
  const { guBias, dBias } = await readBiases();
  for (let j = 0; j < E; j++) {
    const [gate, up] = splitGateUp(gateUp.subarray(j * 2 * I * H, (j + 1) * 2 * I * H), I, H, interleaved);
    const [gateBias, upBias] = splitBias(guBias ? guBias.subarray(j * 2 * I, (j + 1) * 2 * I) : null, I, interleaved);
    experts.push({
      gate, up,
      down: down.slice(j * H * I, (j + 1) * H * I),
      gateBias, upBias,
      downBias: dBias ? dBias.slice(j * H, (j + 1) * H) : null,
      inter: I, hidden: H,
    });
  }
  return experts;
}
