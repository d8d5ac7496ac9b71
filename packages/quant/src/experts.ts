/**
 * One MoE layer's expert weights in any input layout, seen as the matrices the MXFP4 layout
 * stores: per expert a [2I, H] gate/up matrix whose rows are in the family's fused order (gate rows
 * then up rows for qwen3_moe and mixtral, as transformers 5 fuses them; interleaved for gpt-oss) and
 * a [H, I] down matrix. The converter quantizes these rows; the quality report compares them with
 * the converted checkpoint's.
 *
 * @module
 */

import { MoeflashError, detectExpertLayout, type ModelSpec, type TensorInfo, type WeightSource } from '@moeflash/core';
import {
  concatRows,
  interleaveRows,
  maybeInfo,
  mxfp4Rows,
  tensorRows,
  transposedRows,
  type BlockScale,
  type RangeReader,
  type RowSource,
} from './rows.js';

/** How a layer's experts are stored in the input checkpoint. */
export type ExpertInputKind = 'per-expert' | 'fused' | 'fused-input-major' | 'mxfp4';

/** The stored MXFP4 tensors of a layer whose experts are already MXFP4. */
export interface Mxfp4ExpertTensors {
  gateUpBlocks: TensorInfo;
  gateUpScales: TensorInfo;
  downBlocks: TensorInfo;
  downScales: TensorInfo;
}

/** One MoE layer's experts, whatever their input layout. */
export interface LayerExperts {
  layer: number;
  /** `model.layers.L.mlp` or `model.layers.L.block_sparse_moe` (Mixtral's released layout). */
  prefix: string;
  kind: ExpertInputKind;
  numExperts: number;
  hidden: number;
  inter: number;
  /** gpt-oss: gate and up rows alternate. */
  interleaved: boolean;
  /** Expert j's [2I, H] gate/up matrix, rows in the fused order of the family. */
  gateUp(j: number): RowSource;
  /** Expert j's [H, I] down matrix. */
  down(j: number): RowSource;
  /** Every checkpoint tensor the weight matrices come from (block scales included). */
  inputs: string[];
  /** Fused bias tensors (gpt-oss: `[E, 2I]` interleaved and `[E, H]`), to keep as they are. */
  biases: string[];
  /** Present when the experts already are MXFP4 blocks and scales. */
  mxfp4?: Mxfp4ExpertTensors;
}

/** FP8 block size declared by a checkpoint's config (weights with `weight_scale_inv`). */
export function fp8BlockOf(spec: ModelSpec): [number, number] {
  const q = spec.quantization;
  return (q?.method === 'fp8' ? q.weightBlockSize : q?.dense?.weightBlockSize) ?? [128, 128];
}

function scaleOf(src: WeightSource, weight: string, spec: ModelSpec): BlockScale | undefined {
  const info = maybeInfo(src, `${weight}_scale_inv`);
  return info ? { info, block: fp8BlockOf(spec) } : undefined;
}

function expectShape(info: TensorInfo, shape: number[]): void {
  if (info.shape.length !== shape.length || info.shape.some((d, i) => d !== shape[i])) {
    throw new MoeflashError(
      'WEIGHTS_INVALID',
      `tensor ${info.name} in ${info.file} has shape [${info.shape}] but the model's config.json implies [${shape}]; the weights and config.json do not belong together`,
    );
  }
}

/**
 * Finds layer `layer`'s experts (the layouts core's loader reads: per-expert tensors, fused 3-D
 * tensors in either orientation, or MXFP4 blocks) and presents them as row sources.
 */
