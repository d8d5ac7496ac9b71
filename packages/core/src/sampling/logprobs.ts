/**
 * Token log-probabilities, as `generate(p, { logprobs: true, topLogprobs: K })` reports them: the
 * log-softmax of the model's logits row at temperature 1, before the grammar mask and the sampling
 * transforms (what the model itself thought of each token, as OpenAI's API reports it). Sums in
 * float64 in index order; ties in the top K go to the lower index, as in argmax.
 */
import { MoeflashError } from '../errors.js';

/** Most alternatives a token reports (OpenAI's limit). */
export const MAX_TOP_LOGPROBS = 20;

export interface TopLogprob {
  token: number;
  logprob: number;
}

export interface RowLogprobs {
  /** Log-probability of the chosen token. */
  logprob: number;
  /** The K most likely tokens, most likely first. */
  top: TopLogprob[];
}

/** Checks the options; the number of alternatives to report, or null when logprobs are off. */
export function logprobsRequest(logprobs: boolean | undefined, topLogprobs: number | undefined): number | null {
  if (logprobs !== undefined && typeof logprobs !== 'boolean') {
    throw new MoeflashError('INVALID_ARGUMENT', `logprobs must be true or false; got ${String(logprobs)}`);
  }
  if (topLogprobs !== undefined && !(Number.isInteger(topLogprobs) && topLogprobs >= 0 && topLogprobs <= MAX_TOP_LOGPROBS)) {
    throw new MoeflashError('INVALID_ARGUMENT', `topLogprobs must be an integer from 0 to ${MAX_TOP_LOGPROBS}; got ${String(topLogprobs)}`);
  }
  if (!logprobs) {
    if (topLogprobs) throw new MoeflashError('INVALID_ARGUMENT', 'topLogprobs needs logprobs: true');
    return null;
  }
  return topLogprobs ?? 0;
}

/** The chosen token's log-probability and the top `k` of row `[offset, offset + length)`. */
export function rowLogprobs(logits: Float32Array, token: number, k: number, offset = 0, length = logits.length - offset): RowLogprobs {
  let max = -Infinity;
  for (let i = 0; i < length; i++) {
    const v = logits[offset + i]!;
    if (v > max) max = v;
  }
  let sum = 0;
  for (let i = 0; i < length; i++) sum += Math.exp(logits[offset + i]! - max);
  const logZ = max + Math.log(sum);
  const top: TopLogprob[] = [];
  if (k > 0) {
    // Insertion into a sorted list of k: O(V k), small next to the step for k <= 20.
    for (let i = 0; i < length; i++) {
      const v = logits[offset + i]!;
      if (top.length === k && !(v > top[k - 1]!.logprob)) continue;
      let j = top.length === k ? k - 1 : top.length;
      while (j > 0 && v > top[j - 1]!.logprob) j--;
      top.splice(j, 0, { token: i, logprob: v });
      if (top.length > k) top.pop();
    }
    for (const t of top) t.logprob = t.logprob - logZ;
  }
  return { logprob: logits[offset + token]! - logZ, top };
}

/** A token as `logprobs` reports it: id, text, bytes (a token may hold part of a character). */
export interface LogprobToken {
  token: number;
  /** The token decoded alone (U+FFFD where it holds part of a UTF-8 character). */
  text: string;
  bytes: number[];
  logprob: number;
}

/** One generated token's log-probability and its top alternatives (GenerateOptions.logprobs). */
export interface TokenLogprob extends LogprobToken {
  top: LogprobToken[];
}
