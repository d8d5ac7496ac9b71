import { kvCacheValuesPerToken } from '../../model/footprint.js';
import { loadModelWeights } from '../../weights/layouts.js';
import { MoeflashError } from '../../errors.js';
import type { ModelSpec } from '../../model/spec.js';
import type { WeightSource } from '../../weights/tensor.js';
import type { Backend, DeviceInfo, LoadedModel, LoadOptions } from '../backend.js';
import { CpuModel, type CpuKvOptions } from './cpu-model.js';
import os from 'node:os';

/** Default KV pool memory: pages are allocated on first use, so this is a ceiling, not a reservation. */
const DEFAULT_KV_BYTES = 256 * 2 ** 20;
const DEFAULT_PAGE_SIZE = 16;

/** The float32 reference backend: the oracle for every other backend. */
export class CpuBackend implements Backend {
  readonly name = 'cpu';

  devices(): DeviceInfo[] {
    return [{ index: 0, name: `CPU (${os.cpus()[0]?.model ?? 'unknown'})`, totalMemory: os.totalmem(), freeMemory: os.freemem() }];
  }

  async load(spec: ModelSpec, weights: WeightSource, opts: LoadOptions = {}): Promise<LoadedModel> {
    const kv = cpuKvOptions(spec, opts);
    const log = typeof opts.log === 'function' ? (opts.log as (line: string) => void) : console.warn;
    const w = await loadModelWeights(spec, weights, opts.onProgress, log);
    return new CpuModel(spec, w, kv, { adoptWeights: true, simd: opts.simd !== false });
  }
}

export function cpuKvOptions(spec: ModelSpec, opts: LoadOptions): CpuKvOptions {
  const o = opts.kvCache ?? {};
  const pageSize = o.pageSize ?? DEFAULT_PAGE_SIZE;
  if (!Number.isInteger(pageSize) || pageSize < 1) {
    throw new MoeflashError('INVALID_ARGUMENT', `kvCache.pageSize must be a positive integer, got ${String(o.pageSize)}`);
  }
  const pageBytes = kvCacheValuesPerToken(spec) * pageSize * 4;
  let pages: number;
  if (o.pages !== undefined) {
    if (!Number.isInteger(o.pages) || o.pages < 1) throw new MoeflashError('INVALID_ARGUMENT', `kvCache.pages must be a positive integer, got ${String(o.pages)}`);
    pages = o.pages;
  } else if (o.bytes !== undefined) {
    if (!(o.bytes > 0)) throw new MoeflashError('INVALID_ARGUMENT', `kvCache.bytes must be positive, got ${String(o.bytes)}`);
    pages = Math.max(1, Math.floor(o.bytes / pageBytes));
  } else {
    // At least one whole sequence of the model's context (up to 32k positions) must fit, so that
    // what ran before paging still runs; memory is only committed as pages are first used.
    const oneSequence = opts.maxSequenceLength ?? Math.min(spec.attention.maxPositionEmbeddings, 32768);
    pages = Math.max(Math.floor(DEFAULT_KV_BYTES / pageBytes), Math.ceil(oneSequence / pageSize));
  }
  return { pageSize, pages, prefixCaching: o.prefixCaching ?? true };
}
