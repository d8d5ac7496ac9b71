import type { SpeculationStats } from '@moeflash/core';

/** What @moeflash/speculative reports per request: the core fields plus measured timings. */
export interface SpeculativeStats extends SpeculationStats {
  /**
   * conditionalAcceptance[i]: of the rounds that judged draft position i (every earlier draft
   * accepted), the fraction that accepted it; the a_i of the block-size policy.
   */
  conditionalAcceptance: number[];
  /** roundsByBlockSize[b]: rounds that verified b drafts (0: a plain decoding step). */
  roundsByBlockSize: number[];
  /** Mean milliseconds drafting a round took, and between the end of drafting and the verdict (the target's verify step). */
  meanDraftMs: number;
  meanVerifyMs: number;
}

/**
 * Per-request acceptance counts. Position i is "offered" when a round drafted at least i + 1
 * tokens, "reached" when it was judged (all before it accepted), and accepted or not.
 */
export class AcceptanceStats {
  rounds = 0;
  drafted = 0;
  accepted = 0;
  readonly offered: number[] = [];
  readonly reached: number[] = [];
  readonly acceptedAt: number[] = [];
  readonly byBlockSize: number[] = [];
  draftMs = 0;
  verifyMs = 0;

  record(drafted: number, accepted: number): void {
    this.rounds++;
    this.drafted += drafted;
    this.accepted += accepted;
    grow(this.byBlockSize, drafted + 1);
    this.byBlockSize[drafted]!++;
    grow(this.offered, drafted);
    grow(this.reached, drafted);
    grow(this.acceptedAt, drafted);
    for (let i = 0; i < drafted; i++) {
      this.offered[i]!++;
      if (i <= accepted) this.reached[i]!++;
      if (i < accepted) this.acceptedAt[i]!++;
    }
  }

  snapshot(method: string, blockSize: number): SpeculativeStats {
    const rounds = this.rounds;
    return {
      method,
      rounds,
      draftedTokens: this.drafted,
      acceptedTokens: this.accepted,
      meanAcceptedPerRound: rounds ? (this.accepted + rounds) / rounds : 0,
      acceptanceByPosition: this.offered.map((n, i) => (n ? this.acceptedAt[i]! / n : 0)),
      conditionalAcceptance: this.reached.map((n, i) => (n ? this.acceptedAt[i]! / n : 0)),
      blockSize,
      roundsByBlockSize: [...this.byBlockSize],
      meanDraftMs: rounds ? this.draftMs / rounds : 0,
      meanVerifyMs: rounds ? this.verifyMs / rounds : 0,
    };
  }
}

function grow(a: number[], n: number): void {
  while (a.length < n) a.push(0);
}
