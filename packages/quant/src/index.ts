/**
 * @moeflash/quant: the bit-exact number formats moeflash stores weights in (MXFP4, FP8 E4M3 and
 * E5M2, bf16) with reference encoders and decoders. The CUDA kernels are tested against these.
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
