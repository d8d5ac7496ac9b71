import path from 'node:path';
import type { Backend, KvCacheOptions, LoadedModel, LoadProgress } from '../backends/backend.js';
import { resolveBackend, type BackendChoice } from '../backends/registry.js';
import { loadModelSpec } from '../model/config.js';
import type { ModelSpec } from '../model/spec.js';
import { openWeights } from '../weights/safetensors.js';
import { validateCheckpoint } from '../weights/validate-checkpoint.js';

export interface LoadModelOptions {
  model: string;
  backend?: BackendChoice;
  log?: (line: string) => void;
  onProgress?: (p: LoadProgress) => void;
  /** KV page pool (backends that page their cache). */
  kvCache?: KvCacheOptions;
  /** Largest sequence length a KV cache must hold. */
  maxSequenceLength?: number;
  /** Refuse NaN or infinite weights (reads the checkpoint once more before the load; the CLI sets it). */
  checkFiniteWeights?: boolean;
  /** Backend-specific load options, passed through (the CUDA backend's `experts`, for one). */
  backendOptions?: Record<string, unknown>;
}

/** A model on a backend without tokenizer or engine (what `moeflash logits` and tests drive directly). */
export interface ModelHandle {
  dir: string;
  spec: ModelSpec;
  backend: Backend;
  model: LoadedModel;
  loadMs: number;
}

export async function loadModel(opts: LoadModelOptions): Promise<ModelHandle> {
  const dir = path.resolve(opts.model);
  const spec = await loadModelSpec(dir);
  const backend = await resolveBackend(opts.backend ?? 'auto', opts.log);
  const t0 = performance.now();
  const weights = await openWeights(dir);
  try {
    // Every backend loads a checkpoint that matches its spec, or none: checked before any upload.
    await validateCheckpoint(spec, weights, { checkFinite: opts.checkFiniteWeights });
    const model = await backend.load(spec, weights, {
      ...opts.backendOptions,
      log: opts.log,
      onProgress: opts.onProgress,
      kvCache: opts.kvCache,
      maxSequenceLength: opts.maxSequenceLength,
    });
    return { dir, spec, backend, model, loadMs: performance.now() - t0 };
  } finally {
    await weights.close();
  }
}