export function layerExperts(src: WeightSource, io: RangeReader, spec: ModelSpec, layer: number): LayerExperts {
  const layout = detectExpertLayout(src, layer);
  const E = spec.moe.numExperts;
  const H = spec.hiddenSize;
  const I = spec.moe.intermediateSize;
  const interleaved = spec.family === 'gpt_oss';
  const ex = `${layout.prefix}.experts`;
  const biases = [`${ex}.gate_up_proj_bias`, `${ex}.down_proj_bias`].filter((n) => src.has(n));
  const base = { layer, prefix: layout.prefix, numExperts: E, hidden: H, inter: I, interleaved, biases };

  if (layout.kind === 'per-expert') {
    const [g, u, d] = layout.names;
    const inputs: string[] = [];
    const matrix = (j: number, which: string, rows: number, cols: number): RowSource => {
      const name = `${ex}.${j}.${which}.weight`;
      const info = src.info(name);
      expectShape(info, [rows, cols]);
      const scale = scaleOf(src, name, spec);
      return tensorRows(io, info, { rows, cols, scale });
    };
    for (let j = 0; j < E; j++) {
      for (const w of [g, u, d]) {
        const name = `${ex}.${j}.${w}.weight`;
        src.info(name); // a missing expert fails here, before any output is written
        inputs.push(name);
        if (src.has(`${name}_scale_inv`)) inputs.push(`${name}_scale_inv`);
      }
    }
    return {
      ...base,
      kind: 'per-expert',
      inputs,
      gateUp: (j) => (interleaved ? interleaveRows : concatRows)(matrix(j, g, I, H), matrix(j, u, I, H)),
      down: (j) => matrix(j, d, H, I),
    };
  }

  if (layout.kind === 'mxfp4-fused') {
    const t: Mxfp4ExpertTensors = {
      gateUpBlocks: src.info(`${ex}.gate_up_proj_blocks`),
      gateUpScales: src.info(`${ex}.gate_up_proj_scales`),
      downBlocks: src.info(`${ex}.down_proj_blocks`),
      downScales: src.info(`${ex}.down_proj_scales`),
    };
    expectShape(t.gateUpBlocks, [E, 2 * I, H / 32, 16]);
    expectShape(t.gateUpScales, [E, 2 * I, H / 32]);
    expectShape(t.downBlocks, [E, H, I / 32, 16]);
    expectShape(t.downScales, [E, H, I / 32]);
    return {
      ...base,
      kind: 'mxfp4',
      mxfp4: t,
      inputs: Object.values(t).map((i) => i.name),
      gateUp: (j) => mxfp4Rows(io, t.gateUpBlocks, t.gateUpScales, { rowOffset: j * 2 * I, rows: 2 * I, cols: H }),
      down: (j) => mxfp4Rows(io, t.downBlocks, t.downScales, { rowOffset: j * H, rows: H, cols: I }),
    };
  }

  const gu = src.info(`${ex}.gate_up_proj`);
  const dn = src.info(`${ex}.down_proj`);
  // The loader's rule: gpt-oss keeps x @ W ([E, H, 2I]), the other families W x ([E, 2I, H]);
  // a square case is decided by the family.
  const inputMajor = gu.shape[1] === H && gu.shape[2] === 2 * I && (interleaved || 2 * I !== H);
  if (src.has(`${ex}.gate_up_proj_scale_inv`) || src.has(`${ex}.down_proj_scale_inv`)) {
    throw new MoeflashError(
      'CONFIG_UNSUPPORTED',
      `${src.origin}: fused FP8 expert tensors (${ex}.gate_up_proj_scale_inv) are not supported; convert from a bf16 or per-expert checkpoint`,
    );
  }
  if (inputMajor) {
    expectShape(gu, [E, H, 2 * I]);
    expectShape(dn, [E, I, H]);
    return {
      ...base,
      kind: 'fused-input-major',
      inputs: [gu.name, dn.name],
      gateUp: (j) => transposedRows(io, gu, { sliceIndex: j, k: H, n: 2 * I }),
      down: (j) => transposedRows(io, dn, { sliceIndex: j, k: I, n: H }),
    };
  }
  expectShape(gu, [E, 2 * I, H]);
  expectShape(dn, [E, H, I]);
  return {
    ...base,
    kind: 'fused',
    inputs: [gu.name, dn.name],
    gateUp: (j) => tensorRows(io, gu, { rowOffset: j * 2 * I, rows: 2 * I, cols: H }),
    down: (j) => tensorRows(io, dn, { rowOffset: j * H, rows: H, cols: I }),
  };
}
