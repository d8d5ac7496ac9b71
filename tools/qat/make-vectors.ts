/**
 * Writes the MXFP4 vectors that tools/qat/test_bit_identity.py checks the PyTorch fake-quant
 * against (packages/quant/test/vectors/mxfp4_*; what they hold: packages/quant/test/mxfp4-vectors.ts).
 * The vitest suite checks the committed files still match the encoder, so run this only after an
 * intended change to it. Either
 *   MOEFLASH_WRITE_VECTORS=1 npx vitest run packages/quant/test/mxfp4-vectors.test.ts
 * or, without vitest, from the repository root:
 *   ESBUILD=$(ls -d node_modules/.pnpm/esbuild@*\/node_modules/esbuild/bin/esbuild | head -1)
 *   $ESBUILD tools/qat/make-vectors.ts --bundle --platform=node --format=esm \
 *     --alias:@moeflash/core=./packages/core/src/index.ts --outfile=/tmp/make-vectors.mjs
 *   node /tmp/make-vectors.mjs [OUT_DIR]
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { makeMxfp4Vectors, vectorFiles } from '../../packages/quant/test/mxfp4-vectors.js';

const out = resolve(process.argv[2] ?? 'packages/quant/test/vectors');
mkdirSync(out, { recursive: true });
const files = vectorFiles(makeMxfp4Vectors());
for (const [name, bytes] of files) writeFileSync(join(out, name), bytes);
console.log(`wrote ${files.size} files to ${out}`);
