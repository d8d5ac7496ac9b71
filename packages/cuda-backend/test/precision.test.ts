import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { loadModelSpec, parseModelConfig, PRESETS } from '@moeflash/core';
import { resolvePrecision } from '@moeflash/cuda-backend';

const coder = path.join(__dirname, '..', '..', '..', 'models', 'moeflash-tiny-coder');

describe('CUDA precision option', () => {
  const saved = process.env.MOEFLASH_CUDA_PRECISION;
  afterEach(() => {
    if (saved === undefined) delete process.env.MOEFLASH_CUDA_PRECISION;
    else process.env.MOEFLASH_CUDA_PRECISION = saved;
  });

  it('auto: f32 under 1 B parameters, bf16 from there on', async () => {
    delete process.env.MOEFLASH_CUDA_PRECISION;
    expect(resolvePrecision(await loadModelSpec(coder), undefined)).toBe('f32');
    const big = parseModelConfig(PRESETS['gpt-oss-20b'].config, 'gpt-oss-20b preset');
    expect(resolvePrecision(big, undefined)).toBe('bf16');
    expect(resolvePrecision(big, 'auto')).toBe('bf16');
    expect(resolvePrecision(big, 'f32')).toBe('f32');
  });

  it('reads MOEFLASH_CUDA_PRECISION when the option is unset, and names a bad value', async () => {
    const spec = await loadModelSpec(coder);
    process.env.MOEFLASH_CUDA_PRECISION = 'bf16';
    expect(resolvePrecision(spec, undefined)).toBe('bf16');
    expect(resolvePrecision(spec, 'f32')).toBe('f32');
    process.env.MOEFLASH_CUDA_PRECISION = 'fp16';
    expect(() => resolvePrecision(spec, undefined)).toThrow(/MOEFLASH_CUDA_PRECISION must be 'auto', 'bf16' or 'f32' \(got "fp16"\)/);
    expect(() => resolvePrecision(spec, 'half')).toThrow(/precision must be/);
  });
});
