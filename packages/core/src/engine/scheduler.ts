import { isFatalBackendError, MoeflashError } from '../errors.js';
import type { KvPageStats, LoadedModel, SeqId, SequenceOutput, StepPlan, StepSample } from '../backends/backend.js';

/** One request's share of the next step. */
export interface StepWork {
  tokens: number[];
  logits: 'none' | 'last' | 'all';
  hiddenLayers?: number[];
  sample?: StepSample;
  absorb?: boolean;
  speculate?: { blockSize: number };
}

/** A request's view of its own sequence in the model. */
export interface SequenceControl {
  /** Positions in the cache. */
  readonly length: number;
  /** Roll back to `length` positions (speculative rejection). */
  truncate(length: number): void;
}

/**
 * What the scheduler needs from one generation request.
 *
 * The request owns its token history (`context()`: the prompt, then every token it emitted); the
 * scheduler owns the cache and keeps it a prefix of that history. It runs the history in chunks
 * until only the last token is left out ("prefill"), then one token a step plus any drafts
 * ("decode"). After a preemption the cache is gone and the whole history runs again, which gives
 * the same cache bit for bit on a batch-invariant backend.
 */
export interface ScheduledRequest {
  /** Higher runs first; equal priorities run in arrival order. */
  readonly priority: number;
  /** Most positions the request can come to hold (prompt + most new tokens). */
  readonly maxPositions: number;
  /** Layers whose hidden states every step must return for this request (turns off prefix reuse). */
  readonly hiddenLayers?: number[];
  /** Every step's rows feed the model's attached drafter (StepSequence.absorb; turns off prefix reuse). */
  readonly absorb?: boolean;
  /**
   * Speculation that runs on the backend: before a decode step, the tokens to draft (0: a plain
   * decode), at most `max`; the step then carries StepSequence.speculate and `advance` gets
   * SequenceOutput.speculation, the cache already holding what the round kept.
   */
  deviceRound?(seq: SequenceControl, max: number): number;
  /** The prompt, then every emitted token. */
  context(): readonly number[];
  /** False while the caller is behind on its stream: the request sits out steps and keeps its cache. */
  ready(): boolean;
  /** True once the caller no longer wants tokens (abort). */
  cancelled(): boolean;
  /**
   * Before a decode step: up to `max` drafted tokens to verify after the last context token.
   * Awaited before the plan is built.
   */
  draft?(seq: SequenceControl, max: number): Promise<number[]>;
  /**
   * Host work the request's next token waits for (a grammar's allowed-token mask), or undefined
   * when there is none: awaited before each plan is built; a rejection fails the request.
   */
  prepare?(): Promise<void> | undefined;
  /** A chunk of the history ran (every prefill chunk, the last one included, before `advance`). */
  chunk?(out: SequenceOutput, seq: SequenceControl): void;
  /** A step ran up to the end of the history (plus drafts): consume its logits; false when done. */
  advance(out: SequenceOutput, seq: SequenceControl): boolean;
  /**
   * On a model that samples (LoadedModel.sampling): the draw for a step that reaches the end of
   * the history without drafts, `position` being the cache length after it. The step then asks
   * for no logits and `advance` gets SequenceOutput.sampled instead; undefined keeps the logits.
   */
  sample?(position: number): StepSample | undefined;
  /** The cache was taken to make room for others; it will be recomputed from `context()`. */
  preempted?(): void;
  /** The request got its first step; `cachedTokens` prompt positions came from the prefix cache. */
  started?(info: { cachedTokens: number }): void;
  /** The request ended without finishing (engine error, close). */
  fail(error: unknown): void;
  /** Called once when the request leaves the scheduler, however it ended. */
  finished(): void;
}

export interface StepInfo {
  /** Sequences and tokens in the step, and how long the backend took. */
  sequences: number;
  tokens: number;
  ms: number;
  /** Of `tokens`: history chunks (prompts, recomputation) and decode tokens (with drafts). */
  prefillTokens: number;
  decodeTokens: number;
  /** sequences / maxBatch. */
  occupancy: number;
  /** Requests waiting for a slot, and admitted ones (paused ones included). */
  queued: number;
  running: number;
  /** KV pages held by live sequences after the step (backends that page their cache). */
  kvPagesUsed?: number;
}

