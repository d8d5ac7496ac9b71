/**
 * The step program: one decode step (a batch bucket of 1-token sequences) or one speculative
 * verify (2..17 rows of one sequence) as plain data, the input of the persistent executor
 * (issue "Persistent runtime", deliverable 1; bench/NOTES.md, "Step program").
 *
 * ```
 *  embed ─> per layer: [input norm] ─> qkv tiles ─> q/k-norm+RoPE+cache epilogue (per KV head)
 *            ─> attention (per sequence, KV head, split) [─> split combine] ─> o tiles (+residual)
 *            ─> [post norm] ─> router+top-k ─> gate/up tiles of each expert slot ─> down tiles
 *            ─> residual add      (dense layers: gate/up tiles ─> down tiles, residual in place)
 *        ─> [final norm] ─> LM-head tiles ─> argmax / sample per row
 * ```
 *
 * Each task reads a disjoint part of the weights (the sum over a step is the bandwidth model's
 * bytes, {@link bytesPerToken}), signals one counter when it finishes and waits for counters to
 * reach their producer counts. Which expert a slot reads is decided on the device: slot u of a
 * layer serves the u-th distinct expert its router chose (an empty slot reads nothing), so a
 * step has min(E, rows x top-k) slots a layer. Placement: tasks go to per-SM queues in
 * dependency-level order (longest processing time first within a level, each to the queue where
 * it would finish first), so every queue follows one global topological order and a kernel that
 * walks the queues in order cannot deadlock.
 */
import type { ModelSpec } from '@moeflash/core';

/** Task kinds; the index is the kind's code in {@link StepProgramArrays}. */
export const TASK_KINDS = [
  'embed', 'input_norm', 'qkv', 'qkv_epilogue', 'attention', 'attn_combine', 'o', 'post_norm', 'router', 'topk',
  'gate_up', 'down', 'moe_residual', 'dense_gate_up', 'dense_down', 'final_norm', 'lm_head', 'argmax', 'sample',
] as const;
export type TaskKind = (typeof TASK_KINDS)[number];

/** What each kind's `args` mean (at most {@link TASK_ARGS} of them; rows in units of the matrix's rows). */
export const TASK_ARG_NAMES: Record<TaskKind, string[]> = {
  embed: ['rows'],
  input_norm: ['rows'],
  qkv: ['row0', 'rows'],
  qkv_epilogue: ['kvHead'],
  attention: ['seq', 'kvHead', 'split', 'pos0', 'positions'],
  attn_combine: ['seq', 'kvHead', 'splits'],
  o: ['row0', 'rows'],
  post_norm: ['rows'],
  router: ['expert0', 'experts'],
  topk: ['experts', 'topK', 'slots'],
  gate_up: ['slot', 'inter0', 'inters'],
  down: ['slot', 'row0', 'rows'],
  moe_residual: ['slots'],
  dense_gate_up: ['inter0', 'inters'],
  dense_down: ['row0', 'rows'],
  final_norm: ['rows'],
  lm_head: ['row0', 'rows'],
  argmax: ['row'],
  sample: ['row'],
};
export const TASK_ARGS = 5;

