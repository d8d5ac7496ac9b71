/**
 * The CUDA backend: {@link CudaBackend} loads a checkpoint onto one GPU and {@link CudaModel} runs
 * steps on it. Weights, the paged KV cache and one activation arena are reserved at load (all or
 * nothing); a step is one call into the addon and allocates no device memory, except that the
 * first step that samples on the device (StepSequence.sample) reserves sample_rows' buffers.
 *
 * ```
 *  WeightSource ──> plan (offsets) ──> native Model (weights | KV pages | arena) ──> upload tensors
 *  StepPlan ──> chunks of <= maxStepTokens rows ──> Model.step(inputs) ──> ids, logits, hidden
 *                (pages, slots, block tables here)      (a CUDA graph when it is a decode step)
 * ```
 */
import {
  MoeflashError,
  detectExpertLayout,
  footprint,
  rngKey,
  ropeTable,
  seedKey,
  validateSamplingParams,
  type Backend,
  type DeviceInfo,
  type KvPageStats,
  type LoadedModel,
  type LoadOptions,
  type MemoryReport,
  type ModelSpec,
  type DeviceDrafterInfo,
  type DeviceDrafterSpec,
  type RoutingTrace,
  type SeqId,
  type SequenceOutput,
  type StepPlan,
  type StepResult,
  type StepSample,
  type WeightSource,
} from '@moeflash/core';

import { bf16Array } from './bf16.js';
import { MAX_DEVICE_BLOCK, planDrafter } from './drafter.js';
import { isCudaAvailable, loadAddon, translateNativeError, type NativeModel } from './native.js';

/** Options of {@link CudaBackend.load} beyond core's LoadOptions. */
export interface CudaLoadOptions extends LoadOptions {
  /** Sequences whose caches can be held at once at full length (default 8). */
  maxSequences?: number;
  /** Most tokens one native call runs; longer steps are split (default 256). */
  maxStepTokens?: number;
  /** KV page size in positions (default 16). */
  pageSize?: number;
  /**
   * How experts stored as floats (bf16, fp16, fp32) are held on the device. Experts stored as
   * MXFP4 are uploaded as stored under every value.
   *
   * - `auto` (the default): quantized to MXFP4 while they are streamed to the device, with
   *   @moeflash/quant's OCP scale rule (the bytes `moeflash quantize` writes): about a quarter of
   *   the bytes and the fast kernels. Where the MXFP4 kernels do not take the shapes (hidden and
   *   expert widths must be multiples of 32), for FP8 experts, or without @moeflash/quant, they
   *   stay bf16 with one log line saying why ({@link CudaModel.expertLoad} reports it too).
   * - `stored`: kept bf16 (logits exact against the CPU backend and HF references).
   * - `mxfp4`: quantized, and an error where that is impossible.
   *
   * Unset: the MOEFLASH_CUDA_EXPERTS environment variable (`auto`, `stored` or `mxfp4`), else `auto`.
   */
  experts?: CudaExpertsOption;
  /**
   * The arithmetic precision of what the kernels keep between operations.
   *
   * - `f32`: the KV cache holds float32 and the MXFP4 experts take float32 activations (CUDA-core
   *   kernels), as the CPU reference does: logits within ~1e-5 of it, so routing near-ties go the
   *   way the reference goes. Twice the KV bytes, and no tensor-core experts or fused attention.
   * - `bf16`: keys and values rounded to bf16 in the cache, activations rounded to bf16 into the
   *   tensor-core experts: the fast path, ~3e-3 from the reference.
   * - `auto` (the default): `f32` for models under 1 B parameters (test and bundled models, whose
   *   steps are bound by launches, not bytes), `bf16` from 1 B on.
   *
   * The residual stream, norms, router logits and top-k are float32 under both.
   * Unset: the MOEFLASH_CUDA_PRECISION environment variable (`auto`, `bf16` or `f32`), else `auto`.
   */
  precision?: CudaPrecisionOption;
  /** GPU index (default 0). */
  device?: number;
  /** One line of diagnostics, such as experts left bf16 (default console.warn). */
  log?: (line: string) => void;
}

/** Values of {@link CudaLoadOptions.precision}. */
export type CudaPrecisionOption = 'auto' | 'bf16' | 'f32';

/** Models below this many parameters run at precision `f32` under `auto`. */
export const F32_PRECISION_BELOW_PARAMS = 1e9;

/** The precision a load runs at: the option, else MOEFLASH_CUDA_PRECISION, else `auto` by model size. */
export function resolvePrecision(spec: ModelSpec, opt: unknown): 'bf16' | 'f32' {
  const env = process.env.MOEFLASH_CUDA_PRECISION;
  const [v, from] = opt !== undefined ? [opt, 'precision'] : env ? [env, 'MOEFLASH_CUDA_PRECISION'] : ['auto', ''];
  if (v !== 'auto' && v !== 'bf16' && v !== 'f32') {
    throw new MoeflashError('INVALID_ARGUMENT', `${from} must be 'auto', 'bf16' or 'f32' (got ${JSON.stringify(v)})`);
  }
  if (v !== 'auto') return v;
  return footprint(spec).total < F32_PRECISION_BELOW_PARAMS ? 'f32' : 'bf16';
}

/** Values of {@link CudaLoadOptions.experts}. */
export type CudaExpertsOption = 'auto' | 'stored' | 'mxfp4';

/** How a load holds a checkpoint's experts on the device ({@link planExpertLoad}, {@link CudaModel.expertLoad}). */
export interface CudaExpertLoad {
  /** The option it was planned for. */
  option: CudaExpertsOption;
  /** How the checkpoint stores them: MXFP4 blocks, a float dtype, or `none` (no MoE layer). */
  stored: 'mxfp4' | 'bf16' | 'f16' | 'f32' | 'f64' | 'fp8' | 'none';
  /** How the device holds them. */
  format: 'mxfp4' | 'bf16' | 'none';
  /** True when float experts are quantized to MXFP4 while they are streamed to the device. */
  quantized: boolean;
  /** Why float experts stay bf16 under `auto` (null when they do not, or were asked to). */
  fallback: string | null;
}

/** A plan of {@link CudaModel.step}: `copyLogits: false` returns only each logits row's arg-max. */
export interface CudaStepPlan extends StepPlan {
  copyLogits?: boolean;
}

/** A sequence's output with the device-computed arg-max of each logits row. */
export interface CudaSequenceOutput extends SequenceOutput {
  argmax: Int32Array;
}

// Keep in step with native/model.cc's LayerField and GlobalField.
const LAYER_FIELDS = [
  'inNorm', 'postNorm', 'qkvW', 'qkvB', 'oW', 'oB', 'qNorm', 'kNorm', 'sinks', 'routerW', 'routerB',
  'gateUp', 'gateUpScales', 'gateUpBias', 'down', 'downScales', 'downBias',
  'mlpKind', 'experts', 'inter', 'window', 'interleaved',
  'qkvScales', 'oScales', 'fp8BlockRows', 'fp8BlockCols',
] as const;
type LayerField = (typeof LAYER_FIELDS)[number];
const GLOBAL_FIELDS = ['embed', 'lmHead', 'finalNorm', 'invFreq'] as const;
const MLP_BF16_EXPERTS = 0;
const MLP_MXFP4_EXPERTS = 1;
const MLP_DENSE = 2;
const MLP_DENSE_FP8 = 3;

/** One piece of the weights buffer: where it goes and how to produce its bytes. */
interface Piece {
  offset: number;
  bytes: number;
  tensors: string[];
  fill: () => Promise<Uint8Array>;
}

const asBytes = (a: ArrayBufferView): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

function transpose<T extends Uint16Array | Float32Array>(m: T, rows: number, cols: number): T {
  const t = (m instanceof Float32Array ? new Float32Array(rows * cols) : new Uint16Array(rows * cols)) as T;
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) t[c * rows + r] = m[r * cols + c];
  return t;
}

/** bf16 bits widened to float32 (exact), or float32 values as they are. */
function toF32(m: Uint16Array | Float32Array): Float32Array {
  if (m instanceof Float32Array) return m;
  const v = new Float32Array(m.length);
  const w = new Uint32Array(v.buffer);
  for (let i = 0; i < m.length; i++) w[i] = m[i] << 16;
  return v;
}

const toBf16Bits = (m: Uint16Array | Float32Array): Uint16Array => (m instanceof Float32Array ? bf16Array(m) : m);

/** Reads tensors as the device stores them: bf16 bits (any float dtype converted), or raw bytes. */
class TensorReader {
  constructor(private readonly src: WeightSource, private readonly fp8Block: [number, number]) {}