export interface SchedulerOptions {
  /** Most sequences in one step. */
  maxBatch: number;
  /** Most tokens in one step, decodes and prefill chunks together. */
  maxStepTokens: number;
  /** Most history tokens of one sequence in one step (default maxStepTokens). */
  prefillChunk?: number;
  onStep?: (info: StepInfo) => void;
  onPreempt?: (info: { generated: number; positions: number }) => void;
}

export interface SchedulerStats {
  queued: number;
  running: number;
  /** Admitted requests sitting out because their callers are behind. */
  paused: number;
  steps: number;
  /** Mean over steps of sequences / maxBatch. */
  batchOccupancy: number;
  preemptions: number;
  /** Prompt tokens of admitted requests, and those of them found in the prefix cache. */
  prefixLookupTokens: number;
  prefixHitTokens: number;
  kvPages: KvPageStats | null;
}

interface Entry {
  req: ScheduledRequest;
  seq: SeqId;
  /** Arrival order: lower is older. */
  order: number;
  state: 'queued' | 'running' | 'done';
  /** True until a step reaches the end of the history (after admission or recomputation). */
  prefilling: boolean;
  started: boolean;
  control: SequenceControl;
}

interface Planned {
  e: Entry;
  work: StepWork;
  /** A history chunk (as opposed to a decode); `final` when it reaches the end of the history. */
  prefill: boolean;
  final: boolean;
}

const setImmediateP = () => new Promise<void>((r) => setImmediate(r));

/**
 * Runs every live request in shared steps (continuous batching): requests join and leave at step
 * boundaries; each step carries one token (plus drafts) of every decoding request, oldest first,
 * then history chunks of prefilling requests up to the token budget, so a long prompt never
 * stalls the decodes. On a backend with a KV page pool it reuses cached prompt prefixes, reserves
 * pages before each step, and when the pool runs dry preempts the youngest sequence (its cache is
 * freed and recomputed later) rather than failing anyone.
 *
 * Failures: a request that could never fit the pool alone fails (OUT_OF_MEMORY saying so) and the
 * others go on; a step that throws fails the requests in it and the others go on, unless the
 * error is fatal (MoeflashError.fatal: the device is unusable), in which case every pending
 * request fails with it, submit() refuses from then on, and the loop stops. Every sequence is
 * released however its request ended.
 */
export class Scheduler {
  private readonly queue: Entry[] = [];
  private readonly running: Entry[] = [];
  private loopDone: Promise<void> | null = null;
  /** True from a loop's start until its last check of the lists (loopDone settles a few ticks later). */
  private looping = false;
  private nextSeq = 1;
  private nextOrder = 0;
  private accepting = true;
  private aborting: MoeflashError | null = null;
  /** The fatal error that ended the loop (a device fault), once there is one. */
  private fatal: unknown = null;
  private wakeUp: (() => void) | null = null;
  private woken = false;
  private steps = 0;
  private occupancySum = 0;
  private preemptions = 0;
  private prefixLookup = 0;
  private prefixHit = 0;
  private readonly prefillChunk: number;

  constructor(private readonly model: LoadedModel, private readonly opts: SchedulerOptions) {
    for (const [k, v] of [['maxBatch', opts.maxBatch], ['maxStepTokens', opts.maxStepTokens], ['prefillChunk', opts.prefillChunk ?? 1]] as const) {
      if (!Number.isInteger(v) || v < 1) throw new MoeflashError('INVALID_ARGUMENT', `${k} must be a positive integer, got ${v}`);
    }
    this.prefillChunk = Math.min(opts.prefillChunk ?? opts.maxStepTokens, opts.maxStepTokens);
  }

  /**
   * Queue a request. Throws OUT_OF_MEMORY when its prompt and most new tokens could not fit in
   * the whole KV pool even alone.
   */
  submit(req: ScheduledRequest): void {
    const refused = this.refusal();
    if (refused) throw refused;
    if (!this.accepting) throw new MoeflashError('CLOSED', 'the engine is closed; create a new one');
    const pool = this.model.kvPages?.();
    if (pool && Math.ceil(req.maxPositions / pool.pageSize) > pool.total) {
      throw new MoeflashError(
        'OUT_OF_MEMORY',
        `the request can never fit in the KV cache: prompt and maxTokens need ${req.maxPositions} positions (${Math.ceil(req.maxPositions / pool.pageSize)} pages of ${pool.pageSize}) but the pool holds ${pool.total} pages (${pool.total * pool.pageSize} positions); lower maxTokens, shorten the prompt, or load with a larger kvCache`,
      );
    }
    const seq = this.nextSeq++;
    const model = this.model;
    const e: Entry = {
      req,
      seq,
      order: this.nextOrder++,
      state: 'queued',
      prefilling: true,
      started: false,
      control: {
        get length() {
          return model.length(seq);
        },
        truncate: (n) => model.truncate(seq, n),
      },
    };
    this.insertSorted(this.queue, e);
    this.wake();
    if (!this.looping) {
      // A request that ended inside plan() (no step, so no yield) can settle the caller's promise
      // and let it submit again before the finished loop's promise settles: `looping` says that
      // the loop is past its last look at the queue, so this submission starts a new one.
      this.looping = true;
      const done = this.loop();
      this.loopDone = done;
      void done.finally(() => {
        if (this.loopDone === done) this.loopDone = null;
      });
    }
  }

