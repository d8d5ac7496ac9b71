/**
 * Positioned reads of one checkpoint file, whether it lies on disk or in memory. The safetensors
 * reader works on this interface, so the same validation runs on a model folder and on the
 * thousands of mutated checkpoints the fuzz test builds in memory.
 */
import { open, type FileHandle } from 'node:fs/promises';

export interface ByteSource {
  /** Absolute path (or a label for an in-memory file), named in error messages. */
  readonly path: string;
  size(): Promise<number>;
  /** Reads into `dst` from `position`; returns the bytes read (fewer at the end of the file). */
  read(dst: Uint8Array, position: number): Promise<number>;
  close(): Promise<void>;
}

/** Opens the file at `path` (an absolute path). */
export type ByteSourceOpener = (path: string) => Promise<ByteSource>;

// Node reads at most 2 GiB - 1 per call.
const MAX_IO_BYTES = 1 << 30;

class FileSource implements ByteSource {
  constructor(
    readonly path: string,
    private readonly fh: FileHandle,
  ) {}

  async size(): Promise<number> {
    return (await this.fh.stat()).size;
  }

  async read(dst: Uint8Array, position: number): Promise<number> {
    let done = 0;
    while (done < dst.length) {
      const len = Math.min(dst.length - done, MAX_IO_BYTES);
      const { bytesRead } = await this.fh.read(dst, done, len, position + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done;
  }

  close(): Promise<void> {
    return this.fh.close();
  }
}

export const openFileSource: ByteSourceOpener = async (path) => new FileSource(path, await open(path, 'r'));

/** A piece of an in-memory file: literal bytes, or a run of zero bytes that takes no memory. */
export type MemorySegment = Uint8Array | { zeros: number };

const segmentLength = (s: MemorySegment): number => (s instanceof Uint8Array ? s.length : s.zeros);

class MemorySource implements ByteSource {
  private readonly total: number;

  constructor(
    readonly path: string,
    private readonly segments: readonly MemorySegment[],
  ) {
    this.total = segments.reduce((sum, s) => sum + segmentLength(s), 0);
  }

  async size(): Promise<number> {
    return this.total;
  }

  async read(dst: Uint8Array, position: number): Promise<number> {
    let start = 0; // where the current segment begins in the file
    let done = 0;
    for (const s of this.segments) {
      const len = segmentLength(s);
      const from = position + done - start;
      if (from < len && done < dst.length) {
        const n = Math.min(len - from, dst.length - done);
        if (s instanceof Uint8Array) dst.set(s.subarray(from, from + n), done);
        else dst.fill(0, done, done + n);
        done += n;
      }
      start += len;
    }
    return done;
  }

  async close(): Promise<void> {}
}

/** An in-memory file: its bytes are the segments one after another (views are not copied). */
export function memorySource(path: string, segments: readonly MemorySegment[]): ByteSource {
  return new MemorySource(path, segments);
}

/** An opener that serves in-memory files by path (and reports others as missing, as the disk would). */
export function memoryOpener(files: ReadonlyMap<string, readonly MemorySegment[]>): ByteSourceOpener {
  return async (path) => {
    const segments = files.get(path);
    if (segments === undefined) throw Object.assign(new Error(`ENOENT: no such file '${path}'`), { code: 'ENOENT' });
    return memorySource(path, segments);
  };
}
