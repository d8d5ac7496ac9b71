/**
 * The quality report behind `moeflash quant-report`: how far a converted checkpoint is from the one
 * it came from, measured where it matters (the next-token distributions on a text) and where it is
 * made (each quantized weight tensor).
 *
 * - KL(p_ref || p_quant) of the next-token distributions at every position of the text (mean and
 *   max), computed in float64 from the two models' float32 logits.
 * - Top-1 agreement: the share of positions where both models' most likely next token is the same.
 * - Perplexity of each model on the text: exp of the mean negative log-likelihood of each actual
 *   next token (positions 0 .. T-2).
 * - Relative error ||W_q - W|| / ||W|| (Frobenius) of every quantized tensor against the reference
 *   tensor it came from, and per role (all experts' gate/up, all q_proj, ...). For MXFP4 experts
 *   it also gives the error each scale rule would give (`ocp`, `no-clip`) on the same weights.
 *
 * @module
 */

import { stat, readdir, readFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import {
  MoeflashError,
  loadModel,
  loadModelSpec,
  loadTokenizer,
  openWeights,
  type BackendChoice,
  type ModelSpec,
  type TensorInfo,
  type WeightSource,
} from '@moeflash/core';
import { fp8BlockOf, layerExperts } from './experts.js';
import { dequantizeMxfp4, quantizeMxfp4, type Mxfp4ScaleRule } from './mxfp4.js';
import { bandRows, RangeReader, tensorRows, type RowSource } from './rows.js';
import { SAMPLE_TEXT } from './sample-text.js';

/** Options of {@link quantReport}. */
export interface QuantReportOptions {
  /** The reference model folder (usually the converter's input). */
  ref: string;
  /** The quantized model folder. */
  quant: string;
  /** Text to score; default {@link SAMPLE_TEXT}. */
  text?: string;
  /** Where `text` came from, for the report (a file name); default 'built-in sample' or 'text'. */
  textSource?: string;
  /** Backend to run both models on; default `'cpu'`. */
  backend?: BackendChoice;
  /** Tokens of the text scored at most (the text is cut there); default 256. */
  maxTokens?: number;
  /** Compare the weight tensors too (reads both checkpoints once more); default true. */
  weights?: boolean;
  /** Progress lines (model loads, tensors compared). */
  log?: (line: string) => void;
}

/** Size and declared quantization of one of the two models. */
export interface ReportModel {
  dir: string;
  /** Bytes of tensor data in its safetensors files. */
  bytes: number;
  quantization: ModelSpec['quantization'];
}

/** The next-token comparison. */
export interface LogitsComparison {
  /** Positions compared (tokens of the text). */
  positions: number;
  klMean: number;
  klMax: number;
  /** Position (0-based token index) of the largest KL. */
  klMaxPosition: number;
  /** Share of positions whose argmax tokens agree, 0..1. */
  top1Agreement: number;
  perplexityRef: number;
  perplexityQuant: number;
}

/** Relative error of one quantized tensor. */
export interface TensorError {
  /** Tensor in the quantized checkpoint (for MXFP4: without the `_blocks` / `_scales` suffix). */
  name: string;
  /** What it came from in the reference checkpoint. */
  refName: string;
  /** Role shared by the same tensor of every layer (`experts.gate_up`, `self_attn.q_proj`, ...). */
  role: string;
  format: 'mxfp4' | 'fp8' | 'bf16';
  elements: number;
  /** ||W_q - W|| / ||W||. */
  relError: number;
  /** MXFP4 only: the relative error each scale rule gives on the same reference weights. */
  rules?: Record<Mxfp4ScaleRule, number>;
}

/** Errors of one role, over all its tensors: sqrt(sum ||W_q - W||^2 / sum ||W||^2). */
export interface RoleError {
  role: string;
  format: TensorError['format'];
  tensors: number;
  elements: number;
  relError: number;
  rules?: Record<Mxfp4ScaleRule, number>;
}

/** What {@link quantReport} returns (and `--json` writes). */
export interface QuantReport {
  schema: 'moeflash.quant-report.v1';
  ref: ReportModel;
  quant: ReportModel;
  backend: string;
  text: {
    source: string;
    tokens: number;
    /** Whose tokenizer made the ids; null when neither folder had one (ids are then synthetic). */
    tokenizer: string | null;
  };
  logits: LogitsComparison;
  weights: {
    tensors: TensorError[];
    byRole: RoleError[];
    /**
     * For MXFP4 experts: which scale rule gives the smaller error over all expert weights, or null
     * when not measured (no MXFP4 experts, or a reference already in MXFP4).
     */
    betterRule: Mxfp4ScaleRule | null;
  } | null;
  seconds: number;
}

const BAND_BYTES = 4 << 20;
const RULES: Mxfp4ScaleRule[] = ['ocp', 'no-clip'];
const DENSE_PROJECTION = /_proj(?:_with_mqa)?\.weight$/;

async function checkpointBytes(dir: string): Promise<number> {
  let total = 0;
  for (const f of await readdir(dir)) {
    if (f.endsWith('.safetensors') && f !== 'logits.safetensors') total += (await stat(join(dir, f))).size;
  }
  return total;
}

/** A fixed pseudo-random token sequence, for models without a tokenizer. */
function syntheticTokens(n: number, vocab: number): number[] {
  let s = 0x12345678;
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    out.push((s >>> 0) % vocab);
  }
  return out;
}