  /** The fatal backend error that ended this scheduler, or null while it runs. */
  get fault(): unknown {
    return this.fatal;
  }

  /** What submit() throws after a fatal backend error (null before one). */
  refusal(): MoeflashError | null {
    if (this.fatal === null) return null;
    return new MoeflashError('DEVICE_ERROR', `the engine failed and takes no new requests: ${messageOf(this.fatal)}; close it and create a new one`, {
      cause: this.fatal,
      fatal: true,
    });
  }

  /** Something a paused or idle loop waits for happened (a consumer caught up, an abort). */
  wake(): void {
    this.woken = true;
    const w = this.wakeUp;
    this.wakeUp = null;
    w?.();
  }

  get size(): number {
    return this.queue.length + this.running.length;
  }

  stats(): SchedulerStats {
    return {
      queued: this.queue.length,
      running: this.running.length,
      paused: this.running.filter((e) => !e.req.ready()).length,
      steps: this.steps,
      batchOccupancy: this.steps ? this.occupancySum / this.steps : 0,
      preemptions: this.preemptions,
      prefixLookupTokens: this.prefixLookup,
      prefixHitTokens: this.prefixHit,
      kvPages: this.model.kvPages?.() ?? null,
    };
  }

  /**
   * Stop admitting. With `drain`, let every request finish (aborting what is left after
   * `timeoutMs`, when given); otherwise fail everything in flight with a CLOSED error. Resolves
   * when the loop has stopped and every sequence's cache is released.
   */
  async close(opts: { drain?: boolean; timeoutMs?: number } = {}): Promise<void> {
    this.accepting = false;
    const abortAll = () => {
      this.aborting ??= new MoeflashError('CLOSED', 'the engine was closed while this request ran');
      this.wake();
    };
    if (!opts.drain) abortAll();
    let timer: NodeJS.Timeout | undefined;
    if (opts.drain && opts.timeoutMs !== undefined) timer = setTimeout(abortAll, opts.timeoutMs);
    try {
      await this.loopDone;
    } finally {
      if (timer) clearTimeout(timer);
    }
  }

  private insertSorted(list: Entry[], e: Entry): void {
    let i = list.length;
    while (i > 0 && this.before(e, list[i - 1])) i--;
    list.splice(i, 0, e);
  }

  /** True when a should run before b (and is the one kept when memory is short). */
  private before(a: Entry, b: Entry): boolean {
    if (a.req.priority !== b.req.priority) return a.req.priority > b.req.priority;
    return a.order < b.order;
  }

  private retire(e: Entry, error?: unknown): void {
    if (e.state === 'done') return;
    const list = e.state === 'queued' ? this.queue : this.running;
    list.splice(list.indexOf(e), 1);
    e.state = 'done';
    try {
      this.model.release(e.seq);
    } catch (err) {
      // After a device fault the backend may refuse even this; the request ends all the same.
      if (this.fatal === null) throw err;
    }
    if (error !== undefined) e.req.fail(error);
    e.req.finished();
  }

  /** Free a running sequence's cache and queue it again; it resumes by recomputing its history. */
  private preempt(e: Entry): void {
    const positions = this.model.length(e.seq);
    this.running.splice(this.running.indexOf(e), 1);
    this.model.release(e.seq);
    e.state = 'queued';
    e.prefilling = true;
    this.insertSorted(this.queue, e);
    this.preemptions++;
    try {
      e.req.preempted?.();
    } catch (err) {
      this.retire(e, err);
    }
    this.opts.onPreempt?.({ generated: e.req.context().length, positions });
  }

