/**
 * Mutations of a model folder (safetensors bytes, config.json, tokenizer.json,
 * tokenizer_config.json) for the fuzz test, each with the verdict a correct loader must reach:
 * `reject` (the folder is malformed: the load must fail with a MoeflashError), `accept` (the
 * mutation leaves a well-formed folder that matches its config: refusing it is a false alarm) or
 * `either` (well formed but possibly inconsistent; only the kind of failure is checked).
 *
 * The verdicts are worked out from the mutation itself, not from the loader's code: which bytes
 * moved, which field changed and whether that field fixes a tensor's shape.
 */
import { DTYPES, DTYPE_SIZES } from '../src/weights/dtypes.js';
import type { MemorySegment } from '../src/weights/byte-source.js';
import type { DType } from '../src/weights/tensor.js';
import { FLOAT_WEIGHT_DTYPES } from '../src/weights/validate-checkpoint.js';
import type { HeldCheckpoint } from './checkpoint-builder.js';

export type Verdict = 'reject' | 'accept' | 'either';

/** A seeded generator (mulberry32): a failing run is reproduced from the seed it prints. */
export class Rng {
  constructor(private s: number) {}
  next(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) | 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }
  pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.next() * xs.length)];
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
}

/** The base a mutation starts from: one checkpoint file and the folder's JSON files. */
export interface Base {
  name: string;
  family: string;
  /** Tensors of the (single) file, in file order. */
  tensors: HeldCheckpoint;
  configText: string;
  tokenizerText: string | null;
  tokenizerConfigText: string | null;
  /** The folder as the exporter wrote it, when sharded: model.safetensors.index.json and its shards by file name. */
  sharded?: { indexText: string; shards: Map<string, Uint8Array> };
}

/** A folder after one mutation: what changed, and the verdict a correct loader must reach. */
export interface Mutant {
  kind: string;
  detail: string;
  verdict: Verdict;
  /** Replaces the checkpoint file when set. */
  file?: MemorySegment[];
  configText?: string;
  tokenizerText?: string | null;
  tokenizerConfigText?: string | null;
  /** Scan the weights for NaN and infinities (the data mutations). */
  checkFinite?: boolean;
  /** Opens the sharded form of the base, with this index text and these shard bytes. */
  sharded?: { indexText: string; shards: Map<string, MemorySegment[]> };
}

interface HeaderEntry {
  dtype: string;
  shape: number[];
  data_offsets: [number, number];
}
type Header = Record<string, HeaderEntry | Record<string, string>>;

/** The file's header as an object, and its data section as segments (tensor bytes not copied). */
export interface SplitFile {
  header: Header;
  data: MemorySegment[];
  dataBytes: number;
}

export function splitFile(tensors: HeldCheckpoint): SplitFile {
  const header: Header = { __metadata__: { format: 'pt' } };
  const data: MemorySegment[] = [];
  let at = 0;
  for (const [name, t] of tensors) {
    const n = t.data instanceof Uint8Array ? t.data.length : t.data.zeros;
    header[name] = { dtype: t.dtype, shape: [...t.shape], data_offsets: [at, at + n] };
    data.push(t.data);
    at += n;
  }
  return { header, data, dataBytes: at };
}

/** u64 header length + JSON, padded with spaces to 8 bytes as the reference writer does. */
export function prefixOf(json: string, headerLen?: number): Uint8Array {
  const bytes = new TextEncoder().encode(json);
  const padded = Math.ceil(bytes.length / 8) * 8;
  const out = new Uint8Array(8 + padded).fill(0x20);
  out.set(bytes, 8);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerLen ?? padded), true);
  return out;
}

function fileOf(header: Header, data: MemorySegment[]): MemorySegment[] {
  return [prefixOf(JSON.stringify(header)), ...data];
}

const tensorNames = (h: Header) => Object.keys(h).filter((k) => k !== '__metadata__');
const entry = (h: Header, name: string) => h[name] as HeaderEntry;
const byteLen = (e: HeaderEntry) => e.data_offsets[1] - e.data_offsets[0];

/** MXFP4 blocks and scales are U8 by the format; every other tensor of these models holds weights. */
const isMxfp4 = (name: string) => /_(blocks|scales)$/.test(name);

function deepEqual(a: unknown, b: unknown): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

