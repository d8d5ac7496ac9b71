/**
 * @moeflash/quant: the bit-exact number formats moeflash stores weights in (MXFP4, FP8 E4M3 and
 * E5M2, bf16) with reference encoders and decoders (the CUDA kernels are tested against these),
 * the checkpoint converter behind `moeflash quantize` ({@link convertCheckpoint}) and the quality
 * report behind `moeflash quant-report` ({@link quantReport}).
 *
 * ```
 *  HF folder ─> layerExperts / tensorRows (bands of rows) ─> quantizeMxfp4 / quantizeFp8Blocked
 *            ─> chunked safetensors writer ─> OUT.partial-<pid> ─> OUT
 *  ref + quant folders ─> loadModel ─> logits ─> KL, top-1, perplexity; weights ─> ||W_q - W|| / ||W||
 * ```
 *
 * @packageDocumentation
 */

export {
  MXFP4_BLOCK_SIZE,
  MXFP4_BLOCK_BYTES,
  E8M0_NAN,
  E8M0_BIAS,
  E2M1_VALUES,
  decodeE2M1,
  encodeE2M1,
  decodeE8M0,
  mxfp4SharedExponent,
  quantizeMxfp4,
  dequantizeMxfp4,
} from './mxfp4.js';
export type { Mxfp4ScaleRule, QuantizeMxfp4Options, Mxfp4Quantized } from './mxfp4.js';

export {
  E4M3_MAX,
  E5M2_MAX,
  decodeE4M3,
  decodeE5M2,
  encodeE4M3,
  encodeE5M2,
  encodeFp8,
  decodeFp8,
  quantizeFp8Blocked,
  dequantizeFp8Blocked,
} from './fp8.js';
export type { Fp8Format, Fp8EncodeOptions, Fp8BlockedWeight } from './fp8.js';

export { f32ToBf16Bits, bf16BitsToF32, encodeBf16, decodeBf16, roundToBf16 } from './bf16.js';

export { f32ToBits, bitsToF32 } from './bits.js';

export { convertCheckpoint, outputQuantizationConfig } from './convert.js';
export type { ConvertOptions, ConvertProgress, ConvertResult, DenseFormat, ExpertFormat, KeptExperts } from './convert.js';

export { quantReport, compareLogits, formatReport, readReportText } from './report.js';
export type {
  QuantReport,
  QuantReportOptions,
  ReportModel,
  LogitsComparison,
  TensorError,
  RoleError,
} from './report.js';
export { SAMPLE_TEXT } from './sample-text.js';

export { layerExperts, fp8BlockOf } from './experts.js';
export type { LayerExperts, ExpertInputKind, Mxfp4ExpertTensors } from './experts.js';
export { RangeReader, tensorRows, transposedRows, concatRows, interleaveRows, mxfp4Rows } from './rows.js';
export type { RowSource, BlockScale } from './rows.js';

export { cliCommands, quantizeCommand, quantReportCommand, quantizeHelp, quantReportHelp, convertProgressPrinter } from './cli.js';
export type { CliCommand } from './cli.js';
