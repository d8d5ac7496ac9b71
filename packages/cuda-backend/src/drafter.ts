/**
 * A DFlash drafter on the device beside its target (CudaModel.attachDrafter): its tensors as bf16
 * in one weights buffer, laid out for native/model.cc's Drafter (q | k | v rows fused, gate | up
 * rows fused), and the shape its kernels take. The drafter reads the target's embedding and LM
 * head where they already are, and its KV cache uses the target's pages.
 */
import { MoeflashError, ropeTable, type DeviceDrafterSpec, type ModelSpec } from '@moeflash/core';

import { bf16Into } from './bf16.js';
import type { NativeDrafterConfig } from './native.js';

/** Keep in step with native/model.cc's DraftGlobal and DraftLayerField. */
const DRAFT_GLOBALS = 4;
const DRAFT_LAYER_FIELDS = 10;
/** Most tokens one round drafts (native kMaxDraftBlock). */
export const MAX_DEVICE_BLOCK = 16;

interface Piece {
  offset: number;
  bytes: number;
  fill: () => Promise<Uint8Array>;
}

export interface DrafterPlan {
  config: NativeDrafterConfig;
  layout: Float64Array;
  pieces: Piece[];
  bytes: number;
}

/** Checks the drafter against the target and what the kernels take, naming what does not fit. */
function check(spec: DeviceDrafterSpec, target: ModelSpec): void {
  const bad = (why: string) => {
    throw new MoeflashError('CONFIG_UNSUPPORTED', `${spec.source}: the CUDA backend cannot run this drafter on the device: ${why}`);
  };
  if (spec.headDim % 8 !== 0) bad(`head_dim ${spec.headDim} is not a multiple of 8`);
  if (spec.kvHeads < 1 || spec.heads % spec.kvHeads !== 0) bad(`${spec.heads} heads over ${spec.kvHeads} KV heads`);
  if (spec.rope.rotaryDim % 2 !== 0 || spec.rope.rotaryDim > spec.headDim) bad(`rotary dim ${spec.rope.rotaryDim}`);
  if (spec.intermediateSize % 8 !== 0) bad(`intermediate_size ${spec.intermediateSize} is not a multiple of 8`);
  if (target.hiddenSize % 8 !== 0) bad(`the target's hidden size ${target.hiddenSize} is not a multiple of 8`);
  for (const id of spec.targetLayerIds) if (id < 0 || id >= target.numLayers) bad(`target layer ${id} is outside the target's ${target.numLayers} layers`);
}

/** Offsets and upload pieces of a drafter's tensors (bf16), and the native config. */
export function planDrafter(spec: DeviceDrafterSpec, target: ModelSpec): DrafterPlan {
  check(spec, target);
  const H = target.hiddenSize;
  const qDim = spec.heads * spec.headDim;
  const kvDim = spec.kvHeads * spec.headDim;
  const I = spec.intermediateSize;
  const F = spec.targetLayerIds.length * H;
  const layout = new Float64Array(DRAFT_GLOBALS + spec.layers * DRAFT_LAYER_FIELDS).fill(-1);
  const pieces: Piece[] = [];
  let bytes = 0;
  const reserve = (n: number) => {
    const at = bytes;
    bytes += Math.ceil(n / 256) * 256;
    return at;
  };
  /** A bf16 tensor made of parts stacked by rows (each [rows_i, cols]); required unless `optional`. */
  const matrix = (field: number, parts: { name: string; elems: number }[], optional = false) => {
    const elems = parts.reduce((s, p) => s + p.elems, 0);
    const offset = reserve(2 * elems);
    layout[field] = offset;
    pieces.push({
      offset,
      bytes: 2 * elems,
      fill: async () => {
        const out = new Uint16Array(elems);
        let at = 0;
        let present = 0;
        for (const p of parts) {
          const v = await spec.tensor(p.name);
          if (v === null) {
            if (!optional) throw new MoeflashError('WEIGHTS_MISSING', `${spec.source}: tensor ${p.name} is missing`);
            at += p.elems;
            continue;
          }
          if (v.length !== p.elems) throw new MoeflashError('WEIGHTS_INVALID', `${spec.source}: tensor ${p.name} holds ${v.length} values where ${p.elems} were expected`);
          bf16Into(v, out, at);
          at += p.elems;
          present++;
        }
        if (optional && present > 0 && present < parts.length) {
          throw new MoeflashError('WEIGHTS_INVALID', `${spec.source}: ${parts.map((p) => p.name).join(', ')} must be all present or all absent`);
        }
        return new Uint8Array(out.buffer);
      },
    });
  };
  matrix(0, [{ name: 'fc', elems: H * F }]);
  matrix(1, [{ name: 'hidden_norm', elems: H }]);
  matrix(2, [{ name: 'norm', elems: H }]);
  const rope = ropeTable(spec.rope);
  layout[3] = reserve(rope.invFreq.byteLength);
  pieces.push({ offset: layout[3], bytes: rope.invFreq.byteLength, fill: async () => new Uint8Array(rope.invFreq.buffer.slice(0)) });
  for (let l = 0; l < spec.layers; l++) {
    const f = DRAFT_GLOBALS + l * DRAFT_LAYER_FIELDS;
    const n = (x: string) => `layers.${l}.${x}`;
    matrix(f + 0, [{ name: n('input_norm'), elems: H }]);
    matrix(f + 1, [{ name: n('post_norm'), elems: H }]);
    matrix(f + 2, [{ name: n('q'), elems: qDim * H }, { name: n('k'), elems: kvDim * H }, { name: n('v'), elems: kvDim * H }]);
    // Absent biases are held as zeros (the same sums, one kernel path).
    matrix(f + 3, [{ name: n('q_bias'), elems: qDim }, { name: n('k_bias'), elems: kvDim }, { name: n('v_bias'), elems: kvDim }], true);
    matrix(f + 4, [{ name: n('o'), elems: H * qDim }]);
    matrix(f + 5, [{ name: n('o_bias'), elems: H }], true);
    matrix(f + 6, [{ name: n('q_norm'), elems: spec.headDim }]);
    matrix(f + 7, [{ name: n('k_norm'), elems: spec.headDim }]);
    matrix(f + 8, [{ name: n('gate'), elems: I * H }, { name: n('up'), elems: I * H }]);
    matrix(f + 9, [{ name: n('down'), elems: H * I }]);
  }
  return { config: nativeConfig(spec, rope.attentionFactor, bytes), layout, pieces, bytes };
}

function nativeConfig(spec: DeviceDrafterSpec, attentionFactor: number, weightsBytes: number): NativeDrafterConfig {
  return {
    layers: spec.layers,
    heads: spec.heads,
    kvHeads: spec.kvHeads,
    headDim: spec.headDim,
    rotaryDim: spec.rope.rotaryDim,
    attentionFactor,
    inter: spec.intermediateSize,
    eps: spec.rmsNormEps,
    scale: 1 / Math.sqrt(spec.headDim),
    maskToken: spec.maskTokenId,
    targetLayers: Int32Array.from(spec.targetLayerIds),
    normLast: spec.normLast,
    weightsBytes,
  };
}
