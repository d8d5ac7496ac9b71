import { defineConfig } from 'vitest/config';
import { fileURLToPath } from 'node:url';

const src = (p: string) => fileURLToPath(new URL(`./packages/${p}/src/index.ts`, import.meta.url));

export default defineConfig({
  resolve: {
    alias: {
      '@moeflash/core': src('core'),
      '@moeflash/quant': src('quant'),
      '@moeflash/speculative': src('speculative'),
      '@moeflash/cuda-backend': src('cuda-backend'),
    },
  },
  test: {
    include: ['packages/*/test/**/*.test.ts', 'examples/*/test/**/*.test.ts'],
    testTimeout: 60_000,
    pool: 'forks',
  },
});