  has(name: string): boolean {
    return this.src.has(name);
  }

  shape(name: string): number[] {
    return this.src.info(name).shape;
  }

  /** Stored as bf16 bits that {@link bf16} returns unchanged (no FP8 scale to apply). */
  plainBf16(name: string): boolean {
    return this.src.info(name).dtype === 'BF16' && !this.src.has(`${name}_scale_inv`);
  }

  expect(name: string, shape: number[]): void {
    const info = this.src.info(name);
    if (info.shape.length !== shape.length || info.shape.some((d, i) => d !== shape[i])) {
      throw new MoeflashError(
        'WEIGHTS_INVALID',
        `tensor ${name} in ${info.file} has shape [${info.shape}] but the model's config.json implies [${shape}]; the weights and config.json do not belong together`,
      );
    }
  }

  async floats(name: string, shape: number[]): Promise<Float32Array> {
    this.expect(name, shape);
    const data = await this.src.readFloat32(name);
    const scaleName = `${name}_scale_inv`;
    if (this.src.has(scaleName) && shape.length === 2) {
      const scale = await this.src.readFloat32(scaleName);
      const [rows, cols] = shape;
      const [br, bc] = this.fp8Block;
      const bCols = Math.ceil(cols / bc);
      for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) data[r * cols + c] *= scale[Math.floor(r / br) * bCols + Math.floor(c / bc)];
    }
    return data;
  }

  async bf16(name: string, shape: number[]): Promise<Uint16Array> {
    this.expect(name, shape);
    const info = this.src.info(name);
    if (info.dtype === 'BF16' && !this.src.has(`${name}_scale_inv`)) {
      const raw = await this.src.read(name);
      const copy = new Uint8Array(raw.byteLength);
      copy.set(raw);
      return new Uint16Array(copy.buffer);
    }
    return bf16Array(await this.floats(name, shape));
  }

  /**
   * Whether `name` can stay FP8 on the device for gemv_fp8: E4M3 codes of this shape with a 2-D
   * block-scale tensor of the configured grid, and rows the kernel's 16-byte loads take.
   */
  fp8Able(name: string, shape: [number, number]): boolean {
    const scaleName = `${name}_scale_inv`;
    if (!this.src.has(name) || !this.src.has(scaleName)) return false;
    const w = this.src.info(name);
    const s = this.src.info(scaleName);
    const [br, bc] = this.fp8Block;
    return (
      w.dtype === 'F8_E4M3' &&
      w.shape.length === 2 && w.shape[0] === shape[0] && w.shape[1] === shape[1] &&
      s.shape.length === 2 && s.shape[0] === Math.ceil(shape[0] / br) && s.shape[1] === Math.ceil(shape[1] / bc) &&
      shape[1] % 16 === 0 && bc % 16 === 0
    );
  }

  /** The E4M3 codes of a tensor that {@link fp8Able} accepted, unchanged. */
  async fp8Codes(name: string, shape: number[]): Promise<Uint8Array> {
    this.expect(name, shape);
    return this.src.read(name);
  }

  async u8(name: string, shape: number[]): Promise<Uint8Array> {
    this.expect(name, shape);
    const info = this.src.info(name);
    if (info.dtype !== 'U8') {
      throw new MoeflashError('WEIGHTS_INVALID', `tensor ${name} in ${info.file} has dtype ${info.dtype}; MXFP4 blocks and scales are stored as U8`);
    }
    return this.src.read(name);
  }
}

type Quantizer = (values: Float32Array) => { blocks: Uint8Array; scales: Uint8Array };

/** @moeflash/quant's MXFP4 encoder (OCP scale rule, as `moeflash quantize`), or why it failed to load. */
async function loadQuantizer(): Promise<Quantizer | string> {
  // A variable specifier keeps the bundler from inlining the optional package.
  const id = '@moeflash/quant';
  try {
    const mod = (await import(/* @vite-ignore */ id)) as { quantizeMxfp4: Quantizer };
    return (v) => mod.quantizeMxfp4(v);
  } catch (e) {
    return `@moeflash/quant failed to load (${(e as Error).message.split('\n')[0]})`;
  }
}

const EXPERTS_OPTIONS: readonly CudaExpertsOption[] = ['auto', 'stored', 'mxfp4'];

/** The experts option of a load: the option, else MOEFLASH_CUDA_EXPERTS, else `auto`. */
function expertsOption(opt: unknown): CudaExpertsOption {
  const env = process.env.MOEFLASH_CUDA_EXPERTS;
  const [v, from] = opt !== undefined ? [opt, 'experts'] : env ? [env, 'MOEFLASH_CUDA_EXPERTS'] : ['auto', ''];
  if (!EXPERTS_OPTIONS.includes(v as CudaExpertsOption)) {
    throw new MoeflashError('INVALID_ARGUMENT', `${from} must be 'auto', 'stored' or 'mxfp4', got ${JSON.stringify(v)}`);
  }
  return v as CudaExpertsOption;
}

const STORED_DTYPES: Record<string, CudaExpertLoad['stored']> = {
  BF16: 'bf16', F16: 'f16', F32: 'f32', F64: 'f64', F8_E4M3: 'fp8', F8_E5M2: 'fp8',
};

/**
 * How {@link CudaBackend.load} would hold a checkpoint's experts under the `experts` option (see
 * {@link CudaLoadOptions.experts}; unset: MOEFLASH_CUDA_EXPERTS, else `auto`); reads tensor
 * headers only. `mxfp4` with shapes the MXFP4 kernels do not take is an error. Whether
 * @moeflash/quant loads is not checked here: a load that cannot import it reports that as its
 * fallback instead.
 */
export function planExpertLoad(spec: ModelSpec, src: WeightSource, option?: CudaExpertsOption): CudaExpertLoad {
  const experts = expertsOption(option);
  // The float dtype of the first layer whose experts are not MXFP4 (a converter may keep some).
  let float: CudaExpertLoad['stored'] | null = null;
  let mxfp4 = false;
  for (let l = 0; l < spec.numLayers; l++) {
    if (spec.layers[l].mlp === 'dense') continue;
    const lay = detectExpertLayout(src, l);
    const ex = `${lay.prefix}.experts`;
    if (lay.kind === 'mxfp4-fused') {
      mxfp4 = true;
      continue;
    }
    if (float !== null) continue;
    const name = lay.kind === 'fused' ? `${ex}.gate_up_proj` : `${ex}.0.${lay.names[0]}.weight`;
    const dtype = src.info(name).dtype;
    float = src.has(`${name}_scale_inv`) ? 'fp8' : (STORED_DTYPES[dtype] ?? 'bf16');
  }
  const stored = float ?? (mxfp4 ? 'mxfp4' : 'none');
  const plan = (quantized: boolean, fallback: string | null = null): CudaExpertLoad => ({
    option: experts,
    stored,
    format: quantized || mxfp4 ? 'mxfp4' : float !== null ? 'bf16' : 'none',
    quantized,
    fallback,
  });
  if (float === null || experts === 'stored') return plan(false);
  const H = spec.hiddenSize;
  const I = spec.moe.intermediateSize;
  if (H % 32 !== 0 || I % 32 !== 0 || spec.moe.topK > 8) {
    const why = `hidden ${H}, expert width ${I}, top-k ${spec.moe.topK}: MXFP4 experts need widths that are multiples of 32 and top-k <= 8`;
    if (experts === 'mxfp4') {
      throw new MoeflashError('CONFIG_UNSUPPORTED', `experts: 'mxfp4' needs hidden and expert widths that are multiples of 32 and top-k <= 8 (got hidden ${H}, intermediate ${I}, top-k ${spec.moe.topK}); load with experts: 'stored'`);
    }
    return plan(false, why);
  }
  if (float === 'fp8' && experts === 'auto') {
    return plan(false, `the experts are stored as FP8; quantize-on-load takes bf16, fp16 and fp32 experts (experts: 'mxfp4' quantizes them anyway)`);
  }
  return plan(true);
}

/** The device layout of a model: every piece of the weights buffer and the per-layer table. */
interface WeightPlan {
  pieces: Piece[];
  bytes: number;
  layout: Float64Array;
  maxInter: number;
  expertFormat: 'mxfp4' | 'bf16' | 'none';
  /** Widest dense MLP kept FP8 (sizes its scratch), and how many matrices stay FP8. */
  fp8Inter: number;
  fp8Matrices: number;
}