/** The header's tensors (metadata left out) in a canonical order, for comparison. */
function declared(h: Record<string, unknown>): string {
  const names = Object.keys(h).filter((k) => k !== '__metadata__').sort();
  return JSON.stringify(names.map((n) => [n, h[n]]));
}

// ---- checkpoint file mutations ----

function headerLength(base: Base, r: Rng): Mutant {
  const { header, data } = splitFile(base.tensors);
  const prefix = prefixOf(JSON.stringify(header));
  const right = prefix.length - 8;
  const delta = r.chance(0.8) ? r.pick([-1, 1, -8, 8, r.int(-right, -1), r.int(1, 64)]) : r.pick([2 ** 32, 2 ** 40, 2 ** 53 - 1]);
  const len = Math.max(0, right + delta);
  const p = prefix.slice();
  new DataView(p.buffer).setBigUint64(0, BigInt(len === right ? right + 1 : len), true);
  return { kind: 'header-length', detail: `header length ${right} -> ${len === right ? right + 1 : len}`, verdict: 'reject', file: [p, ...data] };
}

function headerBytes(base: Base, r: Rng): Mutant {
  const { header, data } = splitFile(base.tensors);
  const prefix = prefixOf(JSON.stringify(header)).slice();
  const flips = r.int(1, 3);
  const where: number[] = [];
  for (let i = 0; i < flips; i++) {
    const at = r.int(8, prefix.length - 1);
    prefix[at] = r.chance(0.5) ? prefix[at] ^ (1 << r.int(0, 7)) : r.pick([0x20, 0x22, 0x2c, 0x3a, 0x7b, 0x7d, 0x5b, 0x5d, 0x30, 0x39, 0x00, 0xff, r.int(0, 255)]);
    where.push(at);
  }
  // The verdict follows from what the bytes now say: not JSON (or not UTF-8) is malformed; the same
  // tensors as before is the same file; other tensors break the file or its match with the config.
  let verdict: Verdict = 'reject';
  try {
    const text = new TextDecoder('utf-8', { fatal: true }).decode(prefix.subarray(8));
    const parsed = JSON.parse(text) as unknown;
    if (typeof parsed === 'object' && parsed !== null && !Array.isArray(parsed) && text.startsWith('{')) {
      const meta = (parsed as Record<string, unknown>).__metadata__;
      const metaOk = meta === undefined || (typeof meta === 'object' && meta !== null && !Array.isArray(meta) && Object.values(meta).every((v) => typeof v === 'string'));
      if (metaOk && declared(parsed as Record<string, unknown>) === declared(header)) verdict = 'accept';
    }
  } catch {
    verdict = 'reject';
  }
  return { kind: 'header-bytes', detail: `bytes at ${where.join(', ')}`, verdict, file: [prefix, ...data] };
}

function offsets(base: Base, r: Rng): Mutant {
  const { header, data } = splitFile(base.tensors);
  const names = tensorNames(header);
  const a = entry(header, r.pick(names));
  const mode = r.int(0, 3);
  let detail: string;
  let verdict: Verdict = 'reject';
  if (mode === 0) {
    const k = r.pick([-1, 1, 2, -4, 64, r.int(-1000, 1000) || 3]);
    a.data_offsets = [a.data_offsets[0] + k, a.data_offsets[1] + k];
    detail = `shift both by ${k}`;
  } else if (mode === 1) {
    const k = r.pick([-1, 1, -2, 2]);
    a.data_offsets = [a.data_offsets[0], a.data_offsets[1] + k];
    detail = `end by ${k}`;
  } else if (mode === 2) {
    const b = entry(header, r.pick(names));
    if (a === b) return offsets(base, r);
    [a.data_offsets, b.data_offsets] = [b.data_offsets, a.data_offsets];
    // Ranges of equal length still tile the data section: a well-formed file (with swapped contents).
    verdict = byteLen(a) === byteLen(b) ? 'accept' : 'reject';
    detail = 'swap with another tensor';
  } else {
    a.data_offsets = r.pick([[0, 0], [-1, 4], [10, 5], [0, 2 ** 60]] as [number, number][]);
    detail = `set to ${JSON.stringify(a.data_offsets)}`;
  }
  return { kind: 'offsets', detail, verdict, file: fileOf(header, data) };
}

