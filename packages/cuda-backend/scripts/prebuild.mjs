#!/usr/bin/env node
// Builds the CUDA addon from source and places it into the platform package, ready to pack:
//
//   node scripts/prebuild.mjs     (`pnpm --filter @moeflash/cuda-backend build:prebuilt`)
//
// writes packages/cuda-backend-<platform>-<arch>/moeflash_cuda.node and moeflash_cuda.json (the
// build's manifest: version, ABI, hash of the sources, nvcc, the newest glibc symbol it needs).
// Neither file is committed (the addon is ~10 MB); `pnpm pack` / `pnpm publish` of the platform
// package takes them. The kernels compile as in any build (stale objects only).
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

import { LOCAL_ADDON, PKG, PKG_ROOT, PREBUILT_PACKAGE, buildFromSource } from './build-native.mjs';

const dir = join(PKG_ROOT, '..', PREBUILT_PACKAGE.split('/')[1]);
const fail = (msg) => {
  console.error(`moeflash: ${msg}`);
  process.exit(1);
};
if (!existsSync(join(dir, 'package.json'))) fail(`no platform package for ${process.platform}-${process.arch} at ${dir}`);
const platformPkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8'));
if (platformPkg.name !== PREBUILT_PACKAGE) fail(`${dir}/package.json names ${platformPkg.name}, expected ${PREBUILT_PACKAGE}`);
if (platformPkg.version !== PKG.version) {
  fail(`${PREBUILT_PACKAGE} is at version ${platformPkg.version} and ${PKG.name} at ${PKG.version}: the two are released together, give them the same version`);
}

/** The newest GLIBC_x.y symbol version the addon imports (the oldest glibc it loads on). */
function glibcNeeded(file) {
  try {
    const versions = [...execFileSync('objdump', ['-T', file], { encoding: 'utf8', maxBuffer: 64 << 20 }).matchAll(/GLIBC_(\d+)\.(\d+)/g)].map((m) => [
      Number(m[1]),
      Number(m[2]),
    ]);
    versions.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    const v = versions.at(-1);
    return v ? `${v[0]}.${v[1]}` : null;
  } catch {
    return null; // no objdump: leave it out
  }
}

let manifest;
try {
  manifest = await buildFromSource();
} catch (e) {
  fail(`CUDA addon build failed: ${e.message}`);
}
const target = join(dir, 'moeflash_cuda.node');
copyFileSync(LOCAL_ADDON, target);
manifest = { ...manifest, package: PREBUILT_PACKAGE, glibc: glibcNeeded(target) };
writeFileSync(join(dir, 'moeflash_cuda.json'), `${JSON.stringify(manifest, null, 2)}\n`);
const mb = (statSync(target).size / 1e6).toFixed(1);
console.log(`moeflash: ${target} (${mb} MB, ABI ${manifest.abiVersion}, nvcc ${manifest.nvcc}, glibc >= ${manifest.glibc}, sources ${manifest.sourceHash.slice(0, 12)})`);