/** `quantize`: float experts become MXFP4 (shapes checked by {@link planExpertLoad}); null keeps them bf16. */
async function planWeights(spec: ModelSpec, src: WeightSource, quantize: Quantizer | null): Promise<WeightPlan> {
  const q = spec.quantization;
  const fp8Block = (q?.method === 'fp8' ? q.weightBlockSize : q?.dense?.weightBlockSize) ?? [128, 128];
  const rd = new TensorReader(src, fp8Block);
  const H = spec.hiddenSize;
  const V = spec.vocabSize;
  const a = spec.attention;
  const D = a.headDim;
  const qDim = a.numHeads * D;
  const kvDim = a.numKvHeads * D;
  const E = spec.moe.numExperts;
  const I = spec.moe.intermediateSize;
  const interleaved = spec.family === 'gpt_oss';
  const pieces: Piece[] = [];
  let bytes = 0;
  const reserve = (n: number): number => {
    const off = bytes;
    bytes += Math.ceil(n / 256) * 256;
    return off;
  };
  const piece = (offset: number, n: number, tensors: string[], fill: () => Promise<Uint8Array>) =>
    pieces.push({ offset, bytes: n, tensors, fill });
  const bf16Tensor = (name: string, shape: number[]): number => {
    const n = shape.reduce((x, y) => x * y, 1) * 2;
    const off = reserve(n);
    piece(off, n, [name], async () => asBytes(await rd.bf16(name, shape)));
    return off;
  };
  // FP8 projections stay FP8 (gemv_fp8) where the kernel takes them; the rest become bf16 as
  // before. Matrices that share a GEMV (q | k | v, gate | up) are stacked by rows: codes one
  // after another, scale grids one after another (native/model.cc launches once when the grids
  // stack into the whole matrix's, once per matrix otherwise).
  const [fp8BlockRows, fp8BlockCols] = fp8Block;
  let fp8Inter = 0;
  let fp8Matrices = 0;
  const fp8Stack = (names: string[], rowsOf: number[], cols: number): { w: number; scales: number } => {
    const scaleCols = Math.ceil(cols / fp8BlockCols);
    const gridRows = rowsOf.map((r) => Math.ceil(r / fp8BlockRows));
    const w = reserve(rowsOf.reduce((a, b) => a + b, 0) * cols);
    const scales = reserve(gridRows.reduce((a, b) => a + b, 0) * scaleCols * 4);
    let row0 = 0;
    let grid0 = 0;
    names.forEach((name, i) => {
      const rows = rowsOf[i];
      piece(w + row0 * cols, rows * cols, [name], () => rd.fp8Codes(name, [rows, cols]));
      piece(scales + grid0 * scaleCols * 4, gridRows[i] * scaleCols * 4, [`${name}_scale_inv`], async () =>
        asBytes(await src.readFloat32(`${name}_scale_inv`)),
      );
      row0 += rows;
      grid0 += gridRows[i];
    });
    fp8Matrices += names.length;
    return { w, scales };
  };

  const layout = new Float64Array(GLOBAL_FIELDS.length + spec.numLayers * LAYER_FIELDS.length).fill(-1);
  const embed = bf16Tensor('model.embed_tokens.weight', [V, H]);
  layout[0] = embed;
  if (src.has('lm_head.weight')) layout[1] = bf16Tensor('lm_head.weight', [V, H]);
  else if (spec.tieWordEmbeddings) layout[1] = embed;
  else throw new MoeflashError('WEIGHTS_MISSING', `tensor lm_head.weight is missing from ${src.origin} and config.json does not set tie_word_embeddings; the checkpoint is incomplete`);
  layout[2] = bf16Tensor('model.norm.weight', [H]);
  const rope = ropeTable(a.rope);
  layout[3] = reserve(rope.invFreq.byteLength);
  piece(layout[3], rope.invFreq.byteLength, [], async () => asBytes(rope.invFreq));

  let maxInter = 0;
  let expertFormat: WeightPlan['expertFormat'] = 'none';
  for (let l = 0; l < spec.numLayers; l++) {
    const base = GLOBAL_FIELDS.length + l * LAYER_FIELDS.length;
    const set = (f: LayerField, v: number) => (layout[base + LAYER_FIELDS.indexOf(f)] = v);
    const p = `model.layers.${l}`;
    const at = `${p}.self_attn`;
    set('inNorm', bf16Tensor(`${p}.input_layernorm.weight`, [H]));
    set('postNorm', bf16Tensor(`${p}.post_attention_layernorm.weight`, [H]));
    // q, k and v as one [q + 2 kv, H] matrix: one GEMV instead of three.
    const parts: [string, number, number][] = [['q_proj', qDim, 0], ['k_proj', kvDim, qDim], ['v_proj', kvDim, qDim + kvDim]];
    set('fp8BlockRows', fp8BlockRows);
    set('fp8BlockCols', fp8BlockCols);
    if (parts.every(([n, rows]) => rd.fp8Able(`${at}.${n}.weight`, [rows, H]))) {
      const st = fp8Stack(parts.map(([n]) => `${at}.${n}.weight`), parts.map(([, rows]) => rows), H);
      set('qkvW', st.w);
      set('qkvScales', st.scales);
    } else {
      const qkvW = reserve((qDim + 2 * kvDim) * H * 2);
      set('qkvW', qkvW);
      for (const [n, rows, row0] of parts) {
        piece(qkvW + row0 * H * 2, rows * H * 2, [`${at}.${n}.weight`], async () => asBytes(await rd.bf16(`${at}.${n}.weight`, [rows, H])));
      }
    }
    if (parts.some(([n]) => src.has(`${at}.${n}.bias`))) {
      const qkvB = reserve((qDim + 2 * kvDim) * 2);
      set('qkvB', qkvB);
      for (const [n, rows, row0] of parts) {
        const name = `${at}.${n}.bias`;
        piece(qkvB + row0 * 2, rows * 2, [name], async () => asBytes(src.has(name) ? await rd.bf16(name, [rows]) : new Uint16Array(rows)));
      }
    }
    if (rd.fp8Able(`${at}.o_proj.weight`, [H, qDim])) {
      const st = fp8Stack([`${at}.o_proj.weight`], [H], qDim);
      set('oW', st.w);
      set('oScales', st.scales);
    } else {
      set('oW', bf16Tensor(`${at}.o_proj.weight`, [H, qDim]));
    }
    if (src.has(`${at}.o_proj.bias`)) set('oB', bf16Tensor(`${at}.o_proj.bias`, [H]));
    if (a.qkNorm) {
      set('qNorm', bf16Tensor(`${at}.q_norm.weight`, [D]));
      set('kNorm', bf16Tensor(`${at}.k_norm.weight`, [D]));
    }
    if (a.sinks) {
      const off = reserve(a.numHeads * 4);
      set('sinks', off);
      piece(off, a.numHeads * 4, [`${at}.sinks`], async () => asBytes(await rd.floats(`${at}.sinks`, [a.numHeads])));
    }
    set('window', spec.layers[l].slidingWindow ?? 0);
    set('interleaved', 0);

    if (spec.layers[l].mlp === 'dense') {
      const DI = spec.denseIntermediateSize!;
      maxInter = Math.max(maxInter, DI);
      set('experts', 1);
      set('inter', DI);
      const mlp = (n: string) => `${p}.mlp.${n}.weight`;
      if (rd.fp8Able(mlp('gate_proj'), [DI, H]) && rd.fp8Able(mlp('up_proj'), [DI, H]) && rd.fp8Able(mlp('down_proj'), [H, DI])) {
        set('mlpKind', MLP_DENSE_FP8);
        fp8Inter = Math.max(fp8Inter, DI);
        const gu = fp8Stack([mlp('gate_proj'), mlp('up_proj')], [DI, DI], H);
        set('gateUp', gu.w);
        set('gateUpScales', gu.scales);
        const dn = fp8Stack([mlp('down_proj')], [H], DI);
        set('down', dn.w);
        set('downScales', dn.scales);
        continue;
      }
      set('mlpKind', MLP_DENSE);
      const gu = reserve(2 * DI * H * 2);
      set('gateUp', gu);
      piece(gu, DI * H * 2, [`${p}.mlp.gate_proj.weight`], async () => asBytes(await rd.bf16(`${p}.mlp.gate_proj.weight`, [DI, H])));
      piece(gu + DI * H * 2, DI * H * 2, [`${p}.mlp.up_proj.weight`], async () => asBytes(await rd.bf16(`${p}.mlp.up_proj.weight`, [DI, H])));
      set('down', bf16Tensor(`${p}.mlp.down_proj.weight`, [H, DI]));
      continue;
    }

    maxInter = Math.max(maxInter, I);
    const lay = detectExpertLayout(src, l);
    const router = src.has(`${lay.prefix}.router.weight`) ? `${lay.prefix}.router` : `${lay.prefix}.gate`;
    set('routerW', bf16Tensor(`${router}.weight`, [E, H]));
    if (src.has(`${router}.bias`)) set('routerB', bf16Tensor(`${router}.bias`, [E]));
    set('experts', E);
    set('inter', I);
    set('interleaved', interleaved ? 1 : 0);
    const ex = `${lay.prefix}.experts`;
    if (src.has(`${ex}.gate_up_proj_bias`)) set('gateUpBias', bf16Tensor(`${ex}.gate_up_proj_bias`, [E, 2 * I]));
    if (src.has(`${ex}.down_proj_bias`)) set('downBias', bf16Tensor(`${ex}.down_proj_bias`, [E, H]));

    if (lay.kind === 'mxfp4-fused') {
      expertFormat = 'mxfp4';
      set('mlpKind', MLP_MXFP4_EXPERTS);
      const u8 = (name: string, shape: number[]) => {
        const n = shape.reduce((x, y) => x * y, 1);
        const off = reserve(n);
        piece(off, n, [name], () => rd.u8(name, shape));
        return off;
      };
      set('gateUp', u8(`${ex}.gate_up_proj_blocks`, [E, 2 * I, H / 32, 16]));
      set('gateUpScales', u8(`${ex}.gate_up_proj_scales`, [E, 2 * I, H / 32]));
      set('down', u8(`${ex}.down_proj_blocks`, [E, H, I / 32, 16]));
      set('downScales', u8(`${ex}.down_proj_scales`, [E, H, I / 32]));
      continue;
    }

    // Float experts, brought to gate_up [E, 2I, H] (rows in the checkpoint's order) and down [E, H, I].
    // Each producer returns expert j's rows: bf16 bits, or (only when quantizing experts not
    // stored as plain bf16) float32 decoded exactly as stored, which is what the converter
    // quantizes; rounding to bf16 first could move a block's scale or a value across a tie.
    type Rows = Uint16Array | Float32Array;
    const rows = (name: string, shape: number[]): Promise<Rows> =>
      quantize && !rd.plainBf16(name) ? rd.floats(name, shape) : rd.bf16(name, shape);
    let gateUpOf: (j: number) => Promise<Rows>;
    let downOf: (j: number) => Promise<Rows>;
    let gateUpNames: string[];
    let downNames: string[];
    if (lay.kind === 'per-expert') {
      const [g, u, d] = lay.names;
      // Gate rows then up rows, or alternating where the family's kernels read them interleaved.
      gateUpOf = async (j) => {
        let gate = await rows(`${ex}.${j}.${g}.weight`, [I, H]);
        let up = await rows(`${ex}.${j}.${u}.weight`, [I, H]);
        const bits = gate instanceof Uint16Array && up instanceof Uint16Array;
        if (!bits) [gate, up] = [toF32(gate), toF32(up)];
        const out = bits ? new Uint16Array(2 * I * H) : new Float32Array(2 * I * H);
        for (let r = 0; r < I; r++) {
          out.set(gate.subarray(r * H, (r + 1) * H), (interleaved ? 2 * r : r) * H);
          out.set(up.subarray(r * H, (r + 1) * H), (interleaved ? 2 * r + 1 : I + r) * H);
        }
        return out;
      };
      downOf = (j) => rows(`${ex}.${j}.${d}.weight`, [H, I]);
      gateUpNames = Array.from({ length: E }, (_, j) => [`${ex}.${j}.${g}.weight`, `${ex}.${j}.${u}.weight`]).flat();
      downNames = Array.from({ length: E }, (_, j) => `${ex}.${j}.${d}.weight`);
    } else {
      const shape = rd.shape(`${ex}.gate_up_proj`);
      const inputMajor = shape[1] === H && shape[2] === 2 * I && (interleaved || 2 * I !== H);
      // Fused tensors are read once and sliced per expert.
      let gu: Promise<Rows> | null = null;
      let dn: Promise<Rows> | null = null;
      const guAll = () => (gu ??= rows(`${ex}.gate_up_proj`, inputMajor ? [E, H, 2 * I] : [E, 2 * I, H]));
      const dnAll = () => (dn ??= rows(`${ex}.down_proj`, inputMajor ? [E, I, H] : [E, H, I]));
      // The last expert drops the cached tensor so that a load holds one layer's experts at most.
      gateUpOf = async (j) => {
        const m = (await guAll()).subarray(j * 2 * I * H, (j + 1) * 2 * I * H);
        if (j === E - 1) gu = null;
        return inputMajor ? transpose(m, H, 2 * I) : m.slice();
      };
      downOf = async (j) => {
        const m = (await dnAll()).subarray(j * H * I, (j + 1) * H * I);
        if (j === E - 1) dn = null;
        return inputMajor ? transpose(m, I, H) : m.slice();
      };
      gateUpNames = [`${ex}.gate_up_proj`];
      downNames = [`${ex}.down_proj`];
    }
    if (quantize) {
      expertFormat = 'mxfp4';
      set('mlpKind', MLP_MXFP4_EXPERTS);
      const guBlocks = reserve(E * 2 * I * (H / 32) * 16);
      const guScales = reserve(E * 2 * I * (H / 32));
      const dnBlocks = reserve(E * H * (I / 32) * 16);
      const dnScales = reserve(E * H * (I / 32));
      set('gateUp', guBlocks);
      set('gateUpScales', guScales);
      set('down', dnBlocks);
      set('downScales', dnScales);
      for (let j = 0; j < E; j++) {
        // Each expert's blocks and scales come from one quantization; the scales piece reuses it.
        let guQ: Promise<{ blocks: Uint8Array; scales: Uint8Array }> | null = null;
        let dnQ: Promise<{ blocks: Uint8Array; scales: Uint8Array }> | null = null;
        const gq = () => (guQ ??= gateUpOf(j).then((b) => quantize(toF32(b))));
        const dq = () => (dnQ ??= downOf(j).then((b) => quantize(toF32(b))));
        const nGu = 2 * I * (H / 32);
        const nDn = H * (I / 32);
        piece(guBlocks + j * nGu * 16, nGu * 16, j === 0 ? gateUpNames : [], async () => (await gq()).blocks);
        piece(guScales + j * nGu, nGu, [], async () => {
          const r = (await gq()).scales;
          guQ = null;
          return r;
        });
        piece(dnBlocks + j * nDn * 16, nDn * 16, j === 0 ? downNames : [], async () => (await dq()).blocks);
        piece(dnScales + j * nDn, nDn, [], async () => {
          const r = (await dq()).scales;
          dnQ = null;
          return r;
        });
      }
    } else {
      if (expertFormat === 'none') expertFormat = 'bf16';
      set('mlpKind', MLP_BF16_EXPERTS);
      const gu = reserve(E * 2 * I * H * 2);
      const dn = reserve(E * H * I * 2);
      set('gateUp', gu);
      set('down', dn);
      for (let j = 0; j < E; j++) {
        piece(gu + j * 2 * I * H * 2, 2 * I * H * 2, j === 0 ? gateUpNames : [], async () => asBytes(toBf16Bits(await gateUpOf(j))));
        piece(dn + j * H * I * 2, H * I * 2, j === 0 ? downNames : [], async () => asBytes(toBf16Bits(await downOf(j))));
      }
    }
  }
  return { pieces, bytes, layout, maxInter, expertFormat, fp8Inter, fp8Matrices };
}

