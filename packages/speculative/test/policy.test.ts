import { describe, expect, it } from 'vitest';
import { AcceptanceStats, BlockSizePolicy, TimingModel, type SpeculativeStats } from '@moeflash/speculative';
import { engineFor, tinyPair, tokens } from './helpers.js';

const priors = { verifySlope: 0.4, draftBase: 0.1, draftSlope: 0 };

function policy(maxBlockSize: number, timings = new TimingModel(priors), counts = new AcceptanceStats()) {
  return { p: new BlockSizePolicy({ maxBlockSize, probeEvery: 1000 }, timings, counts), timings, counts };
}

describe('statistics', () => {
  it('count offered, reached and accepted positions per round', () => {
    const s = new AcceptanceStats();
    s.record(4, 2); // positions 0, 1 accepted, 2 rejected, 3 never judged
    s.record(2, 2);
    s.record(0, 0);
    expect(s.offered).toEqual([2, 2, 1, 1]);
    expect(s.reached).toEqual([2, 2, 1, 0]);
    expect(s.acceptedAt).toEqual([2, 2, 0, 0]);
    const snap = s.snapshot('x', 4);
    expect(snap.acceptanceByPosition).toEqual([1, 1, 0, 0]);
    expect(snap.conditionalAcceptance).toEqual([1, 1, 0, 0]);
    expect(snap.meanAcceptedPerRound).toBeCloseTo((4 + 3) / 3);
    expect(snap.roundsByBlockSize).toEqual([1, 0, 1, 0, 1]);
  });
});

describe('block-size policy', () => {
  it('E(B) = 1 + sum of products of the conditional acceptance rates', () => {
    const { p, counts } = policy(4);
    for (let i = 0; i < 1000; i++) counts.record(3, i % 4 === 0 ? 0 : 3); // a_1 = 0.75, then a_2 = a_3 = 1
    const a = [0, 1, 2].map((i) => p.conditionalAcceptance(i));
    expect(a[0]).toBeCloseTo(0.75, 2);
    expect(p.expectedTokens(0)).toBe(1);
    expect(p.expectedTokens(3)).toBeCloseTo(1 + a[0]! + a[0]! * a[1]! + a[0]! * a[1]! * a[2]!, 12);
  });

  it('plain decoding (B = 0) when drafts are never accepted and verifying more tokens costs more', () => {
    const { p, timings, counts } = policy(8);
    for (let i = 0; i < 200; i++) counts.record(8, 0);
    for (let b = 0; b <= 8; b++) timings.observeVerify(b, 10 + 5 * b);
    expect(p.best()).toBe(0);
  });

  it('the largest block when every draft is accepted and a verify costs what a decode step costs', () => {
    const { p, timings, counts } = policy(8);
    for (let i = 0; i < 200; i++) counts.record(8, 8);
    timings.observeVerify(0, 10);
    timings.observeVerify(8, 10);
    timings.observeDraft(8, 1);
    expect(p.best()).toBe(8);
  });

  it('weighs measured costs: a block size pays only if its extra tokens outrun its extra time', () => {
    const { p, timings, counts } = policy(6);
    for (let i = 0; i < 400; i++) counts.record(6, i % 2 ? 6 : 1); // a_1 = 1, a_2 = 0.5, then 1
    for (let b = 0; b <= 6; b++) timings.observeVerify(b, b <= 1 ? 10 : 40);
    // E(1) = 2 in 10 ms beats E(6) = 4.5 in 40 ms.
    expect(p.best()).toBe(1);
  });

  it('estimates unmeasured block sizes from measured ones', () => {
    const t = new TimingModel(priors);
    expect(t.verifyCost(4)).toBeCloseTo(1 + 0.4 * 4); // prior shape, in units of one step
    t.observeVerify(2, 18);
    expect(t.verifyCost(4)).toBeCloseTo((18 * (1 + 1.6)) / (1 + 0.8));
    t.observeVerify(6, 34);
    expect(t.verifyCost(4)).toBeCloseTo(26); // the line through (2, 18) and (6, 34)
    expect(t.draftCost(0)).toBe(0);
  });

  it('probes the largest block now and then, so that a small B can be revisited', () => {
    const counts = new AcceptanceStats();
    for (let i = 0; i < 100; i++) counts.record(4, 0);
    const p = new BlockSizePolicy({ maxBlockSize: 4, probeEvery: 5 }, new TimingModel(priors), counts);
    const chosen = Array.from({ length: 10 }, () => p.next());
    expect(chosen).toEqual([0, 0, 0, 0, 4, 0, 0, 0, 0, 4]);
  });
});

describe('adaptive block size through the engine', () => {
  it('keeps greedy output identical while it chooses B each round', async () => {
    const { target, draft } = await tinyPair('gpt_oss');
    const plain = await engineFor(target);
    const adaptive = await engineFor(target, { method: 'dflash', draft, blockSize: 6, adaptive: true });
    const prompt = [3, 14, 15, 92, 65, 35];
    const want = await tokens(plain, prompt, { maxTokens: 40, temperature: 0 });
    const r = await adaptive.generate(prompt, { maxTokens: 40, temperature: 0, ignoreEos: true }).result;
    expect(r.tokens).toEqual(want);
    const s = r.speculation as SpeculativeStats;
    // The random drafter is rarely right (a lucky match in the tiny vocabulary happens, and which
    // rounds exist depends on the policy's choices). Whether the policy falls back to plain steps
    // depends on wall-clock costs: for this tiny model a CPU verify of 6 rows costs about one plain
    // step (each weight row is read once for all rows), so on a loaded machine either choice can
    // win by noise. The choice given the costs is tested above with set timings; here, losslessness
    // and the bookkeeping: every round is counted under the block size it used, and no more tokens
    // are accepted than drafted.
    expect(s.acceptedTokens).toBeLessThanOrEqual(s.draftedTokens);
    expect(Object.values(s.roundsByBlockSize).reduce((x, y) => x + y, 0)).toBe(s.rounds);
    expect(s.meanDraftMs).toBeGreaterThan(0);
    await plain.close();
    await adaptive.close();
  });
});
