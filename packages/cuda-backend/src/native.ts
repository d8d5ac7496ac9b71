/**
 * The one typed boundary to the native addon (`moeflash_cuda.node`): it finds the addon (prebuilt
 * in the platform package @moeflash/cuda-backend-linux-x64, or built from source into
 * build/Release/), checks its ABI version and describes every native function in TypeScript.
 * Nothing else in moeflash touches the addon directly.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { MoeflashError, type DeviceInfo } from '@moeflash/core';

/** What the addon reports about one GPU. */
export interface CudaDeviceInfo extends DeviceInfo {
  multiprocessors: number;
  /** "9.0" for Hopper. */
  computeCapability: string;
  major: number;
  minor: number;
  l2CacheBytes: number;
  sharedMemoryPerBlockOptin: number;
  pciBusId: number;
}

/** Raw result of the native driver probe. */
export type NativeProbe =
  | { ok: true; devices: CudaDeviceInfo[]; driverVersion: number; runtimeVersion: number }
  | {
      ok: false;
      kind: 'no-driver' | 'no-device' | 'old-driver' | 'cuda-error';
      reason: string;
      runtimeVersion: number;
      driverVersion?: number;
    };

/**
 * Test-only kernel entry points: host arrays in, host arrays out (copy to the device, run one
 * kernel family, synchronize, copy back). bf16 tensors are Uint16Arrays of raw bits. Argument
 * order is fixed by native/ops.cc; src/ops.ts wraps these with named arguments.
 */
export interface NativeOps {
  embedding(table: Uint16Array, hidden: number, ids: Int32Array): Float32Array;
  rmsnorm(
    x: Float32Array,
    residual: Float32Array | null,
    weight: Uint16Array,
    eps: number,
    rows: number,
  ): { out: Float32Array; x: Float32Array };
  rope(
    q: Float32Array,
    k: Float32Array | null,
    positions: Int32Array,
    invFreq: Float32Array,
    attentionFactor: number,
    numHeads: number,
    numKvHeads: number,
    headDim: number,
    rotaryDim: number,
  ): { q: Float32Array; k: Float32Array | null };
  gemvBf16(
    w: Uint16Array,
    bias: Uint16Array | null,
    x: Float32Array,
    rows: number,
    cols: number,
    tokens: number,
  ): Float32Array;
  gemvFp8(
    w: Uint8Array,
    scales: Float32Array,
    blockRows: number,
    blockCols: number,
    bias: Uint16Array | null,
    x: Float32Array,
    rows: number,
    cols: number,
    tokens: number,
    yStride: number | null,
  ): Float32Array;
  moeGateUp(
    blocks: Uint8Array,
    scales: Uint8Array,
    bias: Uint16Array | null,
    x: Float32Array,
    expertIds: Int32Array,
    tokens: number,
    topK: number,
    numExperts: number,
    hidden: number,
    inter: number,
    activation: 0 | 1,
    limit: number,
    alpha: number,
  ): Float32Array;
  moeDown(
    blocks: Uint8Array,
    scales: Uint8Array,
    bias: Uint16Array | null,
    act: Float32Array,
    expertIds: Int32Array,
    tokens: number,
    topK: number,
    numExperts: number,
    hidden: number,
    inter: number,
    expertWeights: Float32Array,
  ): Float32Array;
  moeMma(
    gateUpBlocks: Uint8Array,
    gateUpScales: Uint8Array,
    gateUpBias: Uint16Array | null,
    downBlocks: Uint8Array,
    downScales: Uint8Array,
    downBias: Uint16Array | null,
    x: Float32Array,
    expertIds: Int32Array,
    expertWeights: Float32Array,
    tokens: number,
    topK: number,
    numExperts: number,
    hidden: number,
    inter: number,
    activation: 0 | 1,
    limit: number,
    alpha: number,
    interleaved: boolean,
    repeat: number,
  ): Float32Array & { msPerLaunch?: number };
  router(
    w: Uint16Array,
    bias: Uint16Array | null,
    x: Float32Array,
    tokens: number,
    numExperts: number,
    hidden: number,
    topK: number,
    rule: 0 | 1,
    renormalize: boolean,
  ): { logits: Float32Array; ids: Int32Array; weights: Float32Array };
  routerTopk(
    logits: Float32Array,
    tokens: number,
    numExperts: number,
    topK: number,
    rule: 0 | 1,
    renormalize: boolean,
  ): { ids: Int32Array; weights: Float32Array };
  attentionDecode(
    q: Float32Array,
    kCache: Uint16Array,
    vCache: Uint16Array,
    blockTable: Int32Array,
    seqLens: Int32Array,
    sinks: Float32Array | null,
    numHeads: number,
    numKvHeads: number,
    headDim: number,
    pageSize: number,
    window: number,
    scale: number,
  ): Float32Array;
  attentionPrefill(
    q: Float32Array,
    kCache: Uint16Array,
    vCache: Uint16Array,
    blockTable: Int32Array,
    seqLens: Int32Array,
    seqStarts: Int32Array,
    sinks: Float32Array | null,
    numHeads: number,
    numKvHeads: number,
    headDim: number,
    pageSize: number,
    window: number,
    scale: number,
  ): Float32Array;
  argmax(logits: Float32Array, rows: number, vocab: number): Int32Array;
  sample(
    logits: Float32Array,
    rows: number,
    vocab: number,
    temperature: Float64Array,
    topK: Int32Array | null,
    topP: Float64Array | null,
    minP: Float64Array | null,
    seedLo: Uint32Array,
    seedHi: Uint32Array,
    seqs: Uint32Array,
    positions: Uint32Array,
    purposes: Uint32Array | null,
  ): Int32Array;
  philox(seedLo: number, seedHi: number, counters: Uint32Array): { u: Float32Array; words: Uint32Array };
  /** Allocates and frees `bytes` of device memory (exercises the out-of-memory error). */
  allocate(bytes: number): void;
}