/** What the addon's Model needs to size and run a model. */
function nativeConfig(
  spec: ModelSpec,
  opts: Required<Pick<CudaLoadOptions, 'maxSequences' | 'maxStepTokens' | 'pageSize'>> & {
    maxSeqLen: number;
    pages?: number;
    kvBytes?: number;
    precision: 'bf16' | 'f32';
  },
  w: WeightPlan,
) {
  const a = spec.attention;
  const act = spec.moe.activation;
  const V = spec.vocabSize;
  const maxTokens = opts.maxStepTokens;
  // Logits rows a call can return: up to 128 MiB of them, at least one graph bucket's worth.
  const maxLogitRows = Math.max(1, Math.min(maxTokens, Math.floor((128 << 20) / (4 * V))));
  let graphTokens = 1;
  while (graphTokens * 2 <= Math.min(64, maxTokens, maxLogitRows)) graphTokens *= 2;
  const maxPagesPerSeq = Math.ceil(opts.maxSeqLen / opts.pageSize);
  const kvF32 = opts.precision === 'f32';
  const pageBytes = 2 * spec.numLayers * opts.pageSize * a.numKvHeads * a.headDim * (kvF32 ? 4 : 2);
  const numPages = Math.max(1, opts.pages ?? (opts.kvBytes !== undefined ? Math.floor(opts.kvBytes / pageBytes) : maxPagesPerSeq * opts.maxSequences));
  return {
    hidden: spec.hiddenSize,
    vocab: V,
    layers: spec.numLayers,
    heads: a.numHeads,
    kvHeads: a.numKvHeads,
    headDim: a.headDim,
    rotaryDim: a.rope.rotaryDim,
    attentionFactor: ropeTable(a.rope).attentionFactor,
    eps: spec.rmsNormEps,
    scale: a.scale,
    topK: spec.moe.topK,
    numExperts: spec.moe.numExperts,
    rule: spec.moe.rule === 'topk_then_softmax' ? 0 : 1,
    renormalize: spec.moe.normTopkProb ? 1 : 0,
    activation: act.kind === 'gpt_oss_clamped_swiglu' ? 1 : 0,
    limit: act.kind === 'gpt_oss_clamped_swiglu' ? act.limit : 0,
    alpha: act.kind === 'gpt_oss_clamped_swiglu' ? act.alpha : 0,
    maxTokens,
    maxLogitRows,
    pageSize: opts.pageSize,
    numPages,
    maxPagesPerSeq,
    maxSeqLen: maxPagesPerSeq * opts.pageSize,
    maxInter: Math.max(w.maxInter, 1),
    fp8Inter: w.fp8Inter,
    graphTokens,
    weightsBytes: w.bytes,
    kvF32: kvF32 ? 1 : 0,
    expertMma: kvF32 ? 0 : 1,
  };
}
type NativeConfig = ReturnType<typeof nativeConfig>;

