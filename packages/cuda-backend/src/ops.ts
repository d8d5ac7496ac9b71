/**
 * Test-only access to the CUDA kernels, one call per kernel family. Each call copies its host
 * arrays to fresh device buffers, runs the kernel, waits for it and copies the result back, so it
 * is slow by design: it exists to compare every kernel with its TypeScript twin in
 * packages/core/src/math and sampling (test/kernels.gpu.test.ts) and is not the engine's path.
 *
 * Conventions: bf16 tensors are Uint16Arrays of raw bf16 bits; matrices are row-major; MXFP4
 * expert weights are gpt-oss's `*_blocks` / `*_scales` bytes unchanged.
 */
import {
  MoeflashError,
  seedKey,
  validateSamplingParams,
  type ExpertActivation,
  type RoutingRule,
  type SamplingParams,
} from '@moeflash/core';

import { loadAddon, translateNativeError, type NativeOps } from './native.js';

function call<T>(f: () => T): T {
  try {
    return f();
  } catch (e) {
    throw translateNativeError(e);
  }
}

export interface MoeWeights {
  /** uint8 [experts, rows, cols/32, 16]: E2M1 codes, element 2i in the low nibble. */
  blocks: Uint8Array;
  /** uint8 [experts, rows, cols/32]: E8M0 scales. */
  scales: Uint8Array;
  /** bf16 [experts, rows], or none. */
  bias?: Uint16Array | null;
}

export interface MoeShape {
  tokens: number;
  topK: number;
  numExperts: number;
  hidden: number;
  /** Width of one expert (its intermediate size). */
  inter: number;
}

