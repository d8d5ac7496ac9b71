/**
 * FP8 dense weights in the CUDA weight plan, on any machine: with the addon replaced by a recorder
 * that keeps the uploaded bytes, the FP8 projections of a checkpoint must stay FP8 where gemv_fp8
 * takes them, and the products that native/model.cc computes from the plan (emulated here the way
 * its gemv_fp8_stack launches them: one launch when the scale grids stack, one per matrix
 * otherwise) must equal core's dequantized weights times x. Where the kernel cannot take a shape
 * the plan falls back to bf16, as before.
 */
import path from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { F8_E4M3_TABLE, loadModelSpec, loadModelWeights, openWeights } from '@moeflash/core';

import { fp8Checkpoint } from './fp8-source.js';

let weights: Uint8Array = new Uint8Array(0);
let layout: Float64Array = new Float64Array(0);
let config: Record<string, number> = {};
vi.mock('../src/native.js', async (orig) => {
  const real = (await orig()) as Record<string, unknown>;
  class RecordingModel {
    constructor(c: Record<string, number>, l: Float64Array) {
      config = c;
      layout = l;
      weights = new Uint8Array(c.weightsBytes);
    }
    upload(off: number, b: Uint8Array) {
      weights.set(b, off);
    }
    prepare() {
      return 0;
    }
    info() {
      return { weights: 0, kvCache: 0, activations: 0, graphs: 0 };
    }
    dispose() {}
  }
  return { ...real, loadAddon: () => ({ setDevice() {}, Model: RecordingModel }) };
});
const { createCudaBackend } = await import('../src/index.js');

// src/model.ts's LAYER_FIELDS (native/model.cc's LayerField); the layout length check below
// catches a list that drifted.
const FIELDS = [
  'inNorm', 'postNorm', 'qkvW', 'qkvB', 'oW', 'oB', 'qNorm', 'kNorm', 'sinks', 'routerW', 'routerB',
  'gateUp', 'gateUpScales', 'gateUpBias', 'down', 'downScales', 'downBias',
  'mlpKind', 'experts', 'inter', 'window', 'interleaved',
  'qkvScales', 'oScales', 'fp8BlockRows', 'fp8BlockCols',
];
const GLOBALS = 4;
const MLP_DENSE_FP8 = 3;

/**
 * y = W x for row-stacked FP8 matrices as gemv_fp8_stack in native/model.cc runs them: codes at
 * byte `wOff`, float32 scale grids at byte `sOff`, float64 sums of exact e4m3 * scale * x.
 */
function stackedGemv(wOff: number, sOff: number, parts: number[], cols: number, br: number, bc: number, x: Float32Array): Float64Array {
  const total = parts.reduce((a, b) => a + b, 0);
  const scaleCols = Math.ceil(cols / bc);
  const scales = new Float32Array(weights.buffer, sOff);
  const whole = parts.slice(0, -1).every((r) => r % br === 0);
  const y = new Float64Array(total);
  let row0 = 0;
  let grid0 = 0;
  for (const rows of whole ? [total] : parts) {
    for (let r = 0; r < rows; r++) {
      const srow = (grid0 + Math.floor(r / br)) * scaleCols;
      let s = 0;
      for (let c = 0; c < cols; c++) {
        s += F8_E4M3_TABLE[weights[wOff + (row0 + r) * cols + c]] * scales[srow + Math.floor(c / bc)] * x[c];
      }
      y[row0 + r] = s;
    }
    row0 += rows;
    grid0 += Math.ceil(rows / br);
  }
  return y;
}

function matVec(w: Float32Array, rows: number, cols: number, x: Float32Array): Float64Array {
  const y = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let s = 0;
    for (let c = 0; c < cols; c++) s += w[r * cols + c] * x[c];
    y[r] = s;
  }
  return y;
}

function relError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < b.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / den);
}

function randomX(n: number, seed: number): Float32Array {
  const x = new Float32Array(n);
  let s = seed;
  for (let i = 0; i < n; i++) {
    s = (s * 1103515245 + 12345) % 2147483648;
    x[i] = s / 1073741824 - 1;
  }
  return x;
}

const root = path.join(__dirname, '..', '..', 'core', 'test', 'fixtures', 'golden');