  /** The running sequence to give up for `x`: the youngest paused one, else the youngest younger than x. */
  private victim(x: Entry): Entry | null {
    for (let i = this.running.length - 1; i >= 0; i--) {
      const e = this.running[i];
      if (e !== x && !e.req.ready()) return e;
    }
    const last = this.running[this.running.length - 1];
    return last && last !== x && this.before(x, last) ? last : null;
  }

  /** Reserve `length` positions for x, preempting others as needed; false when nobody is left to preempt. */
  private makeRoom(x: Entry, length: number, planned: Planned[]): boolean {
    const reserve = this.model.reserve?.bind(this.model);
    if (!reserve) return true;
    while (!reserve(x.seq, length)) {
      const v = this.victim(x);
      if (!v) return false;
      const i = planned.findIndex((p) => p.e === v);
      if (i >= 0) planned.splice(i, 1);
      this.preempt(v);
    }
    return true;
  }

  private sweep(): void {
    for (const list of [this.queue, this.running]) {
      for (let i = list.length - 1; i >= 0; i--) {
        const e = list[i];
        if (this.aborting) this.retire(e, this.aborting);
        else if (e.req.cancelled()) this.retire(e);
      }
    }
  }

  private chunkWork(e: Entry, budget: number): { work: StepWork; final: boolean } {
    const ctx = e.req.context();
    const have = this.model.length(e.seq);
    const n = Math.min(ctx.length - have, budget, this.prefillChunk);
    const final = have + n === ctx.length;
    const work: StepWork = { tokens: ctx.slice(have, have + n), logits: final ? 'last' : 'none', hiddenLayers: e.req.hiddenLayers, absorb: e.req.absorb };
    return { work: final ? this.withSample(e, work) : work, final };
  }

  /** Lets the backend draw the token of a step that ends the history, where both sides can. */
  private withSample(e: Entry, work: StepWork): StepWork {
    if (!this.model.sampling || !e.req.sample || work.logits !== 'last') return work;
    const sample = e.req.sample(this.model.length(e.seq) + work.tokens.length);
    return sample ? { ...work, logits: 'none', sample } : work;
  }

  /** Awaits the host work of every request that may step now (ScheduledRequest.prepare). */
  private async prepareAll(): Promise<void> {
    const waits: Promise<void>[] = [];
    for (const e of [...this.running, ...this.queue]) {
      if (!e.req.prepare || !e.req.ready()) continue;
      let wait: Promise<void> | undefined;
      try {
        wait = e.req.prepare();
      } catch (err) {
        this.retire(e, err);
        continue;
      }
      if (wait) waits.push(wait.catch((err) => this.retire(e, err)));
    }
    if (waits.length) await Promise.all(waits);
  }

  /**
   * False while a request's host work is pending: one submitted while the plan awaited (drafts,
   * other requests' work) waits for the next plan, whose prepareAll awaits it.
   */
  private prepared(e: Entry): boolean {
    return !e.req.prepare || e.req.prepare() === undefined;
  }

