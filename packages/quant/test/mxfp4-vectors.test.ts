/**
 * The committed MXFP4 vectors (packages/quant/test/vectors/mxfp4_*) equal what the encoder
 * produces now, so the QAT bit-identity test on the GPU host checks PyTorch against the current
 * encoder. After an intended change to the encoder, regenerate them:
 *   MOEFLASH_WRITE_VECTORS=1 npx vitest run packages/quant/test/mxfp4-vectors.test.ts
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { HOST_IS_LITTLE_ENDIAN } from '@moeflash/core';
import { E2M1_VALUES } from '../src/index.js';
import { makeMxfp4Vectors, vectorFiles } from './mxfp4-vectors.js';

const dir = path.join(__dirname, 'vectors');
const write = process.env.MOEFLASH_WRITE_VECTORS === '1';

describe('MXFP4 vectors for the QAT fake-quant', () => {
  const v = makeMxfp4Vectors();
  const files = vectorFiles(v);

  it('cover the cases that matter', () => {
    expect(HOST_IS_LITTLE_ENDIAN).toBe(true);
    expect(v.inputs.length % v.cols).toBe(0);
    for (const rule of ['ocp', 'no-clip'] as const) {
      const r = v.rules[rule];
      const scales = new Set(r.scales);
      // NaN blocks, the lowest and near-highest scales.
      expect(scales.has(0xff)).toBe(true);
      expect(scales.has(0)).toBe(true);
      expect([...scales].some((s) => s >= 250 && s < 0xff)).toBe(true);
      // Every code in both nibbles.
      const lo = new Set([...r.blocks].map((b) => b & 15));
      const hi = new Set([...r.blocks].map((b) => b >> 4));
      expect(lo.size).toBe(16);
      expect(hi.size).toBe(16);
      // Only no-clip reaches scale 2^126, where 4 * 2^126 overflows float32 on decoding.
      expect(r.dequant.some((x) => x === Infinity)).toBe(rule === 'no-clip');
    }
    // The two rules differ somewhere (clipping blocks) and agree on most blocks.
    const a = v.rules.ocp.scales;
    const b = v.rules['no-clip'].scales;
    const differ = a.filter((s, i) => s !== b[i]).length;
    expect(differ).toBeGreaterThan(50);
    expect(differ).toBeLessThan(a.length);
    expect(E2M1_VALUES.length).toBe(16);
  });

  it(write ? 'writes the files' : 'match the committed files', () => {
    if (write) {
      fs.mkdirSync(dir, { recursive: true });
      for (const [name, bytes] of files) fs.writeFileSync(path.join(dir, name), bytes);
      console.log(`mxfp4-vectors: wrote ${files.size} files to ${dir}`);
      return;
    }
    for (const [name, bytes] of files) {
      const file = path.join(dir, name);
      expect(fs.existsSync(file), `${file} is missing; run MOEFLASH_WRITE_VECTORS=1 npx vitest run packages/quant/test/mxfp4-vectors.test.ts`).toBe(true);
      const same = Buffer.from(bytes).equals(fs.readFileSync(file));
      expect(same, `${file} differs from what the encoder produces now; if the change is intended, regenerate with MOEFLASH_WRITE_VECTORS=1`).toBe(true);
    }
  });
});
