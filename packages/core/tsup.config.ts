import { defineConfig } from 'tsup';
export default defineConfig({
  entry: ['src/index.ts', 'src/cli.ts'],
  format: ['esm'],
  dts: { entry: 'src/index.ts' },
  sourcemap: true,
  clean: true,
  target: 'node20',
  banner: ({ format }) => ({}),
  external: ['@moeflash/cuda-backend', '@moeflash/quant', '@moeflash/speculative'],
});