async function tokenize(
  opts: QuantReportOptions,
  vocab: number,
  log: (l: string) => void,
): Promise<{ tokens: number[]; tokenizer: string | null; source: string }> {
  const maxTokens = opts.maxTokens ?? 256;
  const source = opts.textSource ?? (opts.text === undefined ? 'built-in sample' : 'text');
  for (const dir of [opts.ref, opts.quant]) {
    const has = await stat(join(dir, 'tokenizer.json')).then(() => true, () => false);
    if (!has) continue;
    const tok = await loadTokenizer(dir);
    const ids = tok.encode(opts.text ?? SAMPLE_TEXT).slice(0, maxTokens);
    const bad = ids.find((t) => t >= vocab);
    if (bad !== undefined) {
      throw new MoeflashError(
        'TOKENIZER_INVALID',
        `${join(dir, 'tokenizer.json')} gives token id ${bad}, outside the model's vocabulary of ${vocab}; the tokenizer does not belong to this model`,
      );
    }
    return { tokens: ids, tokenizer: resolve(dir), source };
  }
  if (opts.text !== undefined) {
    throw new MoeflashError('TOKENIZER_INVALID', `neither ${opts.ref} nor ${opts.quant} has a tokenizer.json, so the text cannot be tokenized; leave out the text to score synthetic token ids`);
  }
  log(`no tokenizer.json in either folder: scoring ${maxTokens} pseudo-random token ids instead of text`);
  return { tokens: syntheticTokens(maxTokens, vocab), tokenizer: null, source: 'synthetic token ids (no tokenizer)' };
}

async function runLogits(dir: string, backend: BackendChoice, tokens: number[], log: (l: string) => void): Promise<{ logits: Float32Array; backend: string }> {
  // Each checkpoint runs as stored: the CUDA backend would otherwise quantize the reference's
  // bf16 experts on load, and the report would compare MXFP4 with MXFP4.
  const h = await loadModel({ model: dir, backend, backendOptions: { experts: 'stored' } });
  log(`loaded ${dir} on ${h.backend.name} in ${(h.loadMs / 1000).toFixed(1)} s`);
  try {
    const r = await h.model.step({ sequences: [{ seq: 0, tokens, logits: 'all' }] });
    return { logits: r.sequences[0].logits, backend: h.backend.name };
  } finally {
    await h.model.dispose();
  }
}

/** log-softmax of `x[off .. off + n)` into `out` (float64). */
function logSoftmax(x: Float32Array, off: number, n: number, out: Float64Array): void {
  let m = -Infinity;
  for (let i = 0; i < n; i++) if (x[off + i] > m) m = x[off + i];
  let s = 0;
  for (let i = 0; i < n; i++) s += Math.exp(x[off + i] - m);
  const lse = m + Math.log(s);
  for (let i = 0; i < n; i++) out[i] = x[off + i] - lse;
}

/** The next-token comparison of two models' logits ([T, V] row-major) on `tokens`. */
export function compareLogits(ref: Float32Array, quant: Float32Array, tokens: readonly number[], vocab: number): LogitsComparison {
  const T = tokens.length;
  if (ref.length !== T * vocab || quant.length !== T * vocab) {
    throw new MoeflashError('INVALID_ARGUMENT', `compareLogits: expected ${T} x ${vocab} logits, got ${ref.length} and ${quant.length}`);
  }
  const lr = new Float64Array(vocab);
  const lq = new Float64Array(vocab);
  let klSum = 0;
  let klMax = -Infinity;
  let klMaxPosition = 0;
  let agree = 0;
  let nllRef = 0;
  let nllQuant = 0;
  for (let t = 0; t < T; t++) {
    logSoftmax(ref, t * vocab, vocab, lr);
    logSoftmax(quant, t * vocab, vocab, lq);
    let kl = 0;
    let ar = 0;
    let aq = 0;
    for (let v = 0; v < vocab; v++) {
      const p = Math.exp(lr[v]);
      if (p > 0) kl += p * (lr[v] - lq[v]);
      if (lr[v] > lr[ar]) ar = v;
      if (lq[v] > lq[aq]) aq = v;
    }
    klSum += kl;
    if (kl > klMax) {
      klMax = kl;
      klMaxPosition = t;
    }
    if (ar === aq) agree++;
    if (t + 1 < T) {
      nllRef -= lr[tokens[t + 1]];
      nllQuant -= lq[tokens[t + 1]];
    }
  }
  const n = Math.max(1, T - 1);
  return {
    positions: T,
    klMean: klSum / T,
    klMax,
    klMaxPosition,
    top1Agreement: agree / T,
    perplexityRef: Math.exp(nllRef / n),
    perplexityQuant: Math.exp(nllQuant / n),
  };
}

