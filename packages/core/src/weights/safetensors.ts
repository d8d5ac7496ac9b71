/**
 * Reads safetensors checkpoints: one file, a folder of shards with `model.safetensors.index.json`,
 * or a folder of `.safetensors` files. Only headers are read at open; tensor bytes come later
 * with positioned reads, so a 600 GB checkpoint costs what its headers cost until a tensor is read.
 *
 * File layout: u64 little-endian N, then N bytes of JSON
 * `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the data
 * section that the offsets are relative to.
 */
import { readdir, readFile, stat } from 'node:fs/promises';
import { isAbsolute, join, relative, resolve } from 'node:path';
import { MoeflashError } from '../errors.js';
import { openFileSource, type ByteSource, type ByteSourceOpener } from './byte-source.js';
import { DTYPES, decodeToFloat32, isDType, isShape, tensorByteLength } from './dtypes.js';
import type { TensorInfo, WeightSource } from './tensor.js';

/** Larger headers are refused (as the reference implementation does): they mean a corrupt file. */
export const MAX_HEADER_BYTES = 100 * 1024 * 1024;

export interface SafetensorsHeader {
  /** Absolute path. */
  file: string;
  fileSize: number;
  /** Offset of the data section (8 + header length). */
  dataStart: number;
  metadata: Record<string, string>;
  /** In header order. */
  tensors: TensorInfo[];
}

/** A safetensors checkpoint opened by {@link openWeights}. */
export interface SafetensorsSource extends WeightSource {
  /** `__metadata__` of the file(s); where shards disagree, the first file in name order wins. */
  readonly metadata: Record<string, string>;
}

function invalid(file: string, message: string, cause?: unknown): MoeflashError {
  return new MoeflashError('WEIGHTS_INVALID', `${file}: ${message}`, { cause });
}

function ioError(file: string, e: unknown): MoeflashError {
  if (e instanceof MoeflashError) return e;
  if ((e as NodeJS.ErrnoException)?.code === 'ENOENT') {
    return new MoeflashError('WEIGHTS_MISSING', `${file} does not exist; check the path, or re-download the model`, {
      cause: e,
    });
  }
  return invalid(file, `cannot read: ${(e as Error)?.message ?? String(e)}`, e);
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * Reads and validates the header of one safetensors file (not its tensor bytes), as strictly as
 * the reference implementation: the tensors' byte ranges must tile the data section exactly,
 * from 0 to the end of the file, so a header length off by a byte or bytes appended after the
 * last tensor are errors instead of weights shifted by a byte.
 */
export async function readSafetensorsHeader(path: string, opener: ByteSourceOpener = openFileSource): Promise<SafetensorsHeader> {
  const file = resolve(path);
  let fh: ByteSource;
  try {
    fh = await opener(file);
  } catch (e) {
    throw ioError(file, e);
  }
  try {
    const fileSize = await fh.size();
    const reDownload = 'the download was cut short or this is not a safetensors file: re-download it';
    if (fileSize < 8) {
      throw invalid(file, `file is ${fileSize} bytes, shorter than the 8-byte header length that starts every safetensors file; ${reDownload}`);
    }
    const lenBytes = new Uint8Array(8);
    await fh.read(lenBytes, 0);
    const headerLen = Number(new DataView(lenBytes.buffer).getBigUint64(0, true));
    if (headerLen > MAX_HEADER_BYTES || headerLen > fileSize - 8) {
      // A Hugging Face clone without git-lfs leaves ~130-byte text pointers in place of weights.
      if (new TextDecoder().decode(lenBytes) === 'version ') {
        throw invalid(file, 'this is a Git LFS pointer, not the weights; run `git lfs pull` in the model folder, or download with `huggingface-cli download`');
      }
      const limit = headerLen > MAX_HEADER_BYTES ? `the ${MAX_HEADER_BYTES / 2 ** 20} MiB limit` : `the file (${fileSize} bytes)`;
      throw invalid(file, `header length ${headerLen} is larger than ${limit}; ${reDownload}`);
    }
    const headerBytes = new Uint8Array(headerLen);
    await fh.read(headerBytes, 8);
    let header: unknown;
    try {
      header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(headerBytes));
    } catch (e) {
      throw invalid(file, `header is not valid JSON (${(e as Error).message}); ${reDownload}`, e);
    }
    if (!isObject(header)) throw invalid(file, `header is not a JSON object; ${reDownload}`);
    // The reference implementation requires the JSON to open the header (padding goes after it).
    if (headerBytes[0] !== 0x7b) throw invalid(file, `header starts with whitespace, not '{'; ${reDownload}`);
    return parseHeader(file, fileSize, 8 + headerLen, header);
  } catch (e) {
    throw ioError(file, e);
  } finally {
    await fh.close();
  }
}