export interface StepProgramOptions {
  /** Routed experts on the device: MXFP4 (4.25 bits a parameter) or bf16. */
  expertFormat: 'mxfp4' | 'bf16';
  /** Attention and dense-MLP projections: bf16, or block-scaled FP8 kept for gemv_fp8. */
  denseFormat: 'bf16' | 'fp8';
  /** FP8 scale block [rows, cols] (device accounting only; default [128, 128]). */
  fp8Block?: [number, number];
  /** `decode`: `tokens` sequences of one token (a batch bucket); `verify`: one sequence of `tokens` rows. */
  mode: 'decode' | 'verify';
  tokens: number;
  smCount: number;
  /**
   * Positions each sequence's attention reads, the step's own included (default: its rows).
   * Sliding-window layers read at most window + rows - 1 of them.
   */
  context?: number;
  /** Attention splits over the sequence are at least this many positions (default 256). */
  minSplitPositions?: number;
  /** `argmax` (device greedy) or `sample` per row (default argmax). */
  sampler?: 'argmax' | 'sample';
  /** Norms computed by their consumers (default true); false: an explicit task per norm. */
  fuseNorms?: boolean;
  /**
   * `bandwidth-model` (default): bytes as footprint.ts counts them (experts at the expert format,
   * everything else at the dense format's bytes a parameter, embedding rows free), so the sum
   * equals {@link bytesPerToken}. `device`: as the CUDA weight plan lays them out (norms, router,
   * biases and LM head bf16, sinks f32, FP8 scales, the embedding rows gathered).
   */
  accounting?: 'bandwidth-model' | 'device';
  /** Tasks a level aims at per SM (default 1); tiles stay at least `minTileBytes` (default 32 KiB). */
  tilesPerSm?: number;
  minTileBytes?: number;
  /** Cost of a task beyond its bytes, as bytes, for placement and the simulated makespan (default 0). */
  taskOverheadBytes?: number;
  /** Bytes of one KV cache value (default 2). */
  kvBytesPerValue?: number;
}

export interface CounterWait {
  counter: number;
  count: number;
}

export interface StepTask {
  id: number;
  kind: TaskKind;
  /** Decoder layer, or -1 outside the layers. */
  layer: number;
  /** Kind-specific, named by {@link TASK_ARG_NAMES}. */
  args: number[];
  /** Weight bytes read (a routed slot: those of its expert, when the router fills the slot). */
  bytes: number;
  /** KV cache bytes read (attention). */
  kvBytes: number;
  flops: number;
  /** Counters this task waits on, each until `count` producers have signalled it. */
  waits: CounterWait[];
  /** The counter this task increments when done (-1: none, the step's outputs). */
  signal: number;
  /** Producer task ids (every producer of every counter waited on). */
  deps: number[];
  /** Longest chain of tasks before this one. */
  level: number;
  sm: number;
  /** Position in its SM's queue. */
  order: number;
}

export interface StepCounter {
  id: number;
  name: string;
  /** Tasks that signal it; a wait's count is their number. */
  producers: number[];
}

export interface StepProgram {
  family: string;
  layers: number;
  options: Required<StepProgramOptions>;
  /** Sequences and rows of each. */
  sequences: number;
  rowsPerSequence: number;
  /** Expert slots of each MoE layer: min(E, rows x top-k). */
  expertSlots: number;
  /** Expected distinct experts a layer with independent uniform routing (what decodeBytes uses). */
  expectedDistinctExperts: number;
  tasks: StepTask[];
  counters: StepCounter[];
  /** Task ids of each SM's queue, in order. */
  queues: number[][];
  summary: StepProgramSummary;
}

export interface StepProgramSummary {
  tasks: number;
  /** Every slot filled (an upper bound). */
  bytes: number;
  /** Slots filled as expected with independent routing: equals bench.ts decodeBytes (weights part). */
  bytesExpected: number;
  kvBytes: number;
  flops: number;
  perSm: { bytes: number; tasks: number }[];
  maxSmBytes: number;
  meanSmBytes: number;
  /** Heaviest chain by cost (bytes + kv + overhead) with its length in tasks. */
  criticalPath: { cost: number; bytes: number; tasks: number; ids: number[] };
  /** Simulated finish, in cost units on one SM, when a task loads nothing before its waits are met. */
  makespanNoPrefetch: number;
}

interface Ctx {
  tasks: StepTask[];
  counters: StepCounter[];
}

const ceil = Math.ceil;

/** Bytes a parameter of each role, and how an FP8 matrix's scales count. */
function rates(spec: ModelSpec, o: Required<StepProgramOptions>) {
  const model = o.accounting === 'bandwidth-model';
  const expert = o.expertFormat === 'mxfp4' ? 4.25 / 8 : 2;
  const dense = o.denseFormat === 'fp8' ? 1 : 2;
  const [br, bc] = o.fp8Block;
  return {
    expert,
    expertBias: model ? expert : 2,
    /** A projection tile of `rows` of a [R, C] matrix (row0 given for its scale-grid share). */
    proj(rows: number, R: number, C: number): number {
      if (model || o.denseFormat === 'bf16') return rows * C * dense;
      return rows * C + (rows / R) * ceil(R / br) * ceil(C / bc) * 4;
    },
    /** Biases, norms, router, LM head: bf16 on the device, the dense rate in the model. */
    small: model ? dense : 2,
    head: model ? dense : 2,
    sink: model ? dense : 4,
    embedRow: model ? 0 : spec.hiddenSize * 2,
  };
}

