/**
 * Writes safetensors files that may be larger than memory (converted checkpoints). The header is
 * fixed up front from the declared tensors, so tensor bytes can arrive in any order and go
 * straight to their place in the file. Everything goes to `<path>.partial`, renamed to `<path>`
 * only once every tensor is complete and synced: a crash or an error never leaves a file at
 * `<path>` that looks whole.
 */
import { open, rename, rm, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { MoeflashError } from '../errors.js';
import { DTYPES, HOST_IS_LITTLE_ENDIAN, byteSwap, isDType, isShape, tensorByteLength } from './dtypes.js';
import { MAX_HEADER_BYTES } from './safetensors.js';
import type { DType } from './tensor.js';

export interface SafetensorsEntry {
  name: string;
  dtype: DType;
  shape: number[];
}

export interface SafetensorsLayout {
  /** The bytes before the data section: u64 header length, JSON header, space padding. */
  prefix: Uint8Array;
  /** Per tensor, its [begin, end) within the data section, in declared order. */
  offsets: Map<string, [number, number]>;
  dataBytes: number;
}

export interface SafetensorsWriter {
  /**
   * Appends bytes to tensor `name`: the whole tensor at once, or consecutive chunks of it (each
   * call continues where the previous one for that tensor stopped). Tensors in any order.
   */
  write(name: string, bytes: Uint8Array): Promise<void>;
  /** Checks every tensor is complete, syncs, and renames the partial file to its final path. */
  close(): Promise<void>;
  /** Deletes the partial file. Does nothing after a successful close(). */
  abort(): Promise<void>;
}

function badArgument(message: string): MoeflashError {
  return new MoeflashError('INVALID_ARGUMENT', message);
}

/** Lays out a safetensors file: tensors in declared order, header padded to 8 bytes with spaces. */
export function layoutSafetensors(entries: SafetensorsEntry[], metadata?: Record<string, string>): SafetensorsLayout {
  const offsets = new Map<string, [number, number]>();
  // Built by hand: a JS object would move integer-like names ("0") ahead of the others.
  const parts: string[] = [];
  if (metadata !== undefined) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') throw badArgument(`safetensors metadata '${k}' must be a string, got ${typeof v}`);
    }
    parts.push(`"__metadata__":${JSON.stringify(metadata)}`);
  }
  let at = 0;
  for (const { name, dtype, shape } of entries) {
    if (typeof name !== 'string' || name === '' || name === '__metadata__') {
      throw badArgument(`invalid tensor name ${JSON.stringify(name)}`);
    }
    if (offsets.has(name)) throw badArgument(`tensor '${name}' is declared twice`);
    if (!isDType(dtype)) throw badArgument(`tensor '${name}': unknown dtype ${JSON.stringify(dtype)} (known: ${DTYPES.join(', ')})`);
    if (!isShape(shape)) throw badArgument(`tensor '${name}': shape ${JSON.stringify(shape)} is not an array of non-negative integers`);
    const n = tensorByteLength(dtype, shape);
    if (Number.isNaN(n)) throw badArgument(`tensor '${name}': shape [${shape.join(', ')}] is too large`);
    offsets.set(name, [at, at + n]);
    parts.push(`${JSON.stringify(name)}:${JSON.stringify({ dtype, shape, data_offsets: [at, at + n] })}`);
    at += n;
  }
  const json = new TextEncoder().encode(`{${parts.join(',')}}`);
  const headerLen = Math.ceil(json.length / 8) * 8;
  if (headerLen > MAX_HEADER_BYTES) {
    throw badArgument(`safetensors header would be ${headerLen} bytes, over the ${MAX_HEADER_BYTES / 2 ** 20} MiB readers accept; split the tensors over several files`);
  }
  const prefix = new Uint8Array(8 + headerLen).fill(0x20, 8 + json.length);
  new DataView(prefix.buffer).setBigUint64(0, BigInt(headerLen), true);
  prefix.set(json, 8);
  return { prefix, offsets, dataBytes: at };
}

// Node writes at most 2 GiB - 1 per call, and may write less than asked.
async function writeAt(fh: FileHandle, bytes: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < bytes.length) {
    const len = Math.min(bytes.length - done, 1 << 30);
    const { bytesWritten } = await fh.write(bytes, done, len, position + done);
    done += bytesWritten;
  }
}