function parseHeader(file: string, fileSize: number, dataStart: number, header: Record<string, unknown>): SafetensorsHeader {
  const corrupt = 'the header is corrupt: re-download or re-export the file';
  const metadata: Record<string, string> = {};
  const tensors: TensorInfo[] = [];
  const ranges: { name: string; begin: number; end: number }[] = [];
  for (const [name, entry] of Object.entries(header)) {
    if (name === '__metadata__') {
      if (!isObject(entry)) throw invalid(file, `__metadata__ is not a JSON object; ${corrupt}`);
      for (const [k, v] of Object.entries(entry)) {
        // The format declares a string -> string map; the reference reader refuses anything else.
        if (typeof v !== 'string') throw invalid(file, `__metadata__ '${k}' is ${JSON.stringify(v)}, not a string; ${corrupt}`);
        metadata[k] = v;
      }
      continue;
    }
    const where = `tensor '${name}'`;
    if (!isObject(entry)) throw invalid(file, `${where} is not a {dtype, shape, data_offsets} object; ${corrupt}`);
    const { dtype, shape, data_offsets: offsets } = entry;
    if (!isDType(dtype)) {
      throw invalid(file, `${where} has dtype ${JSON.stringify(dtype)}, which moeflash does not read (it reads ${DTYPES.join(', ')}); convert the checkpoint to one of these (bf16 is the usual choice)`);
    }
    if (!isShape(shape)) {
      throw invalid(file, `${where} has shape ${JSON.stringify(shape)}; a shape is an array of non-negative integers; ${corrupt}`);
    }
    if (!isShape(offsets) || offsets.length !== 2 || offsets[0] > offsets[1]) {
      throw invalid(file, `${where} has data_offsets ${JSON.stringify(offsets)}; expected [begin, end], integers with 0 <= begin <= end; ${corrupt}`);
    }
    const [begin, end] = offsets;
    const byteLength = tensorByteLength(dtype, shape);
    if (end - begin !== byteLength) {
      throw invalid(file, `${where} is ${dtype} [${shape.join(', ')}] = ${byteLength} bytes, but its data_offsets [${begin}, ${end}] span ${end - begin} bytes; ${corrupt}`);
    }
    if (dataStart + end > fileSize) {
      throw invalid(file, `truncated: file is ${fileSize} bytes, tensor '${name}' needs up to ${dataStart + end}; re-download it`);
    }
    tensors.push({ name, dtype, shape, file, offset: dataStart + begin, byteLength });
    ranges.push({ name, begin, end });
  }
  checkTiling(file, fileSize - dataStart, ranges);
  return { file, fileSize, dataStart, metadata, tensors };
}

/**
 * The tensors' ranges, in offset order, must cover [0, dataBytes) with neither gap nor overlap
 * (empty tensors sit anywhere on a boundary). A gap or a tail means the offsets or the header
 * length are wrong, or the file holds bytes no tensor owns: loading it would read shifted weights.
 */
function checkTiling(file: string, dataBytes: number, ranges: { name: string; begin: number; end: number }[]): void {
  const corrupt = 'the header is corrupt: re-download or re-export the file';
  ranges.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let covered = 0;
  let last: (typeof ranges)[number] | null = null;
  for (const r of ranges) {
    if (r.begin < covered) {
      throw invalid(file, `tensors '${last!.name}' [${last!.begin}, ${last!.end}] and '${r.name}' [${r.begin}, ${r.end}] overlap; ${corrupt}`);
    }
    if (r.begin > covered) {
      const after = last ? `after tensor '${last.name}'` : 'at the start of the data section';
      throw invalid(file, `data section bytes [${covered}, ${r.begin}) ${after} belong to no tensor (the next is '${r.name}'); offsets must be contiguous from 0; ${corrupt}`);
    }
    covered = r.end;
    last = r;
  }
  if (covered !== dataBytes) {
    const where = last ? `the last tensor '${last.name}' ends at ${covered}` : 'the header declares no tensor bytes';
    throw invalid(file, `the data section is ${dataBytes} bytes but ${where}: ${dataBytes - covered} bytes follow that no tensor owns (was the file appended to, or is the header length wrong?); re-download or re-export the file`);
  }
}

/**
 * Names in `names` sharing the longest dotted suffix with `name` (at least two components, or
 * all of a one-component name): the usual near miss is a different prefix, as in
 * `model.language_model.layers.0...` against `model.layers.0...`.
 */