function dtype(base: Base, r: Rng): Mutant {
  const { header, data } = splitFile(base.tensors);
  const name = r.pick(tensorNames(header));
  const e = entry(header, name);
  const was = e.dtype as DType;
  const to = r.chance(0.9) ? r.pick(DTYPES.filter((d) => d !== was)) : r.pick(['F4', 'bf16', '', 'FLOAT', 'I128']);
  e.dtype = to;
  let verdict: Verdict = 'reject';
  const known = (DTYPES as readonly string[]).includes(to);
  if (known && DTYPE_SIZES[to as DType] === DTYPE_SIZES[was]) {
    const holdsIt = isMxfp4(name) ? to === 'U8' : FLOAT_WEIGHT_DTYPES.includes(to as DType);
    if (holdsIt) verdict = 'accept';
  }
  return { kind: 'dtype', detail: `${name}: ${was} -> ${to}`, verdict, file: fileOf(header, data) };
}

function reshape(shape: number[], r: Rng): number[] {
  const s = [...shape];
  switch (r.int(0, 5)) {
    case 0: {
      const i = r.int(0, Math.max(0, s.length - 1));
      if (s.length === 0) return [1];
      s[i] += r.pick([-1, 1]);
      return s;
    }
    case 1:
      return s.length > 0 ? s.map((d, i) => (i === 0 ? d * 2 : d)) : [2];
    case 2:
      return [...s, 1];
    case 3:
      return s.length > 1 ? s.slice(1) : [...s, 2];
    case 4:
      return s.length > 1 ? [s.reduce((a, b) => a * b, 1)] : [1, ...s];
    default:
      return s.length > 1 ? [...s].reverse() : [...s, 1];
  }
}

function shape(base: Base, r: Rng): Mutant {
  const { header, data } = splitFile(base.tensors);
  const name = r.pick(tensorNames(header));
  const e = entry(header, name);
  const was = e.shape;
  let to = reshape(was, r);
  for (let i = 0; i < 4 && deepEqual(to, was); i++) to = reshape(was, r);
  if (deepEqual(to, was)) to = [...was, 1];
  e.shape = to;
  // Either the byte count no longer matches the offsets, or it does and the shape contradicts the
  // config: every tensor of these checkpoints has one shape (one orientation per layer) the config allows.
  return { kind: 'shape', detail: `${name}: [${was}] -> [${to}]`, verdict: 'reject', file: fileOf(header, data) };
}

/** The same shape change with the file laid out anew, so the format holds and only the config can catch it. */
function shapeRelaid(base: Base, r: Rng): Mutant {
  const names = [...base.tensors.keys()];
  const name = r.pick(names);
  const t = base.tensors.get(name)!;
  let to = reshape(t.shape, r);
  if (deepEqual(to, t.shape)) to = [...t.shape, 1];
  const tensors: HeldCheckpoint = new Map([...base.tensors].map(([n, v]) => [n, n === name ? { ...v, shape: to } : v]));
  return { kind: 'shape-relaid', detail: `${name}: [${t.shape}] -> [${to}]`, verdict: 'reject', file: relaid(tensors) };
}

function relaid(tensors: HeldCheckpoint): MemorySegment[] {
  const header: Header = { __metadata__: { format: 'pt' } };
  const data: MemorySegment[] = [];
  let at = 0;
  for (const [name, t] of tensors) {
    const n = t.shape.reduce((a, b) => a * b, DTYPE_SIZES[t.dtype]);
    const have = t.data instanceof Uint8Array ? t.data.length : t.data.zeros;
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [at, at + n] };
    if (t.data instanceof Uint8Array && have >= n) data.push(t.data.subarray(0, n));
    else data.push({ zeros: n });
    at += n;
  }
  return fileOf(header, data);
}

function nearMiss(name: string, r: Rng): string {
  switch (r.int(0, 4)) {
    case 0: {
      const i = r.int(0, name.length - 1);
      return name.slice(0, i) + name.slice(i + 1);
    }
    case 1:
      return name.replace(/^model\./, 'model.language_model.');
    case 2:
      return name.replace(/\.(\d+)\./, (_, d) => `.${Number(d) + 100}.`);
    case 3:
      return `${name}_`;
    default:
      return name.toUpperCase();
  }
}