/** Starts a file at `path + '.partial'` with room for every declared tensor. */
export async function createSafetensorsWriter(
  path: string,
  entries: SafetensorsEntry[],
  metadata?: Record<string, string>,
): Promise<SafetensorsWriter> {
  const layout = layoutSafetensors(entries, metadata);
  const partial = `${path}.partial`;
  const fh = await open(partial, 'w');
  try {
    // Sized up front: later positioned writes land in place whatever their order.
    await fh.truncate(layout.prefix.length + layout.dataBytes);
    await writeAt(fh, layout.prefix, 0);
  } catch (e) {
    await fh.close().catch(() => {});
    await rm(partial, { force: true });
    throw e;
  }

  const slots = new Map(
    entries.map((e) => {
      const [begin, end] = layout.offsets.get(e.name)!;
      return [e.name, { entry: e, start: layout.prefix.length + begin, length: end - begin, written: 0 }];
    }),
  );
  let state: 'open' | 'closing' | 'closed' | 'aborted' = 'open';
  let closing: Promise<void> | undefined;
  let failure: unknown;
  const inFlight = new Set<Promise<void>>();

  const describe = (s: { entry: SafetensorsEntry; length: number }) =>
    `${s.entry.dtype} [${s.entry.shape.join(', ')}] = ${s.length} bytes`;

  async function write(name: string, bytes: Uint8Array): Promise<void> {
    if (state !== 'open') throw new MoeflashError('CLOSED', `${path}: write('${name}') after the writer was ${state === 'aborted' ? 'aborted' : 'closed'}`);
    const s = slots.get(name);
    if (!s) throw badArgument(`${path}: tensor '${name}' was not declared when the writer was created`);
    if (s.written + bytes.byteLength > s.length) {
      throw badArgument(`${path}: tensor '${name}' is ${describe(s)}; ${s.written} are written and ${bytes.byteLength} more would overrun it`);
    }
    // Claimed before awaiting, so concurrent chunks of one tensor keep their call order.
    const position = s.start + s.written;
    s.written += bytes.byteLength;
    const p = writeAt(fh, bytes, position).catch((e: unknown) => {
      failure ??= e;
      throw new MoeflashError('WEIGHTS_INVALID', `${partial}: writing tensor '${name}' failed: ${(e as Error).message}`, { cause: e });
    });
    inFlight.add(p);
    try {
      await p;
    } finally {
      inFlight.delete(p);
    }
  }

  async function finish(): Promise<void> {
    await Promise.allSettled([...inFlight]);
    if (failure !== undefined) {
      throw new MoeflashError('WEIGHTS_INVALID', `${partial}: an earlier write failed (${(failure as Error).message}); abort() and write the file again`, { cause: failure });
    }
    const incomplete = [...slots].filter(([, s]) => s.written !== s.length);
    if (incomplete.length > 0) {
      const list = incomplete.slice(0, 5).map(([n, s]) => `'${n}' (${s.written} of ${s.length} bytes)`);
      const more = incomplete.length > 5 ? ` and ${incomplete.length - 5} more` : '';
      throw badArgument(`${path}: ${incomplete.length} tensor(s) not completely written: ${list.join(', ')}${more}; write them before close(), or abort()`);
    }
    await fh.sync();
    await fh.close();
    await rename(partial, path);
    // Makes the rename itself durable; some platforms cannot open a folder, and that is harmless.
    try {
      const dir = await open(dirname(path), 'r');
      await dir.sync().finally(() => dir.close());
    } catch {
      /* best effort */
    }
  }

  async function close(): Promise<void> {
    if (state === 'closed') return;
    if (state === 'aborted') throw new MoeflashError('CLOSED', `${path}: close() after abort()`);
    if (state === 'open') {
      state = 'closing';
      closing = finish().then(
        () => {
          state = 'closed';
        },
        (e: unknown) => {
          // Still open: the caller may write what is missing and close again, or abort.
          state = 'open';
          closing = undefined;
          throw e;
        },
      );
    }
    return closing;
  }

  async function abort(): Promise<void> {
    if (closing) await closing.catch(() => {});
    if (state === 'closed' || state === 'aborted') return;
    state = 'aborted';
    await Promise.allSettled([...inFlight]);
    await fh.close().catch(() => {});
    await rm(partial, { force: true });
  }

  return { write, close, abort };
}

function asBytes(data: Uint8Array | Float32Array | Int32Array): Uint8Array {
  const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  return HOST_IS_LITTLE_ENDIAN || data instanceof Uint8Array ? bytes : byteSwap(bytes, data.BYTES_PER_ELEMENT);
}

/**
 * Writes a whole safetensors file from tensors in memory. `data` holds the raw elements of
 * `dtype` (a Float32Array for F32, an Int32Array for I32, bytes for anything else).
 */
export async function writeSafetensors(
  path: string,
  tensors: Record<string, { dtype: DType; shape: number[]; data: Uint8Array | Float32Array | Int32Array }>,
  metadata?: Record<string, string>,
): Promise<void> {
  const list = Object.entries(tensors);
  for (const [name, t] of list) {
    const want = tensorByteLength(t.dtype, t.shape);
    if (t.data.byteLength !== want) {
      throw badArgument(`${path}: tensor '${name}' is ${t.dtype} [${t.shape.join(', ')}] = ${want} bytes, but its data is ${t.data.byteLength} bytes`);
    }
  }
  const writer = await createSafetensorsWriter(
    path,
    list.map(([name, t]) => ({ name, dtype: t.dtype, shape: t.shape })),
    metadata,
  );
  try {
    for (const [name, t] of list) await writer.write(name, asBytes(t.data));
    await writer.close();
  } catch (e) {
    await writer.abort();
    throw e;
  }
}
