import type { Proposal, RequestSpeculator, SequenceOutput, SpeculationContext, Verdict } from '@moeflash/core';
import { verifyRound } from './acceptance.js';
import { BlockSizePolicy, type TimingModel } from './policy.js';
import { AcceptanceStats, type SpeculativeStats } from './stats.js';

/** Most tokens one round may draft (DESIGN.md: B <= 16). */
export const MAX_BLOCK_SIZE = 16;

export interface BlockChoice {
  /** Fixed B, or the most the adaptive policy may choose. */
  blockSize: number;
  adaptive: boolean;
}

/**
 * What every drafter shares: the block-size choice, timing, lossless verification and statistics.
 * A drafter supplies `draft` (B tokens for the round) and, when it keeps state fed by the target,
 * `absorb` (the verified round's output).
 */
export abstract class SpeculatingRequest implements RequestSpeculator {
  abstract readonly hiddenLayers: number[];
  protected readonly counts = new AcceptanceStats();
  private readonly policy: BlockSizePolicy | null;
  private draftEnd = 0;
  /** Drafting work done outside propose() (absorbing context), charged to the next round's draft time. */
  protected deferredDraftMs = 0;

  constructor(
    readonly method: string,
    private readonly choice: BlockChoice,
    private readonly timings: TimingModel,
  ) {
    this.policy = choice.adaptive ? new BlockSizePolicy({ maxBlockSize: choice.blockSize }, timings, this.counts) : null;
  }

  /** Draft up to `b` tokens (b >= 1) for the position after ctx.tokens. */
  protected abstract draft(ctx: SpeculationContext, b: number): Promise<Proposal> | Proposal;

  /** The round's verdict is final; update drafter state from the verify output. */
  protected absorb(_ctx: SpeculationContext, _proposal: Proposal, _verdict: Verdict, _out: SequenceOutput): void {}

  prefilled(_ctx: SpeculationContext, _out: SequenceOutput): void {}

  async propose(ctx: SpeculationContext): Promise<Proposal> {
    const b = this.policy ? this.policy.next() : this.choice.blockSize;
    const t0 = performance.now();
    const proposal = b > 0 ? await this.draft(ctx, b) : { tokens: [] };
    this.draftEnd = performance.now();
    const ms = this.draftEnd - t0 + this.deferredDraftMs;
    this.deferredDraftMs = 0;
    this.counts.draftMs += ms;
    this.timings.observeDraft(proposal.tokens.length, ms);
    return proposal;
  }

  verify(ctx: SpeculationContext, proposal: Proposal, out: SequenceOutput): Verdict {
    const ms = performance.now() - this.draftEnd;
    const drafted = proposal.tokens.length;
    this.counts.verifyMs += ms;
    this.timings.observeVerify(drafted, ms);
    const verdict = verifyRound(ctx, proposal, out);
    this.counts.record(drafted, verdict.accepted);
    const t0 = performance.now();
    this.absorb(ctx, proposal, verdict, out);
    this.deferredDraftMs += performance.now() - t0;
    return verdict;
  }

  release(): void {}

  stats(): SpeculativeStats {
    return this.counts.snapshot(this.method, this.choice.blockSize);
  }
}