interface Acc {
  err: number;
  norm: number;
  elements: number;
  rules?: Record<Mxfp4ScaleRule, number>;
}

/** Accumulates ||q - w||^2 and ||w||^2 over bands of two row sources of one shape. */
async function accumulate(ref: RowSource, quant: RowSource, acc: Acc, withRules: boolean): Promise<void> {
  if (ref.rows !== quant.rows || ref.cols !== quant.cols) {
    throw new MoeflashError('WEIGHTS_INVALID', `cannot compare a [${ref.rows}, ${ref.cols}] reference with a [${quant.rows}, ${quant.cols}] quantized matrix`);
  }
  const band = bandRows(ref, BAND_BYTES);
  for (let r0 = 0; r0 < ref.rows; r0 += band) {
    const r1 = Math.min(ref.rows, r0 + band);
    const [w, q] = await Promise.all([ref.read(r0, r1), quant.read(r0, r1)]);
    for (let i = 0; i < w.length; i++) {
      const d = q[i] - w[i];
      acc.err += d * d;
      acc.norm += w[i] * w[i];
    }
    acc.elements += w.length;
    if (withRules) {
      acc.rules ??= { ocp: 0, 'no-clip': 0 };
      for (const rule of RULES) {
        const { blocks, scales } = quantizeMxfp4(w, { scaleRule: rule });
        const d = dequantizeMxfp4(blocks, scales);
        let e = 0;
        for (let i = 0; i < w.length; i++) e += (d[i] - w[i]) ** 2;
        acc.rules[rule] += e;
      }
    }
  }
}

const rel = (err: number, norm: number) => (norm > 0 ? Math.sqrt(err / norm) : err > 0 ? Infinity : 0);

function layerRole(name: string): string {
  return name.replace(/^model\.layers\.\d+\./, '').replace(/\.weight$/, '');
}

