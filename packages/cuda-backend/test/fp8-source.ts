/**
 * An FP8 checkpoint made in memory from a bf16 one: every attention projection and dense MLP
 * weight becomes E4M3 codes with a `weight_scale_inv` of the given block grid (@moeflash/quant's
 * DeepSeek-V3 / HF recipe), and the spec declares `quant_method: "fp8"` with that block size. Any
 * block grid can be had this way, so tests reach both the stacked and the one-launch-per-matrix
 * q | k | v and gate | up paths of the CUDA model.
 */
import {
  decodeToFloat32,
  type ModelSpec,
  type TensorInfo,
  type WeightSource,
} from '@moeflash/core';
import { quantizeFp8Blocked } from '@moeflash/quant';

/** The weights FP8 checkpoints store as FP8: attention projections and dense MLPs. */
export function denseProjectionNames(spec: ModelSpec): string[] {
  const out: string[] = [];
  for (let l = 0; l < spec.numLayers; l++) {
    for (const n of ['q_proj', 'k_proj', 'v_proj', 'o_proj']) out.push(`model.layers.${l}.self_attn.${n}.weight`);
    if (spec.layers[l].mlp === 'dense') {
      for (const n of ['gate_proj', 'up_proj', 'down_proj']) out.push(`model.layers.${l}.mlp.${n}.weight`);
    }
  }
  return out;
}

export async function fp8Checkpoint(
  spec: ModelSpec,
  src: WeightSource,
  block: [number, number],
): Promise<{ spec: ModelSpec; source: WeightSource; fp8: string[] }> {
  const q = new Map<string, { codes: Uint8Array; scales: Float32Array; rows: number; cols: number }>();
  for (const name of denseProjectionNames(spec)) {
    const [rows, cols] = src.info(name).shape;
    const r = quantizeFp8Blocked(await src.readFloat32(name), rows, cols, block);
    q.set(name, { codes: r.data, scales: r.scaleInv, rows, cols });
  }
  const scaleOf = (n: string) => (n.endsWith('_scale_inv') ? q.get(n.slice(0, -'_scale_inv'.length)) : undefined);
  const info = (n: string): TensorInfo => {
    const w = q.get(n);
    if (w) return { ...src.info(n), dtype: 'F8_E4M3', byteLength: w.rows * w.cols };
    const s = scaleOf(n);
    if (s) {
      const base = src.info(n.slice(0, -'_scale_inv'.length));
      const shape = [Math.ceil(s.rows / block[0]), Math.ceil(s.cols / block[1])];
      return { name: n, dtype: 'F32', shape, file: base.file, offset: 0, byteLength: 4 * s.scales.length };
    }
    return src.info(n);
  };
  const source: WeightSource = {
    origin: `${src.origin} (FP8 E4M3, ${block[0]}x${block[1]} blocks, made in memory)`,
    names: () => [...src.names(), ...[...q.keys()].map((n) => `${n}_scale_inv`)],
    has: (n) => src.has(n) || scaleOf(n) !== undefined,
    info,
    read: async (n) => {
      const w = q.get(n);
      if (w) return w.codes.slice();
      const s = scaleOf(n);
      if (s) return new Uint8Array(s.scales.slice().buffer);
      return src.read(n);
    },
    readFloat32: async (n) => {
      const w = q.get(n);
      if (w) return decodeToFloat32(w.codes, 'F8_E4M3');
      const s = scaleOf(n);
      if (s) return s.scales.slice();
      return src.readFloat32(n);
    },
    close: () => src.close(),
  };
  // MXFP4 checkpoints declare FP8 dense weights in a nested config (core's ModelSpec.quantization.dense).
  const quantization: ModelSpec['quantization'] =
    spec.quantization?.method === 'mxfp4'
      ? { ...spec.quantization, dense: { method: 'fp8', weightBlockSize: block } }
      : { method: 'fp8', weightBlockSize: block };
  return {
    spec: { ...spec, quantization },
    source,
    fp8: [...q.keys()],
  };
}

/**
 * The CUDA model checks of fp8-dense.gpu.test.ts, [fixture, block grid]; fp8-dense-cases.test.ts
 * checks on the CPU that none of them sits on a router near-tie that the device's bf16 KV cache
 * flips (as qwen3_moe_fused in 32x32 blocks does: see there).
 */
export const FP8_MODEL_CASES: [string, [number, number]][] = [
  ['qwen3_moe_per_expert', [128, 128]], // one launch per matrix of q | k | v and gate | up; a dense FP8 MLP layer
  ['qwen3_moe_per_expert', [32, 32]], // the scale grids stack: one launch each
  ['qwen3_moe_fused', [64, 32]], // head_dim 32, hidden 64: the grids stack
  ['qwen3_moe_fused', [96, 32]], // q = 96 + 32 rows, k and v one partial row block each: one launch per matrix
  ['gpt_oss_mxfp4', [128, 128]], // FP8 attention (with biases) beside MXFP4 experts
];

/** Their prompt (20 tokens: steps of 16 and 4, gemv_fp8 runs 8 tokens a launch) and greedy decode steps. */
export const FP8_PROMPT = [5, 17, 42, 99, 3, 250, 8, 64, 11, 13, 200, 7, 1, 2, 77, 31, 9, 120, 55, 6];
export const FP8_DECODE_STEPS = 8;
