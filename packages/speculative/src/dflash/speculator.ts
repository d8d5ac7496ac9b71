import {
  argmax,
  isGreedy,
  probabilities,
  RngPurpose,
  sampleFrom,
  uniform,
  type Proposal,
  type RequestSpeculator,
  type SequenceOutput,
  type SpeculationContext,
  type Speculator,
  type Verdict,
} from '@moeflash/core';
import { TimingModel } from '../policy.js';
import { SpeculatingRequest, type BlockChoice } from '../request.js';
import type { DflashDraft, DflashKvCache } from './model.js';

/**
 * One request's drafter state: the draft KV cache of the verified context. After every round it
 * holds exactly the positions the target cache holds (the target keeps lengthBefore + 1 +
 * accepted; the drafter absorbs the features of those accepted + 1 new tokens, taken from the
 * verify step's own hidden states, so no extra target pass is needed).
 */
export class DflashRequest extends SpeculatingRequest {
  readonly hiddenLayers: number[];
  cache: DflashKvCache;

  constructor(private readonly model: DflashDraft, choice: BlockChoice, timings: TimingModel) {
    super('dflash', choice, timings);
    this.hiddenLayers = [...new Set(model.cfg.targetLayerIds)];
    this.cache = model.newCache();
  }

  override prefilled(ctx: SpeculationContext, out: SequenceOutput): void {
    const rows = ctx.cacheLength - this.cache.length;
    const t0 = performance.now();
    this.model.absorb(this.cache, this.model.features(out.hidden, 0, rows), rows);
    this.deferredDraftMs += performance.now() - t0;
  }

  protected draft(ctx: SpeculationContext, b: number): Proposal {
    if (this.cache.length !== ctx.cacheLength) {
      throw new Error(`DFlash: the draft cache holds ${this.cache.length} positions but the target holds ${ctx.cacheLength}; the engine must call prefilled() after the prompt and verify() after every round`);
    }
    const anchor = ctx.tokens[ctx.tokens.length - 1]!;
    const logits = this.model.block(this.cache, anchor, b);
    const V = this.model.vocabSize;
    const tokens: number[] = [];
    if (isGreedy(ctx.params)) {
      for (let i = 0; i < b; i++) tokens.push(argmax(logits, i * V, V));
      return { tokens };
    }
    const q = new Float32Array(b * V);
    const seed = ctx.params.seed ?? 0;
    for (let i = 0; i < b; i++) {
      const row = q.subarray(i * V, (i + 1) * V);
      probabilities(logits, ctx.params, { offset: i * V, length: V, out: row });
      const u = uniform({ seed, seq: ctx.stream, position: ctx.cacheLength + 1 + i, purpose: RngPurpose.Draft });
      tokens.push(sampleFrom(row, u));
    }
    return { tokens, q };
  }

  protected override absorb(_ctx: SpeculationContext, _proposal: Proposal, verdict: Verdict, out: SequenceOutput): void {
    const rows = verdict.accepted + 1;
    this.model.absorb(this.cache, this.model.features(out.hidden, 0, rows), rows);
  }

  override release(): void {
    this.cache = this.model.newCache();
  }
}

export class DflashSpeculator implements Speculator {
  readonly method = 'dflash';
  // One draft pass costs a fraction of a target step; on the CPU its LM head grows with B.
  private readonly timings = new TimingModel({ verifySlope: 0.4, draftBase: 0.15, draftSlope: 0.02 });

  constructor(
    readonly draft: DflashDraft,
    private readonly choice: (requested: number | undefined) => BlockChoice,
  ) {}

  forRequest(opts: { blockSize?: number }): RequestSpeculator {
    return new DflashRequest(this.draft, this.choice(opts.blockSize), this.timings);
  }

  async dispose(): Promise<void> {}
}
