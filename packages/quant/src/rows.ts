/**
 * Streaming access to the matrices inside a checkpoint, a band of rows at a time, so that the
 * converter and the quality report never hold a whole tensor (a fused expert tensor of a large
 * model is gigabytes). Rows come back as float32, decoded exactly from the stored dtype, with FP8
 * block scales applied.
 *
 * @module
 */

import { open, type FileHandle } from 'node:fs/promises';
import {
  DTYPE_SIZES,
  HOST_IS_LITTLE_ENDIAN,
  MoeflashError,
  decodeToFloat32,
  type DType,
  type TensorInfo,
  type WeightSource,
} from '@moeflash/core';
import { dequantizeMxfp4, MXFP4_BLOCK_BYTES, MXFP4_BLOCK_SIZE } from './mxfp4.js';

// Node reads at most 2 GiB - 1 per call.
const MAX_IO_BYTES = 1 << 30;

/** Positioned reads of byte ranges inside the tensors of a checkpoint (one handle per file). */
export class RangeReader {
  private readonly handles = new Map<string, Promise<FileHandle>>();

  /** `length` bytes of `info`'s data starting `start` bytes into it. */
  async read(info: TensorInfo, start: number, length: number): Promise<Uint8Array> {
    if (start < 0 || length < 0 || start + length > info.byteLength) {
      throw new MoeflashError(
        'INVALID_ARGUMENT',
        `read of bytes [${start}, ${start + length}) is outside tensor '${info.name}' (${info.byteLength} bytes)`,
      );
    }
    let h = this.handles.get(info.file);
    if (!h) {
      h = open(info.file, 'r');
      this.handles.set(info.file, h);
      h.catch(() => this.handles.delete(info.file));
    }
    const fh = await h;
    const out = new Uint8Array(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await fh.read(out, done, Math.min(length - done, MAX_IO_BYTES), info.offset + start + done);
      if (bytesRead === 0) {
        throw new MoeflashError(
          'WEIGHTS_INVALID',
          `${info.file}: truncated: tensor '${info.name}' ends at byte ${info.offset + info.byteLength} but the file ended at ${info.offset + start + done}; re-download it`,
        );
      }
      done += bytesRead;
    }
    return out;
  }

  async close(): Promise<void> {
    const pending = [...this.handles.values()];
    this.handles.clear();
    await Promise.all(pending.map((h) => h.then((fh) => fh.close()).catch(() => {})));
  }
}

/**
 * A logical float32 matrix [rows, cols] whose rows can be read in bands. `sourceBytesPerRow` is
 * what one row costs in the checkpoint (for progress and for sizing bands).
 */
export interface RowSource {
  readonly rows: number;
  readonly cols: number;
  readonly sourceBytesPerRow: number;
  /** Rows [r0, r1) as row-major float32 [r1 - r0, cols]. */
  read(r0: number, r1: number): Promise<Float32Array>;
}

function checkRange(src: RowSource, r0: number, r1: number): void {
  if (!(Number.isInteger(r0) && Number.isInteger(r1) && 0 <= r0 && r0 <= r1 && r1 <= src.rows)) {
    throw new MoeflashError('INVALID_ARGUMENT', `row range [${r0}, ${r1}) is outside a matrix of ${src.rows} rows`);
  }
}

const FLOAT_DTYPES: ReadonlySet<DType> = new Set(['BF16', 'F16', 'F32', 'F64', 'F8_E4M3', 'F8_E5M2']);

/** Throws WEIGHTS_INVALID unless `info` holds floating-point values. */
export function requireFloat(info: TensorInfo): void {
  if (!FLOAT_DTYPES.has(info.dtype)) {
    throw new MoeflashError(
      'WEIGHTS_INVALID',
      `tensor '${info.name}' in ${info.file} has dtype ${info.dtype}; a weight matrix must be BF16, F16, F32, F64 or FP8`,
    );
  }
}

/** A block-scale tensor (`W.weight_scale_inv`) for a 2-D FP8 weight, read whole: it is small. */
export interface BlockScale {
  info: TensorInfo;
  block: readonly [number, number];
}

/**
 * Rows `rowOffset .. rowOffset + rows` of a tensor seen as a row-major matrix with `cols` columns
 * (a 2-D weight, or one expert's slice of a fused 3-D tensor). With `scale`, the tensor is a 2-D
 * block-scaled FP8 weight and each value is multiplied by its block's `scale_inv`.
 */