function names(base: Base, r: Rng): Mutant {
  const all = [...base.tensors.keys()];
  const name = r.pick(all);
  const mode = r.int(0, 4);
  if (mode === 0 || mode === 1) {
    // Renamed in place (same bytes): the tensor the config implies is gone.
    const { header, data } = splitFile(base.tensors);
    let to = nearMiss(name, r);
    if (mode === 1) to = r.pick(all.filter((n) => n !== name)); // a duplicate key: one of the two is lost
    if (to === name) to = `${name}.x`;
    const renamed: Header = {};
    for (const [k, v] of Object.entries(header)) renamed[k === name ? to : k] = v;
    return { kind: 'name', detail: `${name} -> ${to}`, verdict: 'reject', file: fileOf(renamed, data) };
  }
  if (mode === 2) {
    const tensors = new Map(base.tensors);
    tensors.delete(name);
    return { kind: 'name', detail: `delete ${name}`, verdict: 'reject', file: relaid(tensors) };
  }
  if (mode === 3) {
    // An extra tensor outside the decoder layers is ignored, as HF ignores unexpected keys.
    const tensors = new Map(base.tensors);
    const extra = `model.extra_${r.int(0, 1e6)}.weight`;
    tensors.set(extra, { dtype: 'BF16', shape: [r.int(1, 8)], data: { zeros: 16 } });
    return { kind: 'name', detail: `add ${extra}`, verdict: 'accept', file: relaid(tensors) };
  }
  // An extra tensor inside a layer: one more expert, or an attention bias where there is none.
  const tensors = new Map(base.tensors);
  const attnBias = [...base.tensors.keys()].some((n) => n.endsWith('self_attn.q_proj.bias'));
  const extra = attnBias ? 'model.layers.0.self_attn.unknown.weight' : 'model.layers.0.self_attn.q_proj.bias';
  tensors.set(extra, { dtype: 'BF16', shape: [4], data: { zeros: 8 } });
  return { kind: 'name', detail: `add ${extra}`, verdict: 'reject', file: relaid(tensors) };
}

function fileBytes(base: Base): { segments: MemorySegment[]; size: number } {
  const { header, data } = splitFile(base.tensors);
  const segments = fileOf(header, data);
  const size = segments.reduce((s, x) => s + (x instanceof Uint8Array ? x.length : x.zeros), 0);
  return { segments, size };
}

/** The first `n` bytes of a segment list (views, no copies). */
function cut(segments: MemorySegment[], n: number): MemorySegment[] {
  const out: MemorySegment[] = [];
  let left = n;
  for (const s of segments) {
    if (left <= 0) break;
    const len = s instanceof Uint8Array ? s.length : s.zeros;
    const take = Math.min(len, left);
    out.push(s instanceof Uint8Array ? s.subarray(0, take) : { zeros: take });
    left -= take;
  }
  return out;
}

function truncate(base: Base, r: Rng): Mutant {
  const { segments, size } = fileBytes(base);
  const n = r.chance(0.3) ? r.int(0, 64) : r.chance(0.5) ? size - r.int(1, 16) : r.int(0, size - 1);
  return { kind: 'truncate', detail: `${size} -> ${n} bytes`, verdict: 'reject', file: cut(segments, n) };
}

function append(base: Base, r: Rng): Mutant {
  const { segments } = fileBytes(base);
  const n = r.pick([1, 2, 7, 8, r.int(1, 4096)]);
  const extra = new Uint8Array(n).map(() => (r.chance(0.5) ? 0 : r.int(0, 255)));
  return { kind: 'append', detail: `${n} bytes`, verdict: 'reject', file: [...segments, extra] };
}

/** A float weight (or an MXFP4 scale) set to a non-finite value, checked with the NaN scan on. */
function data(base: Base, r: Rng): Mutant {
  const candidates = [...base.tensors].filter(([n, t]) => t.data instanceof Uint8Array && t.data.length > 0 && (FLOAT_WEIGHT_DTYPES.includes(t.dtype) || /_scales$/.test(n)));
  const [name, t] = r.pick(candidates);
  const bytes = (t.data as Uint8Array).slice();
  const size = DTYPE_SIZES[t.dtype];
  const at = r.int(0, bytes.length / size - 1) * size;
  const view = new DataView(bytes.buffer);
  const poison = r.chance(0.75);
  if (!poison) {
    for (let i = 0; i < size; i++) bytes[at + i] = 0; // zero is finite in every format
  } else if (t.dtype === 'U8') bytes[at] = 255;
  else if (t.dtype === 'BF16') view.setUint16(at, r.pick([0x7fc0, 0x7f80, 0xff80, 0x7f81]), true);
  else if (t.dtype === 'F16') view.setUint16(at, r.pick([0x7e00, 0x7c00, 0xfc00]), true);
  else if (t.dtype === 'F32') view.setFloat32(at, r.pick([NaN, Infinity, -Infinity]), true);
  else if (t.dtype === 'F64') view.setFloat64(at, r.pick([NaN, Infinity]), true);
  else if (t.dtype === 'F8_E4M3') bytes[at] = r.pick([0x7f, 0xff]);
  else bytes[at] = r.pick([0x7c, 0x7e, 0xfc]);
  const tensors = new Map(base.tensors);
  tensors.set(name, { ...t, data: bytes });
  const { header, data: d } = splitFile(tensors);
  return { kind: 'data', detail: `${name}[${at / size}] ${poison ? 'non-finite' : '= 0'}`, verdict: poison ? 'reject' : 'accept', file: fileOf(header, d), checkFinite: true };
}

