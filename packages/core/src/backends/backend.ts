import type { ModelSpec, RopeSpec } from '../model/spec.js';
import type { RngKey } from '../sampling/rng.js';
import type { SamplingParams } from '../sampling/sample.js';
import type { RowLogprobs } from '../sampling/logprobs.js';
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
  /**
   * Draw a token from the logits of the last position on the backend (only where
   * LoadedModel.sampling is true; other backends ignore it), returned as SequenceOutput.sampled.
   * Independent of `logits`: with `logits: 'none'` the logits need not leave the backend.
   */
  sample?: StepSample;
  /**
   * Return each MoE layer's router logits and the experts every token went to
   * (SequenceOutput.routing): what a debugging tool compares between backends. Backends that
   * cannot trace ignore it.
   */
  traceRouting?: boolean;
  /**
   * The step's rows also feed the drafter attached with LoadedModel.attachDrafter: their context
   * features go into its cache at the same positions (prefill chunks and plain decodes of a
   * sequence that speculates on the backend).
   */
  absorb?: boolean;
  /**
   * Run one speculative round on the backend (LoadedModel.attachDrafter): `tokens` is the anchor
   * alone; the drafter proposes `blockSize` tokens, the model verifies [anchor, drafts] in the same
   * step, acceptance runs where the model is, and the cache keeps the anchor and the accepted
   * drafts. The output's `speculation` holds the emitted tokens; no logits come back.
   * `forced` replaces the drafter's proposals by these tokens (the drafter still runs, for its
   * cost): benchmarks that set the acceptance rate.
   */
  speculate?: { blockSize: number; forced?: number[] };
}

/** A drafter the backend runs itself (LoadedModel.attachDrafter): a DFlash drafter's shape and tensors. */
export interface DeviceDrafterSpec {
  method: 'dflash';
  source: string;
  layers: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  intermediateSize: number;
  rmsNormEps: number;
  rope: RopeSpec;
  maskTokenId: number;
  /** Target layers whose outputs, side by side, are the context feature. */
  targetLayerIds: number[];
  /** The target's final norm applies to the feature of its last layer (HF's hidden_states[L]). */
  normLast: boolean;
  /**
   * A tensor as float32 by role: `fc`, `hidden_norm`, `norm`, and `layers.{l}.{input_norm,
   * post_norm, q, k, v, o, q_bias, k_bias, v_bias, o_bias, q_norm, k_norm, gate, up, down}`; null
   * for an absent bias.
   */
  tensor(name: string): Promise<Float32Array | null>;
}

/** What a backend reports of its attached drafter. */
export interface DeviceDrafterInfo {
  /** Bytes of the drafter's weights, KV cache and scratch on the device. */
  bytes: number;
  kvCacheBytes: number;
}

/** A speculative round's result (StepSequence.speculate). */
export interface SpeculationOutput {
  /** The accepted drafts, then the model's own next token. */
  emitted: number[];
  accepted: number;
  blockSize: number;
}
/** Routing of one sequence's tokens in a step, per layer (StepSequence.traceRouting). */
export interface RoutingTrace {
  /** Per layer: router logits, row-major [tokens, numExperts]; empty for dense layers. */
  logits: Float32Array[];
  /** Per layer: the experts each token went to, [tokens, topK] in routing order; empty for dense layers. */
  experts: Int32Array[];
}

/**
 * A backend-side draw: core's argmax(row) when params are greedy, else sampleToken(row, params,
 * key), the same token bit for bit whichever backend draws it.
 */