async function weightErrors(
  refDir: string,
  quantDir: string,
  log: (l: string) => void,
): Promise<NonNullable<QuantReport['weights']>> {
  const [refSpec, quantSpec] = await Promise.all([loadModelSpec(refDir), loadModelSpec(quantDir)]);
  const [ref, quant] = await Promise.all([openWeights(refDir), openWeights(quantDir)]);
  const io = new RangeReader();
  const tensors: TensorError[] = [];
  const accs: Acc[] = [];
  try {
    for (let l = 0; l < quantSpec.numLayers; l++) {
      if (quantSpec.layers[l].mlp !== 'moe') continue;
      const qe = layerExperts(quant, io, quantSpec, l);
      if (qe.kind !== 'mxfp4') continue;
      const re = layerExperts(ref, io, refSpec, l);
      const withRules = re.kind !== 'mxfp4';
      for (const [part, role] of [['gateUp', 'gate_up'], ['down', 'down']] as const) {
        const acc: Acc = { err: 0, norm: 0, elements: 0 };
        for (let j = 0; j < qe.numExperts; j++) await accumulate(re[part](j), qe[part](j), acc, withRules);
        const name = `model.layers.${l}.mlp.experts.${role}_proj`;
        tensors.push({
          name,
          refName: re.kind === 'per-expert' ? `${re.prefix}.experts.{0..${re.numExperts - 1}}.*` : `${re.prefix}.experts.${role}_proj${re.kind === 'mxfp4' ? '_blocks' : ''}`,
          role: `experts.${role}`,
          format: 'mxfp4',
          elements: acc.elements,
          relError: rel(acc.err, acc.norm),
          ...(acc.rules ? { rules: { ocp: rel(acc.rules.ocp, acc.norm), 'no-clip': rel(acc.rules['no-clip'], acc.norm) } } : {}),
        });
        accs.push(acc);
        log(`compared ${name}`);
      }
    }

    const refBlock = fp8BlockOf(refSpec);
    const quantBlock = fp8BlockOf(quantSpec);
    const rowsOf = (src: WeightSource, info: TensorInfo, block: [number, number]) => {
      const s = src.has(`${info.name}_scale_inv`) ? src.info(`${info.name}_scale_inv`) : null;
      return tensorRows(io, info, { rows: info.shape[0], cols: info.shape[1], scale: s ? { info: s, block } : undefined });
    };
    for (const name of quant.names()) {
      if (!DENSE_PROJECTION.test(name) || name.includes('.experts.') || !ref.has(name)) continue;
      const qi = quant.info(name);
      const ri = ref.info(name);
      if (qi.shape.length !== 2) continue;
      const qScaled = quant.has(`${name}_scale_inv`);
      const rScaled = ref.has(`${name}_scale_inv`);
      if (qi.dtype === ri.dtype && qScaled === rScaled) continue; // not converted
      const format = qi.dtype === 'F8_E4M3' ? 'fp8' : qi.dtype === 'BF16' ? 'bf16' : null;
      if (format === null) continue;
      const acc: Acc = { err: 0, norm: 0, elements: 0 };
      await accumulate(rowsOf(ref, ri, refBlock), rowsOf(quant, qi, quantBlock), acc, false);
      tensors.push({ name, refName: name, role: layerRole(name), format, elements: acc.elements, relError: rel(acc.err, acc.norm) });
      accs.push(acc);
    }
  } finally {
    await io.close();
    await Promise.all([ref.close(), quant.close()]);
  }

  const byRoleMap = new Map<string, { format: TensorError['format']; tensors: number; acc: Acc }>();
  tensors.forEach((t, i) => {
    const key = `${t.role}\u0000${t.format}`;
    const g = byRoleMap.get(key) ?? { format: t.format, tensors: 0, acc: { err: 0, norm: 0, elements: 0 } };
    g.tensors++;
    g.acc.err += accs[i].err;
    g.acc.norm += accs[i].norm;
    g.acc.elements += accs[i].elements;
    if (accs[i].rules) {
      g.acc.rules ??= { ocp: 0, 'no-clip': 0 };
      g.acc.rules.ocp += accs[i].rules!.ocp;
      g.acc.rules['no-clip'] += accs[i].rules!['no-clip'];
    }
    byRoleMap.set(key, g);
  });
  const byRole: RoleError[] = [...byRoleMap].map(([key, g]) => ({
    role: key.split('\u0000')[0],
    format: g.format,
    tensors: g.tensors,
    elements: g.acc.elements,
    relError: rel(g.acc.err, g.acc.norm),
    ...(g.acc.rules ? { rules: { ocp: rel(g.acc.rules.ocp, g.acc.norm), 'no-clip': rel(g.acc.rules['no-clip'], g.acc.norm) } } : {}),
  }));
  let ocp = 0;
  let noClip = 0;
  let measured = false;
  for (const a of accs) {
    if (!a.rules) continue;
    measured = true;
    ocp += a.rules.ocp;
    noClip += a.rules['no-clip'];
  }
  return { tensors, byRole, betterRule: measured ? (noClip < ocp ? 'no-clip' : 'ocp') : null };
}

/**
 * Compares a quantized model with its reference: next-token distributions on a text (both models
 * run on `opts.backend`, one after the other) and, unless `weights: false`, every quantized tensor.
 */
export async function quantReport(opts: QuantReportOptions): Promise<QuantReport> {
  const t0 = performance.now();
  const log = opts.log ?? (() => {});
  const refDir = resolve(opts.ref);
  const quantDir = resolve(opts.quant);
  const [refSpec, quantSpec] = await Promise.all([loadModelSpec(refDir), loadModelSpec(quantDir)]);
  if (refSpec.vocabSize !== quantSpec.vocabSize || refSpec.family !== quantSpec.family || refSpec.numLayers !== quantSpec.numLayers) {
    throw new MoeflashError(
      'INVALID_ARGUMENT',
      `${quantDir} (${quantSpec.family}, ${quantSpec.numLayers} layers, vocab ${quantSpec.vocabSize}) is not a conversion of ${refDir} (${refSpec.family}, ${refSpec.numLayers} layers, vocab ${refSpec.vocabSize})`,
    );
  }
  const { tokens, tokenizer, source } = await tokenize({ ...opts, ref: refDir, quant: quantDir }, refSpec.vocabSize, log);
  if (tokens.length < 2) {
    throw new MoeflashError('INVALID_ARGUMENT', `the text gives ${tokens.length} token(s); the report needs at least 2`);
  }
  const backend = opts.backend ?? 'cpu';
  const r = await runLogits(refDir, backend, tokens, log);
  const q = await runLogits(quantDir, backend, tokens, log);
  const logits = compareLogits(r.logits, q.logits, tokens, refSpec.vocabSize);
  const weights = opts.weights === false ? null : await weightErrors(refDir, quantDir, log);
  return {
    schema: 'moeflash.quant-report.v1',
    ref: { dir: refDir, bytes: await checkpointBytes(refDir), quantization: refSpec.quantization },
    quant: { dir: quantDir, bytes: await checkpointBytes(quantDir), quantization: quantSpec.quantization },
    backend: q.backend,
    text: { source, tokens: tokens.length, tokenizer },
    logits,
    weights,
    seconds: (performance.now() - t0) / 1000,
  };
}