// ---- JSON file mutations ----

/** Text edits: cut, insert or delete a character, swap a bracket. Not JSON afterwards: malformed. */
function syntax(text: string, r: Rng): { text: string; detail: string; verdict: Verdict } {
  const at = r.int(0, text.length);
  let out: string;
  let detail: string;
  switch (r.int(0, 3)) {
    case 0:
      out = text.slice(0, at);
      detail = `cut at ${at}`;
      break;
    case 1: {
      const ch = r.pick(['{', '}', '[', ']', ',', ':', '"', '\\', 'x', '0', '\u0000', '\u00e9', ' ']);
      out = text.slice(0, at) + ch + text.slice(at);
      detail = `insert ${JSON.stringify(ch)} at ${at}`;
      break;
    }
    case 2:
      out = text.slice(0, at) + text.slice(at + 1);
      detail = `delete at ${at}`;
      break;
    default:
      out = text.replace(r.chance(0.5) ? '{' : '[', r.chance(0.5) ? '[' : '{');
      detail = 'swap a bracket';
  }
  let verdict: Verdict;
  try {
    verdict = deepEqual(JSON.parse(out), JSON.parse(text)) ? 'accept' : 'either';
  } catch {
    verdict = 'reject';
  }
  return { text: out, detail, verdict };
}

const WRONG_TYPES: unknown[] = ['64', 'x', -1, 0, 1.5, true, [], {}, 1e300];

/** Fields that fix some tensor's shape, per family (what changing them must be caught by). */
function shapeFields(config: Record<string, unknown>): string[] {
  const f = ['vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads'];
  if ('head_dim' in config) f.push('head_dim');
  if (config.model_type === 'qwen3_moe') {
    f.push('moe_intermediate_size');
    if (Array.isArray(config.mlp_only_layers) && config.mlp_only_layers.length > 0) f.push('intermediate_size');
  } else f.push('intermediate_size');
  for (const k of ['num_experts', 'num_local_experts']) if (k in config) f.push(k);
  return f;
}

function configField(base: Base, r: Rng): Mutant {
  const config = JSON.parse(base.configText) as Record<string, unknown>;
  const shapeKeys = shapeFields(config);
  const keys = Object.keys(config);
  const mode = r.int(0, 5);
  let detail: string;
  let verdict: Verdict = 'either';
  if (mode <= 1) {
    // A shape-bearing size set to another valid size: the tensors no longer match.
    const k = r.pick(shapeKeys);
    const was = config[k] as number;
    const to = r.pick([was + 1, was * 2, Math.max(1, was - 1), 1].filter((v) => v !== was));
    config[k] = to;
    if (k === 'num_local_experts' && 'num_experts' in config) config.num_experts = to; // keep the alias in step
    if (k === 'num_experts' && 'num_local_experts' in config) config.num_local_experts = to;
    detail = `${k}: ${was} -> ${to}`;
    verdict = 'reject';
  } else if (mode === 2) {
    const k = r.pick(shapeKeys);
    const to = r.pick(WRONG_TYPES);
    detail = `${k} = ${JSON.stringify(to)}`;
    config[k] = to;
    verdict = 'reject';
  } else if (mode === 3) {
    const k = r.pick(['model_type', 'attention_bias', 'tie_word_embeddings']);
    const was = config[k];
    let to: unknown;
    if (k === 'model_type') to = r.pick(['qwen3_moe', 'mixtral', 'gpt_oss', 'llama', '', 7].filter((v) => v !== was));
    else to = !was;
    config[k] = to;
    detail = `${k}: ${JSON.stringify(was)} -> ${JSON.stringify(to)}`;
    // Another family means other tensors (q/k norms, sinks, routers); mixtral reads no attention_bias.
    if (k === 'model_type') verdict = 'reject';
    else if (k === 'attention_bias') verdict = config.model_type === 'mixtral' ? 'either' : 'reject';
    else verdict = to === false && !base.tensors.has('lm_head.weight') ? 'reject' : 'either';
  } else if (mode === 4) {
    const k = r.pick(keys);
    delete config[k];
    detail = `delete ${k}`;
    if (['model_type', 'vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads'].includes(k)) verdict = 'reject';
  } else {
    // Any field, any value: only the kind of failure is checked.
    const k = r.chance(0.8) ? r.pick(keys) : `unknown_${r.int(0, 99)}`;
    const to = r.pick([...WRONG_TYPES, null, 'yarn', { rope_type: 'yarn', factor: 'x' }, { rope_type: 'dynamic' }, { quant_method: 'gptq' }, [1, 'a']]);
    config[k] = to;
    detail = `${k} = ${JSON.stringify(to)}`;
  }
  return { kind: 'config-field', detail, verdict, configText: JSON.stringify(config) };
}

