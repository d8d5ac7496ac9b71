#!/usr/bin/env node
// The package's install hook: compile the CUDA addon only when nothing usable is there.
//
//   1. The platform package (@moeflash/cuda-backend-linux-x64, an optional dependency) holds a
//      prebuilt addon from these very sources: nothing to do.
//   2. build/Release/moeflash_cuda.node is stamped with these sources' hash: nothing to do.
//   3. Otherwise build from source (about 2 minutes of nvcc for every kernel, less for the
//      stale ones). Without nvcc, or when the build fails, say so and succeed: the CPU backend
//      needs none of this.
//
// MOEFLASH_CUDA_BUILD chooses: `auto` (the default, as above), `source` (always build from source;
// a failure fails the install), `never` (never compile: the prebuilt addon or none).
import { rmSync } from 'node:fs';

import { cudaHome } from './build-kernels.mjs';
import { LOCAL_ADDON, PREBUILT_PACKAGE, buildFromSource, findPrebuilt, manifestPath, readManifest, sourceHash } from './build-native.mjs';

const say = (line) => console.log(`moeflash: ${line}`);
const mode = process.env.MOEFLASH_CUDA_BUILD || 'auto';
if (!['auto', 'source', 'never'].includes(mode)) {
  console.error(`moeflash: MOEFLASH_CUDA_BUILD=${mode} is not one of auto, source, never`);
  process.exit(1);
}

const hash = sourceHash();
const prebuilt = findPrebuilt();
const local = readManifest(LOCAL_ADDON);
const prebuiltMatches = prebuilt?.manifest?.sourceHash === hash;

let why;
if (mode === 'never') {
  say(
    prebuilt
      ? `MOEFLASH_CUDA_BUILD=never: the CUDA addon is the prebuilt one from ${PREBUILT_PACKAGE}${prebuiltMatches ? '' : ' (built from other sources than this package holds)'}`
      : `MOEFLASH_CUDA_BUILD=never and no prebuilt addon (${PREBUILT_PACKAGE} is not installed): the CUDA backend is off, the CPU backend works`,
  );
  process.exit(0);
} else if (mode === 'source') {
  why = 'MOEFLASH_CUDA_BUILD=source';
} else if (prebuiltMatches) {
  say(`using the prebuilt CUDA addon from ${PREBUILT_PACKAGE} (no compile needed)`);
  process.exit(0);
} else if (local?.sourceHash === hash) {
  say('the CUDA addon is up to date with its sources (no compile needed)');
  process.exit(0);
} else {
  why = local
    ? 'the kernel or addon sources changed since the last build'
    : prebuilt
      ? `the prebuilt addon in ${PREBUILT_PACKAGE} is from other sources than this package holds`
      : 'no prebuilt addon for this platform and no local build';
}

if (!cudaHome()) {
  if (mode === 'source') {
    console.error('moeflash: MOEFLASH_CUDA_BUILD=source but nvcc was not found: install the CUDA toolkit or set CUDA_HOME');
    process.exit(1);
  }
  say(
    prebuilt
      ? `${why}, and there is no nvcc to build it: the prebuilt addon will be used if its ABI matches`
      : `CUDA addon not built (${why}; no nvcc: install the CUDA toolkit or set CUDA_HOME to build it); the CPU backend still works`,
  );
  process.exit(0);
}

say(`building the CUDA addon from source (${why})`);
const t0 = Date.now();
try {
  const m = await buildFromSource();
  say(`CUDA addon built in ${((Date.now() - t0) / 1000).toFixed(0)} s (ABI ${m.abiVersion}, nvcc ${m.nvcc})`);
} catch (e) {
  // A failed build leaves no addon behind (as `node-gyp rebuild` did): nothing half-built loads,
  // and CI, which checks for the file, rebuilds it with the errors shown.
  rmSync(LOCAL_ADDON, { force: true });
  rmSync(manifestPath(LOCAL_ADDON), { force: true });
  if (mode === 'source') {
    console.error(`moeflash: CUDA addon build failed: ${e.message}`);
    process.exit(1);
  }
  say(`CUDA addon not built (${e.message}); the CPU backend still works. To see the errors: \`pnpm --filter @moeflash/cuda-backend build:native\` in the repository, \`MOEFLASH_CUDA_BUILD=source npm rebuild @moeflash/cuda-backend\` in an application`);
}