/** Splits `units` into `n` near-equal ranges (the first ones the larger), in units of `align` rows. */
function ranges(rows: number, n: number, align: number): [number, number][] {
  const units = ceil(rows / align);
  n = Math.max(1, Math.min(n, units));
  const out: [number, number][] = [];
  for (let i = 0; i < n; i++) {
    const a = Math.floor((i * units) / n) * align;
    const b = Math.min(rows, Math.floor(((i + 1) * units) / n) * align);
    out.push([a, b - a]);
  }
  return out;
}

/** Builds the step program of `spec` for one batch bucket or verify size. */
export function buildStepProgram(spec: ModelSpec, opts: StepProgramOptions): StepProgram {
  if (spec.family === 'deepseek_v3' || spec.attention.mla) throw new Error('step program: the deepseek_v3 family (latent attention) has no CUDA kernels yet');
  if (!Number.isInteger(opts.tokens) || opts.tokens < 1) throw new Error(`step program: tokens must be a positive integer, got ${opts.tokens}`);
  if (opts.mode === 'verify' && (opts.tokens < 2 || opts.tokens > 17)) throw new Error(`step program: a verify has 2..17 rows, got ${opts.tokens}`);
  if (!Number.isInteger(opts.smCount) || opts.smCount < 1) throw new Error(`step program: smCount must be a positive integer, got ${opts.smCount}`);
  const seqs = opts.mode === 'decode' ? opts.tokens : 1;
  const rowsPerSeq = opts.mode === 'decode' ? 1 : opts.tokens;
  const o: Required<StepProgramOptions> = {
    fp8Block: [128, 128], context: rowsPerSeq, minSplitPositions: 256, sampler: 'argmax', fuseNorms: true,
    accounting: 'bandwidth-model', tilesPerSm: 1, minTileBytes: 32 << 10, taskOverheadBytes: 0, kvBytesPerValue: 2,
    ...opts,
  };
  if (o.context < rowsPerSeq) throw new Error(`step program: context ${o.context} is shorter than the step's ${rowsPerSeq} rows`);
  const T = opts.tokens;
  const H = spec.hiddenSize;
  const a = spec.attention;
  const D = a.headDim;
  const qDim = a.numHeads * D;
  const kvDim = a.numKvHeads * D;
  const group = a.numHeads / a.numKvHeads;
  const { numExperts: E, topK: K, intermediateSize: I } = spec.moe;
  const S = Math.min(E, T * K);
  const distinct = E * (1 - Math.pow(1 - K / E, T));
  const r = rates(spec, o);
  const align = 16;
  const target = o.smCount * o.tilesPerSm;
  /** Tiles of a matrix that shares its level with `share` others like it. */
  const tileCount = (bytes: number, rows: number, share = 1) =>
    Math.max(1, Math.min(ceil(target / share), Math.floor(bytes / o.minTileBytes) || 1, ceil(rows / align)));

  const c: Ctx = { tasks: [], counters: [] };
  const counter = (name: string): number => {
    c.counters.push({ id: c.counters.length, name, producers: [] });
    return c.counters.length - 1;
  };
  const task = (kind: TaskKind, layer: number, args: number[], bytes: number, flops: number, waits: number[], signal: number, kvBytes = 0): StepTask => {
    const t: StepTask = {
      id: c.tasks.length, kind, layer, args, bytes, kvBytes, flops,
      waits: waits.map((id) => ({ counter: id, count: 0 })), signal, deps: [], level: 0, sm: -1, order: -1,
    };
    c.tasks.push(t);
    if (signal >= 0) c.counters[signal].producers.push(t.id);
    return t;
  };

  // The embedding rows of the step's tokens.
  let x = counter('embed');
  task('embed', -1, [T], T * r.embedRow, 0, [], x);

  for (let l = 0; l < spec.numLayers; l++) {
    const L = spec.layers[l];
    const P = `L${l}.`;
    // Input norm: explicit, or recomputed by every qkv tile (its weights counted on tile 0).
    let normBytes = H * r.small;
    if (!o.fuseNorms) {
      const n = counter(P + 'input_norm');
      task('input_norm', l, [T], normBytes, 4 * H * T, [x], n);
      x = n;
      normBytes = 0;
    }
    const R = qDim + 2 * kvDim;
    const qkvC = counter(P + 'qkv');
    const qkvTiles = ranges(R, tileCount(r.proj(R, R, H), R), align);
    qkvTiles.forEach(([r0, n], i) =>
      task('qkv', l, [r0, n], r.proj(n, R, H) + (a.bias ? n * r.small : 0) + (i === 0 ? normBytes : 0), 2 * n * H * T, [x], qkvC),
    );
    // q/k norm + RoPE + K/V into the cache, per KV head, all rows.
    const epi: number[] = [];
    for (let h = 0; h < a.numKvHeads; h++) {
      const e = counter(`${P}epilogue.h${h}`);
      epi.push(e);
      const w = h === 0 && a.qkNorm ? 2 * D * r.small : 0;
      task('qkv_epilogue', l, [h], w, (group + 1) * D * T * 8, [qkvC], e);
    }
    // Attention per (sequence, KV head), split over the positions for long contexts.
    const visible = Math.min(o.context, L.slidingWindow === null ? o.context : L.slidingWindow + rowsPerSeq - 1);
    const maxSplits = Math.max(1, Math.floor(visible / o.minSplitPositions));
    const splits = Math.max(1, Math.min(ceil(o.smCount / (seqs * a.numKvHeads)), maxSplits));
    const attnC = counter(P + 'attention');
    for (let s = 0; s < seqs; s++) {
      for (let h = 0; h < a.numKvHeads; h++) {
        const parts = ranges(visible, splits, 1);
        const sc = splits > 1 ? counter(`${P}attention.s${s}.h${h}`) : attnC;
        parts.forEach(([p0, n], i) => {
          const sinks = a.sinks && s === 0 && i === 0 ? group * r.sink : 0;
          task('attention', l, [s, h, i, p0, n], sinks, 4 * group * rowsPerSeq * n * D, [epi[h]], sc, n * 2 * D * o.kvBytesPerValue);
        });
        if (splits > 1) task('attn_combine', l, [s, h, splits], 0, 4 * group * rowsPerSeq * D * splits, [sc], attnC);
      }
    }
    // o projection, each tile adding its rows into the residual stream.
    let oC = counter(P + 'o');
    ranges(H, tileCount(r.proj(H, H, qDim), H), align).forEach(([r0, n]) =>
      task('o', l, [r0, n], r.proj(n, H, qDim) + (a.bias ? n * r.small : 0), 2 * n * qDim * T, [attnC], oC),
    );
    normBytes = H * r.small;
    if (!o.fuseNorms) {
      const n = counter(P + 'post_norm');
      task('post_norm', l, [T], normBytes, 4 * H * T, [oC], n);
      oC = n;
      normBytes = 0;
    }
    if (L.mlp === 'dense') {
      const DI = spec.denseIntermediateSize ?? 0;
      const gu = counter(P + 'dense_gate_up');
      ranges(DI, tileCount(r.proj(2 * DI, 2 * DI, H), DI), align).forEach(([i0, n], i) =>
        task('dense_gate_up', l, [i0, n], r.proj(2 * n, 2 * DI, H) + (i === 0 ? normBytes : 0), 4 * n * H * T, [oC], gu),
      );
      x = counter(P + 'dense_down');
      ranges(H, tileCount(r.proj(H, H, DI), H), align).forEach(([r0, n]) => task('dense_down', l, [r0, n], r.proj(n, H, DI), 2 * n * DI * T, [gu], x));
      continue;
    }
    // Router logits in expert-row tiles, then top-k: slot u <- the u-th distinct expert chosen.
    const logitsC = counter(P + 'router');
    const biasPerRow = (spec.moe.routerBias ? 1 : 0) + (spec.moe.rule === 'sigmoid_grouped_topk' ? 1 : 0);
    ranges(E, tileCount(E * H * r.small, E * align), 1).forEach(([e0, n], i) =>
      task('router', l, [e0, n], n * (H + biasPerRow) * r.small + (i === 0 ? normBytes : 0), 2 * n * H * T, [oC], logitsC),
    );
    const routerC = counter(P + 'topk');
    task('topk', l, [E, K, S], 0, E * T * 8, [logitsC], routerC);
    // Rows a filled slot sees on average (flops only).
    const rowsPerSlot = (T * K) / distinct;
    const guBias = spec.moe.expertBias ? 2 : 0;
    const downBias = spec.moe.expertBias ? 1 : 0;
    const guTiles = ranges(I, tileCount(2 * I * H * r.expert, I, S), align);
    const dnTiles = ranges(H, tileCount(H * I * r.expert, H, S), align);
    const downC = counter(P + 'down');
    for (let u = 0; u < S; u++) {
      const gu = counter(`${P}gate_up.slot${u}`);
      for (const [i0, n] of guTiles) task('gate_up', l, [u, i0, n], 2 * n * H * r.expert + guBias * n * r.expertBias, 4 * n * H * rowsPerSlot, [routerC], gu);
      for (const [r0, n] of dnTiles) task('down', l, [u, r0, n], n * I * r.expert + downBias * n * r.expertBias, 2 * n * I * rowsPerSlot, [gu], downC);
    }
    x = counter(P + 'residual');
    task('moe_residual', l, [S], 0, 2 * H * T * K, [downC], x);
  }
  let normBytes = H * r.small;
  if (!o.fuseNorms) {
    const n = counter('final_norm');
    task('final_norm', -1, [T], normBytes, 4 * H * T, [x], n);
    x = n;
    normBytes = 0;
  }
  const V = spec.vocabSize;
  const head = counter('lm_head');
  ranges(V, tileCount(V * H * r.head, V), align).forEach(([r0, n], i) =>
    task('lm_head', -1, [r0, n], n * H * r.head + (i === 0 ? normBytes : 0), 2 * n * H * T, [x], head),
  );
  for (let row = 0; row < T; row++) task(o.sampler, -1, [row], 0, 4 * V, [head], -1);

  // Waits count every producer; deps and levels follow.
  for (const t of c.tasks) {
    for (const w of t.waits) {
      const p = c.counters[w.counter].producers;
      w.count = p.length;
      t.deps.push(...p);
    }
    t.level = t.deps.reduce((m, d) => Math.max(m, c.tasks[d].level + 1), 0);
  }
  const queues = place(c.tasks, o);
  const program: StepProgram = {
    family: spec.family,
    layers: spec.numLayers,
    options: o,
    sequences: seqs,
    rowsPerSequence: rowsPerSeq,
    expertSlots: spec.layers.some((l) => l.mlp === 'moe') ? S : 0,
    expectedDistinctExperts: distinct,
    tasks: c.tasks,
    counters: c.counters,
    queues,
    summary: undefined as unknown as StepProgramSummary,
  };
  program.summary = summarize(program);
  return program;
}

