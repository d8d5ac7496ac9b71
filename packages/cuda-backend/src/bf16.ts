/** float32 -> bf16 bits as the device holds weights: round to nearest even, NaN kept a quiet NaN. */
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function toBf16(x: number): number {
  f32[0] = x;
  const b = u32[0];
  if ((b & 0x7f800000) === 0x7f800000 && (b & 0x7fffff) !== 0) return 0x7fc0;
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
}

/** `v` as bf16 bits into `out` from index `at`. */
export function bf16Into(v: Float32Array, out: Uint16Array, at = 0): Uint16Array {
  for (let i = 0; i < v.length; i++) out[at + i] = toBf16(v[i]);
  return out;
}

export function bf16Array(v: Float32Array): Uint16Array {
  return bf16Into(v, new Uint16Array(v.length));
}
