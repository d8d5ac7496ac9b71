/**
 * DFlash with the drafter on the target's backend (LoadedModel.attachDrafter, the CUDA backend):
 * the drafter's tensors go to the device once, and every round (draft, verify, greedy acceptance)
 * is one step there. This file only describes the drafter to the backend and keeps per-request
 * statistics and the block size; model.ts stays the readable specification of the drafter and the
 * host path that sampling requests and backends without attachDrafter use.
 */
import { MoeflashError, openWeights, type DeviceDrafterSpec, type DeviceRounds, type LoadedModel, type ModelSpec, type RequestSpeculator, type Speculator, type SpeculationStats, type WeightSource } from '@moeflash/core';
import { BlockSizePolicy, TimingModel } from '../policy.js';
import type { BlockChoice } from '../request.js';
import { AcceptanceStats } from '../stats.js';
import type { DflashConfig } from './config.js';
import { prefixOf, tensor } from './weights.js';

/** Why this drafter cannot run on the device (null: it can). */
export function deviceUnsupported(cfg: DflashConfig): string | null {
  if (cfg.windows.some((w) => w !== null)) return 'sliding-window draft layers';
  if (cfg.causal) return 'causal attention inside the block (is_causal: true)';
  if (cfg.inputEmbeddingScale !== 1 || cfg.outputMultiplier !== 1 || cfg.finalLogitSoftcapping !== null) return 'embedding or logit scalings';
  return null;
}

const ROLE: Record<string, string> = {
  input_norm: 'input_layernorm.weight',
  post_norm: 'post_attention_layernorm.weight',
  q: 'self_attn.q_proj.weight',
  k: 'self_attn.k_proj.weight',
  v: 'self_attn.v_proj.weight',
  o: 'self_attn.o_proj.weight',
  q_bias: 'self_attn.q_proj.bias',
  k_bias: 'self_attn.k_proj.bias',
  v_bias: 'self_attn.v_proj.bias',
  o_bias: 'self_attn.o_proj.bias',
  q_norm: 'self_attn.q_norm.weight',
  k_norm: 'self_attn.k_norm.weight',
  gate: 'mlp.gate_proj.weight',
  up: 'mlp.up_proj.weight',
  down: 'mlp.down_proj.weight',
};

/** The drafter as the backend takes it; its tensors are read from `src` when the backend asks. */
export function deviceDrafterSpec(cfg: DflashConfig, src: WeightSource, target: ModelSpec): DeviceDrafterSpec {
  const p = prefixOf(src);
  const H = target.hiddenSize;
  const qDim = cfg.numHeads * cfg.headDim;
  const kvDim = cfg.numKvHeads * cfg.headDim;
  const I = cfg.intermediateSize;
  const shapes: Record<string, number[]> = {
    input_norm: [H], post_norm: [H], q: [qDim, H], k: [kvDim, H], v: [kvDim, H], o: [H, qDim],
    q_bias: [qDim], k_bias: [kvDim], v_bias: [kvDim], o_bias: [H], q_norm: [cfg.headDim], k_norm: [cfg.headDim],
    gate: [I, H], up: [I, H], down: [H, I],
  };
  return {
    method: 'dflash',
    source: cfg.source,
    layers: cfg.numLayers,
    heads: cfg.numHeads,
    kvHeads: cfg.numKvHeads,
    headDim: cfg.headDim,
    intermediateSize: I,
    rmsNormEps: cfg.rmsNormEps,
    rope: cfg.rope,
    maskTokenId: cfg.maskTokenId,
    targetLayerIds: cfg.targetLayerIds,
    normLast: cfg.targetLayerIds.includes(target.numLayers - 1),
    async tensor(name) {
      if (name === 'fc') return tensor(src, `${p}fc.weight`, [H, cfg.targetLayerIds.length * H]);
      if (name === 'hidden_norm' || name === 'norm') return tensor(src, `${p}${name}.weight`, [H]);
      const m = /^layers\.(\d+)\.(\w+)$/.exec(name);
      if (!m || !ROLE[m[2]!]) throw new MoeflashError('INVALID_ARGUMENT', `no drafter tensor role ${name}`);
      const full = `${p}layers.${m[1]}.${ROLE[m[2]!]}`;
      if (m[2]!.endsWith('_bias') && !src.has(full)) {
        if (cfg.attentionBias) throw new MoeflashError('WEIGHTS_MISSING', `tensor ${full} is missing from ${src.origin} but config.json sets attention_bias`);
        return null;
      }
      return tensor(src, full, shapes[m[2]!]!);
    },
  };
}

/** One request's rounds on the device: the block size (fixed or adaptive) and statistics. */
export class DeviceDflashRequest implements RequestSpeculator {
  readonly hiddenLayers: number[] = [];
  readonly onDevice: DeviceRounds;
  private readonly counts = new AcceptanceStats();
  private readonly policy: BlockSizePolicy | null;

  constructor(private readonly choice: BlockChoice, timings: TimingModel) {
    this.policy = choice.adaptive ? new BlockSizePolicy({ maxBlockSize: choice.blockSize }, timings, this.counts) : null;
    this.onDevice = {
      nextBlockSize: () => (this.policy ? this.policy.next() : this.choice.blockSize),
      record: (drafted, accepted, ms) => {
        // A round is one step: its whole time is charged as verify time of `drafted` tokens.
        timings.observeVerify(drafted, ms);
        this.counts.verifyMs += ms;
        this.counts.record(drafted, accepted);
      },
    };
  }

  prefilled(): void {}
  propose(): never {
    throw new MoeflashError('INVALID_ARGUMENT', 'a device DFlash request drafts on the backend (onDevice), not through propose()');
  }
  verify(): never {
    throw new MoeflashError('INVALID_ARGUMENT', 'a device DFlash request accepts on the backend (onDevice), not through verify()');
  }
  release(): void {}
  stats(): SpeculationStats {
    return this.counts.snapshot('dflash', this.choice.blockSize);
  }
}

/** DFlash whose drafter lives on the target's backend. */
export class DeviceDflashSpeculator implements Speculator {
  readonly method = 'dflash';
  // The whole round is measured as one step, so the prior's draft terms are 0 and its verify
  // slope holds the draft's share too.
  private readonly timings = new TimingModel({ verifySlope: 0.5, draftBase: 0, draftSlope: 0 });

  constructor(private readonly choice: (requested: number | undefined) => BlockChoice, readonly drafterBytes: number) {}

  forRequest(opts: { blockSize?: number }): RequestSpeculator {
    return new DeviceDflashRequest(this.choice(opts.blockSize), this.timings);
  }

  async dispose(): Promise<void> {}
}

/** Attaches the drafter in `draftDir` to `target`'s backend; null when the backend has no attachDrafter. */
export async function attachDeviceDflash(
  cfg: DflashConfig,
  draftDir: string,
  target: LoadedModel,
  targetSpec: ModelSpec,
  choice: (requested: number | undefined) => BlockChoice,
): Promise<DeviceDflashSpeculator | null> {
  if (!target.attachDrafter || deviceUnsupported(cfg) !== null) return null;
  const src = await openWeights(draftDir);
  try {
    const info = await target.attachDrafter(deviceDrafterSpec(cfg, src, targetSpec));
    return new DeviceDflashSpeculator(choice, info.bytes);
  } finally {
    await src.close();
  }
}