const costOf = (t: StepTask, o: Required<StepProgramOptions>) => t.bytes + t.kvBytes + o.taskOverheadBytes;

/**
 * Placement: tasks by level, within a level by cost (largest first, then id), each to the queue
 * where it would finish first (a queue is free when its last task is done; a task starts when
 * its queue is free and its producers are done), ties to the SM with the least cost so far, then
 * the lowest.
 */
function place(tasks: StepTask[], o: Required<StepProgramOptions>): number[][] {
  const order = tasks.slice().sort((x, y) => x.level - y.level || costOf(y, o) - costOf(x, o) || x.id - y.id);
  const free = new Float64Array(o.smCount);
  /** Cost placed on each SM so far: ties between equally early queues go to the lightest. */
  const load = new Float64Array(o.smCount);
  const finish = new Float64Array(tasks.length);
  const queues: number[][] = Array.from({ length: o.smCount }, () => []);
  for (const t of order) {
    const ready = t.deps.reduce((m, d) => Math.max(m, finish[d]), 0);
    let best = 0;
    let bestEnd = Infinity;
    for (let s = 0; s < o.smCount; s++) {
      const end = Math.max(free[s], ready) + costOf(t, o);
      if (end < bestEnd || (end === bestEnd && load[s] < load[best])) [best, bestEnd] = [s, end];
    }
    free[best] = bestEnd;
    load[best] += costOf(t, o);
    finish[t.id] = bestEnd;
    t.sm = best;
    t.order = queues[best].length;
    queues[best].push(t.id);
  }
  return queues;
}