/** Checks the shapes the kernels take, naming what does not fit. */
function checkSupported(spec: ModelSpec): void {
  const a = spec.attention;
  const bad = (why: string) => {
    throw new MoeflashError('CONFIG_UNSUPPORTED', `the CUDA backend cannot run ${spec.source}: ${why}; use the CPU backend (--backend cpu)`);
  };
  if (spec.family === 'deepseek_v3') bad('the deepseek_v3 family (latent attention, grouped sigmoid routing, shared experts) has no CUDA kernels yet');
  if (spec.hiddenSize % 8 !== 0) bad(`hidden_size ${spec.hiddenSize} is not a multiple of 8`);
  if ((a.numHeads * a.headDim) % 8 !== 0) bad(`num_heads * head_dim ${a.numHeads * a.headDim} is not a multiple of 8`);
  if (a.rope.rotaryDim % 2 !== 0 || a.rope.rotaryDim > a.headDim) bad(`rotary dim ${a.rope.rotaryDim} must be even and <= head_dim`);
  if (spec.moe.numExperts > 1024) bad(`${spec.moe.numExperts} experts (at most 1024)`);
  if (spec.moe.topK > 8) bad(`top-k ${spec.moe.topK} (at most 8)`);
}

/** A row's settings for Model.step's `sample` argument (native/model.cc SampleField order). */
const SAMPLE_FIELDS = 9;
function sampleFields(s: StepSample): number[] {
  const p = s.params;
  const [lo, hi] = seedKey(s.key.seed);
  return [p.temperature ?? 0, p.topK ?? 0, p.topP ?? 1, p.minP ?? 0, lo, hi, s.key.seq, s.key.position, s.key.purpose ?? 0];
}

interface SeqState {
  pages: number[];
  length: number;
}

/** A model resident on one GPU. */
export class CudaModel implements LoadedModel {
  private readonly seqs = new Map<SeqId, SeqState>();
  private readonly freePages: number[];
  private readonly inputs: Int32Array;
  private native: NativeModel | null;
  /** Steps that replayed a CUDA graph, and steps launched kernel by kernel. */
  readonly stats = { graphSteps: 0, eagerCalls: 0 };
  /** StepSequence.sample runs sample_rows (kernels/sample.cu), bit-exact with core's sampler. */
  readonly sampling = true;
  /** The attached drafter's mask token (attachDrafter), or null. */
  private drafterMask: number | null = null;
  private draftInputs: Int32Array | null = null;

  constructor(
    readonly spec: ModelSpec,
    native: NativeModel,
    private readonly cfg: NativeConfig,
    /** How the experts are held on the device. */
    readonly expertFormat: WeightPlan['expertFormat'],
    /** Projection matrices held as FP8 (gemv_fp8) rather than upcast to bf16. */
    readonly fp8Matrices = 0,
    /** How the experts came to be held as they are: stored format, quantized on load, or why not. */
    readonly expertLoad: CudaExpertLoad | null = null,
  ) {
    this.native = native;
    this.freePages = Array.from({ length: cfg.numPages }, (_, i) => cfg.numPages - 1 - i);
    this.inputs = new Int32Array(5 * cfg.maxTokens + cfg.maxTokens * cfg.maxPagesPerSeq);
  }

  /** Positions one sequence can hold, and sequences of that length the cache holds at once. */
  /** What the kernels keep between operations ({@link CudaLoadOptions.precision}). */
  get precision(): 'bf16' | 'f32' {
    return this.cfg.kvF32 ? 'f32' : 'bf16';
  }

  get capacity(): { maxSequenceLength: number; pages: number; pageSize: number; freePages: number } {
    return { maxSequenceLength: this.cfg.maxSeqLen, pages: this.cfg.numPages, pageSize: this.cfg.pageSize, freePages: this.freePages.length };
  }

  /** The KV page pool (no prefix caching yet: `cached` is always 0). */
  kvPages(): KvPageStats {
    const free = this.freePages.length;
    return { pageSize: this.cfg.pageSize, total: this.cfg.numPages, free, cached: 0, used: this.cfg.numPages - free };
  }

  /** Pages for `length` positions of `seq`, all or nothing; false when the pool cannot supply them. */
  reserve(seq: SeqId, length: number): boolean {
    if (length > this.cfg.maxSeqLen) return false;
    const s = this.seqs.get(seq) ?? { pages: [], length: 0 };
    const need = Math.ceil(length / this.cfg.pageSize) - s.pages.length;
    if (need > this.freePages.length) return false;
    for (let i = 0; i < need; i++) s.pages.push(this.freePages.pop()!);
    this.seqs.set(seq, s);
    return true;
  }

  length(seq: SeqId): number {
    return this.seqs.get(seq)?.length ?? 0;
  }

  truncate(seq: SeqId, length: number): void {
    const s = this.seqs.get(seq);
    if (!s) return;
    if (!Number.isInteger(length) || length < 0 || length > s.length) {
      throw new MoeflashError('INVALID_ARGUMENT', `truncate(${seq}, ${length}): the sequence holds ${s.length} positions; length must be in [0, ${s.length}]`);
    }
    s.length = length;
    const keep = Math.ceil(length / this.cfg.pageSize);
    while (s.pages.length > keep) this.freePages.push(s.pages.pop()!);
  }

  release(seq: SeqId): void {
    const s = this.seqs.get(seq);
    if (!s) return;
    this.freePages.push(...s.pages);
    this.seqs.delete(seq);
  }

  memory(): MemoryReport & { drafter: number } {
    if (!this.native) return { weights: 0, kvCache: 0, activations: 0, total: 0, drafter: 0 };
    const i = this.native.info();
    return { weights: i.weights, kvCache: i.kvCache, activations: i.activations, drafter: i.drafter, total: i.weights + i.kvCache + i.activations + i.drafter };
  }

  /**
   * Loads a DFlash drafter beside the model: its layers in device memory, its KV cache on the
   * model's pages, the model's embedding and LM head shared. Then StepSequence.absorb feeds it and
   * StepSequence.speculate runs a whole round (draft, verify, greedy acceptance) in one call.
   */
  async attachDrafter(spec: DeviceDrafterSpec): Promise<DeviceDrafterInfo> {
    const native = this.native;
    if (!native) throw new MoeflashError('CLOSED', 'attachDrafter() on a disposed model');
    if (this.drafterMask !== null) throw new MoeflashError('INVALID_ARGUMENT', 'a drafter is already attached to this model');
    if (spec.maskTokenId < 0 || spec.maskTokenId >= this.spec.vocabSize) {
      throw new MoeflashError('CONFIG_INVALID', `${spec.source}: mask_token_id ${spec.maskTokenId} is outside the target's vocabulary`);
    }
    const plan = planDrafter(spec, this.spec);
    try {
      native.attachDrafter(plan.config, plan.layout);
      for (const p of plan.pieces) {
        const data = await p.fill();
        if (data.byteLength !== p.bytes) throw new MoeflashError('WEIGHTS_INVALID', `${spec.source}: a drafter tensor of ${data.byteLength} bytes where ${p.bytes} were planned`);
        native.uploadDrafter(p.offset, data);
      }
    } catch (e) {
      throw translateNativeError(e);
    }
    this.drafterMask = spec.maskTokenId;
    this.draftInputs = new Int32Array(this.inputs.length);
    const i = native.info();
    return { bytes: i.drafter, kvCacheBytes: i.drafterKvCache };
  }

