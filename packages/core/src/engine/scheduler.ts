import { MoeflashError } from '../errors.js';
import type { LoadedModel, SeqId, SequenceOutput, StepPlan } from '../backends/backend.js';

/** One request's share of the next step. */
export interface StepWork {
  tokens: number[];
  logits: 'last' | 'all';
  hiddenLayers?: number[];
}

/** A request's view of its own sequence in the model. */
export interface SequenceControl {
  /** Positions in the cache. */
  readonly length: number;
  /** Roll back to `length` positions (speculative rejection). */
  truncate(length: number): void;
}

/** What the scheduler needs from one generation request. */
export interface ScheduledRequest {
  /** Work that must happen before the step (drafting); awaited before the plan is built. */
  prepare?(seq: SequenceControl): Promise<void>;
  /** Tokens to run in the next step: the prompt first, then sampled (and drafted) tokens. */
  work(seq: SequenceControl): StepWork;
  /** Consume the step's output; false when the request is done. */
  advance(out: SequenceOutput, seq: SequenceControl): boolean;
  /** The request ended without finishing (abort, engine error). */
  fail(error: unknown): void;
  /** True once the caller no longer wants tokens (abort). */
  cancelled(): boolean;
  /** Called once when the request leaves the scheduler, however it ended. */
  finished(): void;
}

export interface SchedulerOptions {
  /** Most sequences in one step. */
  maxBatch: number;
  onStep?: (info: { sequences: number; tokens: number; ms: number }) => void;
}

/**
 * Runs every live request in shared steps: each step carries the prompt of newly admitted
 * requests and one token of each decoding one; requests join and leave at step boundaries.
 */
export class Scheduler {
  private readonly queue: Array<{ req: ScheduledRequest; seq: SeqId }> = [];
  private readonly active: Array<{ req: ScheduledRequest; seq: SeqId }> = [];
  private running: Promise<void> | null = null;
  private nextSeq = 1;
  private closed = false;

  constructor(private readonly model: LoadedModel, private readonly opts: SchedulerOptions) {}

  submit(req: ScheduledRequest): void {
    if (this.closed) throw new MoeflashError('CLOSED', 'the engine is closed; create a new one');
    this.queue.push({ req, seq: this.nextSeq++ });
    this.running ??= this.loop().finally(() => {
      this.running = null;
    });
  }

  get size(): number {
    return this.queue.length + this.active.length;
  }

  /** Stop admitting, cancel everything in flight and wait for the loop to stop. */
  async close(): Promise<void> {
    this.closed = true;
    const err = new MoeflashError('CLOSED', 'the engine was closed while this request ran');
    for (const e of [...this.queue, ...this.active]) e.req.fail(err);
    await this.running;
  }

  private control(seq: SeqId): SequenceControl {
    const model = this.model;
    return {
      get length() {
        return model.length(seq);
      },
      truncate: (n) => model.truncate(seq, n),
    };
  }

  private retire(i: number): void {
    const [e] = this.active.splice(i, 1);
    this.model.release(e.seq);
    e.req.finished();
  }

  private async loop(): Promise<void> {
    // Yield once so that requests submitted in the same tick share the first step.
    await new Promise((r) => setImmediate(r));
    while (this.queue.length || this.active.length) {
      while (this.queue.length && this.active.length < this.opts.maxBatch) this.active.push(this.queue.shift()!);
      for (let i = this.active.length - 1; i >= 0; i--) if (this.active[i].req.cancelled() || this.closed) this.retire(i);
      if (!this.active.length) continue;

      const controls = this.active.map((e) => this.control(e.seq));
      for (let i = this.active.length - 1; i >= 0; i--) {
        const e = this.active[i];
        if (!e.req.prepare) continue;
        try {
          await e.req.prepare(controls[i]);
        } catch (err) {
          e.req.fail(err);
          this.retire(i);
          controls.splice(i, 1);
        }
      }
      if (!this.active.length) continue;
      const plan: StepPlan = {
        sequences: this.active.map((e, i) => ({ seq: e.seq, ...e.req.work(controls[i]) })),
      };
      const t0 = performance.now();
      let result;
      try {
        result = await this.model.step(plan);
      } catch (err) {
        for (let i = this.active.length - 1; i >= 0; i--) {
          this.active[i].req.fail(err);
          this.retire(i);
        }
        continue;
      }
      this.opts.onStep?.({
        sequences: plan.sequences.length,
        tokens: plan.sequences.reduce((s, p) => s + p.tokens.length, 0),
        ms: performance.now() - t0,
      });
      for (let i = this.active.length - 1; i >= 0; i--) {
        const e = this.active[i];
        let more = false;
        try {
          more = !e.req.cancelled() && e.req.advance(result.sequences[i], controls[i]);
        } catch (err) {
          e.req.fail(err);
        }
        if (!more) this.retire(i);
      }
      // Let consumers run between steps (stream delivery, aborts, new submissions).
      await new Promise((r) => setImmediate(r));
    }
  }
}