  private async plan(): Promise<Planned[]> {
    await this.prepareAll();
    const { maxBatch } = this.opts;
    let budget = this.opts.maxStepTokens;
    const planned: Planned[] = [];
    // A device round runs its drafts through the step too (anchor + B rows).
    const tokensOf = () => planned.reduce((s, p) => s + p.work.tokens.length + (p.work.speculate?.blockSize ?? 0), 0);

    // Decodes first, oldest first: each gets one token, drafts come out of what the others leave.
    const decodes = this.running.filter((e) => !e.prefilling && e.req.ready() && this.prepared(e)).slice(0, maxBatch);
    for (let i = 0; i < decodes.length && budget > 0; i++) {
      const e = decodes[i];
      if (e.state !== 'running') continue;
      const ctx = e.req.context();
      if (e.req.deviceRound) {
        const laterDecodes = decodes.length - i - 1;
        const max = Math.max(0, budget - 1 - laterDecodes);
        let b: number;
        try {
          b = Math.max(0, Math.min(max, e.req.deviceRound(e.control, max)));
        } catch (err) {
          this.retire(e, err);
          continue;
        }
        if (!this.makeRoom(e, this.model.length(e.seq) + 1 + b, planned)) {
          if (this.running.length > 1) this.preempt(e);
          else this.retire(e, this.cannotHold(this.model.length(e.seq) + 1 + b));
          continue;
        }
        const anchor = [ctx[ctx.length - 1]];
        const work: StepWork =
          b > 0
            ? { tokens: anchor, logits: 'none', absorb: true, speculate: { blockSize: b } }
            : this.withSample(e, { tokens: anchor, logits: 'last', absorb: true });
        planned.push({ e, work, prefill: false, final: true });
        budget = this.opts.maxStepTokens - tokensOf();
        continue;
      }
      let drafts: number[] = [];
      if (e.req.draft) {
        const laterDecodes = decodes.length - i - 1;
        const max = Math.max(0, budget - 1 - laterDecodes);
        try {
          drafts = max > 0 ? (await e.req.draft(e.control, max)).slice(0, max) : await e.req.draft(e.control, 0);
        } catch (err) {
          this.retire(e, err);
          continue;
        }
        if (e.state !== 'running') continue;
      }
      const tokens = [ctx[ctx.length - 1], ...drafts];
      if (!this.makeRoom(e, this.model.length(e.seq) + tokens.length, planned)) {
        if (this.running.length > 1) this.preempt(e);
        else this.retire(e, this.cannotHold(this.model.length(e.seq) + tokens.length));
        continue;
      }
      const work: StepWork = { tokens, logits: drafts.length ? 'all' : 'last', hiddenLayers: e.req.hiddenLayers };
      planned.push({ e, work: this.withSample(e, work), prefill: false, final: true });
      budget = this.opts.maxStepTokens - tokensOf();
    }

    // Then history chunks of admitted requests, oldest first.
    for (const e of this.running.filter((x) => x.prefilling && x.req.ready() && this.prepared(x))) {
      if (planned.length >= maxBatch || budget <= 0) break;
      if (e.state !== 'running') continue;
      const { work, final } = this.chunkWork(e, budget);
      if (!this.makeRoom(e, this.model.length(e.seq) + work.tokens.length, planned)) {
        // Alone, nothing will ever free the room it needs (the backend holds fewer positions a
        // sequence than the pool does, say); with others it waits for them.
        if (this.running.length === 1) this.retire(e, this.cannotHold(this.model.length(e.seq) + work.tokens.length));
        continue;
      }
      planned.push({ e, work, prefill: true, final });
      budget = this.opts.maxStepTokens - tokensOf();
    }

    // Then admissions, in order; a request that does not fit blocks those behind it.
    for (const e of [...this.queue]) {
      if (planned.length >= maxBatch || budget <= 0) break;
      if (e.state !== 'queued' || !e.req.ready() || !this.prepared(e)) continue;
      const ctx = e.req.context();
      let cached = 0;
      if (this.model.reusePrefix && !e.req.hiddenLayers?.length && !e.req.absorb) cached = this.model.reusePrefix(e.seq, ctx);
      const { work, final } = this.chunkWork(e, budget);
      const length = cached + work.tokens.length;
      const admitted = this.makeRoom(e, length, planned);
      const pool = this.model.kvPages?.();
      // Leave a page of headroom per running sequence so that admissions do not force preemptions.
      if (!admitted && !this.running.length) {
        // Nothing runs, so nothing will free room: waiting would hold it (and everyone behind it) forever.
        this.retire(e, this.cannotHold(length));
        continue;
      }
      if (!admitted || (pool && this.running.length && pool.free + pool.cached < this.running.length)) {
        this.model.release(e.seq);
        break;
      }
      this.queue.splice(this.queue.indexOf(e), 1);
      e.state = 'running';
      e.prefilling = true;
      this.insertSorted(this.running, e);
      if (!e.started) {
        e.started = true;
        this.prefixLookup += ctx.length;
        this.prefixHit += cached;
        try {
          e.req.started?.({ cachedTokens: cached });
        } catch (err) {
          this.retire(e, err);
          continue;
        }
      }
      planned.push({ e, work, prefill: true, final });
      budget = this.opts.maxStepTokens - tokensOf();
    }
    return planned;
  }

  /** A sequence that cannot get `length` positions even with every other request preempted. */
  private cannotHold(length: number): MoeflashError {
    const pool = this.model.kvPages?.();
    const size = pool ? ` (the pool holds ${pool.total} pages of ${pool.pageSize} positions)` : '';
    return new MoeflashError(
      'OUT_OF_MEMORY',
      `the KV cache cannot hold ${length} positions of this request even with every other request preempted${size}; lower maxTokens, shorten the prompt, or load with a larger kvCache (and maxSequenceLength)`,
    );
  }

