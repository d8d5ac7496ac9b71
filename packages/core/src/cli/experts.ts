import { MoeflashError } from '../errors.js';

/** Help line of `--experts`, the CUDA backend's `experts` load option. */
export const EXPERTS_HELP = `--experts auto|stored|mxfp4  CUDA backend: float experts quantized to MXFP4 on load where the
                               shapes allow (auto, the default), kept bf16 (stored), or quantized
                               and an error where they cannot be (mxfp4)`;

/** `--experts` as the CUDA backend's load option (none: the backend's default). */
export function expertsFlag(command: string, v: string | undefined): { experts?: 'auto' | 'stored' | 'mxfp4' } {
  if (v === undefined) return {};
  if (v !== 'auto' && v !== 'stored' && v !== 'mxfp4') {
    throw new MoeflashError('INVALID_ARGUMENT', `moeflash ${command}: --experts must be auto, stored or mxfp4, got '${v}'`);
  }
  return { experts: v };
}

/** Help line of `--precision`, the CUDA backend's `precision` load option. */
export const PRECISION_HELP = `--precision auto|bf16|f32  CUDA backend: float32 KV cache and expert activations (f32, the
                               reference's arithmetic), bf16 (the fast path), or by model size (auto:
                               f32 under 1 B parameters)`;

/** `--precision` as the CUDA backend's load option (none: the backend's default). */
export function precisionFlag(command: string, v: string | undefined): { precision?: 'auto' | 'bf16' | 'f32' } {
  if (v === undefined) return {};
  if (v !== 'auto' && v !== 'bf16' && v !== 'f32') {
    throw new MoeflashError('INVALID_ARGUMENT', `moeflash ${command}: --precision must be auto, bf16 or f32, got '${v}'`);
  }
  return { precision: v };
}

/** What the CUDA backend reports of its experts (CudaModel.expertLoad, planExpertLoad). */
export interface ExpertLoadReport {
  stored: string;
  format: string;
  quantized: boolean;
  fallback: string | null;
}

/** The report of a loaded model, when its backend gives one. */
export function expertLoadOf(model: unknown): ExpertLoadReport | null {
  const r = (model as { expertLoad?: ExpertLoadReport | null }).expertLoad;
  return r && typeof r.format === 'string' ? r : null;
}

/** One phrase: `mxfp4 (quantized on load from bf16)`, `bf16 (stored bf16; not quantized: why)`. */
export function describeExpertLoad(r: ExpertLoadReport): string {
  if (r.format === 'none') return 'none (no MoE layer)';
  if (r.quantized) return `${r.format} (quantized on load from ${r.stored})`;
  return `${r.format} (stored ${r.stored}${r.fallback ? `; not quantized: ${r.fallback}` : ''})`;
}
