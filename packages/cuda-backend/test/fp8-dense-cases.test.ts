/**
 * Keeps fp8-dense.gpu.test.ts's cases clear of router near-ties, on any machine. The CUDA model
 * stores K and V in bf16 (qkv_prepare rounds to nearest even) where the CPU backend keeps float32;
 * that moves router logits by up to a few 1e-2 on these fixtures, so an expert choice whose top-k
 * gap is smaller can flip, and one flipped token then carries the whole logits error. Here the CPU
 * runs each case twice, once with its KV cache rounded to bf16 as the device stores it: the
 * difference is what the GPU test must tolerate even when every kernel is exact, and must stay
 * well inside its 1e-2.
 *
 * On an H100 the GPU test's errors equalled this emulation's to three digits (qwen3_moe_per_expert
 * 1.70e-3 and 1.55e-3, gpt_oss_mxfp4 4.74e-3 / 5.61e-3) and so did the one case that failed:
 * qwen3_moe_fused in 32x32 blocks, 2.99e-2, from position 14 of layer 2 whose second and third
 * router logits are 1.9e-3 apart (2.3259 vs 2.3241).
 */
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CpuBackend, loadModelSpec, openWeights } from '@moeflash/core';

import { KvPagePool } from '../../core/src/backends/cpu/kv-cache.js';
import { FP8_DECODE_STEPS, FP8_MODEL_CASES, FP8_PROMPT, fp8Checkpoint } from './fp8-source.js';
import { bf16BitsToF32, toBf16Bits } from './helpers.js';

/** A page whose writes (the model's K and V rows) are rounded to bf16 as the device's cache. */
class Bf16Page extends Float32Array {
  override set(src: ArrayLike<number>, offset = 0): void {
    super.set(src, offset);
    for (let i = offset; i < offset + src.length; i++) this[i] = bf16BitsToF32(toBf16Bits(this[i]));
  }
}

let bf16Kv = false;
let pageCalls = 0;
const page = KvPagePool.prototype.page;
KvPagePool.prototype.page = function (this: KvPagePool, p: number): Float32Array {
  const a = page.call(this, p);
  if (!bf16Kv) return a;
  pageCalls++;
  return new Bf16Page(a.buffer as ArrayBuffer, a.byteOffset, a.length);
};
afterAll(() => {
  KvPagePool.prototype.page = page;
});

const root = path.join(__dirname, '..', '..', 'core', 'test', 'fixtures', 'golden');

function relError(a: Float32Array, b: Float32Array): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / den);
}

function argmax(v: Float32Array): number {
  let best = 0;
  for (let i = 1; i < v.length; i++) if (v[i] > v[best]) best = i;
  return best;
}

/** fp8-dense.gpu.test.ts's steps on the CPU, float32 KV against bf16 KV: prefill and worst decode error. */
async function kvRoundingError(name: string, block: [number, number]): Promise<{ prefill: number; decode: number }> {
  const dir = path.join(root, name);
  const w = await openWeights(dir);
  try {
    const fp = await fp8Checkpoint(await loadModelSpec(dir), w, block);
    const ref = await new CpuBackend().load(fp.spec, fp.source);
    const dev = await new CpuBackend().load(fp.spec, fp.source);
    const step = async (m: typeof ref, tokens: number[], logits: 'all' | 'last', rounded: boolean) => {
      bf16Kv = rounded;
      try {
        return (await m.step({ sequences: [{ seq: 1, tokens, logits }] })).sequences[0].logits;
      } finally {
        bf16Kv = false;
      }
    };
    const V = fp.spec.vocabSize;
    const a = await step(ref, FP8_PROMPT, 'all', false);
    pageCalls = 0;
    const b = await step(dev, FP8_PROMPT, 'all', true);
    expect(pageCalls, 'the CPU model writes its KV rows through KvPagePool.page').toBeGreaterThan(0);
    const prefill = relError(b, a);
    let next = argmax(a.subarray((FP8_PROMPT.length - 1) * V));
    let decode = 0;
    for (let i = 0; i < FP8_DECODE_STEPS; i++) {
      const c = await step(ref, [next], 'last', false);
      const g = await step(dev, [next], 'last', true);
      decode = Math.max(decode, relError(g, c));
      next = argmax(c);
    }
    await ref.dispose();
    await dev.dispose();
    return { prefill, decode };
  } finally {
    await w.close();
  }
}

describe('FP8 CUDA model cases against the bf16 KV cache (no GPU needed)', () => {
  // Three quarters of the GPU test's 1e-2: room for the kernels' own rounding, none for a flip.
  const LIMIT = 7.5e-3;
  it.each(FP8_MODEL_CASES)('%s, blocks %j: bf16 K/V alone stays within 7.5e-3 of float32', async (name, block) => {
    const e = await kvRoundingError(name, block);
    console.log(`[fp8 cases] ${name} ${block.join('x')}: bf16 KV vs float32 KV prefill ${e.prefill.toExponential(2)}, decode ${e.decode.toExponential(2)}`);
    expect(e.prefill).toBeGreaterThan(0);
    expect(e.prefill).toBeLessThanOrEqual(LIMIT);
    expect(e.decode).toBeLessThanOrEqual(LIMIT);
  });

  it('flags qwen3_moe_fused in 32x32 blocks, which failed on the H100 with a 2.99e-2 prefill error', async () => {
    const e = await kvRoundingError('qwen3_moe_fused', [32, 32]);
    console.log(`[fp8 cases] qwen3_moe_fused 32x32: bf16 KV vs float32 KV prefill ${e.prefill.toExponential(2)} (near-tie)`);
    expect(e.prefill).toBeGreaterThan(1e-2);
  });
});