  /**
   * The error the requests of a failed step get: the backend's, with the step's size added when
   * it ran out of memory (a smaller step needs less working memory).
   */
  private stepError(err: unknown, live: Planned[]): unknown {
    if ((err as { code?: unknown } | null)?.code !== 'OUT_OF_MEMORY') return err;
    const tokens = live.reduce((n, p) => n + p.work.tokens.length + (p.work.speculate?.blockSize ?? 0), 0);
    return new MoeflashError(
      'OUT_OF_MEMORY',
      `a step of ${live.length} sequence${live.length === 1 ? '' : 's'} (${tokens} tokens) ran out of memory, which ends its requests (the engine goes on with the others): ${messageOf(err)}; a smaller maxBatch or maxStepTokens makes smaller steps`,
      { cause: err },
    );
  }

  /**
   * A fatal backend error (or one the loop itself could not handle): the requests of the step get
   * it as is, every other pending request an error naming it, and submit() refuses from now on.
   */
  private failAll(err: unknown, live: Planned[] = []): void {
    this.fatal = err;
    this.accepting = false;
    for (const p of live) this.retire(p.e, err);
    this.aborting = new MoeflashError('DEVICE_ERROR', `the engine failed before this request could finish: ${messageOf(err)}; close it and create a new one`, {
      cause: err,
      fatal: true,
    });
    this.sweep();
  }

  /** The loop's condition; false ends the loop, in the same tick (see `looping`). */
  private pending(): boolean {
    if (this.queue.length || this.running.length) return true;
    this.looping = false;
    return false;
  }

  private idle(): Promise<void> {
    if (this.woken) {
      this.woken = false;
      return Promise.resolve();
    }
    return new Promise<void>((r) => {
      this.wakeUp = () => {
        this.woken = false;
        r();
      };
    });
  }

  private async loop(): Promise<void> {
    try {
      await this.run();
    } catch (err) {
      this.looping = false;
      // A bug or a backend call outside step() threw: the loop's state is unknown, so it ends
      // every request rather than leaving them waiting (or the rejection unhandled).
      this.failAll(err);
    }
  }

  private async run(): Promise<void> {
    // Yield once so that requests submitted in the same tick share the first step.
    await setImmediateP();
    while (this.pending()) {
      this.woken = false;
      this.sweep();
      if (!this.queue.length && !this.running.length) continue;
      const planned = await this.plan();
      this.sweep();
      // plan() retires requests whose host work failed (a schema that does not compile): when
      // that was the last one, waiting below would hold close({ drain }) until its timeout.
      if (!this.queue.length && !this.running.length) continue;
      const live = planned.filter((p) => p.e.state === 'running');
      if (!live.length) {
        // Requests left out only because their host work is pending: the next plan awaits it.
        if ([...this.running, ...this.queue].some((e) => e.req.ready() && !this.prepared(e))) continue;
        await this.idle();
        continue;
      }
      const plan: StepPlan = { sequences: live.map((p) => ({ seq: p.e.seq, ...p.work })) };
      const t0 = performance.now();
      let result;
      try {
        result = await this.model.step(plan);
      } catch (err) {
        if (isFatalBackendError(err)) {
          this.failAll(err, live);
          continue;
        }
        const error = this.stepError(err, live);
        for (const p of live) this.retire(p.e, error);
        continue;
      }
      const ms = performance.now() - t0;
      let prefillTokens = 0;
      let decodeTokens = 0;
      for (const p of live) {
        if (p.prefill) prefillTokens += p.work.tokens.length;
        else decodeTokens += p.work.tokens.length + (p.work.speculate?.blockSize ?? 0);
      }
      live.forEach((p, i) => {
        const e = p.e;
        if (e.state !== 'running') return;
        if (e.req.cancelled()) return this.retire(e);
        let more = true;
        try {
          const out = result.sequences[i];
          if (p.prefill) e.req.chunk?.(out, e.control);
          if (p.final) {
            e.prefilling = false;
            more = e.req.advance(out, e.control);
          }
        } catch (err) {
          this.retire(e, err);
          return;
        }
        if (!more) this.retire(e);
      });
      this.steps++;
      const occupancy = live.length / this.opts.maxBatch;
      this.occupancySum += occupancy;
      this.opts.onStep?.({
        sequences: live.length,
        tokens: prefillTokens + decodeTokens,
        ms,
        prefillTokens,
        decodeTokens,
        occupancy,
        queued: this.queue.length,
        running: this.running.length,
        kvPagesUsed: this.model.kvPages?.().used,
      });
      // Let consumers run between steps (stream delivery, aborts, new submissions).
      await setImmediateP();
    }
  }
}

function messageOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
