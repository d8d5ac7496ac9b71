/**
 * The checkpoint converter behind `moeflash quantize`: a Hugging Face model folder in, a folder
 * moeflash (and, for gpt-oss with bf16 dense weights, HF transformers) loads out, with
 * - experts as MXFP4 in the gpt-oss layout for every family: `mlp.experts.gate_up_proj_blocks`
 *   uint8 [E, 2I, H/32, 16] + `_scales` [E, 2I, H/32] and `mlp.experts.down_proj_blocks/_scales`;
 * - dense projections (attention, dense MLP layers) as bf16, or as block-scaled FP8 E4M3 the way HF
 *   fp8 checkpoints store them (`weight` F8_E4M3 + `weight_scale_inv` F32 per 128x128 block);
 * - everything else (embeddings, norms, routers, biases, sinks, lm_head) as it was.
 *
 * It streams: tensors are read and written a band of rows at a time, so memory stays at a few
 * bands whatever the model's size (the one exception is gpt-oss's input-major `[E, H, 2I]` bf16
 * experts, read one expert's slice at a time). Output goes to `OUT.partial-<pid>` and is renamed to
 * OUT only when complete.
 *
 * @module
 */

import { copyFile, mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import {
  DTYPE_SIZES,
  HOST_IS_LITTLE_ENDIAN,
  MoeflashError,
  byteSwap,
  createSafetensorsWriter,
  loadModelSpec,
  openWeights,
  type ModelSpec,
  type SafetensorsEntry,
  type TensorInfo,
  type WeightSource,
} from '@moeflash/core';
import { encodeBf16 } from './bf16.js';
import { fp8BlockOf, layerExperts, type LayerExperts } from './experts.js';
import { quantizeFp8Blocked } from './fp8.js';
import { MXFP4_BLOCK_BYTES, MXFP4_BLOCK_SIZE, quantizeMxfp4, type Mxfp4ScaleRule } from './mxfp4.js';
import { bandRows, RangeReader, requireFloat, tensorRows, type RowSource } from './rows.js';

/** What `--experts` asks for. `keep` leaves the experts exactly as the input stores them. */
export type ExpertFormat = 'mxfp4' | 'keep';
/** What `--dense` asks for: the format of attention and dense-MLP projection weights. */
export type DenseFormat = 'fp8' | 'bf16';

/** Options of {@link convertCheckpoint}. */
export interface ConvertOptions {
  /** Input model folder: config.json and safetensors weights (one file or shards). */
  input: string;
  /** Output folder; must not exist unless `force`. */
  output: string;
  /** Expert format; default `'mxfp4'`. */
  experts?: ExpertFormat;
  /** Dense projection format; default `'bf16'`. */
  dense?: DenseFormat;
  /** MXFP4 scale rule; default `'ocp'` (see {@link Mxfp4ScaleRule}). */
  scaleRule?: Mxfp4ScaleRule;
  /** Replace an existing output folder. */
  force?: boolean;
  /** Largest output shard in bytes (a single tensor group may exceed it); default 5 GB. */
  shardBytes?: number;
  /** Called after every band written (often: throttle before printing). */
  onProgress?: (p: ConvertProgress) => void;
  /** Warnings (experts left unquantized and why). Default: none. */
  log?: (line: string) => void;
}

/** Progress of a conversion. */
export interface ConvertProgress {
  /** Input tensor bytes processed so far, and in all. */
  inputBytes: number;
  totalInputBytes: number;
  /** Output bytes written so far. */
  outputBytes: number;
  /** The output tensor being written. */
  tensor: string;
  elapsedMs: number;
}

/** What {@link convertCheckpoint} wrote. */
export interface ConvertResult {
  /** Absolute path of the output folder. */
  output: string;
  inputBytes: number;
  outputBytes: number;
  seconds: number;
  /** Input bytes a second. */
  bytesPerSecond: number;
  tensors: number;
  shards: string[];
  /** Layers whose experts were written as MXFP4. */
  mxfp4Layers: number[];
  /** Layers whose experts were left as they were, with the reason. */
  keptExpertLayers: KeptExperts[];
  /** Dense projection weights written as FP8 (or converted to bf16). */
  denseTensors: string[];
  /** The `quantization_config` written to config.json (null: none). */
  quantizationConfig: Record<string, unknown> | null;
  /** Files copied beside the weights (tokenizer, generation config, ...). */
  copiedFiles: string[];
}

/** Band size: big enough for I/O to be efficient, small enough to keep memory flat. */
const BAND_BYTES = 4 << 20;
const COPY_CHUNK_BYTES = 4 << 20;
const FP8_BLOCK: [number, number] = [128, 128];
const DEFAULT_SHARD_BYTES = 5e9;

/** Projection weights that `--dense` applies to (attention and dense MLPs; never experts). */
const DENSE_PROJECTION = /_proj(?:_with_mqa)?\.weight$/;
const EXPERT_TENSOR = /^model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\./;
const MIXTRAL_MOE = /^model\.layers\.(\d+)\.block_sparse_moe\.(.*)$/;

/** Non-weight files of a HF model folder that belong with the weights. */
const COPIED_FILES = [
  /^tokenizer(\.json|_config\.json|\.model)$/,
  /^special_tokens_map\.json$/,
  /^added_tokens\.json$/,
  /^(vocab\.(json|txt)|merges\.txt)$/,
  /^chat_template\.(jinja|json)$/,
  /\.jinja$/,
  /^generation_config\.json$/,
  /^(LICENSE|README|USAGE_POLICY|NOTICE)(\..*)?$/i,
];

function isDenseProjection(name: string, info: TensorInfo): boolean {
  return DENSE_PROJECTION.test(name) && info.shape.length === 2 && !name.includes('.experts.');
}

function invalid(message: string): MoeflashError {
  return new MoeflashError('INVALID_ARGUMENT', message);
}

/** One unit of output: a few tensors produced together, all in one shard. */
interface Job {
  outputs: SafetensorsEntry[];
  inputBytes: number;
  run(ctx: JobContext): Promise<void>;
}

interface JobContext {
  io: RangeReader;
  write(name: string, bytes: Uint8Array): Promise<void>;
  /** Input bytes consumed (progress). */
  consumed(bytes: number): void;
}

function outputBytesOf(e: SafetensorsEntry): number {
  return e.shape.reduce((a, d) => a * d, DTYPE_SIZES[e.dtype]);
}

function leBytes(a: Uint16Array | Float32Array): Uint8Array {
  const bytes = new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  return HOST_IS_LITTLE_ENDIAN ? bytes : byteSwap(bytes, a.BYTES_PER_ELEMENT);
}

/**
 * Calls `fn` on consecutive bands of `src`'s rows, reading the next band while `fn` works on the
 * current one (reads go to the libuv pool, so I/O overlaps the quantization).
 */
async function forEachBand(
  src: RowSource,
  band: number,
  fn: (values: Float32Array, r0: number, r1: number) => Promise<void>,
): Promise<void> {
  let r0 = 0;
  let next: Promise<Float32Array> | null = src.rows > 0 ? src.read(0, Math.min(band, src.rows)) : null;
  while (next) {
    const r1 = Math.min(r0 + band, src.rows);
    const values = await next;
    next = r1 < src.rows ? src.read(r1, Math.min(r1 + band, src.rows)) : null;
    // A failed prefetch is reported by the await that consumes it; until then keep it quiet.
    next?.catch(() => {});
    await fn(values, r0, r1);
    r0 = r1;
  }
}

/** A tensor copied byte for byte (possibly under a new name), in chunks. */
function copyJob(info: TensorInfo, outName = info.name): Job {
  return {
    outputs: [{ name: outName, dtype: info.dtype, shape: info.shape }],
    inputBytes: info.byteLength,
    async run(ctx) {
      let pos = 0;
      let next: Promise<Uint8Array> | null = info.byteLength > 0 ? ctx.io.read(info, 0, Math.min(COPY_CHUNK_BYTES, info.byteLength)) : null;
      if (!next) await ctx.write(outName, new Uint8Array(0));
      while (next) {
        const bytes = await next;
        const end = pos + bytes.length;
        next = end < info.byteLength ? ctx.io.read(info, end, Math.min(COPY_CHUNK_BYTES, info.byteLength - end)) : null;
        next?.catch(() => {});
        await ctx.write(outName, bytes);
        ctx.consumed(bytes.length);
        pos = end;
      }
    },
  };
}

/** MXFP4 blocks and scales of a stack of matrices given as row sources (one per expert). */
function mxfp4Outputs(
  name: string,
  count: number,
  rows: number,
  cols: number,
): [SafetensorsEntry, SafetensorsEntry] {
  const g = cols / MXFP4_BLOCK_SIZE;
  return [
    { name: `${name}_blocks`, dtype: 'U8', shape: [count, rows, g, MXFP4_BLOCK_BYTES] },
    { name: `${name}_scales`, dtype: 'U8', shape: [count, rows, g] },
  ];
}

async function writeMxfp4Stack(
  ctx: JobContext,
  name: string,
  sources: (j: number) => RowSource,
  count: number,
  scaleRule: Mxfp4ScaleRule,
): Promise<void> {
  for (let j = 0; j < count; j++) {
    const src = sources(j);
    await forEachBand(src, bandRows(src, BAND_BYTES), async (values, r0, r1) => {
      const { blocks, scales } = quantizeMxfp4(values, { scaleRule });
      await Promise.all([ctx.write(`${name}_blocks`, blocks), ctx.write(`${name}_scales`, scales)]);
      ctx.consumed((r1 - r0) * src.sourceBytesPerRow);
    });
  }
}

function expertJob(ex: LayerExperts, outPrefix: string, scaleRule: Mxfp4ScaleRule, src: WeightSource): Job[] {
  const E = ex.numExperts;
  const H = ex.hidden;
  const I = ex.inter;
  const out = `${outPrefix}.experts`;
  const jobs: Job[] = [];
  if (ex.mxfp4) {
    // Already MXFP4: the codes are copied, not requantized (decoding and re-encoding could move a
    // block to another scale under a different rule, and gains nothing).
    const t = ex.mxfp4;
    jobs.push(copyJob(t.gateUpBlocks, `${out}.gate_up_proj_blocks`), copyJob(t.gateUpScales, `${out}.gate_up_proj_scales`));
    jobs.push(copyJob(t.downBlocks, `${out}.down_proj_blocks`), copyJob(t.downScales, `${out}.down_proj_scales`));
  } else {
    const inputBytes = ex.inputs.reduce((s, n) => s + src.info(n).byteLength, 0);
    // Two jobs (gate_up, down) share the input bytes in proportion to their sizes.
    const guShare = Math.round((inputBytes * 2) / 3);
    jobs.push({
      outputs: mxfp4Outputs(`${out}.gate_up_proj`, E, 2 * I, H),
      inputBytes: guShare,
      run: (ctx) => writeMxfp4Stack(ctx, `${out}.gate_up_proj`, (j) => ex.gateUp(j), E, scaleRule),
    });
    jobs.push({
      outputs: mxfp4Outputs(`${out}.down_proj`, E, H, I),
      inputBytes: inputBytes - guShare,
      run: (ctx) => writeMxfp4Stack(ctx, `${out}.down_proj`, (j) => ex.down(j), E, scaleRule),
    });
  }
  for (const b of ex.biases) jobs.push(copyJob(src.info(b), `${out}.${b.slice(b.lastIndexOf('.') + 1)}`));
  return jobs;
}

/** A dense projection weight (2-D, maybe FP8 with `weight_scale_inv`) to FP8 or bf16. */
function denseJob(src: WeightSource, info: TensorInfo, spec: ModelSpec, format: DenseFormat): Job {
  const scaleInfo = src.has(`${info.name}_scale_inv`) ? src.info(`${info.name}_scale_inv`) : null;
  const [rows, cols] = info.shape;
  const inputBytes = info.byteLength + (scaleInfo?.byteLength ?? 0);
  const srcBlock = fp8BlockOf(spec);
  const source = (io: RangeReader) =>
    tensorRows(io, info, { rows, cols, scale: scaleInfo ? { info: scaleInfo, block: srcBlock } : undefined });

  if (format === 'bf16') {
    if (info.dtype === 'BF16' && !scaleInfo) return copyJob(info);
    return {
      outputs: [{ name: info.name, dtype: 'BF16', shape: [rows, cols] }],
      inputBytes,
      async run(ctx) {
        const rs = source(ctx.io);
        await forEachBand(rs, bandRows(rs, BAND_BYTES), async (values, r0, r1) => {
          await ctx.write(info.name, leBytes(encodeBf16(values)));
          ctx.consumed((r1 - r0) * rs.sourceBytesPerRow);
        });
        if (scaleInfo) ctx.consumed(scaleInfo.byteLength);
      },
    };
  }

  const scaleName = `${info.name}_scale_inv`;
  const scaleShape = [Math.ceil(rows / FP8_BLOCK[0]), Math.ceil(cols / FP8_BLOCK[1])];
  if (info.dtype === 'F8_E4M3' && scaleInfo && srcBlock[0] === FP8_BLOCK[0] && srcBlock[1] === FP8_BLOCK[1] && scaleInfo.dtype === 'F32') {
    const [a, b] = [copyJob(info), copyJob(scaleInfo)];
    return { outputs: [...a.outputs, ...b.outputs], inputBytes, run: async (ctx) => { await a.run(ctx); await b.run(ctx); } };
  }
  return {
    outputs: [
      { name: info.name, dtype: 'F8_E4M3', shape: [rows, cols] },
      { name: scaleName, dtype: 'F32', shape: scaleShape },
    ],
    inputBytes,
    async run(ctx) {
      const rs = source(ctx.io);
      // Bands of whole 128-row blocks: each band's scales are complete rows of weight_scale_inv.
      await forEachBand(rs, bandRows(rs, BAND_BYTES, FP8_BLOCK[0]), async (values, r0, r1) => {
        let q: ReturnType<typeof quantizeFp8Blocked>;
        try {
          q = quantizeFp8Blocked(values, r1 - r0, cols, FP8_BLOCK);
        } catch (e) {
          throw new MoeflashError('WEIGHTS_INVALID', `${info.name} in ${info.file}, rows ${r0}..${r1 - 1}: ${(e as Error).message} (row numbers within those rows)`, { cause: e });
        }
        await Promise.all([ctx.write(info.name, q.data), ctx.write(scaleName, leBytes(q.scaleInv))]);
        ctx.consumed((r1 - r0) * rs.sourceBytesPerRow);
      });
      if (scaleInfo) ctx.consumed(scaleInfo.byteLength);
    },
  };
}

/** Why a layer's experts cannot be MXFP4 (null: they can). */
function mxfp4Obstacle(ex: LayerExperts): string | null {
  const bad: string[] = [];
  if (ex.hidden % MXFP4_BLOCK_SIZE !== 0) bad.push(`hidden_size ${ex.hidden}`);
  if (ex.inter % MXFP4_BLOCK_SIZE !== 0) bad.push(`expert intermediate size ${ex.inter}`);
  if (bad.length === 0) return null;
  return `${bad.join(' and ')} not a multiple of ${MXFP4_BLOCK_SIZE} (MXFP4 blocks run along the input axis)`;
}

/** A layer whose experts the converter left as the input stores them. */
export interface KeptExperts {
  layer: number;
  /** Module holding them, e.g. `model.layers.3.block_sparse_moe.experts`. */
  module: string;
  /** Whether they are MXFP4 already (then they still count as MXFP4 experts). */
  mxfp4: boolean;
  reason: string;
}

interface Plan {
  jobs: Job[];
  mxfp4Layers: number[];
  keptExpertLayers: KeptExperts[];
  denseTensors: string[];
}

function plan(src: WeightSource, spec: ModelSpec, opts: Required<Pick<ConvertOptions, 'experts' | 'dense' | 'scaleRule'>>, io: RangeReader, log: (l: string) => void): Plan {
  const jobs: Job[] = [];
  const done = new Set<string>();
  const mxfp4Layers: number[] = [];
  const keptExpertLayers: KeptExperts[] = [];
  const denseTensors: string[] = [];
  const converted = new Map<number, boolean>();

  const layerDecision = (layer: number): boolean => {
    let d = converted.get(layer);
    if (d !== undefined) return d;
    const ex = layerExperts(src, io, spec, layer);
    const obstacle = opts.experts === 'keep' ? 'kept as asked (--experts keep)' : mxfp4Obstacle(ex);
    d = obstacle === null;
    converted.set(layer, d);
    if (d) {
      jobs.push(...expertJob(ex, `model.layers.${layer}.mlp`, opts.scaleRule, src));
      mxfp4Layers.push(layer);
      for (const n of [...ex.inputs, ...ex.biases]) done.add(n);
    } else {
      keptExpertLayers.push({ layer, module: `${ex.prefix}.experts`, mxfp4: ex.kind === 'mxfp4', reason: obstacle! });
      if (opts.experts !== 'keep') log(`layer ${layer}: experts kept as they are: ${obstacle}`);
    }
    return d;
  };

  for (const name of src.names()) {
    if (done.has(name)) continue;
    const info = src.info(name);
    const em = EXPERT_TENSOR.exec(name);
    if (em && spec.layers[Number(em[1])]?.mlp === 'moe') {
      if (layerDecision(Number(em[1]))) {
        if (!done.has(name)) throw invalid(`${src.origin}: tensor '${name}' is in layer ${em[1]}'s experts but not part of any layout moeflash reads; remove it or report the layout`);
        continue;
      }
      jobs.push(copyJob(info));
      continue;
    }
    // Mixtral's released `block_sparse_moe.*` moves to `mlp.*` with its experts, router included:
    // the loader finds a layer's router under the prefix of its experts.
    const mm = MIXTRAL_MOE.exec(name);
    if (mm && spec.layers[Number(mm[1])]?.mlp === 'moe' && layerDecision(Number(mm[1]))) {
      jobs.push(copyJob(info, `model.layers.${mm[1]}.mlp.${mm[2]}`));
      continue;
    }
    if (name.endsWith('.weight_scale_inv')) {
      const weight = name.slice(0, -'_scale_inv'.length);
      if (src.has(weight) && isDenseProjection(weight, src.info(weight))) continue; // converted with its weight
    }
    if (isDenseProjection(name, info)) {
      requireFloat(info);
      const j = denseJob(src, info, spec, opts.dense);
      jobs.push(j);
      if (j.outputs.length === 2 || j.outputs[0].dtype !== info.dtype) denseTensors.push(name);
      continue;
    }
    jobs.push(copyJob(info));
  }
  return { jobs, mxfp4Layers, keptExpertLayers, denseTensors };
}

/**
 * The `quantization_config` of the output. MXFP4 experts are declared as gpt-oss declares them
 * (`quant_method: "mxfp4"` and `modules_to_not_convert`); FP8 dense weights as HF's fine-grained
 * FP8 (`quant_method: "fp8"`, `weight_block_size: [128, 128]`). When both are present the FP8 part
 * is nested as `dense_quantization_config`, since one `quant_method` cannot name both; core's config
 * parser reads it into `ModelSpec.quantization.dense`.
 */
export function outputQuantizationConfig(
  spec: ModelSpec,
  p: { mxfp4Layers: number[]; keptExpertLayers: KeptExperts[]; fp8Dense: boolean },
): Record<string, unknown> | null {
  const router = spec.family === 'gpt_oss' ? 'model.layers.*.mlp.router' : 'model.layers.*.mlp.gate';
  const mxfp4 = p.mxfp4Layers.length > 0 || p.keptExpertLayers.some((k) => k.mxfp4);
  const denseLayers = spec.layers.flatMap((l, i) => (l.mlp === 'dense' ? [`model.layers.${i}.mlp`] : []));
  const notMxfp4Experts = p.keptExpertLayers.filter((k) => !k.mxfp4).map((k) => k.module);
  const fp8 = {
    quant_method: 'fp8',
    activation_scheme: 'dynamic',
    fmt: 'e4m3',
    weight_block_size: [...FP8_BLOCK],
    modules_to_not_convert: [
      ...new Set([...(mxfp4 ? ['model.layers.*.mlp.experts'] : []), ...p.keptExpertLayers.map((k) => k.module.replace(/^model\.layers\.\d+\./, 'model.layers.*.'))]),
      router,
      'model.embed_tokens',
      'lm_head',
    ],
  };
  if (!mxfp4) return p.fp8Dense ? fp8 : null;
  const config: Record<string, unknown> = {
    quant_method: 'mxfp4',
    modules_to_not_convert: ['model.layers.*.self_attn', router, 'model.embed_tokens', 'lm_head', ...denseLayers, ...notMxfp4Experts],
  };
  if (p.fp8Dense) config.dense_quantization_config = fp8;
  return config;
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/** Splits jobs into shards of at most `limit` output bytes (a job never straddles two shards). */
function shard(jobs: Job[], limit: number): Job[][] {
  const shards: Job[][] = [];
  let cur: Job[] = [];
  let bytes = 0;
  for (const j of jobs) {
    const b = j.outputs.reduce((s, e) => s + outputBytesOf(e), 0);
    if (cur.length > 0 && bytes + b > limit) {
      shards.push(cur);
      cur = [];
      bytes = 0;
    }
    cur.push(j);
    bytes += b;
  }
  if (cur.length > 0 || shards.length === 0) shards.push(cur);
  return shards;
}

/**
 * Converts a model folder (see the module notes for what each tensor becomes). Memory stays at a
 * few row bands; the output appears at `opts.output` only when complete.
 *
 * Throws INVALID_ARGUMENT for bad options or an existing output without `force`, and the loader's
 * errors (CONFIG_*, WEIGHTS_*) for an input moeflash cannot read.
 */
export async function convertCheckpoint(opts: ConvertOptions): Promise<ConvertResult> {
  const t0 = performance.now();
  const experts = opts.experts ?? 'mxfp4';
  const dense = opts.dense ?? 'bf16';
  const scaleRule = opts.scaleRule ?? 'ocp';
  if (experts !== 'mxfp4' && experts !== 'keep') throw invalid(`experts must be 'mxfp4' or 'keep', got ${JSON.stringify(experts)}`);
  if (dense !== 'fp8' && dense !== 'bf16') throw invalid(`dense must be 'fp8' or 'bf16', got ${JSON.stringify(dense)}`);
  if (scaleRule !== 'ocp' && scaleRule !== 'no-clip') throw invalid(`scaleRule must be 'ocp' or 'no-clip', got ${JSON.stringify(scaleRule)}`);
  const shardBytes = opts.shardBytes ?? DEFAULT_SHARD_BYTES;
  if (!(shardBytes > 0)) throw invalid(`shardBytes must be positive, got ${shardBytes}`);
  const log = opts.log ?? (() => {});

  const input = resolve(opts.input);
  const output = resolve(opts.output);
  if (output === input) throw invalid(`the output folder is the input folder (${input}); choose another --out`);
  if (!(await exists(join(input, 'config.json')))) {
    throw new MoeflashError('WEIGHTS_MISSING', `${input} has no config.json; --in must be a Hugging Face model folder`);
  }
  if ((await exists(output)) && !opts.force) {
    throw invalid(`${output} already exists; remove it or pass --force to replace it`);
  }
  const rawConfig = JSON.parse(await readFile(join(input, 'config.json'), 'utf8')) as Record<string, unknown>;
  const spec = await loadModelSpec(input);
  const src = await openWeights(input);
  const io = new RangeReader();
  const partial = `${output}.partial-${process.pid}`;
  try {
    const p = plan(src, spec, { experts, dense, scaleRule }, io, log);
    const quantizationConfig = outputQuantizationConfig(spec, {
      mxfp4Layers: p.mxfp4Layers,
      keptExpertLayers: p.keptExpertLayers,
      fp8Dense: dense === 'fp8' && p.denseTensors.length > 0,
    });

    await rm(partial, { recursive: true, force: true });
    await mkdir(partial, { recursive: true });

    const shards = shard(p.jobs, shardBytes);
    const fileNames =
      shards.length === 1
        ? ['model.safetensors']
        : shards.map((_, i) => `model-${String(i + 1).padStart(5, '0')}-of-${String(shards.length).padStart(5, '0')}.safetensors`);
    const totalInputBytes = p.jobs.reduce((s, j) => s + j.inputBytes, 0);
    let inputBytes = 0;
    let outputBytes = 0;
    const weightMap: Record<string, string> = {};
    let tensors = 0;

    for (let s = 0; s < shards.length; s++) {
      const entries = shards[s].flatMap((j) => j.outputs);
      const writer = await createSafetensorsWriter(join(partial, fileNames[s]), entries, { format: 'pt' });
      let current = '';
      const ctx: JobContext = {
        io,
        async write(name, bytes) {
          current = name;
          await writer.write(name, bytes);
          outputBytes += bytes.byteLength;
        },
        consumed(bytes) {
          inputBytes += bytes;
          opts.onProgress?.({ inputBytes, totalInputBytes, outputBytes, tensor: current, elapsedMs: performance.now() - t0 });
        },
      };
      try {
        for (const job of shards[s]) {
          const before = inputBytes;
          await job.run(ctx);
          // Jobs estimate their input share; settle the count on what they declared.
          inputBytes = before + job.inputBytes;
        }
        await writer.close();
      } catch (e) {
        await writer.abort();
        throw e;
      }
      for (const e of entries) weightMap[e.name] = fileNames[s];
      tensors += entries.length;
    }
    if (shards.length > 1) {
      await writeFile(join(partial, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: outputBytes }, weight_map: weightMap }, null, 2) + '\n');
    }

    const config = { ...rawConfig };
    delete config.quantization_config;
    if (quantizationConfig) config.quantization_config = quantizationConfig;
    await writeFile(join(partial, 'config.json'), JSON.stringify(config, null, 2) + '\n');

    const copiedFiles: string[] = [];
    for (const entry of await readdir(input, { withFileTypes: true })) {
      if (!entry.isFile() || entry.name === 'config.json') continue;
      if (!COPIED_FILES.some((re) => re.test(entry.name))) continue;
      await copyFile(join(input, entry.name), join(partial, entry.name));
      copiedFiles.push(entry.name);
    }

    await mkdir(dirname(output), { recursive: true });
    if (await exists(output)) {
      const old = `${output}.old-${process.pid}`;
      await rename(output, old);
      await rename(partial, output);
      await rm(old, { recursive: true, force: true });
    } else {
      await rename(partial, output);
    }
    const seconds = (performance.now() - t0) / 1000;
    return {
      output,
      inputBytes: totalInputBytes,
      outputBytes,
      seconds,
      bytesPerSecond: totalInputBytes / seconds,
      tensors,
      shards: fileNames,
      mxfp4Layers: p.mxfp4Layers,
      keptExpertLayers: p.keptExpertLayers,
      denseTensors: p.denseTensors,
      quantizationConfig,
      copiedFiles,
    };
  } catch (e) {
    await rm(partial, { recursive: true, force: true }).catch(() => {});
    throw e;
  } finally {
    await io.close();
    await src.close();
  }
}
