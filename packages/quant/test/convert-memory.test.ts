/**
 * The converter's memory stays bounded: a ~270 MB checkpoint whose largest tensor (a fused expert
 * tensor) is 151 MB of bf16 converts in a child process whose V8 heap is capped at 64 MB, and the
 * child's resident memory grows by far less than that one tensor (a converter that held a whole
 * tensor, let alone its float32 decoding, could not stay under it).
 *
 * The child runs the built package (packages/quant/dist), as `pnpm test` builds before it runs
 * vitest; without a build the test is skipped with a note.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { synthesizeModel } from '@moeflash/core';
import { tempDir } from './models.js';

const pkg = path.resolve(__dirname, '..');
const dist = path.join(pkg, 'dist', 'index.js');
const built = fs.existsSync(dist);
const HEAP_MB = 64;

function newestSource(dir: string): number {
  let newest = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    newest = Math.max(newest, e.isDirectory() ? newestSource(p) : fs.statSync(p).mtimeMs);
  }
  return newest;
}

if (!built) {
  console.log(`convert-memory: skipped, ${dist} is absent; run \`pnpm build\` first (\`pnpm test\` does)`);
} else if (newestSource(path.join(pkg, 'src')) > fs.statSync(dist).mtimeMs) {
  console.log(`convert-memory: note: ${dist} is older than packages/quant/src; this test runs the build, so rebuild to test your changes`);
}

const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

describe.skipIf(!built)('converter memory', () => {
  it(`converts a 270 MB checkpoint with a ${HEAP_MB} MB heap and bounded resident memory`, async () => {
    const root = tempDir('memory');
    dirs.push(root);
    const input = path.join(root, 'in');
    const { bytes, spec } = await synthesizeModel({
      preset: 'qwen3-30b-a3b',
      out: input,
      seed: 3,
      overrides: { num_hidden_layers: 1, num_experts: 24, vocab_size: 1024 },
    });
    const largest = spec.moe.numExperts * 2 * spec.moe.intermediateSize * spec.hiddenSize * 2;
    expect(largest).toBeGreaterThan(150e6);
    expect(bytes).toBeGreaterThan(250e6);

    const output = path.join(root, 'out');
    const r = spawnSync(process.execPath, [`--max-old-space-size=${HEAP_MB}`, path.join(__dirname, 'convert-child.mjs'), input, output, 'fp8'], {
      encoding: 'utf8',
      timeout: 60_000,
    });
    expect(r.status, `child failed:\n${r.stderr}`).toBe(0);
    const stats = JSON.parse(r.stdout.trim().split('\n').pop()!) as {
      inputBytes: number;
      maxRssBytes: number;
      rssBeforeBytes: number;
      peakHeapBytes: number;
    };
    expect(stats.inputBytes).toBe(bytes);
    expect(fs.existsSync(path.join(output, 'model.safetensors'))).toBe(true);
    const growth = stats.maxRssBytes - stats.rssBeforeBytes;
    console.log(
      `convert-memory: ${(bytes / 1e6).toFixed(0)} MB checkpoint, largest tensor ${(largest / 1e6).toFixed(0)} MB: ` +
        `resident memory grew ${(growth / 1e6).toFixed(0)} MB, peak heap ${(stats.peakHeapBytes / 1e6).toFixed(0)} MB`,
    );
    // Streaming keeps a few 4 MB bands; V8 lets dead array buffers pile up to ~64 MB before it
    // collects them, so growth is 50-90 MB. Holding the largest tensor alone would exceed this.
    expect(growth).toBeLessThan(largest * 0.9);
  });
});