export function similarNames(name: string, names: Iterable<string>, max = 3): string[] {
  const want = name.split('.');
  let best = 0;
  let found: string[] = [];
  for (const candidate of names) {
    const parts = candidate.split('.');
    let k = 0;
    while (k < want.length && k < parts.length && want[want.length - 1 - k] === parts[parts.length - 1 - k]) k++;
    if (k > best) {
      best = k;
      found = [candidate];
    } else if (k === best && k > 0 && found.length < max) {
      found.push(candidate);
    }
  }
  return best >= Math.min(2, want.length) ? found.slice(0, max) : [];
}

class SafetensorsWeights implements SafetensorsSource {
  private readonly handles = new Map<string, Promise<ByteSource>>();
  private closed = false;

  constructor(
    readonly origin: string,
    private readonly tensors: Map<string, TensorInfo>,
    readonly metadata: Record<string, string>,
    private readonly opener: ByteSourceOpener,
  ) {}

  names(): string[] {
    return [...this.tensors.keys()];
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  info(name: string): TensorInfo {
    const t = this.tensors.get(name);
    if (t) return t;
    const near = similarNames(name, this.tensors.keys());
    const hint = near.length > 0 ? `; similar names: ${near.map((n) => `'${n}'`).join(', ')}` : '';
    throw new MoeflashError(
      'WEIGHTS_MISSING',
      `tensor '${name}' is not in ${this.origin}${hint}; check that the checkpoint matches the model's config.json`,
    );
  }

  async read(name: string): Promise<Uint8Array> {
    const t = this.info(name);
    const out = new Uint8Array(t.byteLength);
    let got: number;
    try {
      got = await (await this.handle(t.file)).read(out, t.offset);
    } catch (e) {
      if (this.closed) throw this.closedError();
      throw ioError(t.file, e);
    }
    if (got < t.byteLength) {
      throw invalid(t.file, `truncated: tensor '${name}' needs up to ${t.offset + t.byteLength} bytes but the file ended at ${t.offset + got} (did it change after it was opened?); re-download it`);
    }
    return out;
  }

  async readFloat32(name: string): Promise<Float32Array> {
    return decodeToFloat32(await this.read(name), this.info(name).dtype);
  }

  async close(): Promise<void> {
    this.closed = true;
    const pending = [...this.handles.values()];
    this.handles.clear();
    await Promise.all(pending.map((h) => h.then((fh) => fh.close()).catch(() => {})));
  }

  private closedError(): MoeflashError {
    return new MoeflashError('CLOSED', `${this.origin} was closed; open it again with openWeights()`);
  }

  private handle(file: string): Promise<ByteSource> {
    if (this.closed) throw this.closedError();
    let h = this.handles.get(file);
    if (!h) {
      h = this.opener(file);
      this.handles.set(file, h);
      // A failed open is not cached, so a later read can try again.
      h.catch(() => this.handles.delete(file));
    }
    return h;
  }
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/**
 * Opens safetensors files as one checkpoint (tensor names unique across them). `opener` serves
 * the bytes: the disk by default, or memory ({@link memoryOpener}) for tests that build files.
 */
export async function openSafetensorsFiles(origin: string, files: string[], opener: ByteSourceOpener = openFileSource): Promise<SafetensorsSource> {
  const headers = await Promise.all(files.map((f) => readSafetensorsHeader(f, opener)));
  const tensors = new Map<string, TensorInfo>();
  const metadata: Record<string, string> = {};
  for (const h of headers) {
    for (const t of h.tensors) {
      const prev = tensors.get(t.name);
      if (prev) {
        throw invalid(origin, `tensor '${t.name}' is in both ${prev.file} and ${t.file}; the folder holds two copies of the weights: remove one, or open a single file`);
      }
      tensors.set(t.name, t);
    }
    for (const [k, v] of Object.entries(h.metadata)) if (!(k in metadata)) metadata[k] = v;
  }
  return new SafetensorsWeights(origin, tensors, metadata, opener);
}

/**
 * Opens a sharded checkpoint from the text of its `model.safetensors.index.json` (`indexFile`, in
 * the folder `dir`): every tensor the index names must be in the shard it names, and every tensor
 * of a shard must be in the index (else index and shards come from different exports). `opener`
 * serves the shards: the disk by default.
 */
export async function openShardedCheckpoint(dir: string, indexFile: string, indexText: string, opener: ByteSourceOpener = openFileSource): Promise<SafetensorsSource> {
  const reDownload = 're-download model.safetensors.index.json';
  let index: unknown;
  try {
    index = JSON.parse(indexText);
  } catch (e) {
    throw invalid(indexFile, `not valid JSON (${(e as Error).message}); ${reDownload}`, e);
  }
  const weightMap = isObject(index) ? index.weight_map : undefined;
  if (!isObject(weightMap)) throw invalid(indexFile, `has no "weight_map" object; ${reDownload}`);

  const byShard = new Map<string, string[]>();
  for (const [name, shard] of Object.entries(weightMap)) {
    if (typeof shard !== 'string') throw invalid(indexFile, `weight_map['${name}'] is not a file name; ${reDownload}`);
    const list = byShard.get(shard) ?? [];
    list.push(name);
    byShard.set(shard, list);
  }
  const shards = [...byShard.keys()].sort();
  for (const shard of shards) {
    const file = resolve(dir, shard);
    const rel = relative(dir, file);
    if (rel.startsWith('..') || isAbsolute(rel)) {
      throw invalid(indexFile, `shard '${shard}' lies outside ${dir}; shard names must be files in the model folder`);
    }
    if (!(await canOpen(file, opener))) {
      const names = byShard.get(shard)!;
      throw new MoeflashError(
        'WEIGHTS_MISSING',
        `${indexFile} names shard '${shard}' (for ${names.length === 1 ? `tensor '${names[0]}'` : `${names.length} tensors, e.g. '${names[0]}'`}), but ${file} does not exist; the download is incomplete: download the missing shard`,
      );
    }
  }
  const headers = await Promise.all(shards.map((s) => readSafetensorsHeader(join(dir, s), opener)));
  const found = new Map<string, TensorInfo>();
  const metadata: Record<string, string> = {};
  headers.forEach((h, i) => {
    const inShard = new Map(h.tensors.map((t) => [t.name, t]));
    for (const name of byShard.get(shards[i])!) {
      const t = inShard.get(name);
      if (!t) {
        throw new MoeflashError(
          'WEIGHTS_MISSING',
          `${indexFile} says tensor '${name}' is in ${h.file}, but that shard does not hold it; the index and the shards come from different versions: re-download them`,
        );
      }
      found.set(name, t);
    }
    const listed = new Set(byShard.get(shards[i]));
    const unlisted = h.tensors.find((t) => !listed.has(t.name));
    if (unlisted) {
      throw invalid(indexFile, `shard ${h.file} holds tensor '${unlisted.name}', which the index does not list (or lists in another shard); the index and the shards come from different versions: re-download them`);
    }
    for (const [k, v] of Object.entries(h.metadata)) if (!(k in metadata)) metadata[k] = v;
  });
  // Index order, not shard order: it is the order the exporter wrote.
  const tensors = new Map(Object.keys(weightMap).map((n) => [n, found.get(n)!]));
  return new SafetensorsWeights(dir, tensors, metadata, opener);
}

async function canOpen(file: string, opener: ByteSourceOpener): Promise<boolean> {
  try {
    await (await opener(file)).close();
    return true;
  } catch {
    return false;
  }
}

/**
 * Opens a `.safetensors` file, or a model folder: `model.safetensors.index.json` (sharded) when
 * present, else `model.safetensors`, else every `*.safetensors` in it (tensor names unique across
 * them). Validates every header; tensor bytes are read on demand.
 */
export async function openWeights(path: string): Promise<SafetensorsSource> {
  const abs = resolve(path);
  let st;
  try {
    st = await stat(abs);
  } catch (e) {
    throw new MoeflashError('WEIGHTS_MISSING', `${abs} does not exist; pass a .safetensors file or a model folder`, { cause: e });
  }
  if (st.isFile()) return openSafetensorsFiles(abs, [abs]);
  if (!st.isDirectory()) throw invalid(abs, 'is neither a file nor a folder; pass a .safetensors file or a model folder');
  const index = join(abs, 'model.safetensors.index.json');
  if (await exists(index)) {
    let text: string;
    try {
      text = await readFile(index, 'utf8');
    } catch (e) {
      throw ioError(index, e);
    }
    return openShardedCheckpoint(abs, index, text);
  }
  const single = join(abs, 'model.safetensors');
  if (await exists(single)) return openSafetensorsFiles(abs, [single]);
  const files = (await readdir(abs)).filter((f) => f.endsWith('.safetensors')).sort();
  if (files.length === 0) {
    throw new MoeflashError(
      'WEIGHTS_MISSING',
      `${abs} holds no .safetensors files (nor model.safetensors.index.json); point at a Hugging Face model folder or a .safetensors file`,
    );
  }
  return openSafetensorsFiles(abs, files.map((f) => join(abs, f)));
}

/** Every tensor's info, in the source's order (for progress: sizes and files). */
export function listTensorInfos(source: WeightSource): TensorInfo[] {
  return source.names().map((n) => source.info(n));
}

/** Bytes of all tensors together (the denominator of a load-progress bar). */
export function totalByteLength(source: WeightSource): number {
  let sum = 0;
  for (const n of source.names()) sum += source.info(n).byteLength;
  return sum;
}
