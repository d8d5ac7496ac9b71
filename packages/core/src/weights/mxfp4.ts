/**
 * Decoding of MXFP4 weights as gpt-oss stores them (refs/FORMATS.md, "MXFP4"): E2M1 codes two to
 * a byte, element 2i in the low nibble, one E8M0 scale (2^(code-127), 0xFF = NaN) per 32.
 * The loader needs only this direction; @moeflash/quant holds the encoder.
 */
export const E2M1_VALUES = new Float32Array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6]);

/** 2^(code-127) for every E8M0 code; NaN for 0xFF. */
export function e8m0ToFloat(code: number): number {
  return code === 0xff ? NaN : Math.pow(2, code - 127);
}

/**
 * blocks: rows * (cols/32) * 16 bytes, scales: rows * (cols/32) bytes -> float32 [rows, cols].
 */
export function dequantizeMxfp4Rows(blocks: Uint8Array, scales: Uint8Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(rows * cols);
  const nBlocks = (rows * cols) / 32;
  for (let b = 0; b < nBlocks; b++) {
    const x = e8m0ToFloat(scales[b]);
    const bo = b * 16;
    const oo = b * 32;
    for (let i = 0; i < 16; i++) {
      const byte = blocks[bo + i];
      out[oo + 2 * i] = E2M1_VALUES[byte & 0xf] * x;
      out[oo + 2 * i + 1] = E2M1_VALUES[byte >> 4] * x;
    }
  }
  return out;
}
