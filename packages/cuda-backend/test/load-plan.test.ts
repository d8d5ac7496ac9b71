/**
 * The weight plan of every golden fixture, on any machine: with the addon replaced by a recorder,
 * a load must upload every piece inside the reserved buffer without overlaps, and quantize bf16
 * experts on request only where the MXFP4 kernels take the shapes.
 */
import path from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { loadModelSpec, openWeights } from '@moeflash/core';

const uploads: { off: number; n: number }[] = [];
let config: { weightsBytes: number } | undefined;
let prepared = 0;
vi.mock('../src/native.js', async (orig) => {
  const real = (await orig()) as Record<string, unknown>;
  class RecordingModel {
    constructor(c: { weightsBytes: number }) {
      config = c;
    }
    upload(off: number, b: Uint8Array) {
      uploads.push({ off, n: b.byteLength });
    }
    prepare() {
      prepared++;
      return 0;
    }
    info() {
      return { weights: 0, kvCache: 0, activations: 0, graphs: 0 };
    }
    dispose() {}
  }
  return { ...real, loadAddon: () => ({ setDevice() {}, Model: RecordingModel }) };
});
const { createCudaBackend } = await import('../src/index.js');

const root = path.join(__dirname, '..', '..', 'core', 'test', 'fixtures', 'golden');
const cases: [string, 'stored' | 'mxfp4', string | null][] = [
  ['qwen3_moe_fused', 'stored', 'bf16'],
  ['qwen3_moe_per_expert', 'stored', 'bf16'],
  ['mixtral_fused', 'stored', 'bf16'],
  ['mixtral_fused', 'mxfp4', 'mxfp4'],
  ['mixtral_per_expert', 'stored', 'bf16'],
  ['mixtral_per_expert', 'mxfp4', null], // hidden 72: not a multiple of 32
  ['gpt_oss_mxfp4', 'stored', 'mxfp4'],
  ['gpt_oss_bf16', 'stored', 'bf16'],
  ['gpt_oss_bf16', 'mxfp4', 'mxfp4'],
];

describe('CUDA weight plan (no GPU needed)', () => {
  it.each(cases)('%s, experts %s', async (name, experts, format) => {
    uploads.length = 0;
    prepared = 0;
    const dir = path.join(root, name);
    const spec = await loadModelSpec(dir);
    const w = await openWeights(dir);
    try {
      const load = createCudaBackend().load(spec, w, { experts });
      if (format === null) {
        await expect(load).rejects.toThrow(/multiples of 32/);
        return;
      }
      const m = await load;
      expect(m.expertFormat).toBe(format);
      uploads.sort((a, b) => a.off - b.off);
      for (let i = 1; i < uploads.length; i++) expect(uploads[i].off).toBeGreaterThanOrEqual(uploads[i - 1].off + uploads[i - 1].n);
      const last = uploads[uploads.length - 1];
      expect(last.off + last.n).toBeLessThanOrEqual(config!.weightsBytes);
      // The expert repack reads the uploaded weights: it runs once, after the last upload.
      expect(prepared).toBe(1);
      await m.dispose();
    } finally {
      await w.close();
    }
  });
});