export function tensorRows(
  io: RangeReader,
  info: TensorInfo,
  opts: { rowOffset?: number; rows: number; cols: number; scale?: BlockScale },
): RowSource {
  requireFloat(info);
  const size = DTYPE_SIZES[info.dtype];
  const { rows, cols } = opts;
  const rowOffset = opts.rowOffset ?? 0;
  const total = info.shape.reduce((a, d) => a * d, 1);
  if ((rowOffset + rows) * cols > total) {
    throw new MoeflashError(
      'WEIGHTS_INVALID',
      `tensor '${info.name}' [${info.shape}] is too small for rows ${rowOffset}..${rowOffset + rows} of ${cols} columns`,
    );
  }
  let scaleValues: Promise<Float32Array> | undefined;
  const scaleFor = (s: BlockScale) => {
    scaleValues ??= io.read(s.info, 0, s.info.byteLength).then((b) => decodeToFloat32(b, s.info.dtype));
    return scaleValues;
  };
  return {
    rows,
    cols,
    sourceBytesPerRow: cols * size,
    async read(r0, r1) {
      checkRange(this, r0, r1);
      const bytes = await io.read(info, (rowOffset + r0) * cols * size, (r1 - r0) * cols * size);
      const out = decodeToFloat32(bytes, info.dtype);
      if (opts.scale) {
        const scale = await scaleFor(opts.scale);
        const [br, bc] = opts.scale.block;
        const sCols = Math.ceil(cols / bc);
        for (let r = r0; r < r1; r++) {
          const srow = Math.floor((rowOffset + r) / br) * sCols;
          const o = (r - r0) * cols;
          for (let c = 0; c < cols; c++) out[o + c] = Math.fround(out[o + c] * scale[srow + Math.floor(c / bc)]);
        }
      }
      return out;
    },
  };
}

/**
 * The transpose of one [K, N] slice of a tensor (input-major expert weights: gpt-oss's dequantized
 * `gate_up_proj` [E, H, 2I] and `down_proj` [E, I, H]): a [N, K] matrix. A row of the result is a
 * column of the slice, so the slice is read once, in its stored dtype, and kept while its rows are
 * asked for: memory is bounded by one expert's slice, not the tensor.
 */
export function transposedRows(
  io: RangeReader,
  info: TensorInfo,
  opts: { sliceIndex: number; k: number; n: number },
): RowSource {
  requireFloat(info);
  const size = DTYPE_SIZES[info.dtype];
  const { k, n, sliceIndex } = opts;
  // bf16 (the usual case) stays in its 2-byte form and is widened during the transpose: half the
  // memory of a float32 copy of the slice.
  const bf16 = info.dtype === 'BF16' && HOST_IS_LITTLE_ENDIAN;
  let slice: Promise<Uint16Array | Float32Array> | undefined;
  return {
    rows: n,
    cols: k,
    sourceBytesPerRow: k * size,
    async read(r0, r1) {
      checkRange(this, r0, r1);
      slice ??= io
        .read(info, sliceIndex * k * n * size, k * n * size)
        .then((b) => (bf16 ? new Uint16Array(b.buffer, b.byteOffset, k * n) : decodeToFloat32(b, info.dtype)));
      const s = await slice;
      const out = new Float32Array((r1 - r0) * k);
      if (s instanceof Uint16Array) {
        const bits = new Uint32Array(out.buffer);
        for (let kk = 0; kk < k; kk++) {
          const base = kk * n;
          for (let r = r0; r < r1; r++) bits[(r - r0) * k + kk] = s[base + r] << 16;
        }
      } else {
        for (let kk = 0; kk < k; kk++) {
          const base = kk * n;
          for (let r = r0; r < r1; r++) out[(r - r0) * k + kk] = s[base + r];
        }
      }
      if (r1 === n) slice = undefined;
      return out;
    },
  };
}

