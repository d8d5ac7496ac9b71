/**
 * Our encoders against PyTorch's own casts, recorded by tools/quant/make_torch_vectors.py into
 * test/vectors/torch_fp8.json (base64 little-endian arrays; float32 as bit patterns). Skipped, with
 * a printed reason, until that file is committed.
 *
 * What is compared, and how strictly:
 * - FP8 casts: PyTorch does not saturate, so inputs inside the finite range (|x| <= 464 for E4M3,
 *   |x| < 61440 for E5M2, where rounding cannot overflow) must match our `saturate: false` codes
 *   bit for bit; beyond it torch must give an overflow code (NaN / Inf / max), and NaN inputs a
 *   NaN code. NaN sign and payload are not compared.
 * - bf16 casts: bit for bit, except NaN, where only NaN-ness is compared (PyTorch's scalar, vector
 *   and CUDA paths give different NaN patterns).
 * - decoders of every code, E8M0 scales, E2M1 elements and the block-scaled FP8 recipe: exact.
 * - torch's `to_mxfp(..., 'mxfp4')` uses another scale rule (RCEIL through bf16), so only its
 *   layout is checked: decoding its bytes with our dequantizer must land within one step of the
 *   input (a swapped nibble order or a wrong E8M0 bias lands far away).
 */
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import {
  E2M1_VALUES,
  decodeE8M0,
  decodeFp8,
  dequantizeFp8Blocked,
  dequantizeMxfp4,
  encodeBf16,
  encodeE2M1,
  encodeFp8,
  quantizeFp8Blocked,
  quantizeMxfp4,
} from '../src/index.js';
import { hex } from './reference.js';

const VECTORS = fileURLToPath(new URL('./vectors/torch_fp8.json', import.meta.url));
const present = existsSync(VECTORS);
if (!present) {
  console.log(
    `torch-vectors: skipped, ${VECTORS} is absent. Generate it on a host with PyTorch: ` +
      'python tools/quant/make_torch_vectors.py',
  );
}

type PerDevice = Record<string, string>;
interface Vectors {
  schema: string;
  meta: Record<string, unknown> & { notes?: string[] };
  fp8_inputs_f32?: string;
  f32_to_e4m3fn?: PerDevice;
  f32_to_e5m2?: PerDevice;
  e4m3fn_to_f32?: PerDevice;
  e5m2_to_f32?: PerDevice;
  bf16_inputs_f32?: string;
  f32_to_bf16?: PerDevice;
  e8m0fnu_to_f32?: PerDevice;
  e2m1?: {
    inputs_f32: string;
    codes_u8?: string;
    decode_f32?: string;
    pack_in_u8?: string;
    pack_out_u8?: string;
  };
  fp8_blocked?: {
    rows: number;
    cols: number;
    block: [number, number];
    w_f32: string;
    data_u8: string;
    scale_inv_f32: string;
    dequant_f32: string;
  };
  to_mxfp4?: {
    rows: number;
    cols: number;
    x_f32: string;
    scales_u8: string;
    packed_u8: string;
  };
}

function bytes(b64: string): Uint8Array {
  // A fresh buffer, so wider views below are aligned whatever Buffer's pool offset was.
  return new Uint8Array(Buffer.from(b64, 'base64'));
}
const u8 = bytes;
function u16(b64: string): Uint16Array {
  const b = bytes(b64);
  return new Uint16Array(b.buffer, 0, b.length / 2);
}
function u32(b64: string): Uint32Array {
  const b = bytes(b64);
  return new Uint32Array(b.buffer, 0, b.length / 4);
}
function f32(b64: string): Float32Array {
  const b = bytes(b64);
  return new Float32Array(b.buffer, 0, b.length / 4);
}

/** Collects mismatches and fails once with the first few, readable. */
class Mismatches {
  private readonly lines: string[] = [];
  count = 0;
  add(line: string): void {
    this.count++;
    if (this.lines.length < 12) this.lines.push(line);
  }
  check(what: string): void {
    if (this.count > 0) {
      throw new Error(`${what}: ${this.count} mismatches, first:\n  ${this.lines.join('\n  ')}`);
    }
  }
}

const v: Vectors | undefined = present ? (JSON.parse(readFileSync(VECTORS, 'utf8')) as Vectors) : undefined;

