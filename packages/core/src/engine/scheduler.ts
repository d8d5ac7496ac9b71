import { MoeflashError } from '../errors.js';
import type { LoadedModel, SeqId, StepPlan } from '../backends/backend.js';

/** What the scheduler needs from one generation request. */
export interface ScheduledRequest {
  /** Tokens to run next: the prompt first, then each sampled token. */
  pending: number[];
  /**
   * Called with the last-position logits after each step that ran this request's tokens, and
   * the position the next token will take. Returns the next token to feed, or null when done.
   */
  advance(logits: Float32Array, position: number): number | null;
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

      const plan: StepPlan = {
        sequences: this.active.map((e) => ({ seq: e.seq, tokens: e.req.pending, logits: 'last' as const })),
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
        const out = result.sequences[i];
        let next: number | null = null;
        try {
          next = e.req.cancelled() ? null : e.req.advance(out.logits, this.model.length(e.seq));
        } catch (err) {
          e.req.fail(err);
        }
        if (next === null) this.retire(i);
        else e.req.pending = [next];
      }
      // Let consumers run between steps (stream delivery, aborts, new submissions).
      await new Promise((r) => setImmediate(r));
    }
  }
}