/** `a`'s rows, then `b`'s (the gate-first order of fused `gate_up_proj`). */
export function concatRows(a: RowSource, b: RowSource): RowSource {
  if (a.cols !== b.cols) throw new MoeflashError('WEIGHTS_INVALID', `cannot stack matrices of ${a.cols} and ${b.cols} columns`);
  return {
    rows: a.rows + b.rows,
    cols: a.cols,
    sourceBytesPerRow: a.sourceBytesPerRow,
    async read(r0, r1) {
      checkRange(this, r0, r1);
      if (r1 <= a.rows) return a.read(r0, r1);
      if (r0 >= a.rows) return b.read(r0 - a.rows, r1 - a.rows);
      const out = new Float32Array((r1 - r0) * a.cols);
      out.set(await a.read(r0, a.rows), 0);
      out.set(await b.read(0, r1 - a.rows), (a.rows - r0) * a.cols);
      return out;
    },
  };
}

/** Rows of `a` and `b` alternating, `a` first (gpt-oss's interleaved gate / up rows). */
export function interleaveRows(a: RowSource, b: RowSource): RowSource {
  if (a.cols !== b.cols || a.rows !== b.rows) {
    throw new MoeflashError('WEIGHTS_INVALID', `cannot interleave [${a.rows}, ${a.cols}] and [${b.rows}, ${b.cols}] matrices`);
  }
  const cols = a.cols;
  return {
    rows: 2 * a.rows,
    cols,
    sourceBytesPerRow: a.sourceBytesPerRow,
    async read(r0, r1) {
      checkRange(this, r0, r1);
      const j0 = r0 >> 1;
      const j1 = (r1 + 1) >> 1;
      const [ra, rb] = await Promise.all([a.read(j0, j1), b.read(j0, j1)]);
      const out = new Float32Array((r1 - r0) * cols);
      for (let r = r0; r < r1; r++) {
        const j = (r >> 1) - j0;
        out.set((r & 1 ? rb : ra).subarray(j * cols, (j + 1) * cols), (r - r0) * cols);
      }
      return out;
    },
  };
}

/**
 * Rows of an MXFP4 weight stored as gpt-oss does (`*_blocks` [..., rows, cols/32, 16] and
 * `*_scales` [..., rows, cols/32], uint8), dequantized; `rowOffset` selects one expert's rows.
 */
export function mxfp4Rows(
  io: RangeReader,
  blocks: TensorInfo,
  scales: TensorInfo,
  opts: { rowOffset?: number; rows: number; cols: number },
): RowSource {
  const { rows, cols } = opts;
  const rowOffset = opts.rowOffset ?? 0;
  if (cols % MXFP4_BLOCK_SIZE !== 0) {
    throw new MoeflashError('WEIGHTS_INVALID', `MXFP4 tensor '${blocks.name}': ${cols} columns are not a whole number of 32-element blocks`);
  }
  const g = cols / MXFP4_BLOCK_SIZE;
  for (const [t, per] of [[blocks, g * MXFP4_BLOCK_BYTES], [scales, g]] as const) {
    if (t.dtype !== 'U8' || t.byteLength < (rowOffset + rows) * per) {
      throw new MoeflashError(
        'WEIGHTS_INVALID',
        `MXFP4 tensor '${t.name}' (${t.dtype} [${t.shape}]) does not hold U8 rows ${rowOffset}..${rowOffset + rows} of ${cols} columns`,
      );
    }
  }
  return {
    rows,
    cols,
    sourceBytesPerRow: g * (MXFP4_BLOCK_BYTES + 1),
    async read(r0, r1) {
      checkRange(this, r0, r1);
      const [b, s] = await Promise.all([
        io.read(blocks, (rowOffset + r0) * g * MXFP4_BLOCK_BYTES, (r1 - r0) * g * MXFP4_BLOCK_BYTES),
        io.read(scales, (rowOffset + r0) * g, (r1 - r0) * g),
      ]);
      return dequantizeMxfp4(b, s);
    },
  };
}

/** How many rows of `src` make a band of about `targetBytes` of source data (at least one). */
export function bandRows(src: RowSource, targetBytes: number, multipleOf = 1): number {
  const rows = Math.max(1, Math.floor(targetBytes / Math.max(1, src.sourceBytesPerRow)));
  return Math.max(multipleOf, Math.floor(rows / multipleOf) * multipleOf);
}

/** A tensor's info, or null when the checkpoint does not hold it. */
export function maybeInfo(src: WeightSource, name: string): TensorInfo | null {
  return src.has(name) ? src.info(name) : null;
}