  /**
   * Device milliseconds one replay of the decode graph captured for `batch` sequences takes (CUDA
   * events around `iters` replays), without the host's share of a step. For benchmarks; a decode
   * step of that batch size must have run first.
   */
  timeDecodeGraph(batch: number, iters = 100, sampling = false): number {
    if (!this.native) throw new MoeflashError('CLOSED', 'timeDecodeGraph() on a disposed model');
    let bucket = 1;
    while (bucket < batch) bucket *= 2;
    return this.native.timeGraphs(bucket, sampling, iters);
  }

  private round(plan: CudaStepPlan): Promise<StepResult & { sequences: CudaSequenceOutput[] }> {
    if (this.drafterMask === null || !this.draftInputs) throw new MoeflashError('INVALID_ARGUMENT', 'StepSequence.speculate needs a drafter: call attachDrafter() first');
    const seqs = this.seqs;
    const free = this.freePages;
    return runRound(this, this.native!, this.cfg, plan, {
      inputs: this.inputs,
      draftInputs: this.draftInputs,
      maskToken: this.drafterMask,
      pagesOf: (seq) => seqs.get(seq)?.pages.length ?? 0,
      freePages: () => free.length,
      reservePages: (seq, length) => {
        const st = seqs.get(seq) ?? { pages: [], length: 0 };
        seqs.set(seq, st);
        while (st.pages.length < Math.ceil(length / this.cfg.pageSize)) st.pages.push(free.pop()!);
        return st.pages;
      },
      setLength: (seq, length) => {
        const st = seqs.get(seq)!;
        st.length = length;
        const keep = Math.ceil(length / this.cfg.pageSize);
        while (st.pages.length > keep) free.push(st.pages.pop()!);
      },
    });
  }

  /** Forgets the captured decode graphs (the next decode step captures again); for benchmarks. */
  dropGraphs(): void {
    this.native?.dropGraphs();
  }

  async dispose(): Promise<void> {
    this.native?.dispose();
    this.native = null;
    this.seqs.clear();
  }

  async step(plan: CudaStepPlan): Promise<StepResult & { sequences: CudaSequenceOutput[] }> {
    const native = this.native;
    if (!native) throw new MoeflashError('CLOSED', 'step() on a disposed model');
    if (plan.sequences.some((s) => s.speculate)) return this.round(plan);
    const absorb = plan.sequences.some((s) => s.absorb);
    if (absorb && this.drafterMask === null) throw new MoeflashError('INVALID_ARGUMENT', 'StepSequence.absorb needs a drafter: call attachDrafter() first');
    const { spec, cfg } = this;
    const V = spec.vocabSize;
    const H = spec.hiddenSize;
    const copyLogits = plan.copyLogits !== false;

    // Validate the whole plan and reserve pages before anything runs, so a bad plan changes nothing.
    const seen = new Set<SeqId>();
    let total = 0;
    for (const s of plan.sequences) {
      if (seen.has(s.seq)) throw new MoeflashError('INVALID_ARGUMENT', `sequence ${s.seq} appears twice in one step`);
      seen.add(s.seq);
      for (const t of s.tokens) {
        if (!Number.isInteger(t) || t < 0 || t >= V) {
          throw new MoeflashError('INVALID_ARGUMENT', `token id ${t} of sequence ${s.seq} is outside the vocabulary [0, ${V})`);
        }
      }
      for (const l of s.hiddenLayers ?? []) {
        if (!Number.isInteger(l) || l < 0 || l >= spec.numLayers) throw new MoeflashError('INVALID_ARGUMENT', `hiddenLayers: layer ${l} is outside [0, ${spec.numLayers})`);
      }
      if (s.sample) {
        validateSamplingParams(s.sample.params);
        const k = s.sample.key;
        rngKey(k.seed, k.seq, k.position, k.purpose);
      }
      const len = this.length(s.seq) + s.tokens.length;
      if (len > cfg.maxSeqLen) {
        throw new MoeflashError('OUT_OF_MEMORY', `sequence ${s.seq} would hold ${len} positions; the KV cache was sized for ${cfg.maxSeqLen} a sequence: load with a larger maxSequenceLength`);
      }
      total += Math.max(0, Math.ceil(len / cfg.pageSize) - (this.seqs.get(s.seq)?.pages.length ?? 0));
    }
    if (total > this.freePages.length) {
      throw new MoeflashError(
        'OUT_OF_MEMORY',
        `the step needs ${total} more KV pages and ${this.freePages.length} are free (${cfg.numPages} pages of ${cfg.pageSize} positions): release finished sequences, or load with a larger maxSequences`,
      );
    }
    const states = plan.sequences.map((s) => {
      let st = this.seqs.get(s.seq);
      if (!st) {
        st = { pages: [], length: 0 };
        this.seqs.set(s.seq, st);
      }
      const need = Math.ceil((st.length + s.tokens.length) / cfg.pageSize);
      while (st.pages.length < need) st.pages.push(this.freePages.pop()!);
      return st;
    });

    // Rows of the step in plan order, and where each sequence's outputs go.
    interface RowRef { si: number; token: number; pos: number; logitRow: number; sample?: StepSample; }
    const rows: RowRef[] = [];
    const outs = plan.sequences.map((s, si) => {
      const n = s.tokens.length;
      const first = s.logits === 'all' ? 0 : n - 1;
      const want = s.logits === 'none' || n === 0 ? 0 : n - first;
      s.tokens.forEach((token, i) =>
        rows.push({ si, token, pos: states[si].length + i, logitRow: i >= first && want > 0 ? i - first : -1, sample: i === n - 1 ? s.sample : undefined }),
      );
      const hidden = s.hiddenLayers?.length ? new Map(s.hiddenLayers.map((l) => [l, new Float32Array(n * H)] as const)) : undefined;
      return {
        seq: s.seq,
        rows: want,
        logits: new Float32Array(copyLogits ? want * V : 0),
        argmax: new Int32Array(want),
        hidden,
        rowBase: rows.length - n,
        sampled: undefined as number | undefined,
      };
    });
    const hiddenLayers = [...new Set(plan.sequences.flatMap((s) => s.hiddenLayers ?? []))].sort((x, y) => x - y);
    const trace = plan.sequences.some((s) => s.traceRouting);
    const traces = plan.sequences.map((s): RoutingTrace | undefined => (s.traceRouting ? { logits: [], experts: [] } : undefined));
    const decode = hiddenLayers.length === 0 && !trace && plan.sequences.every((s) => s.tokens.length === 1) && rows.length <= cfg.graphTokens;

    const MT = cfg.maxTokens;
    const inp = this.inputs;
    try {
      for (let c0 = 0; c0 < rows.length; ) {
        // A call takes up to maxTokens rows, of which up to maxLogitRows return logits.
        let c1 = c0;
        let nLogit = 0;
        while (c1 < rows.length && c1 - c0 < MT) {
          const wantsLogit = decode || rows[c1].logitRow >= 0 || rows[c1].sample !== undefined;
          if (wantsLogit && nLogit === cfg.maxLogitRows) break;
          if (wantsLogit) nLogit++;
          c1++;
        }
        const T = c1 - c0;
        let maxLen = 1;
        let li = 0;
        const logitOf: RowRef[] = [];
        for (let t = 0; t < T; t++) {
          const r = rows[c0 + t];
          const pages = states[r.si].pages;
          inp[t] = r.token;
          inp[MT + t] = r.pos;
          inp[2 * MT + t] = pages[Math.floor(r.pos / cfg.pageSize)] * cfg.pageSize + (r.pos % cfg.pageSize);
          inp[3 * MT + t] = r.pos + 1;
          maxLen = Math.max(maxLen, r.pos + 1);
          if (decode || r.logitRow >= 0 || r.sample) {
            inp[4 * MT + li++] = t;
            logitOf.push(r);
          }
          const used = Math.ceil((r.pos + 1) / cfg.pageSize);
          const base = 5 * MT + t * cfg.maxPagesPerSeq;
          for (let p = 0; p < used; p++) inp[base + p] = pages[p];
        }
        // Logits leave the device only when some row of the call returns them; drawn tokens always do.
        const copy = copyLogits && logitOf.some((r) => r.logitRow >= 0);
        let sample: Float64Array | null = null;
        if (logitOf.some((r) => r.sample)) {
          sample = new Float64Array(li * SAMPLE_FIELDS);
          logitOf.forEach((r, j) => {
            if (r.sample) sample!.set(sampleFields(r.sample), j * SAMPLE_FIELDS);
          });
        }
        const res = native.step(inp, T, li, maxLen, copy, hiddenLayers.length ? Int32Array.from(hiddenLayers) : null, decode, sample, trace, absorb);
        if (res.routing) appendRouting(traces, rows, c0, T, res.routing, spec);
        if (res.graph) this.stats.graphSteps++;
        else this.stats.eagerCalls++;
        logitOf.forEach((r, j) => {
          if (r.sample && res.sampled) outs[r.si].sampled = res.sampled[j];
          if (r.logitRow < 0) return;
          const o = outs[r.si];
          o.argmax[r.logitRow] = res.ids[j];
          if (copy && res.logits) o.logits.set(res.logits.subarray(j * V, (j + 1) * V), r.logitRow * V);
        });
        if (res.hidden) {
          hiddenLayers.forEach((l, k) => {
            for (let t = 0; t < T; t++) {
              const r = rows[c0 + t];
              const h = outs[r.si].hidden?.get(l);
              if (!h) continue;
              const i = c0 + t - outs[r.si].rowBase;
              h.set(res.hidden!.subarray((k * T + t) * H, (k * T + t + 1) * H), i * H);
            }
          });
        }
        c0 = c1;
      }
    } catch (e) {
      // The cache may hold part of this step's keys; the lengths stay as they were.
      throw translateNativeError(e);
    }
    plan.sequences.forEach((s, si) => (states[si].length += s.tokens.length));
    return {
      sequences: outs.map((o, i) => ({
        seq: o.seq,
        logits: o.logits,
        rows: o.rows,
        hidden: o.hidden,
        argmax: o.argmax,
        ...(o.sampled !== undefined ? { sampled: o.sampled } : {}),
        ...(traces[i] ? { routing: traces[i] } : {}),
      })),
    };
  }
}