export interface CudaOps {
  /** out[t] = table[ids[t]] as float32. table bf16 [vocab, hidden]. */
  embedding(a: { table: Uint16Array; hidden: number; ids: Int32Array }): Float32Array;
  /** x += residual (returned as `x`); out = rmsnorm(x) * weight. x [rows, hidden]. */
  rmsnorm(a: {
    x: Float32Array;
    residual?: Float32Array | null;
    weight: Uint16Array;
    eps: number;
    rows: number;
  }): { out: Float32Array; x: Float32Array };
  /** Rotate-half RoPE on q [tokens, numHeads, headDim] and k [tokens, numKvHeads, headDim]. */
  rope(a: {
    q: Float32Array;
    k?: Float32Array | null;
    positions: Int32Array;
    invFreq: Float32Array;
    attentionFactor: number;
    numHeads: number;
    numKvHeads: number;
    headDim: number;
    rotaryDim: number;
  }): { q: Float32Array; k: Float32Array | null };
  /** y [tokens, rows] = x [tokens, cols] W^T (+ bias); W bf16 [rows, cols]. */
  gemvBf16(a: {
    w: Uint16Array;
    bias?: Uint16Array | null;
    x: Float32Array;
    rows: number;
    cols: number;
    tokens: number;
  }): Float32Array;
  /**
   * y [tokens, rows] = x [tokens, cols] W^T (+ bias) with W in FP8 E4M3 and block scales as FP8
   * checkpoints store them: W's value = e4m3(w) * scales[row / blockRows, col / blockCols] (the
   * `weight_scale_inv` tensor, [ceil(rows / blockRows), ceil(cols / blockCols)]). Blocks default
   * to 128 x 128; cols and blockCols must be multiples of 16. With `yStride` (>= rows) the result
   * is [tokens, yStride] with zeros past `rows`, as the model writes stacked projections.
   */
  gemvFp8(a: {
    w: Uint8Array;
    scales: Float32Array;
    blockRows?: number;
    blockCols?: number;
    bias?: Uint16Array | null;
    x: Float32Array;
    rows: number;
    cols: number;
    tokens: number;
    yStride?: number;
  }): Float32Array;
  /**
   * Expert gate/up projection with the activation fused: act [tokens, topK, inter]. The weights
   * are [experts, 2 * inter, hidden]: gate rows then up rows for `swiglu`, interleaved (even gate,
   * odd up) for `gpt_oss_clamped_swiglu`.
   */
  moeGateUp(a: MoeWeights & MoeShape & { x: Float32Array; expertIds: Int32Array; activation: ExpertActivation }): Float32Array;
  /** y [tokens, hidden] = sum_k expertWeights[t, k] * (W_down[e] act[t, k] + bias[e]). */
  /**
   * The whole MoE layer on the tensor-core path (plan, repack, gate/up + activation, down +
   * combine) for any number of tokens: y [tokens, hidden]. Weights in the checkpoint layout;
   * gpt-oss activations take interleaved gate/up rows. `repeat` runs it that many times on the
   * same buffers (checks that the launch leaves its counters ready for the next one) and then
   * reports `msPerLaunch`, the device time of one launch when they run back to back. `expertIds`
   * may hold several sets of tokens * topK ids, which the repeated launches cycle through (so that
   * they do not read L2-resident experts); the result is that of the first set. With
   * MOEFLASH_MOE_TRACE=1 in the environment the decode kernels' per-block timestamps of the last
   * launch come back as `trace` (bench/moe-trace.mjs).
   */
  moeMma(
    a: MoeShape & {
      gateUp: MoeWeights;
      down: MoeWeights;
      x: Float32Array;
      expertIds: Int32Array;
      expertWeights: Float32Array;
      activation: ExpertActivation;
      repeat?: number;
    },
  ): Float32Array & { msPerLaunch?: number; trace?: Float64Array };
  moeDown(
    a: MoeWeights & MoeShape & { act: Float32Array; expertIds: Int32Array; expertWeights: Float32Array },
  ): Float32Array;
  /** Router GEMV (bf16 [numExperts, hidden], optional bias) and top-k under `rule`. */
  router(a: {
    w: Uint16Array;
    bias?: Uint16Array | null;
    x: Float32Array;
    tokens: number;
    numExperts: number;
    hidden: number;
    topK: number;
    rule: RoutingRule;
    renormalize: boolean;
  }): { logits: Float32Array; ids: Int32Array; weights: Float32Array };
  /** Top-k of given logits [tokens, numExperts]. */
  routerTopk(a: {
    logits: Float32Array;
    tokens: number;
    numExperts: number;
    topK: number;
    rule: RoutingRule;
    renormalize: boolean;
  }): { ids: Int32Array; weights: Float32Array };
  /**
   * Decode attention of one query per sequence over a paged bf16 cache
   * [pages, pageSize, numKvHeads, headDim]; blockTable [numSeqs, maxPagesPerSeq]; the query sits at
   * position seqLens[s] - 1. window 0 = full causal.
   */
  attentionDecode(a: {
    q: Float32Array;
    kCache: Uint16Array;
    vCache: Uint16Array;
    blockTable: Int32Array;
    seqLens: Int32Array;
    sinks?: Float32Array | null;
    numHeads: number;
    numKvHeads: number;
    headDim: number;
    pageSize: number;
    window?: number;
    scale: number;
  }): Float32Array;
  /**
   * Prefill attention of many query rows over the same paged cache: row r's query sits at
   * position seqLens[r] - 1 and blockTable has one row per query row [rows, maxPagesPerSeq].
   * Sequence s owns rows [seqStarts[s], seqStarts[s + 1]), which must share their pages; each
   * thread block reads a K/V tile once for a tile of one sequence's rows.
   */
  attentionPrefill(a: {
    q: Float32Array;
    kCache: Uint16Array;
    vCache: Uint16Array;
    blockTable: Int32Array;
    seqLens: Int32Array;
    seqStarts: Int32Array;
    sinks?: Float32Array | null;
    numHeads: number;
    numKvHeads: number;
    headDim: number;
    pageSize: number;
    window?: number;
    scale: number;
  }): Float32Array;
  /** Index of the largest logit per row (lowest among equals, NaN last). */
  argmax(a: { logits: Float32Array; rows: number; vocab: number }): Int32Array;
  /**
   * Row r's token as core's sampleToken(row r, params[r], rngKey(seed, seqs[r], positions[r],
   * purpose)) gives it, bit for bit: temperature, top-k, top-p and min-p, each row with its own
   * settings (one params object stands for every row). Temperature 0 is greedy (argmax's
   * answer). The seed is params' seed unless `seed` is given (a bigint may use all 64 bits).
   * -1 for a sampled row that core rejects: a NaN or +Infinity logit, or only -Infinity.
   */
  sample(a: {
    logits: Float32Array;
    rows: number;
    vocab: number;
    params: SamplingParams | readonly SamplingParams[];
    seed?: number | bigint | readonly (number | bigint)[];
    seqs: ArrayLike<number>;
    positions: ArrayLike<number>;
    purpose?: number | ArrayLike<number>;
  }): Int32Array;
  /** Philox4x32-10 words and sampling uniforms for counters [n, 4] (c0 position, c1 seq, c2 draw, c3 purpose). */
  philox(a: { seed: number | bigint; counters: Uint32Array }): { u: Float32Array; words: Uint32Array };
  /** Allocates and frees `bytes` of device memory; throws OUT_OF_MEMORY when it cannot. */
  allocate(bytes: number): void;
}

const activationCode = (a: ExpertActivation): 0 | 1 => (a.kind === 'swiglu' ? 0 : 1);
const ruleCode = (r: RoutingRule): 0 | 1 => (r === 'topk_then_softmax' ? 0 : 1);