describe.skipIf(!present)('PyTorch vectors', () => {
  const V = v as Vectors;

  it('has the expected schema', () => {
    expect(V.schema).toBe('moeflash.torch-vectors.v1');
    if (V.meta.notes && V.meta.notes.length > 0) {
      console.log(`torch-vectors (torch ${String(V.meta.torch)}) notes:\n  ${V.meta.notes.join('\n  ')}`);
    }
  });

  const fp8Cases = [
    { key: 'f32_to_e4m3fn', fmt: 'e4m3', exactBelow: 464, inclusive: true, max: 0x7e },
    { key: 'f32_to_e5m2', fmt: 'e5m2', exactBelow: 61440, inclusive: false, max: 0x7b },
  ] as const;
  for (const c of fp8Cases) {
    const per = present ? V[c.key] : undefined;
    it.skipIf(!per || !V.fp8_inputs_f32)(`${c.key}: torch casts (every device recorded)`, () => {
      const inBits = u32(V.fp8_inputs_f32 as string);
      const x = new Float32Array(inBits.buffer, inBits.byteOffset, inBits.length);
      const ours = encodeFp8(x, c.fmt, { saturate: false });
      const isNaNCode = (k: number) =>
        c.fmt === 'e4m3' ? (k & 0x7f) === 0x7f : (k & 0x7f) > 0x7c;
      for (const [dev, b64] of Object.entries(per as PerDevice)) {
        const theirs = u8(b64);
        expect(theirs.length).toBe(x.length);
        const mm = new Mismatches();
        let outside = 0;
        for (let i = 0; i < x.length; i++) {
          const a = Math.abs(x[i]);
          const t = theirs[i];
          const where = `${dev} x=${x[i]} (${hex(inBits[i], 8)}): torch ${hex(t)} ours ${hex(ours[i])}`;
          if (Number.isNaN(x[i])) {
            if (!isNaNCode(t) || !isNaNCode(ours[i])) mm.add(where);
          } else if (a < c.exactBelow || (c.inclusive && a === c.exactBelow)) {
            if (t !== ours[i]) mm.add(where);
          } else {
            outside++;
            // Any overflow convention: NaN, Inf or the largest finite code.
            const m = t & 0x7f;
            if (!(isNaNCode(t) || m === 0x7c || m === c.max)) mm.add(`${where} (overflow)`);
          }
        }
        mm.check(`${c.key} on ${dev}`);
        expect(outside).toBeGreaterThan(0);
      }
    });
  }

  for (const [key, fmt] of [
    ['e4m3fn_to_f32', 'e4m3'],
    ['e5m2_to_f32', 'e5m2'],
  ] as const) {
    const per = present ? V[key] : undefined;
    it.skipIf(!per)(`${key}: every code decodes as torch does`, () => {
      const codes = Uint8Array.from({ length: 256 }, (_, i) => i);
      const ours = new Uint32Array(decodeFp8(codes, fmt).buffer);
      for (const [dev, b64] of Object.entries(per as PerDevice)) {
        const theirs = u32(b64);
        const mm = new Mismatches();
        for (let c = 0; c < 256; c++) {
          const tn = (theirs[c] & 0x7fffffff) > 0x7f800000;
          const on = (ours[c] & 0x7fffffff) > 0x7f800000;
          if (tn !== on || (!tn && theirs[c] !== ours[c])) {
            mm.add(`${dev} code ${hex(c)}: torch ${hex(theirs[c], 8)} ours ${hex(ours[c], 8)}`);
          }
        }
        mm.check(`${key} on ${dev}`);
      }
    });
  }

  it.skipIf(!present || !V.f32_to_bf16 || !V.bf16_inputs_f32)('f32_to_bf16: torch casts', () => {
    const inBits = u32(V.bf16_inputs_f32 as string);
    const x = new Float32Array(inBits.buffer, inBits.byteOffset, inBits.length);
    const ours = encodeBf16(x);
    for (const [dev, b64] of Object.entries(V.f32_to_bf16 as PerDevice)) {
      const theirs = u16(b64);
      expect(theirs.length).toBe(x.length);
      const mm = new Mismatches();
      for (let i = 0; i < x.length; i++) {
        const tn = (theirs[i] & 0x7fff) > 0x7f80;
        const on = (ours[i] & 0x7fff) > 0x7f80;
        if (Number.isNaN(x[i]) ? !(tn && on) : theirs[i] !== ours[i]) {
          mm.add(`${dev} ${hex(inBits[i], 8)}: torch ${hex(theirs[i], 4)} ours ${hex(ours[i], 4)}`);
        }
      }
      mm.check(`f32_to_bf16 on ${dev}`);
    }
  });

  it.skipIf(!present || !V.e8m0fnu_to_f32)('e8m0fnu: every scale code decodes as torch does', () => {
    for (const [dev, b64] of Object.entries(V.e8m0fnu_to_f32 as PerDevice)) {
      const theirs = f32(b64);
      for (let c = 0; c < 256; c++) {
        if (c === 0xff) expect(theirs[c], dev).toBeNaN();
        else expect(theirs[c], `${dev} code ${c}`).toBe(decodeE8M0(c));
      }
    }
  });

  it.skipIf(!present || !V.e2m1)('e2m1: element rounding, decoding and nibble packing', () => {
    const e = V.e2m1 as NonNullable<Vectors['e2m1']>;
    const x = f32(e.inputs_f32);
    if (e.codes_u8) {
      const theirs = u8(e.codes_u8);
      const mm = new Mismatches();
      for (let i = 0; i < x.length; i++) {
        const ours = encodeE2M1(x[i]);
        if (ours !== theirs[i]) mm.add(`x=${x[i]}: torch ${theirs[i]} ours ${ours}`);
      }
      mm.check('e2m1 codes');
    }
    if (e.decode_f32) {
      const d = f32(e.decode_f32);
      for (let c = 0; c < 16; c++) expect(Object.is(d[c], E2M1_VALUES[c]) || d[c] === E2M1_VALUES[c]).toBe(true);
    }
    if (e.pack_in_u8 && e.pack_out_u8) {
      const codes = u8(e.pack_in_u8);
      const packed = u8(e.pack_out_u8);
      for (let i = 0; i < packed.length; i++) expect(packed[i]).toBe(codes[2 * i] | (codes[2 * i + 1] << 4));
      // Our packer puts the same codes in the same places.
      const block = Float32Array.from(codes, (c) => E2M1_VALUES[c]);
      block[0] = 6; // pin X = 1 (codes[0] is 1: 0.5 -> replaced by 6, code 7)
      const q = quantizeMxfp4(block);
      expect(q.scales[0]).toBe(127);
      expect(q.blocks[0]).toBe(7 | (codes[1] << 4));
      for (let i = 1; i < packed.length; i++) expect(q.blocks[i]).toBe(packed[i]);
    }
  });

  it.skipIf(!present || !V.fp8_blocked)('fp8_blocked: the DeepSeek-V3 recipe bit for bit', () => {
    const b = V.fp8_blocked as NonNullable<Vectors['fp8_blocked']>;
    const w = f32(b.w_f32);
    const q = quantizeFp8Blocked(w, b.rows, b.cols, b.block);
    const theirS = f32(b.scale_inv_f32);
    expect(Array.from(q.scaleInv)).toEqual(Array.from(theirS));
    const theirD = u8(b.data_u8);
    const mm = new Mismatches();
    for (let i = 0; i < theirD.length; i++) {
      if (theirD[i] !== q.data[i]) mm.add(`[${i}] w=${w[i]}: torch ${hex(theirD[i])} ours ${hex(q.data[i])}`);
    }
    mm.check('fp8_blocked data');
    const deq = dequantizeFp8Blocked(q.data, q.scaleInv, b.rows, b.cols, b.block);
    expect(new Uint32Array(deq.buffer)).toEqual(u32(b.dequant_f32));
  });

  it.skipIf(!present || !V.to_mxfp4)('to_mxfp4: torch packed layout and E8M0 bias decode with ours', () => {
    const t = V.to_mxfp4 as NonNullable<Vectors['to_mxfp4']>;
    const x = f32(t.x_f32);
    const scales = u8(t.scales_u8);
    const packed = u8(t.packed_u8);
    expect(scales.length).toBe((t.rows * t.cols) / 32);
    expect(packed.length).toBe((t.rows * t.cols) / 2);
    const d = dequantizeMxfp4(packed, scales);
    const ours = quantizeMxfp4(x, { scaleRule: 'no-clip' });
    let sameScale = 0;
    const mm = new Mismatches();
    for (let b = 0; b < scales.length; b++) {
      if (ours.scales[b] === scales[b]) sameScale++;
      const X = 2 ** (scales[b] - 127);
      for (let j = 0; j < 32; j++) {
        const i = b * 32 + j;
        // Largest E2M1 step is 2X, so rounding error is at most X; the bf16 rounding before it
        // moves a quotient below 8 by at most half a bf16 step there, 2^-6 (times X).
        if (!(Math.abs(d[i] - x[i]) <= X * (1 + 2 ** -6))) mm.add(`[${i}] x=${x[i]} decoded ${d[i]} (X=${X})`);
      }
    }
    mm.check('to_mxfp4 layout');
    console.log(`to_mxfp4: torch RCEIL scale equals our 'no-clip' scale in ${sameScale}/${scales.length} blocks`);
    expect(sameScale / scales.length).toBeGreaterThan(0.9);
  });
});
