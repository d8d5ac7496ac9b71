/**
 * (d) After rounds with rejected drafts, the target cache and the DFlash draft cache are exactly
 * what they would be had the rejected tokens never run: the next logits (and hidden states) of the
 * target, and every cached draft key and value, equal those of a fresh run over the kept tokens.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { argmax, loadModel, sampleToken, type LoadedModel, type ModelHandle, type Proposal, type SamplingParams, type SpeculationContext } from '@moeflash/core';
import { createSpeculator, DflashRequest, TimingModel, type DflashSpeculator } from '@moeflash/speculative';
import { tinyPair, type Family } from './helpers.js';

/** The engine's loop, by hand, so that the sequence stays alive afterwards. */
async function drive(model: LoadedModel, rs: DflashRequest, seq: number, prompt: number[], maxTokens: number, params: SamplingParams) {
  const hiddenLayers = rs.hiddenLayers;
  const out = await model.step({ sequences: [{ seq, tokens: prompt, logits: 'last', hiddenLayers }] });
  const emitted: number[] = [];
  const ctx = (cacheLength: number): SpeculationContext => ({ tokens: [...prompt, ...emitted], cacheLength, params, stream: 0 });
  rs.prefilled(ctx(model.length(seq)), out.sequences[0]!);
  const first = params.temperature ? sampleToken(out.sequences[0]!.logits, params, { seed: params.seed ?? 0, seq: 0, position: model.length(seq) }) : argmax(out.sequences[0]!.logits);
  emitted.push(first);
  let rejected = 0;
  let accepted = 0;
  while (emitted.length < maxTokens) {
    const before = model.length(seq);
    const proposal: Proposal = await rs.propose(ctx(before));
    const step = await model.step({ sequences: [{ seq, tokens: [emitted[emitted.length - 1]!, ...proposal.tokens], logits: 'all', hiddenLayers }] });
    const verdict = rs.verify(ctx(before), proposal, step.sequences[0]!);
    model.truncate(seq, before + 1 + verdict.accepted);
    rejected += proposal.tokens.length - verdict.accepted;
    accepted += verdict.accepted;
    emitted.push(...verdict.emit);
    expect(model.length(seq)).toBe(prompt.length + emitted.length - 1);
    expect(rs.cache.length).toBe(model.length(seq));
  }
  return { emitted, rejected, accepted };
}

/** A DFlash request whose drafts are, for a varying prefix, the known right tokens: partial acceptance. */
class PartlyRight extends DflashRequest {
  round = 0;
  truth: number[] = [];
  promptLength = 0;
  protected override draft(ctx: SpeculationContext, b: number): Proposal {
    const p = super.draft(ctx, b);
    const done = ctx.tokens.length - this.promptLength;
    const keep = this.round++ % (b + 1);
    for (let i = 0; i < Math.min(keep, p.tokens.length); i++) p.tokens[i] = this.truth[done + i] ?? p.tokens[i]!;
    return p;
  }
}

for (const family of ['qwen3_moe', 'gpt_oss'] as Family[]) {
  describe(`rollback leaves target and draft caches as if rejected tokens never ran (${family})`, () => {
    let handle: ModelHandle;
    let spec: DflashSpeculator;
    beforeAll(async () => {
      const { target, draft } = await tinyPair(family, 2);
      handle = await loadModel({ model: target, backend: 'cpu', log: () => {} });
      spec = (await createSpeculator({ target: handle.model, targetSpec: handle.spec, targetDir: target, options: { method: 'dflash', draft, blockSize: 5 } })) as DflashSpeculator;
    });
    afterAll(() => handle.model.dispose());

    for (const params of [{ temperature: 0 }, { temperature: 1, topK: 8, seed: 3 }] as SamplingParams[]) {
      it(`temperature ${params.temperature}`, async () => {
        const model = handle.model;
        const prompt = [12, 40, 7, 300, 12, 40];
        // The greedy truth, for drafts that are partly right.
        const plainSeq = 100;
        let t = argmax((await model.step({ sequences: [{ seq: plainSeq, tokens: prompt, logits: 'last' }] })).sequences[0]!.logits);
        const truth = [t];
        for (let i = 0; i < 24; i++) {
          t = argmax((await model.step({ sequences: [{ seq: plainSeq, tokens: [t], logits: 'last' }] })).sequences[0]!.logits);
          truth.push(t);
        }
        model.release(plainSeq);

        const rs = new PartlyRight(spec.draft, { blockSize: 5, adaptive: false }, new TimingModel({ verifySlope: 0.4, draftBase: 0, draftSlope: 0 }));
        rs.truth = truth;
        rs.promptLength = prompt.length;
        const seq = 101;
        const { emitted, rejected, accepted } = await drive(model, rs, seq, prompt, 20, params);
        expect(rejected).toBeGreaterThan(0);
        if (!params.temperature) expect(accepted).toBeGreaterThan(0);

        // Target: continue the rolled-back sequence by one token and compare with a fresh run.
        const layers = rs.hiddenLayers;
        const kept = [...prompt, ...emitted];
        const cont = (await model.step({ sequences: [{ seq, tokens: [emitted[emitted.length - 1]!], logits: 'last', hiddenLayers: layers }] })).sequences[0]!;
        const freshSeq = 102;
        const fresh = (await model.step({ sequences: [{ seq: freshSeq, tokens: kept, logits: 'last', hiddenLayers: layers }] })).sequences[0]!;
        expect(cont.logits).toEqual(fresh.logits);
        const H = model.spec.hiddenSize;
        for (const l of layers) expect(cont.hidden!.get(l)).toEqual(fresh.hidden!.get(l)!.subarray((kept.length - 1) * H));

        // Draft: its cache against a fresh drafter fed the whole kept context at once.
        const ctxRows = kept.length - 1;
        const features = spec.draft.features(fresh.hidden, 0, ctxRows);
        const cache = spec.draft.newCache();
        spec.draft.absorb(cache, features, ctxRows);
        expect(rs.cache.length).toBe(ctxRows);
        const row = spec.draft.cfg.numKvHeads * spec.draft.cfg.headDim;
        for (let l = 0; l < spec.draft.cfg.numLayers; l++) {
          expect(rs.cache.keys[l]!.subarray(0, ctxRows * row)).toEqual(cache.keys[l]!.subarray(0, ctxRows * row));
          expect(rs.cache.values[l]!.subarray(0, ctxRows * row)).toEqual(cache.values[l]!.subarray(0, ctxRows * row));
        }
        // And the next block it drafts is the same.
        expect(spec.draft.block(rs.cache, emitted[emitted.length - 1]!, 5)).toEqual(spec.draft.block(cache, emitted[emitted.length - 1]!, 5));
        model.release(seq);
        model.release(freshSeq);
      });
    }
  });
}