/** Expected weight bytes of a task with independent uniform routing (filled slots). */
function expectedBytes(p: StepProgram, t: StepTask): number {
  return t.kind === 'gate_up' || t.kind === 'down' ? (t.bytes * p.expectedDistinctExperts) / p.expertSlots : t.bytes;
}

function summarize(p: StepProgram): StepProgramSummary {
  const o = p.options;
  const perSm = p.queues.map((q) => ({ bytes: q.reduce((s, id) => s + p.tasks[id].bytes, 0), tasks: q.length }));
  const bytes = p.tasks.reduce((s, t) => s + t.bytes, 0);
  // Heaviest chain (tasks are created after their producers, so ids are a topological order).
  const best = new Float64Array(p.tasks.length);
  const from = new Int32Array(p.tasks.length).fill(-1);
  let end = 0;
  for (const t of p.tasks) {
    let m = 0;
    for (const d of t.deps) {
      if (from[t.id] < 0 || best[d] > m) [m, from[t.id]] = [best[d], d];
    }
    best[t.id] = m + costOf(t, o);
    if (best[t.id] > best[end]) end = t.id;
  }
  const ids: number[] = [];
  for (let i = end; i >= 0; i = from[i]) ids.unshift(i);
  return {
    tasks: p.tasks.length,
    bytes,
    bytesExpected: p.tasks.reduce((s, t) => s + expectedBytes(p, t), 0),
    kvBytes: p.tasks.reduce((s, t) => s + t.kvBytes, 0),
    flops: p.tasks.reduce((s, t) => s + t.flops, 0),
    perSm,
    maxSmBytes: Math.max(...perSm.map((s) => s.bytes)),
    meanSmBytes: bytes / perSm.length,
    criticalPath: { cost: best[end], bytes: ids.reduce((s, i) => s + p.tasks[i].bytes, 0), tasks: ids.length, ids },
    makespanNoPrefetch: simulate(p).makespan,
  };
}