/**
 * A step with speculative rounds (StepSequence.speculate) as one native call (Model.round): the
 * drafter's rows ([anchor, mask x B] per speculating sequence), the verify rows ([anchor,
 * d_1..d_B] with every row's logits, other sequences' rows beside them), and acceptance, all on
 * the device; only the emitted ids come back. The cache keeps each speculating sequence's
 * anchor and accepted drafts.
 */
async function runRound(m: CudaModel, native: NativeModel, cfg: NativeConfig, plan: CudaStepPlan, ctx: RoundContext): Promise<StepResult & { sequences: CudaSequenceOutput[] }> {
  const MT = cfg.maxTokens;
  const seen = new Set<SeqId>();
  for (const s of plan.sequences) {
    if (seen.has(s.seq)) throw new MoeflashError('INVALID_ARGUMENT', `sequence ${s.seq} appears twice in one step`);
    seen.add(s.seq);
    if (s.hiddenLayers?.length || s.traceRouting) throw new MoeflashError('INVALID_ARGUMENT', 'a step with speculative rounds returns no hidden states or routing traces');
    if (s.logits !== 'none') throw new MoeflashError('INVALID_ARGUMENT', `sequence ${s.seq}: a step with speculative rounds returns no logits (logits: 'none'; use sample for a plain decode beside them)`);
    for (const t of s.tokens) {
      if (!Number.isInteger(t) || t < 0 || t >= m.spec.vocabSize) throw new MoeflashError('INVALID_ARGUMENT', `token id ${t} of sequence ${s.seq} is outside the vocabulary [0, ${m.spec.vocabSize})`);
    }
    if (s.sample) {
      validateSamplingParams(s.sample.params);
      rngKey(s.sample.key.seed, s.sample.key.seq, s.sample.key.position, s.sample.key.purpose);
    }
    const sp = s.speculate;
    if (!sp) continue;
    if (s.tokens.length !== 1) throw new MoeflashError('INVALID_ARGUMENT', `sequence ${s.seq}: a speculative round takes the anchor token alone (got ${s.tokens.length} tokens)`);
    if (!Number.isInteger(sp.blockSize) || sp.blockSize < 1 || sp.blockSize > MAX_DEVICE_BLOCK) {
      throw new MoeflashError('INVALID_ARGUMENT', `sequence ${s.seq}: speculate.blockSize must be an integer in [1, ${MAX_DEVICE_BLOCK}] (got ${sp.blockSize})`);
    }
    if (sp.forced && (sp.forced.length !== sp.blockSize || !sp.forced.every((t) => Number.isInteger(t) && t >= 0 && t < m.spec.vocabSize))) {
      throw new MoeflashError('INVALID_ARGUMENT', `sequence ${s.seq}: speculate.forced must hold blockSize token ids`);
    }
    if (s.sample) throw new MoeflashError('INVALID_ARGUMENT', `sequence ${s.seq}: device rounds accept greedily; sampled speculation runs through the engine's host path`);
  }
  const rowsOf = (s: (typeof plan.sequences)[number]) => s.tokens.length + (s.speculate?.blockSize ?? 0);
  const T = plan.sequences.reduce((n, s) => n + rowsOf(s), 0);
  const DT = plan.sequences.reduce((n, s) => n + (s.speculate ? s.speculate.blockSize + 1 : 0), 0);
  const nLogit = plan.sequences.reduce((n, s) => n + (s.speculate ? s.speculate.blockSize + 1 : s.sample && s.tokens.length ? 1 : 0), 0);
  const dnLogit = plan.sequences.reduce((n, s) => n + (s.speculate?.blockSize ?? 0), 0);
  if (T > MT || DT > MT || nLogit > cfg.maxLogitRows || dnLogit > cfg.maxLogitRows) {
    throw new MoeflashError('INVALID_ARGUMENT', `the round needs ${T} verify rows (${nLogit} with logits) and ${DT} draft rows; one call takes ${MT} rows and ${cfg.maxLogitRows} logits rows: load with a larger maxStepTokens or speculate on fewer sequences at once`);
  }
  const lengths = plan.sequences.map((s) => m.length(s.seq));
  const need = plan.sequences.map((s, i) => lengths[i] + rowsOf(s));
  for (const [i, s] of plan.sequences.entries()) {
    if (need[i] > cfg.maxSeqLen) throw new MoeflashError('OUT_OF_MEMORY', `sequence ${s.seq} would hold ${need[i]} positions; the KV cache was sized for ${cfg.maxSeqLen} a sequence: load with a larger maxSequenceLength`);
  }
  const extra = plan.sequences.reduce((n, s, i) => n + Math.max(0, Math.ceil(need[i] / cfg.pageSize) - ctx.pagesOf(s.seq)), 0);
  if (extra > ctx.freePages()) {
    throw new MoeflashError('OUT_OF_MEMORY', `the round needs ${extra} more KV pages and ${ctx.freePages()} are free: release finished sequences, or load with a larger maxSequences`);
  }
  const pagesBySeq = plan.sequences.map((s, i) => ctx.reservePages(s.seq, need[i]));
  const vin = ctx.inputs;
  const din = ctx.draftInputs;
  const spec = new Int32Array(5 * plan.sequences.filter((s) => s.speculate).length);
  const sampleRows: (StepSample | undefined)[] = [];
  let t = 0, dt = 0, li = 0, dli = 0, k = 0, maxLen = 1, dMaxLen = 1;
  const setRow = (arr: Int32Array, row: number, token: number, pos: number, len: number, pages: number[]) => {
    arr[row] = token;
    arr[MT + row] = pos;
    arr[2 * MT + row] = pages[Math.floor(pos / cfg.pageSize)] * cfg.pageSize + (pos % cfg.pageSize);
    arr[3 * MT + row] = len;
    const base = 5 * MT + row * cfg.maxPagesPerSeq;
    const used = Math.ceil(len / cfg.pageSize);
    for (let p = 0; p < used; p++) arr[base + p] = pages[p];
  };
  plan.sequences.forEach((s, i) => {
    const L = lengths[i];
    const pages = pagesBySeq[i];
    const sp = s.speculate;
    if (sp) {
      const B = sp.blockSize;
      spec.set([t, li, B, dli, sp.forced ? 1 : 0], 5 * k++);
      for (let j = 0; j <= B; j++) {
        setRow(vin, t, j === 0 ? s.tokens[0] : sp.forced ? sp.forced[j - 1] : 0, L + j, L + j + 1, pages);
        vin[4 * MT + li++] = t;
        sampleRows.push(undefined);
        t++;
        // Every block row sees the whole context and the whole block (z-lab's is_causal = False).
        setRow(din, dt, j === 0 ? s.tokens[0] : ctx.maskToken, L + j, L + B + 1, pages);
        if (j > 0) din[4 * MT + dli++] = dt;
        dt++;
      }
      maxLen = Math.max(maxLen, L + B + 1);
      dMaxLen = Math.max(dMaxLen, L + B + 1);
    } else {
      s.tokens.forEach((token, j) => {
        setRow(vin, t, token, L + j, L + j + 1, pages);
        if (j === s.tokens.length - 1 && s.sample) {
          vin[4 * MT + li++] = t;
          sampleRows.push(s.sample);
        }
        t++;
      });
      maxLen = Math.max(maxLen, L + s.tokens.length);
    }
  });
  let sample: Float64Array | null = null;
  if (sampleRows.some((r) => r)) {
    sample = new Float64Array(li * SAMPLE_FIELDS);
    sampleRows.forEach((r, j) => {
      if (r) sample!.set(sampleFields(r), j * SAMPLE_FIELDS);
    });
  }
  let res;
  try {
    res = native.round(vin, T, li, maxLen, din, DT, dli, dMaxLen, spec, sample);
  } catch (e) {
    throw translateNativeError(e);
  }
  if (res.graph) m.stats.graphSteps++;
  else m.stats.eagerCalls++;
  const outs: CudaSequenceOutput[] = [];
  k = 0;
  let logitAt = 0;
  plan.sequences.forEach((s, i) => {
    const base = { seq: s.seq, logits: new Float32Array(0), rows: 0, argmax: new Int32Array(0) };
    if (s.speculate) {
      const a = res.accepted[k];
      const emitted = Array.from(res.emitted.subarray(k * (MAX_DEVICE_BLOCK + 1), k * (MAX_DEVICE_BLOCK + 1) + a + 1));
      ctx.setLength(s.seq, lengths[i] + a + 1);
      outs.push({ ...base, speculation: { emitted, accepted: a, blockSize: s.speculate.blockSize } });
      k++;
      logitAt += s.speculate.blockSize + 1;
    } else {
      ctx.setLength(s.seq, lengths[i] + s.tokens.length);
      const out: CudaSequenceOutput = { ...base };
      if (s.sample && s.tokens.length) out.sampled = res.sampled ? res.sampled[logitAt] : res.ids[logitAt];
      if (s.sample && s.tokens.length) logitAt++;
      outs.push(out);
    }
  });
  return { sequences: outs };
}

