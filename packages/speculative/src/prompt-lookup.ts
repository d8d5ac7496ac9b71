/**
 * Prompt lookup: draft by copying what followed the last time the context's suffix appeared in
 * the prompt or the output so far. No weights, no target features; a deterministic drafter, so
 * the verifier treats its q as one-hot (acceptance.ts).
 */
import type { Proposal, RequestSpeculator, SpeculationContext, Speculator } from '@moeflash/core';
import { TimingModel } from './policy.js';
import { SpeculatingRequest, type BlockChoice } from './request.js';

export interface PromptLookupOptions {
  minNgram: number;
  maxNgram: number;
}

/**
 * Up to `count` tokens that followed the most recent earlier occurrence of the longest suffix of
 * `tokens` of n tokens, n from maxNgram down to minNgram. A continuation that runs into the
 * suffix itself keeps copying from what it has proposed (LZ77-style overlap), so a periodic
 * context yields a full block.
 */
export function lookupDraft(tokens: readonly number[], count: number, minNgram: number, maxNgram: number): number[] {
  const len = tokens.length;
  for (let n = Math.min(maxNgram, len - 1); n >= minNgram; n--) {
    const suffix = len - n;
    for (let j = suffix - 1; j >= 0; j--) {
      let k = 0;
      while (k < n && tokens[j + k] === tokens[suffix + k]) k++;
      if (k < n) continue;
      const out: number[] = [];
      for (let i = 0; i < count; i++) {
        const at = j + n + i;
        out.push(at < len ? tokens[at]! : out[at - len]!);
      }
      return out;
    }
  }
  return [];
}

class PromptLookupRequest extends SpeculatingRequest {
  readonly hiddenLayers: number[] = [];

  constructor(choice: BlockChoice, timings: TimingModel, private readonly opts: PromptLookupOptions) {
    super('prompt-lookup', choice, timings);
  }

  protected draft(ctx: SpeculationContext, b: number): Proposal {
    return { tokens: lookupDraft(ctx.tokens, b, this.opts.minNgram, this.opts.maxNgram) };
  }
}

export class PromptLookupSpeculator implements Speculator {
  readonly method = 'prompt-lookup';
  // Lookup costs next to nothing; verify as a MoE step costs more per token than on a dense model.
  private readonly timings = new TimingModel({ verifySlope: 0.4, draftBase: 0.01, draftSlope: 0 });

  constructor(
    private readonly choice: (requested: number | undefined) => BlockChoice,
    private readonly opts: PromptLookupOptions,
  ) {}

  forRequest(opts: { blockSize?: number }): RequestSpeculator {
    return new PromptLookupRequest(this.choice(opts.blockSize), this.timings, this.opts);
  }

  async dispose(): Promise<void> {}
}