/**
 * What a persistent kernel walking the queues does: each SM takes its queue's next task once
 * every counter it waits on is full, runs it for its cost, and signals. Round-robin over the
 * SMs in event order; throws if the queues deadlock. Returns finish times (cost units) too.
 */
export function simulate(p: StepProgram): { makespan: number; finish: Float64Array; rounds: number } {
  const o = p.options;
  const count = new Int32Array(p.counters.length);
  const ready = new Float64Array(p.counters.length);
  const finish = new Float64Array(p.tasks.length);
  const head = new Int32Array(p.queues.length);
  const clock = new Float64Array(p.queues.length);
  let done = 0;
  let rounds = 0;
  while (done < p.tasks.length) {
    let progressed = false;
    rounds++;
    for (let s = 0; s < p.queues.length; s++) {
      // An SM runs as long as its head task's waits are satisfied.
      for (;;) {
        const id = p.queues[s][head[s]];
        if (id === undefined) break;
        const t = p.tasks[id];
        if (!t.waits.every((w) => count[w.counter] >= w.count)) break;
        const start = t.waits.reduce((m, w) => Math.max(m, ready[w.counter]), clock[s]);
        clock[s] = finish[id] = start + costOf(t, o);
        if (t.signal >= 0) {
          count[t.signal]++;
          ready[t.signal] = Math.max(ready[t.signal], finish[id]);
        }
        head[s]++;
        done++;
        progressed = true;
      }
    }
    if (!progressed) throw new Error(`step program: the queues deadlock with ${p.tasks.length - done} tasks left`);
  }
  return { makespan: Math.max(0, ...clock), finish, rounds };
}