describe('CUDA weight plan with FP8 dense weights (no GPU needed)', () => {
  // [fixture, block grid, FP8 kept]
  it.each([
    ['qwen3_moe_per_expert', [128, 128], true], // q | k | v and gate | up one launch each matrix; a dense FP8 layer
    ['qwen3_moe_per_expert', [32, 32], true], // grids stack: one launch for q | k | v and for gate | up
    ['qwen3_moe_per_expert', [16, 48], true], // partial column blocks (down's 160 columns)
    ['qwen3_moe_fused', [32, 32], true],
    ['qwen3_moe_fused', [64, 32], true], // the GPU test's fused cases (fp8-source.ts FP8_MODEL_CASES)
    ['qwen3_moe_fused', [96, 32], true], // q = 96 + 32 rows, k and v one partial row block: one launch per matrix
    ['gpt_oss_mxfp4', [128, 128], true], // FP8 attention beside MXFP4 experts
    ['mixtral_per_expert', [128, 128], false], // hidden 72: rows not a multiple of 16 bytes, bf16 as before
  ] as [string, [number, number], boolean][])('%s, blocks %j', async (name, block, kept) => {
    const dir = path.join(root, name);
    const base = await loadModelSpec(dir);
    const w = await openWeights(dir);
    try {
      const fp = await fp8Checkpoint(base, w, block);
      const spec = fp.spec;
      const m = await createCudaBackend().load(spec, fp.source);
      expect(layout.length).toBe(GLOBALS + spec.numLayers * FIELDS.length);
      expect(m.fp8Matrices).toBe(kept ? fp.fp8.length : 0);
      const ref = await loadModelWeights(spec, fp.source);
      const H = spec.hiddenSize;
      const a = spec.attention;
      const qDim = a.numHeads * a.headDim;
      const kvDim = a.numKvHeads * a.headDim;
      const [br, bc] = block;
      let denseFp8 = 0;
      for (let l = 0; l < spec.numLayers; l++) {
        const f = (k: string) => layout[GLOBALS + l * FIELDS.length + FIELDS.indexOf(k)];
        const lw = ref.layers[l];
        if (!kept) {
          expect(f('qkvScales')).toBe(-1);
          expect(f('oScales')).toBe(-1);
          continue;
        }
        expect(f('fp8BlockRows')).toBe(br);
        expect(f('fp8BlockCols')).toBe(bc);
        const x = randomX(H, 7 + l);
        const qkvRef = [...matVec(lw.attn.q, qDim, H, x), ...matVec(lw.attn.k, kvDim, H, x), ...matVec(lw.attn.v, kvDim, H, x)];
        const eQkv = relError(stackedGemv(f('qkvW'), f('qkvScales'), [qDim, kvDim, kvDim], H, br, bc, x), qkvRef);
        expect(eQkv, `layer ${l} q | k | v`).toBeLessThanOrEqual(1e-6);
        const xo = randomX(qDim, 11 + l);
        const eO = relError(stackedGemv(f('oW'), f('oScales'), [H], qDim, br, bc, xo), matVec(lw.attn.o, H, qDim, xo));
        expect(eO, `layer ${l} o`).toBeLessThanOrEqual(1e-6);
        if (lw.dense) {
          const DI = lw.dense.inter;
          expect(f('mlpKind')).toBe(MLP_DENSE_FP8);
          denseFp8 = Math.max(denseFp8, DI);
          const guRef = [...matVec(lw.dense.gate, DI, H, x), ...matVec(lw.dense.up, DI, H, x)];
          const eGu = relError(stackedGemv(f('gateUp'), f('gateUpScales'), [DI, DI], H, br, bc, x), guRef);
          expect(eGu, `layer ${l} gate | up`).toBeLessThanOrEqual(1e-6);
          const xd = randomX(DI, 13 + l);
          const eD = relError(stackedGemv(f('down'), f('downScales'), [H], DI, br, bc, xd), matVec(lw.dense.down, H, DI, xd));
          expect(eD, `layer ${l} down`).toBeLessThanOrEqual(1e-6);
        }
      }
      expect(config.fp8Inter).toBe(denseFp8);
      await m.dispose();
    } finally {
      await w.close();
    }
  });
});