/** Device-side timing for bench/kernels-bench.mjs; every time is in milliseconds. */
export interface NativeBench {
  copy(bytes: number, iters: number): Float64Array;
  gemvBf16(
    rows: number,
    cols: number,
    tokens: number,
    iters: number,
    copies: number,
    warmup: number,
  ): { times: Float64Array; bytes: number };
  moe(
    tokens: number,
    topK: number,
    numExperts: number,
    hidden: number,
    inter: number,
    iters: number,
    layers: number,
    warmup: number,
    activation: 0 | 1,
  ): { gateUp: Float64Array; down: Float64Array; gateUpBytes: Float64Array; downBytes: Float64Array };
}

/** Configuration of the native Model (built by src/model.ts). */
export interface NativeModelConfig {
  hidden: number; vocab: number; layers: number; heads: number; kvHeads: number; headDim: number; rotaryDim: number;
  attentionFactor: number; eps: number; scale: number; topK: number; numExperts: number;
  rule: number; renormalize: number; activation: number; limit: number; alpha: number;
  maxTokens: number; maxLogitRows: number; pageSize: number; numPages: number; maxPagesPerSeq: number;
  maxSeqLen: number; maxInter: number; graphTokens: number; weightsBytes: number;
  /** Widest dense MLP held as FP8 (sizes its scratch); 0 or absent when none. */
  fp8Inter?: number;
  /** 1: the KV cache holds float32 (precision 'f32'); 0 or absent: bf16. */
  kvF32?: number;
  /** 0: MXFP4 experts stay on the CUDA-core kernels (float32 activations); 1 or absent: tensor cores where the shapes allow. */
  expertMma?: number;
}

/** A DFlash drafter's shape for Model.attachDrafter (its hidden size is the model's). */
export interface NativeDrafterConfig {
  layers: number; heads: number; kvHeads: number; headDim: number; rotaryDim: number; attentionFactor: number;
  inter: number; eps: number; scale: number; maskToken: number; targetLayers: Int32Array; normLast: boolean; weightsBytes: number;
}

