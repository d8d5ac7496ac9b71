import type { LoadedModel, SequenceOutput } from '../backends/backend.js';
import type { ModelSpec } from '../model/spec.js';
import type { SamplingParams } from '../sampling/sample.js';

/**
 * The contract between the engine and a speculative decoding method (implemented in
 * @moeflash/speculative). The engine owns the target model's steps; a speculator proposes tokens
 * and decides, from the target's verify output, which of them to keep.
 */
export interface SpeculationContext {
  /** Prompt and every emitted token so far (the last one is not yet in the target's cache). */
  tokens: readonly number[];
  /** Target cache length before this round's verify. */
  cacheLength: number;
  params: SamplingParams;
  /** Random stream of the request (with params.seed). */
  stream: number;
}

export interface Proposal {
  /** Drafted tokens (may be empty: the round is then a plain decode step). */
  tokens: number[];
  /** Row-major [tokens.length, vocab] draft probabilities, after the same sampling transforms (sampling mode only). */
  q?: Float32Array;
}

export interface Verdict {
  /** Tokens to emit this round: the accepted drafts, then the target's correction or bonus token. */
  emit: number[];
  /** How many of the proposal's drafts were accepted. */
  accepted: number;
}

/** Per-request speculation state (drafter caches, statistics). */
export interface RequestSpeculator {
  /** Target layers whose hidden states the verify step must return (DFlash context features). */
  readonly hiddenLayers: number[];
  /**
   * Called after each prefill chunk with its output (hidden states of the chunk's rows for the
   * drafter); `ctx.cacheLength` is the target's cache length after the chunk. A long prompt comes
   * in several chunks; after a preemption (announced by `release()`) the whole history is
   * prefilled again from an empty cache.
   */
  prefilled(ctx: SpeculationContext, out: SequenceOutput): Promise<void> | void;
  propose(ctx: SpeculationContext): Promise<Proposal>;
  /** Judge the verify output (rows for [last token, ...drafts]) and update drafter state. */
  verify(ctx: SpeculationContext, proposal: Proposal, out: SequenceOutput): Verdict;
  /** The engine finished the request, or dropped its target cache (preemption); free drafter caches. */
  release(): void;
  /** Statistics so far (accepted per round, per-position acceptance, timings). */
  stats(): SpeculationStats;
  /**
   * Set when the backend runs the whole round (a drafter attached to the target model with
   * LoadedModel.attachDrafter): the engine then asks for B, steps with StepSequence.speculate and
   * absorb instead of propose/verify, and reports each round here. Greedy requests only.
   */
  readonly onDevice?: DeviceRounds;
}

/** The engine's side of speculation that runs on the backend (RequestSpeculator.onDevice). */
export interface DeviceRounds {
  /** Tokens to draft next round (0: a plain decode step that still feeds the drafter). */
  nextBlockSize(): number;
  /** A round ran: `drafted` tokens drafted (0 for a plain step), `accepted` of them kept, in `ms`. */
  record(drafted: number, accepted: number, ms: number): void;
}

export interface SpeculationStats {
  method: string;
  rounds: number;
  draftedTokens: number;
  acceptedTokens: number;
  /** Mean tokens emitted per verify round (accepted + 1). */
  meanAcceptedPerRound: number;
  /** acceptance[i]: fraction of rounds in which draft position i was accepted. */
  acceptanceByPosition: number[];
  blockSize: number;
}

/** A speculative method bound to a loaded target; creates per-request speculators. */
export interface Speculator {
  readonly method: string;
  forRequest(opts: { blockSize?: number }): RequestSpeculator;
  dispose(): Promise<void>;
}

/** What a speculative package's factory receives. */
export interface SpeculatorFactoryInput {
  target: LoadedModel;
  targetSpec: ModelSpec;
  targetDir: string;
  options: Record<string, unknown>;
}
