import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { synthesizeModel } from '@moeflash/core';

/** Tiny shapes of each family, small enough for many CPU steps in a test. */
export const TINY: Record<string, { preset: string; overrides: Record<string, unknown> }> = {
  qwen3_moe: { preset: 'tiny-demo', overrides: { num_hidden_layers: 2, mlp_only_layers: [1], intermediate_size: 64 } },
  gpt_oss: {
    preset: 'gpt-oss-20b',
    overrides: {
      vocab_size: 512, hidden_size: 64, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
      num_key_value_heads: 2, head_dim: 16, num_local_experts: 4, sliding_window: 4,
      layer_types: ['sliding_attention', 'full_attention'], eos_token_id: 511, pad_token_id: 509,
    },
  },
};

export const repoRoot = path.resolve(__dirname, '../../..');

/** Writes a tiny random model of a family into a temp folder, with the demo tokenizer files. */
export async function tinyModel(family: keyof typeof TINY, seed = 7): Promise<string> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `moeflash-${family}-`));
  await synthesizeModel({ preset: TINY[family].preset, overrides: TINY[family].overrides, out: dir, seed });
  for (const f of ['tokenizer.json', 'tokenizer_config.json', 'generation_config.json']) {
    const src = path.join(repoRoot, 'packages', 'core', 'test', 'fixtures', 'demo-tokenizer', f);
    if (fs.existsSync(src)) fs.copyFileSync(src, path.join(dir, f));
  }
  return dir;
}