/** A model's device memory and its step (native/model.cc). */
export interface NativeModel {
  upload(offset: number, bytes: Uint8Array): void;
  /** After the last upload: moves the MXFP4 expert layers to the tensor-core path; returns how many. */
  prepare(): number;
  step(
    inputs: Int32Array,
    tokens: number,
    logitRows: number,
    maxLen: number,
    copyLogits: boolean,
    hiddenLayers: Int32Array | null,
    decode: boolean,
    /** [logitRows][9]: temperature, topK, topP, minP, seedLo, seedHi, seq, position, purpose. */
    sample: Float64Array | null,
    /** Return every MoE layer's router logits and chosen experts (the step runs kernel by kernel). */
    traceRouting?: boolean,
    /** The rows also feed the attached drafter's cache (the step runs kernel by kernel). */
    absorb?: boolean,
  ): {
    ids: Int32Array;
    logits: Float32Array | null;
    hidden: Float32Array | null;
    sampled: Int32Array | null;
    graph: boolean;
    /** With traceRouting: logits [layers, tokens, numExperts] (NaN for dense layers), experts [layers, tokens, topK] (-1 there). */
    routing?: { logits: Float32Array; experts: Int32Array };
  };
  info(): {
    weights: number;
    kvCache: number;
    activations: number;
    graphs: number;
    kvF32: boolean;
    /** Bytes of the attached drafter (weights, KV cache, arena), and of its KV cache; 0 without one. */
    drafter: number;
    drafterKvCache: number;
  };
  /** Reserves a DFlash drafter beside the model (native/model.cc DraftConfig; layout [4 + layers * 10] byte offsets, -1 absent). */
  attachDrafter(config: NativeDrafterConfig, layout: Float64Array): void;
  uploadDrafter(offset: number, bytes: Uint8Array): void;
  /**
   * One DFlash round: the drafter's block forward, the verify forward, acceptance (native/model.cc
   * Model::Round). spec: [seqs][5] verify row of the anchor, first logit row, B, first draft logit
   * row, forced (1: the host wrote the drafts into verifyInputs).
   */
  round(
    verifyInputs: Int32Array,
    tokens: number,
    logitRows: number,
    maxLen: number,
    draftInputs: Int32Array,
    draftTokens: number,
    draftLogitRows: number,
    draftMaxLen: number,
    spec: Int32Array,
    sample: Float64Array | null,
  ): { ids: Int32Array; sampled: Int32Array | null; emitted: Int32Array; accepted: Int32Array; graph: boolean };
  /** Device milliseconds a replay of the captured decode graph of `bucket` rows (CUDA events). */
  timeGraphs(bucket: number, sampling: boolean, iters: number): number;
  /** Forgets the captured decode graphs; the next decode step of each size captures again. */
  dropGraphs(): void;
  dispose(): void;
}

export interface NativeAddon {
  abiVersion: number;
  /** Reserves weights, KV cache and arena (all or nothing: OUT_OF_MEMORY frees what it took). */
  Model: new (config: NativeModelConfig, layout: Float64Array) => NativeModel;
  memInfo(): { free: number; total: number };
  /** Never throws: says why CUDA is unusable when it is. */
  probe(): NativeProbe;
  listDevices(): CudaDeviceInfo[];
  setDevice(index: number): void;
  ops: NativeOps;
  bench: NativeBench;
}

/** The package folder (one level above both src/ and dist/). */
export const PACKAGE_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
/** Where a build from source (node-gyp) puts the addon. */
export const LOCAL_ADDON_PATH = join(PACKAGE_ROOT, 'build', 'Release', 'moeflash_cuda.node');
/** The optional dependency that ships the addon prebuilt for this platform. */
export const PREBUILT_PACKAGE = `@moeflash/cuda-backend-${process.platform}-${process.arch}`;
/** The command that builds the addon from source in this repository. */
export const BUILD_COMMAND = 'pnpm --filter @moeflash/cuda-backend build:native';
/** The same, in an application that installed the package. */
const REBUILD_COMMAND = 'MOEFLASH_CUDA_BUILD=source npm rebuild @moeflash/cuda-backend';

const EXPECTED_ABI = 3;

/** An addon file to try, and where it comes from. */
export interface AddonCandidate {
  path: string;
  from: 'MOEFLASH_CUDA_ADDON' | 'prebuilt' | 'local build';
}

