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