/** The test-only kernel calls; throws BACKEND_UNAVAILABLE when the addon is not built. */
export function cudaOps(): CudaOps {
  const n: NativeOps = loadAddon().ops;
  return {
    embedding: (a) => call(() => n.embedding(a.table, a.hidden, a.ids)),
    rmsnorm: (a) => call(() => n.rmsnorm(a.x, a.residual ?? null, a.weight, a.eps, a.rows)),
    rope: (a) =>
      call(() =>
        n.rope(a.q, a.k ?? null, a.positions, a.invFreq, a.attentionFactor, a.numHeads, a.numKvHeads, a.headDim, a.rotaryDim),
      ),
    gemvBf16: (a) => call(() => n.gemvBf16(a.w, a.bias ?? null, a.x, a.rows, a.cols, a.tokens)),
    gemvFp8: (a) =>
      call(() =>
        n.gemvFp8(a.w, a.scales, a.blockRows ?? 128, a.blockCols ?? 128, a.bias ?? null, a.x, a.rows, a.cols, a.tokens, a.yStride ?? null),
      ),
    moeGateUp: (a) =>
      call(() => {
        const act = a.activation;
        const limit = act.kind === 'gpt_oss_clamped_swiglu' ? act.limit : 0;
        const alpha = act.kind === 'gpt_oss_clamped_swiglu' ? act.alpha : 0;
        return n.moeGateUp(
          a.blocks,
          a.scales,
          a.bias ?? null,
          a.x,
          a.expertIds,
          a.tokens,
          a.topK,
          a.numExperts,
          a.hidden,
          a.inter,
          activationCode(act),
          limit,
          alpha,
        );
      }),
    moeMma: (a) =>
      call(() => {
        const act = a.activation;
        const clamped = act.kind === 'gpt_oss_clamped_swiglu';
        return n.moeMma(
          a.gateUp.blocks,
          a.gateUp.scales,
          a.gateUp.bias ?? null,
          a.down.blocks,
          a.down.scales,
          a.down.bias ?? null,
          a.x,
          a.expertIds,
          a.expertWeights,
          a.tokens,
          a.topK,
          a.numExperts,
          a.hidden,
          a.inter,
          activationCode(act),
          clamped ? act.limit : 0,
          clamped ? act.alpha : 0,
          clamped,
          a.repeat ?? 1,
        );
      }),
    moeDown: (a) =>
      call(() =>
        n.moeDown(
          a.blocks,
          a.scales,
          a.bias ?? null,
          a.act,
          a.expertIds,
          a.tokens,
          a.topK,
          a.numExperts,
          a.hidden,
          a.inter,
          a.expertWeights,
        ),
      ),
    router: (a) =>
      call(() =>
        n.router(a.w, a.bias ?? null, a.x, a.tokens, a.numExperts, a.hidden, a.topK, ruleCode(a.rule), a.renormalize),
      ),
    routerTopk: (a) =>
      call(() => n.routerTopk(a.logits, a.tokens, a.numExperts, a.topK, ruleCode(a.rule), a.renormalize)),
    attentionDecode: (a) =>
      call(() =>
        n.attentionDecode(
          a.q,
          a.kCache,
          a.vCache,
          a.blockTable,
          a.seqLens,
          a.sinks ?? null,
          a.numHeads,
          a.numKvHeads,
          a.headDim,
          a.pageSize,
          a.window ?? 0,
          a.scale,
        ),
      ),
    attentionPrefill: (a) =>
      call(() =>
        n.attentionPrefill(
          a.q,
          a.kCache,
          a.vCache,
          a.blockTable,
          a.seqLens,
          a.seqStarts,
          a.sinks ?? null,
          a.numHeads,
          a.numKvHeads,
          a.headDim,
          a.pageSize,
          a.window ?? 0,
          a.scale,
        ),
      ),
    argmax: (a) => call(() => n.argmax(a.logits, a.rows, a.vocab)),
    sample: (a) =>
      call(() => {
        const rows = a.rows;
        const perRow = <T,>(v: T | readonly T[], what: string): ((r: number) => T) => {
          if (!Array.isArray(v)) return () => v as T;
          const list = v as readonly T[];
          if (list.length !== rows) {
            throw new MoeflashError('INVALID_ARGUMENT', `ops.sample: ${what} has ${list.length} entries; expected ${rows} (rows)`);
          }
          return (r) => list[r]!;
        };
        const params = perRow(a.params, 'params');
        const seed = perRow(a.seed ?? null, 'seed');
        const temperature = new Float64Array(rows);
        const topK = new Int32Array(rows);
        const topP = new Float64Array(rows);
        const minP = new Float64Array(rows);
        const seedLo = new Uint32Array(rows);
        const seedHi = new Uint32Array(rows);
        for (let r = 0; r < rows; r++) {
          const p = params(r);
          validateSamplingParams(p);
          temperature[r] = p.temperature ?? 0;
          topK[r] = p.topK ?? 0;
          topP[r] = p.topP ?? 1;
          minP[r] = p.minP ?? 0;
          [seedLo[r], seedHi[r]] = seedKey(seed(r) ?? p.seed ?? 0);
        }
        const purpose = a.purpose ?? 0;
        const purposes = typeof purpose === 'number' ? new Uint32Array(rows).fill(purpose) : Uint32Array.from(purpose);
        return n.sample(
          a.logits,
          rows,
          a.vocab,
          temperature,
          topK,
          topP,
          minP,
          seedLo,
          seedHi,
          Uint32Array.from(a.seqs),
          Uint32Array.from(a.positions),
          purposes,
        );
      }),
    philox: (a) =>
      call(() => {
        const [lo, hi] = seedKey(a.seed);
        return n.philox(lo, hi, a.counters);
      }),
    allocate: (bytes) => call(() => n.allocate(bytes)),
  };
}