/** What runRound needs of a CudaModel's page bookkeeping. */
interface RoundContext {
  inputs: Int32Array;
  draftInputs: Int32Array;
  maskToken: number;
  pagesOf(seq: SeqId): number;
  freePages(): number;
  /** Pages for `length` positions (reserved: the caller checked there are enough). */
  reservePages(seq: SeqId, length: number): number[];
  /** The sequence now holds `length` positions; pages past them go back to the pool. */
  setLength(seq: SeqId, length: number): void;
}

/**
 * Appends one native call's routing trace ([layers, T, E] logits, [layers, T, K] experts over the
 * call's rows c0 .. c0 + T - 1) to the traces of the sequences those rows belong to.
 */
function appendRouting(
  traces: (RoutingTrace | undefined)[],
  rows: readonly { si: number }[],
  c0: number,
  T: number,
  routing: { logits: Float32Array; experts: Int32Array },
  spec: ModelSpec,
): void {
  const E = Math.max(spec.moe.numExperts, 1);
  const K = Math.max(spec.moe.topK, 1);
  traces.forEach((tr, si) => {
    if (!tr) return;
    const mine: number[] = [];
    for (let t = 0; t < T; t++) if (rows[c0 + t].si === si) mine.push(t);
    if (!mine.length) return;
    spec.layers.forEach((layer, l) => {
      const dense = layer.mlp === 'dense';
      const lg = new Float32Array(dense ? 0 : mine.length * E);
      const ex = new Int32Array(dense ? 0 : mine.length * K);
      if (!dense) {
        mine.forEach((t, j) => {
          lg.set(routing.logits.subarray((l * T + t) * E, (l * T + t + 1) * E), j * E);
          ex.set(routing.experts.subarray((l * T + t) * K, (l * T + t + 1) * K), j * K);
        });
      }
      tr.logits[l] = concat(tr.logits[l], lg);
      tr.experts[l] = concat(tr.experts[l], ex);
    });
  });
}

function concat<T extends Float32Array | Int32Array>(a: T | undefined, b: T): T {
  if (!a || a.length === 0) return b;
  const out = new (b.constructor as new (n: number) => T)(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

/** The CUDA backend: found by core's registry as `cuda`. */
export class CudaBackend implements Backend {
  readonly name = 'cuda';

  devices(): DeviceInfo[] {
    const a = isCudaAvailable();
    if (!a.ok) throw new MoeflashError('BACKEND_UNAVAILABLE', `moeflash CUDA backend: ${a.reason}`);
    return a.devices;
  }

  async load(spec: ModelSpec, weights: WeightSource, opts: CudaLoadOptions = {}): Promise<CudaModel> {
    const addon = loadAddon();
    checkSupported(spec);
    const device = opts.device ?? 0;
    addon.setDevice(device);
    const expertLoad = planExpertLoad(spec, weights, opts.experts);
    let quantize: Quantizer | null = null;
    if (expertLoad.quantized) {
      const q = await loadQuantizer();
      if (typeof q !== 'string') quantize = q;
      else if (expertLoad.option === 'mxfp4') {
        throw new MoeflashError('BACKEND_UNAVAILABLE', `experts: 'mxfp4' quantizes float experts on load, but ${q}; install it or load with experts: 'stored'`);
      } else Object.assign(expertLoad, { quantized: false, fallback: `${q}; install it to quantize` });
    }
    if (expertLoad.fallback) {
      (opts.log ?? console.warn)(`moeflash cuda: experts held as bf16, not quantized to MXFP4 on load: ${expertLoad.fallback} (experts: 'stored' keeps bf16 without this line)`);
    }
    const plan = await planWeights(spec, weights, quantize);
    expertLoad.format = plan.expertFormat;
    const pageSize = opts.kvCache?.pageSize ?? opts.pageSize ?? 16;
    const maxSeqLen = Math.min(opts.maxSequenceLength ?? Math.min(spec.attention.maxPositionEmbeddings, 4096), spec.attention.maxPositionEmbeddings);
    const cfg = nativeConfig(
      spec,
      {
        maxSequences: opts.maxSequences ?? 8,
        maxStepTokens: opts.maxStepTokens ?? 256,
        pageSize,
        maxSeqLen: Math.max(maxSeqLen, 1),
        pages: opts.kvCache?.pages,
        kvBytes: opts.kvCache?.bytes,
        precision: resolvePrecision(spec, opts.precision),
      },
      plan,
    );
    let native: NativeModel;
    try {
      native = new addon.Model(cfg, plan.layout);
    } catch (e) {
      throw translateNativeError(e);
    }
    try {
      const totalBytes = plan.pieces.reduce((s, p) => s + p.bytes, 0);
      const totalTensors = plan.pieces.reduce((s, p) => s + p.tensors.length, 0);
      let loadedBytes = 0;
      let loadedTensors = 0;
      for (const p of plan.pieces) {
        const data = await p.fill();
        if (data.byteLength !== p.bytes) {
          throw new MoeflashError('WEIGHTS_INVALID', `${p.tensors.join(', ') || 'a derived tensor'}: ${data.byteLength} bytes where ${p.bytes} were planned`);
        }
        native.upload(p.offset, data);
        loadedBytes += p.bytes;
        loadedTensors += p.tensors.length;
        if (p.tensors.length) opts.onProgress?.({ tensor: p.tensors[p.tensors.length - 1], loadedBytes, totalBytes, loadedTensors, totalTensors });
      }
      native.prepare();
    } catch (e) {
      native.dispose();
      throw translateNativeError(e);
    }
    return new CudaModel(spec, native, cfg, plan.expertFormat, plan.fp8Matrices, expertLoad);
  }
}

/** The backend core's registry asks for (`backend: 'cuda'`). */
export function createCudaBackend(): CudaBackend {
  return new CudaBackend();
}
