import { describe, expect, it } from 'vitest';
import { bytesPerToken, footprint, parseModelConfig, PRESETS } from '@moeflash/core';

describe('bandwidth model (DESIGN.md, "Performance model")', () => {
  const spec = parseModelConfig(PRESETS['gpt-oss-20b'].config, 'gpt-oss-20b/config.json');
  it('gpt-oss-20b: attention 0.64 G, routed experts 2.39 G, LM head 0.58 G parameters a token', () => {
    const f = footprint(spec);
    expect(f.attention / 1e9).toBeCloseTo(0.64, 2);
    expect(f.expertsPerToken / 1e9).toBeCloseTo(2.39, 1);
    expect(f.lmHead / 1e9).toBeCloseTo(0.58, 2);
  });
  it('bytes a token: 7.2 GB bf16, 3.7 GB MXFP4 experts, 2.5 GB MXFP4 + FP8', () => {
    expect(bytesPerToken(spec, 'bf16') / 1e9).toBeCloseTo(7.2, 1);
    expect(bytesPerToken(spec, 'mxfp4 experts + bf16') / 1e9).toBeCloseTo(3.7, 1);
    expect(bytesPerToken(spec, 'mxfp4 experts + fp8') / 1e9).toBeCloseTo(2.5, 1);
  });
});
