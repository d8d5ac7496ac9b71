/**
 * (a) Greedy speculative decoding emits, token for token, what greedy plain decoding emits: every
 * block size 1 to 16, both families, with a random DFlash drafter, prompt lookup, a drafter that
 * is always wrong and one that is always right.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Engine, Proposal, SpeculationContext, Speculator } from '@moeflash/core';
import { SpeculatingRequest, TimingModel, type SpeculativeStats } from '@moeflash/speculative';
import { engineFor, engineWith, tinyPair, tokens, type Family } from './helpers.js';

const BLOCK_SIZES = Array.from({ length: 16 }, (_, i) => i + 1);
const MAX_TOKENS = 20;
const PROMPTS = [
  [5, 6, 7, 8, 9, 5, 6, 7, 8],
  [100, 3, 250, 17, 42],
];

/** Test drafters: replay (a shifted copy of) a known greedy continuation through the real verifier. */
class ReplayRequest extends SpeculatingRequest {
  readonly hiddenLayers: number[] = [];
  constructor(private readonly prompt: number[], private readonly greedy: number[], private readonly shift: number, private readonly vocab: number, blockSize: number) {
    super(shift === 0 ? 'always-right' : 'always-wrong', { blockSize, adaptive: false }, new TimingModel({ verifySlope: 0.4, draftBase: 0, draftSlope: 0 }));
  }
  protected draft(ctx: SpeculationContext, b: number): Proposal {
    const done = ctx.tokens.length - this.prompt.length;
    return { tokens: this.greedy.slice(done, done + b).map((t) => (t + this.shift) % this.vocab) };
  }
}

function replaySpeculator(runs: Map<string, { prompt: number[]; greedy: number[] }>, shift: number, vocab: number): Speculator & { current: string } {
  const s = {
    method: shift === 0 ? 'always-right' : 'always-wrong',
    current: '',
    forRequest: (o: { blockSize?: number }) => {
      const run = runs.get(s.current)!;
      return new ReplayRequest(run.prompt, run.greedy, shift, vocab, o.blockSize ?? 8);
    },
    dispose: async () => {},
  };
  return s;
}

for (const family of ['qwen3_moe', 'gpt_oss'] as Family[]) {
  describe(`greedy speculative == greedy plain (${family})`, () => {
    const engines: Engine[] = [];
    let plain: Engine;
    let dflash: Engine;
    let lookup: Engine;
    let right: Engine;
    let wrong: Engine;
    let rightSpec: ReturnType<typeof replaySpeculator>;
    let wrongSpec: ReturnType<typeof replaySpeculator>;
    const runs = new Map<string, { prompt: number[]; greedy: number[] }>();

    beforeAll(async () => {
      const { target, draft } = await tinyPair(family);
      plain = await engineFor(target);
      dflash = await engineFor(target, { method: 'dflash', draft });
      lookup = await engineFor(target, { method: 'prompt-lookup', maxNgram: 3 });
      for (const p of PROMPTS) runs.set(p.join(), { prompt: p, greedy: await tokens(plain, p, { maxTokens: MAX_TOKENS, temperature: 0 }) });
      const V = plain.spec.vocabSize;
      rightSpec = replaySpeculator(runs, 0, V);
      wrongSpec = replaySpeculator(runs, 1, V);
      right = await engineWith(target, rightSpec);
      wrong = await engineWith(target, wrongSpec);
      engines.push(plain, dflash, lookup, right, wrong);
    });
    afterAll(async () => {
      for (const e of engines) await e.close();
    });

    const check = async (engine: Engine, select?: (key: string) => void) => {
      const stats: SpeculativeStats[] = [];
      for (const [key, run] of runs) {
        select?.(key);
        for (const blockSize of BLOCK_SIZES) {
          const r = await engine.generate(run.prompt, { maxTokens: MAX_TOKENS, temperature: 0, ignoreEos: true, speculative: { blockSize } }).result;
          expect(r.tokens, `block size ${blockSize}, prompt ${key}`).toEqual(run.greedy);
          expect(r.speculation!.blockSize).toBe(blockSize);
          stats.push(r.speculation as SpeculativeStats);
        }
      }
      return stats;
    };

    it('DFlash (random drafter), block sizes 1-16', async () => {
      const stats = await check(dflash);
      expect(stats.every((s) => s.method === 'dflash' && s.rounds > 0)).toBe(true);
    });

    it('prompt lookup, block sizes 1-16', async () => {
      const stats = await check(lookup);
      expect(stats.some((s) => s.acceptedTokens > 0)).toBe(true);
    });

    it('a drafter that is always right accepts every draft', async () => {
      const stats = await check(right, (k) => (rightSpec.current = k));
      for (const s of stats) {
        expect(s.acceptedTokens).toBe(s.draftedTokens);
        // Each round emits its drafts plus the bonus token, until maxTokens trims the last ones.
        expect(s.rounds).toBeLessThanOrEqual(Math.ceil((MAX_TOKENS - 1) / (s.blockSize + 1)) + 1);
      }
    });

    it('a drafter that is always wrong accepts nothing and still emits one token a round', async () => {
      const stats = await check(wrong, (k) => (wrongSpec.current = k));
      for (const s of stats) {
        expect(s.acceptedTokens).toBe(0);
        expect(s.rounds).toBe(MAX_TOKENS - 1);
      }
    });

    it('per-request speculative: false, or block size 0, decodes plainly', async () => {
      const [key, run] = [...runs][0]!;
      const r = await dflash.generate(run.prompt, { maxTokens: MAX_TOKENS, temperature: 0, ignoreEos: true, speculative: false }).result;
      expect(r.tokens, key).toEqual(run.greedy);
      expect(r.speculation).toBeUndefined();
      const z = await dflash.generate(run.prompt, { maxTokens: MAX_TOKENS, temperature: 0, ignoreEos: true, speculative: { blockSize: 0 } }).result;
      expect(z.tokens, key).toEqual(run.greedy);
      expect(z.speculation!.draftedTokens).toBe(0);
    });
  });
}