export interface StepSample {
  params: SamplingParams;
  key: RngKey;
  /**
   * Grammar mask (sampling/token-mask.ts layout: bit i of word i >> 5 allows token i): the draw
   * is made from the logits with every disallowed token at -Infinity (core's applyTokenMasks).
   * Sent only to models whose `samplingFeatures.allowedTokens` is true.
   */
  allowedTokens?: Int32Array;
  /**
   * Also return SequenceOutput.logprobs for the drawn token with this many alternatives (core's
   * rowLogprobs of the unmasked row). Sent only where `samplingFeatures.logprobs` is true.
   */
  logprobs?: number;
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
  /**
   * The token drawn for StepSequence.sample; -1 where core's sampler rejects the row (a NaN or
   * +Infinity logit, or every logit -Infinity) and would have thrown.
   */
  sampled?: number;
  /** With StepSequence.traceRouting, on backends that trace. */
  routing?: RoutingTrace;
  /** With StepSample.logprobs: the drawn token's log-probability and the top alternatives. */
  logprobs?: RowLogprobs;
  /** With StepSequence.speculate. */
  speculation?: SpeculationOutput;
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

/** The KV cache as a pool of fixed-size pages (backends that page their cache). */
export interface KvPageStats {
  /** Positions a page holds. */
  pageSize: number;
  /** Pages in the pool, fixed at load. */
  total: number;
  /** Pages nobody holds. */
  free: number;
  /** Pages held only by the prefix cache: reclaimed on demand, so as good as free for allocation. */
  cached: number;
  /** Pages held by live sequences (total = free + cached + used). */
  used: number;
}

/** How a backend that pages its KV cache sizes the pool. */
export interface KvCacheOptions {
  /** Positions a page holds (CPU default 16). */
  pageSize?: number;
  /** Pages in the pool; wins over `bytes`. */
  pages?: number;
  /**
   * Memory for the pool. CPU default: 256 MiB, or one sequence of maxSequenceLength (else of the
   * model's context, up to 32k positions) when that is more; pages are allocated on first use.
   */
  bytes?: number;
  /** Share full pages between sequences with the same prefix (default true). */
  prefixCaching?: boolean;
}

export interface LoadOptions {
  onProgress?: (p: LoadProgress) => void;
  /** Largest sequence length a KV cache must hold (defaults to the model's context). */
  maxSequenceLength?: number;
  /** KV page pool size, for backends that page their cache. */
  kvCache?: KvCacheOptions;
  /** Backend-specific options. */
  [key: string]: unknown;
}

/** A model resident on a backend. Weights and KV caches never leave it. */
export interface LoadedModel {
  readonly spec: ModelSpec;
  /** True when step() honours StepSequence.sample. */
  readonly sampling?: boolean;
  /**
   * What a backend-side draw can do besides sampling: apply StepSample.allowedTokens, return
   * StepSample.logprobs. Without them, requests that need them get logits and core does it.
   */
  readonly samplingFeatures?: { allowedTokens?: boolean; logprobs?: boolean };
  step(plan: StepPlan): Promise<StepResult>;
  /** Number of positions held in a sequence's cache (0 for an unknown sequence). */
  length(seq: SeqId): number;
  /** Drop cached positions >= length (rollback after rejected draft tokens). */
  truncate(seq: SeqId, length: number): void;
  /** Free a sequence's cache. */
  release(seq: SeqId): void;
  memory(): MemoryReport;
  dispose(): Promise<void>;
  /**
   * The KV page pool, for backends that page their cache. A backend that implements it also
   * implements `reserve` and, with prefix caching, `reusePrefix`.
   */
  kvPages?(): KvPageStats;
  /**
   * Make room for `length` positions in a sequence's cache before a step needs them (growth
   * pages, and a private copy of a shared page about to be written). All or nothing: false, with
   * nothing allocated, when the pool cannot supply them now. Also enters the sequence's full pages
   * in the prefix cache.
   */
  reserve?(seq: SeqId, length: number): boolean;
  /**
   * Attach the cached pages of the longest run of full pages that starts `tokens` to an empty
   * sequence, leaving at least the last token to run; returns the positions now cached.
   */
  reusePrefix?(seq: SeqId, tokens: readonly number[]): number;
  /**
   * Load a drafter beside the model, for StepSequence.speculate and .absorb: the whole
   * speculative round (draft, verify, acceptance) then runs on the backend in one step. Backends
   * without it speculate through the engine (drafts from the host).
   */
  attachDrafter?(spec: DeviceDrafterSpec): Promise<DeviceDrafterInfo>;
}

/** A compute backend, found by name. */
export interface Backend {
  readonly name: string;
  devices(): DeviceInfo[];
  load(spec: ModelSpec, weights: WeightSource, opts?: LoadOptions): Promise<LoadedModel>;
}