/** The program as flat typed arrays, for a native loader (layout in the field comments). */
export interface StepProgramArrays {
  /** Kind code a task ({@link TASK_KINDS} index). */
  kinds: Uint8Array;
  layers: Int32Array;
  /** {@link TASK_ARGS} int32 a task. */
  args: Int32Array;
  /** Counter a task signals, -1 none. */
  signal: Int32Array;
  /** Task i waits on waitCounter[waitStart[i] .. waitStart[i + 1]) until each reaches waitCount. */
  waitStart: Int32Array;
  waitCounter: Int32Array;
  waitCount: Int32Array;
  /** Producers a counter expects (a step's counters start at 0). */
  counterTargets: Int32Array;
  /** Queue of SM s: queueTasks[queueStart[s] .. queueStart[s + 1]). */
  queueStart: Int32Array;
  queueTasks: Int32Array;
  bytes: Float64Array;
}

export function exportStepProgram(p: StepProgram): StepProgramArrays {
  const n = p.tasks.length;
  const waits = p.tasks.reduce((s, t) => s + t.waits.length, 0);
  const out: StepProgramArrays = {
    kinds: new Uint8Array(n), layers: new Int32Array(n), args: new Int32Array(n * TASK_ARGS), signal: new Int32Array(n),
    waitStart: new Int32Array(n + 1), waitCounter: new Int32Array(waits), waitCount: new Int32Array(waits),
    counterTargets: Int32Array.from(p.counters, (c) => c.producers.length),
    queueStart: new Int32Array(p.queues.length + 1), queueTasks: new Int32Array(n), bytes: Float64Array.from(p.tasks, (t) => t.bytes),
  };
  let w = 0;
  for (const t of p.tasks) {
    out.kinds[t.id] = TASK_KINDS.indexOf(t.kind);
    out.layers[t.id] = t.layer;
    t.args.forEach((v, i) => (out.args[t.id * TASK_ARGS + i] = v));
    out.signal[t.id] = t.signal;
    out.waitStart[t.id] = w;
    for (const x of t.waits) [out.waitCounter[w], out.waitCount[w++]] = [x.counter, x.count];
  }
  out.waitStart[n] = w;
  let q = 0;
  p.queues.forEach((ids, s) => {
    out.queueStart[s] = q;
    for (const id of ids) out.queueTasks[q++] = id;
  });
  out.queueStart[p.queues.length] = q;
  return out;
}

const mb = (b: number) => (b / 1e6).toFixed(b >= 1e7 ? 1 : 3);
const gf = (f: number) => (f / 1e9).toFixed(3);

/**
 * A readable table: per task kind (over all layers and per layer, layer 0 shown), per SM, the
 * critical path, and at `bandwidth` bytes/s (default 3.0e12) what each bound means in time.
 */