function fmtBytes(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB`;
  return `${n} B`;
}

function describeQuantization(q: ModelSpec['quantization']): string {
  if (!q) return 'unquantized';
  if (q.method === 'fp8') return `fp8 ${q.weightBlockSize?.join('x')} blocks`;
  return q.dense ? `mxfp4 experts, fp8 ${q.dense.weightBlockSize.join('x')} dense` : 'mxfp4 experts';
}

const fmtErr = (x: number | undefined) => (x === undefined ? '-' : x.toFixed(4));

function table(header: string[], rows: string[][]): string[] {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (r: string[]) => r.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ').trimEnd();
  return [line(header), ...rows.map(line)];
}

/** The report as a readable text table (what the CLI prints). */
export function formatReport(r: QuantReport, opts: { worstTensors?: number } = {}): string {
  const L = r.logits;
  const out: string[] = [];
  out.push(`ref    ${r.ref.dir}  (${fmtBytes(r.ref.bytes)}, ${describeQuantization(r.ref.quantization)})`);
  out.push(`quant  ${r.quant.dir}  (${fmtBytes(r.quant.bytes)}, ${describeQuantization(r.quant.quantization)})`);
  out.push(`text   ${r.text.source}, ${r.text.tokens} tokens${r.text.tokenizer ? ` (tokenizer of ${r.text.tokenizer})` : ''}; backend ${r.backend}`);
  out.push('');
  out.push(`next-token distributions over ${L.positions} positions`);
  out.push(`  KL(ref || quant)  mean ${L.klMean.toExponential(3)}  max ${L.klMax.toExponential(3)} (position ${L.klMaxPosition})`);
  out.push(`  top-1 agreement   ${(100 * L.top1Agreement).toFixed(1)} %`);
  const dp = (100 * (L.perplexityQuant - L.perplexityRef)) / L.perplexityRef;
  out.push(`  perplexity        ref ${L.perplexityRef.toFixed(3)}  quant ${L.perplexityQuant.toFixed(3)}  (${dp >= 0 ? '+' : ''}${dp.toFixed(2)} %)`);
  if (r.weights) {
    const w = r.weights;
    out.push('');
    out.push('weights: relative error ||W_q - W|| / ||W||');
    if (w.byRole.length === 0) {
      out.push('  no quantized tensors found (same formats in both checkpoints)');
    } else {
      const rows = w.byRole.map((g) => [g.role, g.format, String(g.tensors), String(g.elements), fmtErr(g.relError), fmtErr(g.rules?.ocp), fmtErr(g.rules?.['no-clip'])]);
      for (const l of table(['role', 'format', 'tensors', 'elements', 'rel.err', 'ocp', 'no-clip'], rows)) out.push(`  ${l}`);
      if (w.betterRule) out.push(`  scale rule with the smaller expert error on these weights: ${w.betterRule}`);
      const worst = [...w.tensors].sort((a, b) => b.relError - a.relError).slice(0, opts.worstTensors ?? 5);
      out.push('');
      out.push(`largest errors (of ${w.tensors.length} tensors; --json lists all)`);
      for (const l of table(['tensor', 'format', 'rel.err'], worst.map((t) => [t.name, t.format, fmtErr(t.relError)]))) out.push(`  ${l}`);
    }
  }
  out.push('');
  out.push(`(${r.seconds.toFixed(1)} s)`);
  return out.join('\n');
}

/** Reads a text file for the report, refusing an empty one. */
export async function readReportText(file: string): Promise<string> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw new MoeflashError('INVALID_ARGUMENT', `cannot read --text ${file}: ${(e as Error).message}`);
  }
  if (text.trim() === '') throw new MoeflashError('INVALID_ARGUMENT', `--text ${file} is empty`);
  return text;
}