function configSyntax(base: Base, r: Rng): Mutant {
  const m = syntax(base.configText, r);
  return { kind: 'config-syntax', detail: m.detail, verdict: m.verdict, configText: m.text };
}

function tokenizerSyntax(base: Base, r: Rng): Mutant {
  const which = r.chance(0.5) ? 'tokenizer' : 'tokenizer-config';
  const text = which === 'tokenizer' ? base.tokenizerText! : base.tokenizerConfigText!;
  const m = syntax(text, r);
  return which === 'tokenizer'
    ? { kind: 'tokenizer-syntax', detail: m.detail, verdict: m.verdict, tokenizerText: m.text }
    : { kind: 'tokenizer-config-syntax', detail: m.detail, verdict: m.verdict, tokenizerConfigText: m.text };
}

/** A value somewhere inside a JSON document, replaced (paths chosen among the document's own). */
function replaceSomewhere(doc: unknown, r: Rng, values: unknown[]): string {
  const paths: (string | number)[][] = [];
  const walk = (v: unknown, p: (string | number)[], depth: number) => {
    if (depth > 3 || paths.length > 400) return;
    paths.push(p);
    if (Array.isArray(v)) v.slice(0, 8).forEach((x, i) => walk(x, [...p, i], depth + 1));
    else if (v && typeof v === 'object') Object.keys(v).slice(0, 24).forEach((k) => walk((v as Record<string, unknown>)[k], [...p, k], depth + 1));
  };
  walk(doc, [], 0);
  const path = r.pick(paths.slice(1));
  let parent = doc as Record<string | number, unknown>;
  for (const k of path.slice(0, -1)) parent = parent[k] as Record<string | number, unknown>;
  const last = path[path.length - 1];
  const value = r.pick(values);
  if (value === undefined) {
    if (Array.isArray(parent)) parent.splice(last as number, 1);
    else delete parent[last];
  } else parent[last] = value;
  return `${path.join('.')} = ${JSON.stringify(value) ?? 'deleted'}`;
}

const ANY_VALUES: unknown[] = [undefined, null, 0, -1, 1.5, 1e308, '', 'x', '{% if %}', '{{ raise_exception("x") }}', true, [], {}, [null], { type: 'Nope' }, { content: 5 }];

function tokenizerField(base: Base, r: Rng): Mutant {
  if (r.chance(0.5)) {
    const doc = JSON.parse(base.tokenizerText!) as Record<string, unknown>;
    if (r.chance(0.15)) {
      // No tokenizer model object: not a tokenizer.json at all.
      const to = r.pick([undefined, null, 3, 'BPE', []]);
      if (to === undefined) delete doc.model;
      else doc.model = to;
      return { kind: 'tokenizer-field', detail: `model = ${JSON.stringify(to) ?? 'deleted'}`, verdict: 'reject', tokenizerText: JSON.stringify(doc) };
    }
    const detail = replaceSomewhere(doc, r, ANY_VALUES);
    return { kind: 'tokenizer-field', detail, verdict: 'either', tokenizerText: JSON.stringify(doc) };
  }
  const doc = JSON.parse(base.tokenizerConfigText!) as Record<string, unknown>;
  const detail = replaceSomewhere(doc, r, ANY_VALUES);
  return { kind: 'tokenizer-config-field', detail, verdict: 'either', tokenizerConfigText: JSON.stringify(doc) };
}