/** sourceHash of the manifest beside an addon (moeflash_cuda.json, written by every build script). */
function builtFrom(addon: string): string | null {
  try {
    const m = JSON.parse(readFileSync(addon.replace(/\.node$/, '.json'), 'utf8')) as { sourceHash?: unknown };
    return typeof m.sourceHash === 'string' ? m.sourceHash : null;
  } catch {
    return null;
  }
}

function prebuiltAddon(): string | null {
  try {
    const dir = dirname(createRequire(import.meta.url).resolve(`${PREBUILT_PACKAGE}/package.json`));
    return existsSync(join(dir, 'moeflash_cuda.node')) ? join(dir, 'moeflash_cuda.node') : null;
  } catch {
    return null;
  }
}

/**
 * The addon files to try, in order. MOEFLASH_CUDA_ADDON, when set, is the only one. Otherwise the
 * prebuilt addon of the platform package comes first, then the local build; except that a local
 * build from other sources than the prebuilt's (kernels changed and rebuilt, a build asked for
 * with MOEFLASH_CUDA_BUILD=source, a build by hand without a stamp) comes first: it is the newer
 * one. Files that do not exist are left out.
 */
export function addonCandidates(): AddonCandidate[] {
  if (process.env.MOEFLASH_CUDA_ADDON) return [{ path: process.env.MOEFLASH_CUDA_ADDON, from: 'MOEFLASH_CUDA_ADDON' }];
  const prebuilt = prebuiltAddon();
  const local = existsSync(LOCAL_ADDON_PATH) ? LOCAL_ADDON_PATH : null;
  const list: AddonCandidate[] = [];
  if (prebuilt) list.push({ path: prebuilt, from: 'prebuilt' });
  if (local) {
    const hash = builtFrom(local);
    const newer = prebuilt !== null && (hash === null || hash !== builtFrom(prebuilt));
    list[newer ? 'unshift' : 'push']({ path: local, from: 'local build' });
  }
  return list;
}

/** The addon file this process loads first: MOEFLASH_CUDA_ADDON, the prebuilt or the local build (where none exists: the local build's path). */
export const ADDON_PATH = addonCandidates()[0]?.path ?? LOCAL_ADDON_PATH;

let loaded: ({ addon: NativeAddon } & AddonCandidate) | { error: string } | undefined;

/**
 * Loads the addon once (the first of addonCandidates() that loads and has this package's ABI); on
 * failure returns the reason instead of throwing.
 */
export function tryLoadAddon(): ({ addon: NativeAddon } & AddonCandidate) | { error: string } {
  if (loaded) return loaded;
  const candidates = addonCandidates();
  const failures: string[] = [];
  const require = createRequire(import.meta.url);
  for (const c of candidates) {
    const name = c.from === 'prebuilt' ? `the prebuilt CUDA addon at ${c.path}` : `the CUDA addon at ${c.path}`;
    try {
      const addon = require(c.path) as NativeAddon;
      if (addon.abiVersion === EXPECTED_ABI) return (loaded = { addon, ...c });
      failures.push(`${name} is from another version of @moeflash/cuda-backend (ABI ${String(addon.abiVersion)}, expected ${EXPECTED_ABI})`);
    } catch (e) {
      failures.push(`${name} failed to load (${(e instanceof Error ? e.message : String(e)).split('\n')[0]})`);
    }
  }
  const build = `build it from source (needs nvcc; set CUDA_HOME if it is not in /usr/local/cuda): \`${BUILD_COMMAND}\` in the repository, \`${REBUILD_COMMAND}\` in an application`;
  if (candidates.length === 0) {
    loaded = {
      error: `the CUDA addon is not installed: no prebuilt addon (${PREBUILT_PACKAGE} is not installed) and no local build (no ${LOCAL_ADDON_PATH}); install with optional dependencies, or ${build}`,
    };
  } else {
    const fix = candidates[0].from === 'MOEFLASH_CUDA_ADDON' ? 'point MOEFLASH_CUDA_ADDON at a build of this version, or unset it' : `reinstall @moeflash/cuda-backend, or ${build}`;
    loaded = { error: `${failures.join('; ')}: ${fix}` };
  }
  return loaded;
}

