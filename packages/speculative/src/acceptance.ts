/**
 * Lossless acceptance of drafted tokens (refs/FORMATS.md, "Speculative acceptance"), as pure
 * functions on the target's logits rows.
 *
 * The verify step ran the target on [last, d_0, ..., d_{B-1}], so logits row i is the target's
 * prediction for the position of d_i, and row B the prediction after the last draft.
 *
 * Greedy (temperature 0): accept the longest prefix of drafts equal to the target's argmax (core's
 * argmax: ties go to the lowest index), then emit the argmax of the first row that disagreed, or of
 * row B when all agreed. The emitted tokens are exactly those of greedy plain decoding.
 *
 * Sampling (Leviathan et al. 2023; Chen et al. 2023): p and q are core's probabilities() of the
 * target's and the draft's logits under the same params (temperature, top-k, top-p, min-p). Draft
 * d_i is accepted when u_i * q(d_i) < p(d_i), u_i = uniform(seed, stream, pos_i, Accept), which
 * happens with probability min(1, p/q). At the first rejection the verifier emits a token drawn
 * from norm(max(0, p - q)) with uniform(..., pos_i, Residual) and stops; when every draft passed it
 * emits a bonus token from row B's p with uniform(..., pos_B, Sample), the very draw plain
 * decoding makes at that position. pos_i is the absolute position of the token being decided:
 * the target cache held `position - 1` tokens before the verify step, plus the last token.
 *
 * Deterministic drafters (prompt lookup) pass no q: their q is one-hot on the drafted token, so a
 * draft is accepted with probability p(x) and a rejection draws from p with x removed. A q row
 * whose q(x) is 0 cannot be the distribution x was drawn from; it is judged as a deterministic
 * proposal too, which keeps the rule lossless for a drafter that picked x by other means.
 *
 * max(0, p - q) sums to sum(max(0, q - p)) >= q(x) - p(x) > 0 whenever a rejection is possible,
 * so p == q can never reject. Rounding can still leave an all-zero residual after a rejection
 * (p and q equal up to the last bit elsewhere); the verifier then draws from p itself.
 */
import {
  argmax,
  isGreedy,
  MoeflashError,
  probabilities,
  RngPurpose,
  sampleFrom,
  uniform,
  type Proposal,
  type SamplingParams,
  type SequenceOutput,
  type SpeculationContext,
  type Verdict,
} from '@moeflash/core';

/** Everything one verify round is judged from. */
export interface AcceptanceInput {
  /** Target logits, row-major [drafts.length + 1, vocab] (at least that many rows). */
  logits: Float32Array;
  vocab: number;
  drafts: readonly number[];
  /** Draft probabilities [drafts.length, vocab] after the same transforms; absent for a deterministic drafter. */
  q?: Float32Array;
  params: SamplingParams;
  /** Seed and random stream of the request. */
  seed: number;
  stream: number;
  /** Absolute position of drafts[0] (the target cache length before the verify step, plus one). */
  position: number;
}

function invalid(message: string): MoeflashError {
  return new MoeflashError('INVALID_ARGUMENT', message);
}

function checkShapes(input: AcceptanceInput): void {
  const { logits, vocab, drafts, q } = input;
  if (!Number.isInteger(vocab) || vocab < 1) throw invalid(`acceptance: vocab must be a positive integer; got ${vocab}`);
  if (logits.length < (drafts.length + 1) * vocab) {
    throw invalid(`acceptance: ${drafts.length} drafts need ${drafts.length + 1} logits rows of ${vocab}; got ${logits.length / vocab} rows`);
  }
  if (q !== undefined && q.length < drafts.length * vocab) {
    throw invalid(`acceptance: q must hold ${drafts.length} rows of ${vocab}; got ${q.length / vocab} rows`);
  }
  for (const t of drafts) {
    if (!Number.isInteger(t) || t < 0 || t >= vocab) throw invalid(`acceptance: draft token ${t} is outside the vocabulary [0, ${vocab})`);
  }
}

/** Greedy acceptance: the longest prefix equal to the target's argmax, then the target's token. */
export function acceptGreedy(logits: Float32Array, vocab: number, drafts: readonly number[]): Verdict {
  const emit: number[] = [];
  for (let i = 0; i < drafts.length; i++) {
    const top = argmax(logits, i * vocab, vocab);
    if (top !== drafts[i]) {
      emit.push(top);
      return { emit, accepted: i };
    }
    emit.push(top);
  }
  emit.push(argmax(logits, drafts.length * vocab, vocab));
  return { emit, accepted: drafts.length };
}

/** Rejection sampling over the drafts; see the file comment for the exact rule and its draws. */
export function acceptSampled(input: AcceptanceInput): Verdict {
  const { logits, vocab, drafts, q, params, seed, stream, position } = input;
  // One vocabulary-sized buffer, reused for every row's p and then for the residual in place.
  const p = new Float32Array(vocab);
  const emit: number[] = [];
  for (let i = 0; i < drafts.length; i++) {
    const x = drafts[i]!;
    const pos = position + i;
    probabilities(logits, params, { offset: i * vocab, length: vocab, out: p });
    const qRow = q === undefined ? 0 : i * vocab;
    const qx = q === undefined ? 1 : q[qRow + x]!;
    const oneHot = q === undefined || !(qx > 0);
    const px = p[x]!;
    const u = uniform({ seed, seq: stream, position: pos, purpose: RngPurpose.Accept });
    if (u * (oneHot ? 1 : qx) < px) {
      emit.push(x);
      continue;
    }
    let total = 0;
    if (oneHot) {
      p[x] = 0;
      for (let j = 0; j < vocab; j++) total += p[j]!;
    } else {
      for (let j = 0; j < vocab; j++) {
        const r = p[j]! - q![qRow + j]!;
        p[j] = r > 0 ? r : 0;
        total += p[j]!;
      }
    }
    if (!(total > 0)) probabilities(logits, params, { offset: i * vocab, length: vocab, out: p });
    emit.push(sampleFrom(p, uniform({ seed, seq: stream, position: pos, purpose: RngPurpose.Residual })));
    return { emit, accepted: i };
  }
  const pos = position + drafts.length;
  probabilities(logits, params, { offset: drafts.length * vocab, length: vocab, out: p });
  emit.push(sampleFrom(p, uniform({ seed, seq: stream, position: pos, purpose: RngPurpose.Sample })));
  return { emit, accepted: drafts.length };
}

/** Greedy or sampled acceptance, as `params` select. */
export function acceptDrafts(input: AcceptanceInput): Verdict {
  checkShapes(input);
  return isGreedy(input.params) ? acceptGreedy(input.logits, input.vocab, input.drafts) : acceptSampled(input);
}

/**
 * Judges one verify round as the engine hands it over: `ctx` as of before the verify step, the
 * proposal that step ran, and the step's output (logits 'all': one row per token it ran).
 */
export function verifyRound(ctx: SpeculationContext, proposal: Proposal, out: SequenceOutput): Verdict {
  if (out.rows < proposal.tokens.length + 1) {
    throw invalid(`acceptance: the verify step returned ${out.rows} logits rows for ${proposal.tokens.length} drafts; it must return one per token (logits: 'all')`);
  }
  return acceptDrafts({
    logits: out.logits,
    vocab: out.logits.length / out.rows,
    drafts: proposal.tokens,
    q: proposal.q,
    params: ctx.params,
    seed: ctx.params.seed ?? 0,
    stream: ctx.stream,
    position: ctx.cacheLength + 1,
  });
}