// ---- sharded folders: the index and its shards ----

function shardedOf(base: Base) {
  const s = base.sharded!;
  return { index: JSON.parse(s.indexText) as { weight_map: Record<string, unknown>; [k: string]: unknown }, shards: new Map([...s.shards].map(([f, b]) => [f, [b] as MemorySegment[]])) };
}

function index(base: Base, r: Rng): Mutant {
  const { index: doc, shards } = shardedOf(base);
  const map = doc.weight_map;
  const names = Object.keys(map);
  const files = [...shards.keys()];
  const name = r.pick(names);
  let detail: string;
  let verdict: Verdict = 'reject';
  let text: string | undefined;
  switch (r.int(0, 8)) {
    case 0:
      delete map[name];
      detail = `drop ${name}`;
      break;
    case 1: {
      const other = files.find((f) => f !== map[name])!;
      map[name] = other;
      detail = `${name} -> the other shard`;
      break;
    }
    case 2:
      map[name] = r.pick(['model-00009-of-00002.safetensors', '../model.safetensors', '/etc/hosts', '', 'model.safetensors']);
      detail = `${name} -> ${JSON.stringify(map[name])}`;
      break;
    case 3:
      map[`model.layers.0.extra_${r.int(0, 99)}.weight`] = r.pick(files);
      detail = 'an entry for a tensor no shard holds';
      break;
    case 4:
      map[name] = r.pick([3, null, [], { file: files[0] }]);
      detail = `${name} -> ${JSON.stringify(map[name])}`;
      break;
    case 5:
      (doc as Record<string, unknown>).weight_map = r.pick([[], 'x', null, 7]);
      detail = `weight_map = ${JSON.stringify(doc.weight_map)}`;
      break;
    case 6: {
      // Fields besides weight_map are the exporter's notes (total_size, ...): ignored.
      doc.metadata = r.pick([{ total_size: 1 }, { total_size: 'x' }, null, [], { format: 'pt' }]);
      (doc as Record<string, unknown>)[`note_${r.int(0, 9)}`] = r.pick(['x', 1, {}]);
      detail = 'other fields changed';
      verdict = 'accept';
      break;
    }
    case 7: {
      const m = syntax(base.sharded!.indexText, r);
      text = m.text;
      detail = `syntax: ${m.detail}`;
      verdict = m.verdict;
      break;
    }
    default: {
      // A shard cut short or grown: the file itself is malformed.
      const f = r.pick(files);
      const bytes = base.sharded!.shards.get(f)!;
      shards.set(f, r.chance(0.5) ? [bytes.subarray(0, r.int(0, bytes.length - 1))] : [bytes, new Uint8Array(r.int(1, 64))]);
      detail = `shard ${f} resized`;
    }
  }
  return { kind: 'index', detail, verdict, sharded: { indexText: text ?? JSON.stringify(doc), shards } };
}

/** Mutation kinds and their share of a run. */
export const MUTATORS: { kind: string; weight: number; tokenizer?: boolean; sharded?: boolean; make: (b: Base, r: Rng) => Mutant }[] = [
  { kind: 'header-length', weight: 6, make: headerLength },
  { kind: 'header-bytes', weight: 14, make: headerBytes },
  { kind: 'offsets', weight: 8, make: offsets },
  { kind: 'dtype', weight: 8, make: dtype },
  { kind: 'shape', weight: 6, make: shape },
  { kind: 'shape-relaid', weight: 6, make: shapeRelaid },
  { kind: 'name', weight: 8, make: names },
  { kind: 'truncate', weight: 6, make: truncate },
  { kind: 'append', weight: 4, make: append },
  { kind: 'data', weight: 4, make: data },
  { kind: 'config-field', weight: 12, make: configField },
  { kind: 'config-syntax', weight: 6, make: configSyntax },
  { kind: 'tokenizer-syntax', weight: 6, tokenizer: true, make: tokenizerSyntax },
  { kind: 'tokenizer-field', weight: 10, tokenizer: true, make: tokenizerField },
  { kind: 'index', weight: 8, sharded: true, make: index },
];