/** The addon, or a BACKEND_UNAVAILABLE error that says how to build it. */
export function loadAddon(): NativeAddon {
  const r = tryLoadAddon();
  if ('error' in r) throw new MoeflashError('BACKEND_UNAVAILABLE', `moeflash CUDA backend: ${r.error}`);
  return r.addon;
}

export type CudaAvailability = { ok: true; devices: CudaDeviceInfo[] } | { ok: false; reason: string };

/**
 * Whether the CUDA backend can run here, and if not, why (addon not built, no driver, no GPU,
 * driver too old). Never throws.
 */
export function isCudaAvailable(): CudaAvailability {
  const r = tryLoadAddon();
  if ('error' in r) return { ok: false, reason: r.error };
  try {
    const p = r.addon.probe();
    return p.ok ? { ok: true, devices: p.devices } : { ok: false, reason: p.reason };
  } catch (e) {
    return { ok: false, reason: `the CUDA probe failed: ${e instanceof Error ? e.message : String(e)}` };
  }
}

/** A native error that carries a CUDA error name (code 'CUDA_ERROR'); see translateNativeError. */
export interface CudaErrorFields {
  code: 'CUDA_ERROR';
  cudaError: string;
  cudaCall: string;
}

/**
 * CUDA errors that are sticky: after one, the CUDA context of the process is unusable and every
 * later call fails the same way until the process exits (driver_types.h: "the process must be
 * terminated and relaunched"). Device-side faults of a kernel, mostly: an illegal address, a
 * trap or assert, a launch failure. Any other CUDA error (a bad argument, too many resources
 * for a launch) leaves the context working.
 */
export const STICKY_CUDA_ERRORS: ReadonlySet<string> = new Set([
  'cudaErrorIllegalAddress',
  'cudaErrorLaunchTimeout',
  'cudaErrorAssert',
  'cudaErrorHardwareStackError',
  'cudaErrorIllegalInstruction',
  'cudaErrorMisalignedAddress',
  'cudaErrorInvalidAddressSpace',
  'cudaErrorInvalidPc',
  'cudaErrorLaunchFailure',
  'cudaErrorECCUncorrectable',
  'cudaErrorContained',
  'cudaErrorExternalDevice',
  'cudaErrorMpsClientTerminated',
  'cudaErrorTensorMemoryLeak',
]);

/**
 * Re-raises an error thrown by the addon as a MoeflashError: OUT_OF_MEMORY and INVALID_ARGUMENT
 * keep their code; a CUDA failure (native code 'CUDA_ERROR') becomes DEVICE_ERROR with its
 * `cudaError` and `cudaCall`, and `fatal: true` when the error is sticky (STICKY_CUDA_ERRORS), so
 * that the engine fails every pending request and refuses new ones instead of stepping again.
 */
export function translateNativeError(e: unknown): unknown {
  if (e instanceof Error) {
    const code = (e as { code?: unknown }).code;
    if (code === 'OUT_OF_MEMORY' || code === 'INVALID_ARGUMENT') {
      const err = new MoeflashError(code, e.message, { cause: e });
      for (const k of ['requestedBytes', 'freeBytes', 'totalBytes'] as const) {
        const v = (e as unknown as Record<string, unknown>)[k];
        if (typeof v === 'number') (err as unknown as Record<string, unknown>)[k] = v;
      }
      return err;
    }
    if (code === 'CUDA_ERROR') {
      const { cudaError, cudaCall } = e as unknown as Partial<CudaErrorFields>;
      const fatal = typeof cudaError === 'string' && STICKY_CUDA_ERRORS.has(cudaError);
      const message = fatal
        ? `${e.message}. This CUDA error is sticky: the device's CUDA context in this process is unusable and nothing more can run on it; close the engine and start a new process`
        : e.message;
      return Object.assign(new MoeflashError('DEVICE_ERROR', message, { cause: e, fatal }), { cudaError, cudaCall });
    }
  }
  return e;
}
