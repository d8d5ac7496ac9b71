/**
 * @moeflash/speculative: speculative decoding for moeflash. Drafters (DFlash block diffusion,
 * prompt lookup), lossless acceptance, draft-cache rollback, acceptance statistics and the
 * block-size policy. The engine loads it when `createEngine({ speculative })` asks for a method.
 *
 * ```
 *  prompt ─> target prefill ──hidden states──> drafter.prefilled
 *  round:  drafter.propose ─> B drafts ─> target verify [last, d_1..d_B] (logits all, hidden states)
 *          ─> verify(): acceptance ─> emit accepted + 1 ─> target truncates, drafter absorbs
 * ```
 * @packageDocumentation
 */
import path from 'node:path';
import { MoeflashError, type Speculator, type SpeculatorFactoryInput } from '@moeflash/core';
import { loadDflashConfig } from './dflash/config.js';
import { DflashDraft } from './dflash/model.js';
import { DflashSpeculator } from './dflash/speculator.js';
import { loadDflashWeights } from './dflash/weights.js';
import { attachDeviceDflash } from './dflash/device.js';
import { PromptLookupSpeculator } from './prompt-lookup.js';
import { MAX_BLOCK_SIZE, type BlockChoice } from './request.js';

export * from './acceptance.js';
export * from './stats.js';
export * from './policy.js';
export { SpeculatingRequest, MAX_BLOCK_SIZE, type BlockChoice } from './request.js';
export { lookupDraft, PromptLookupSpeculator, type PromptLookupOptions } from './prompt-lookup.js';
export { parseDflashConfig, loadDflashConfig, defaultTargetLayerIds, type DflashConfig } from './dflash/config.js';
export { loadDflashWeights, type DflashWeights, type DflashLayerWeights } from './dflash/weights.js';
export { DflashDraft, DflashKvCache } from './dflash/model.js';
export { DflashRequest, DflashSpeculator } from './dflash/speculator.js';
export { DeviceDflashRequest, DeviceDflashSpeculator, attachDeviceDflash, deviceDrafterSpec, deviceUnsupported } from './dflash/device.js';
export { synthesizeDflashDraft, type SynthesizeDflashOptions } from './dflash/synthesize.js';

/** Default drafted tokens a round. */
export const DEFAULT_BLOCK_SIZE = 8;

function invalid(message: string): MoeflashError {
  return new MoeflashError('INVALID_ARGUMENT', message);
}

function blockSizeOf(value: unknown, what: string): number {
  if (!Number.isInteger(value) || (value as number) < 0 || (value as number) > MAX_BLOCK_SIZE) {
    throw invalid(`${what} must be an integer from 0 (no drafting) to ${MAX_BLOCK_SIZE}; got ${JSON.stringify(value)}`);
  }
  return value as number;
}

function intOption(options: Record<string, unknown>, key: string, fallback: number, min: number): number {
  const v = options[key];
  if (v === undefined) return fallback;
  if (!Number.isInteger(v) || (v as number) < min) throw invalid(`speculative.${key} must be an integer >= ${min}; got ${JSON.stringify(v)}`);
  return v as number;
}

/**
 * The speculator the engine asks for with `createEngine({ speculative: { method, ... } })`.
 *
 * - `method: 'dflash'`: `draft` (the drafter folder: config.json + model.safetensors as z-lab
 *   publishes them), `blockSize` (drafted tokens a round, default 8, at most 16). On a backend
 *   that runs drafters itself (the CUDA backend's attachDrafter) the drafter goes there and each
 *   round is one call; greedy requests speculate that way, sampled ones decode plainly.
 *   `device: false` keeps the drafter on the host (the reference path) anyway.
 * - `method: 'prompt-lookup'`: `blockSize` (default 8), `minNgram` (default 1), `maxNgram`
 *   (default 3).
 * - Both: `adaptive: true` (the default for rounds on the device) lets the block-size policy choose B in 0..blockSize each round from
 *   measured timings and acceptance (policy.ts); otherwise every round drafts blockSize tokens.
 *   A request's `speculative: { blockSize }` replaces the engine's for that request.
 */
export async function createSpeculator(input: SpeculatorFactoryInput): Promise<Speculator> {
  const o = input.options;
  const blockSize = o.blockSize === undefined ? DEFAULT_BLOCK_SIZE : blockSizeOf(o.blockSize, 'speculative.blockSize');
  if (o.adaptive !== undefined && typeof o.adaptive !== 'boolean') throw invalid(`speculative.adaptive must be a boolean; got ${JSON.stringify(o.adaptive)}`);
  // Rounds on the device measure their whole cost, so there the policy is on unless turned off;
  // on the host path it stays opt-in.
  const choiceFor = (adaptive: boolean) => (requested: number | undefined): BlockChoice => ({
    blockSize: requested === undefined ? blockSize : blockSizeOf(requested, 'the request\'s speculative.blockSize'),
    adaptive,
  });
  const choice = choiceFor(o.adaptive === true);

  if (o.method === 'prompt-lookup') {
    const maxNgram = intOption(o, 'maxNgram', 3, 1);
    const minNgram = intOption(o, 'minNgram', 1, 1);
    if (minNgram > maxNgram) throw invalid(`speculative.minNgram (${minNgram}) must not exceed speculative.maxNgram (${maxNgram})`);
    return new PromptLookupSpeculator(choice, { minNgram, maxNgram });
  }

  if (o.method === 'dflash') {
    if (typeof o.draft !== 'string' || o.draft === '') {
      throw invalid('speculative.draft must be the folder of a DFlash drafter (for example a download of z-lab/Qwen3-Coder-30B-A3B-DFlash)');
    }
    const draftDir = path.resolve(o.draft);
    const cfg = await loadDflashConfig(draftDir);
    const t = input.targetSpec;
    const mismatch = (what: string) =>
      new MoeflashError('CONFIG_INVALID', `${cfg.source}: ${what}; this drafter was not made for the target in ${input.targetDir}`);
    if (cfg.hiddenSize !== t.hiddenSize) throw mismatch(`hidden_size is ${cfg.hiddenSize} but the target's is ${t.hiddenSize} (the drafter reads the target's embeddings and LM head)`);
    if (cfg.vocabSize !== t.vocabSize) throw mismatch(`vocab_size is ${cfg.vocabSize} but the target's is ${t.vocabSize}`);
    if (cfg.numTargetLayers !== null && cfg.numTargetLayers !== t.numLayers) throw mismatch(`num_target_layers is ${cfg.numTargetLayers} but the target has ${t.numLayers} layers`);
    const bad = cfg.targetLayerIds.find((id) => id >= t.numLayers);
    if (bad !== undefined) throw mismatch(`target_layer_ids names layer ${bad} but the target has ${t.numLayers} layers`);
    if (cfg.maskTokenId >= t.vocabSize) throw mismatch(`mask_token_id ${cfg.maskTokenId} is outside the target's vocabulary of ${t.vocabSize}`);
    // On a backend that runs drafters itself, the whole round happens there (one call a round).
    if (o.device !== false) {
      const onDevice = await attachDeviceDflash(cfg, draftDir, input.target, t, choiceFor(o.adaptive !== false));
      if (onDevice) return onDevice;
    }
    const weights = await loadDflashWeights(cfg, draftDir, input.targetDir, t);
    const draft = new DflashDraft(cfg, weights, { hiddenSize: t.hiddenSize, numLayers: t.numLayers, rmsNormEps: t.rmsNormEps });
    return new DflashSpeculator(draft, choice);
  }

  throw invalid(`speculative.method must be 'dflash' or 'prompt-lookup'; got ${JSON.stringify(o.method)}`);
}