export function formatStepProgram(p: StepProgram, opts: { bandwidth?: number; perLayer?: boolean } = {}): string {
  const bw = opts.bandwidth ?? 3.0e12;
  const o = p.options;
  const s = p.summary;
  const us = (bytes: number) => ((bytes / bw) * 1e6).toFixed(1);
  const perSmUs = (cost: number) => ((cost * o.smCount) / bw * 1e6).toFixed(1);
  const lines: string[] = [];
  lines.push(
    `step program: ${p.family}, ${p.layers} layers, ${o.mode} ${o.mode === 'decode' ? `batch ${o.tokens}` : `of ${o.tokens} rows`}, context ${o.context}, ` +
      `experts ${o.expertFormat}, dense ${o.denseFormat}, ${o.smCount} SMs, ${o.accounting} bytes, norms ${o.fuseNorms ? 'fused' : 'explicit'}`,
  );
  lines.push(`expert slots a MoE layer: ${p.expertSlots} (expected distinct experts ${p.expectedDistinctExperts.toFixed(2)}); ${s.tasks} tasks, ${p.counters.length} counters`);
  lines.push('');
  const kindTable = (filter: (t: StepTask) => boolean, title: string) => {
    lines.push(`| ${title} | tasks | MB | KV MB | GFLOP | tasks/SM |`, '| --- | ---: | ---: | ---: | ---: | ---: |');
    for (const k of TASK_KINDS) {
      const ts = p.tasks.filter((t) => t.kind === k && filter(t));
      if (!ts.length) continue;
      const b = ts.reduce((x, t) => x + t.bytes, 0);
      const kv = ts.reduce((x, t) => x + t.kvBytes, 0);
      const f = ts.reduce((x, t) => x + t.flops, 0);
      lines.push(`| ${k} | ${ts.length} | ${mb(b)} | ${mb(kv)} | ${gf(f)} | ${(ts.length / o.smCount).toFixed(2)} |`);
    }
  };
  kindTable(() => true, 'kind (whole step)');
  if (opts.perLayer ?? true) {
    lines.push('');
    kindTable((t) => t.layer === 0, 'kind (layer 0)');
    lines.push('');
    lines.push('| layer | tasks | MB | GFLOP |', '| ---: | ---: | ---: | ---: |');
    for (let l = -1; l < p.layers; l++) {
      const ts = p.tasks.filter((t) => t.layer === l);
      lines.push(`| ${l < 0 ? 'outside' : l} | ${ts.length} | ${mb(ts.reduce((x, t) => x + t.bytes, 0))} | ${gf(ts.reduce((x, t) => x + t.flops, 0))} |`);
    }
  }
  lines.push('');
  const sorted = s.perSm.map((x, i) => ({ ...x, i })).sort((x, y) => y.bytes - x.bytes);
  const min = sorted[sorted.length - 1];
  lines.push('| per SM | SM | MB | tasks |', '| --- | ---: | ---: | ---: |');
  lines.push(`| heaviest | ${sorted[0].i} | ${mb(sorted[0].bytes)} | ${sorted[0].tasks} |`);
  lines.push(`| mean | - | ${mb(s.meanSmBytes)} | ${(s.tasks / o.smCount).toFixed(1)} |`);
  lines.push(`| lightest | ${min.i} | ${mb(min.bytes)} | ${min.tasks} |`);
  lines.push('');
  lines.push(`| bound | bytes | time at ${(bw / 1e12).toFixed(2)} TB/s |`, '| --- | ---: | ---: |');
  lines.push(`| floor: all bytes (weights ${mb(s.bytes)} MB + KV ${mb(s.kvBytes)} MB) over the whole GPU | ${mb(s.bytes + s.kvBytes)} MB | ${us(s.bytes + s.kvBytes)} us |`);
  lines.push(`| expected with independent routing (weights + KV) | ${mb(s.bytesExpected + s.kvBytes)} MB | ${us(s.bytesExpected + s.kvBytes)} us |`);
  lines.push(`| heaviest SM queue at 1/${o.smCount} of the bandwidth (perfect prefetch) | ${mb(s.maxSmBytes)} MB | ${perSmUs(s.maxSmBytes)} us |`);
  lines.push(`| critical path: ${s.criticalPath.tasks} dependent tasks, each at 1/${o.smCount} of the bandwidth | ${mb(s.criticalPath.bytes)} MB | ${perSmUs(s.criticalPath.cost)} us |`);
  lines.push(`| simulated queues, no load before a task's waits are met | - | ${perSmUs(s.makespanNoPrefetch)} us |`);
  const chain = new Map<string, number>();
  for (const id of s.criticalPath.ids) chain.set(p.tasks[id].kind, (chain.get(p.tasks[id].kind) ?? 0) + 1);
  lines.push('');
  lines.push(`critical path by kind: ${[...chain].map(([k, n]) => `${k} x${n}`).join(', ')}`);
  return lines.join('\n');
}
