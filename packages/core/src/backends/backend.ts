import type { ModelSpec } from '../model/spec.js';
import type { WeightSource } from '../weights/tensor.js';

/** Identifies one sequence (its KV cache) inside a loaded model. */
export type SeqId = number;

/** One sequence's share of a step: tokens appended after what its cache already holds. */
export interface StepSequence {
  seq: SeqId;
  /** Token ids to run, at positions cacheLength .. cacheLength + tokens.length - 1. */
  tokens: number[];
  /** Which positions' logits to return. */
  logits: 'none' | 'last' | 'all';
  /** Hidden states (the residual stream after these layers, 0-based) to return for every token. */
  hiddenLayers?: number[];
}

/** A whole step: several sequences of any lengths, run in one forward pass. */
export interface StepPlan {
  sequences: StepSequence[];
}

export interface SequenceOutput {
  seq: SeqId;
  /** Row-major [rows, vocab] logits for the positions asked for (rows 0 when `logits: 'none'`). */
  logits: Float32Array;
  rows: number;
  /** Per requested layer: row-major [tokens, hidden]. */
  hidden?: Map<number, Float32Array>;
}

export interface StepResult {
  sequences: SequenceOutput[];
}

export interface DeviceInfo {
  index: number;
  name: string;
  totalMemory: number;
  freeMemory: number;
}

export interface MemoryReport {
  /** Bytes held by weights, KV cache and activations, and in all. */
  weights: number;
  kvCache: number;
  activations: number;
  total: number;
}

/** Progress of a model load, reported tensor by tensor. */
export interface LoadProgress {
  tensor: string;
  loadedBytes: number;
  totalBytes: number;
  loadedTensors: number;
  totalTensors: number;
}

export interface LoadOptions {
  onProgress?: (p: LoadProgress) => void;
  /** Largest sequence length a KV cache must hold (defaults to the model's context). */
  maxSequenceLength?: number;
  /** Backend-specific options. */
  [key: string]: unknown;
}

/** A model resident on a backend. Weights and KV caches never leave it. */
export interface LoadedModel {
  readonly spec: ModelSpec;
  step(plan: StepPlan): Promise<StepResult>;
  /** Number of positions held in a sequence's cache (0 for an unknown sequence). */
  length(seq: SeqId): number;
  /** Drop cached positions >= length (rollback after rejected draft tokens). */
  truncate(seq: SeqId, length: number): void;
  /** Free a sequence's cache. */
  release(seq: SeqId): void;
  memory(): MemoryReport;
  dispose(): Promise<void>;
}

/** A compute backend, found by name. */
export interface Backend {
  readonly name: string;
  devices(): DeviceInfo[];
  load(spec: ModelSpec, weights: WeightSource, opts?: LoadOptions): Promise<LoadedModel>;
}
