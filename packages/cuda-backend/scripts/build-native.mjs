#!/usr/bin/env node
// Builds the CUDA addon from source and stamps it with the hash of the sources it was built from.
//
//   node scripts/build-native.mjs      kernels (stale ones only), then the addon; fails on any error
//                                      (`pnpm --filter @moeflash/cuda-backend build:native`)
//
// The stamp is build/Release/moeflash_cuda.json beside the addon (the same manifest the platform
// package carries beside its prebuilt copy): install.mjs compares its sourceHash with the sources
// to decide whether anything must be compiled, and src/native.ts with the prebuilt's to decide
// which addon to load. The sources are kernels/*, native/*, binding.gyp and build-kernels.mjs.
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { cudaHome } from './build-kernels.mjs';

export const PKG_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
export const PKG = JSON.parse(readFileSync(join(PKG_ROOT, 'package.json'), 'utf8'));
/** Where node-gyp puts the addon, and its stamp. */
export const LOCAL_ADDON = join(PKG_ROOT, 'build', 'Release', 'moeflash_cuda.node');
/** The package that ships the addon prebuilt for this host (an optional dependency). */
export const PREBUILT_PACKAGE = `${PKG.name}-${process.platform}-${process.arch}`;

/** The manifest beside an addon file (moeflash_cuda.node -> moeflash_cuda.json), or null. */
export const manifestPath = (addon) => addon.replace(/\.node$/, '.json');
export function readManifest(addon) {
  try {
    return JSON.parse(readFileSync(manifestPath(addon), 'utf8'));
  } catch {
    return null;
  }
}

/** sha256 over every file the addon is compiled from (relative path and content, sorted). */
export function sourceHash(root = PKG_ROOT) {
  const files = ['binding.gyp', 'scripts/build-kernels.mjs'];
  for (const dir of ['kernels', 'native']) {
    for (const f of readdirSync(join(root, dir))) if (statSync(join(root, dir, f)).isFile()) files.push(`${dir}/${f}`);
  }
  const h = createHash('sha256');
  for (const f of files.sort()) {
    const bytes = readFileSync(join(root, f));
    h.update(`${f}\0${bytes.length}\0`);
    h.update(bytes);
  }
  return h.digest('hex');
}

/** The prebuilt addon of the platform package when it is installed: { path, manifest } or null. */
export function findPrebuilt() {
  try {
    const dir = dirname(createRequire(join(PKG_ROOT, 'package.json')).resolve(`${PREBUILT_PACKAGE}/package.json`));
    const path = join(dir, 'moeflash_cuda.node');
    return existsSync(path) ? { path, manifest: readManifest(path) } : null;
  } catch {
    return null;
  }
}

/** node-gyp: the devDependency in the repository, else the one the package manager runs scripts with, else PATH's. */
function nodeGyp() {
  try {
    return [process.execPath, createRequire(join(PKG_ROOT, 'package.json')).resolve('node-gyp/bin/node-gyp.js')];
  } catch {
    const fromPm = process.env.npm_config_node_gyp;
    return fromPm && existsSync(fromPm) ? [process.execPath, fromPm] : ['node-gyp'];
  }
}

function run(cmd, args) {
  return new Promise((res, rej) => {
    const child = spawn(cmd, args, { cwd: PKG_ROOT, stdio: ['ignore', 'inherit', 'inherit'] });
    child.on('error', rej);
    child.on('close', (code) => (code === 0 ? res() : rej(new Error(`${[cmd, ...args].join(' ')} exited with ${code}`))));
  });
}

/** "13.0.88" from `nvcc --version`, or null. */
function nvccVersion(home) {
  try {
    return /V(\d+\.\d+\.\d+)/.exec(execFileSync(join(home, 'bin', 'nvcc'), ['--version'], { encoding: 'utf8' }))?.[1] ?? null;
  } catch {
    return null;
  }
}

/** The ABI version the addon reports, read in a child process (loading it needs no driver). */
export function addonAbi(addon) {
  const out = execFileSync(process.execPath, ['-e', `process.stdout.write(String(require(${JSON.stringify(addon)}).abiVersion))`], {
    encoding: 'utf8',
  });
  return Number(out);
}

/**
 * Compiles the kernels and the addon (stale parts only: build-kernels.mjs and make skip what is
 * up to date), checks that the addon loads, and writes its stamp. Throws on any failure, with the
 * stamp removed so that the next install tries again.
 */
export async function buildFromSource() {
  const home = cudaHome();
  if (!home) throw new Error('nvcc not found: install the CUDA toolkit or set CUDA_HOME (it must hold bin/nvcc)');
  const hash = sourceHash();
  rmSync(manifestPath(LOCAL_ADDON), { force: true });
  const [gyp, ...gypArgs] = nodeGyp();
  await run(gyp, [...gypArgs, 'configure']);
  await run(process.execPath, ['scripts/build-kernels.mjs', 'build/kernels']);
  await run(gyp, [...gypArgs, 'build', '--jobs', 'max']);
  const manifest = {
    package: PKG.name,
    version: PKG.version,
    abiVersion: addonAbi(LOCAL_ADDON),
    sourceHash: hash,
    platform: process.platform,
    arch: process.arch,
    nvcc: nvccVersion(home),
    builtAt: new Date().toISOString(),
  };
  writeFileSync(manifestPath(LOCAL_ADDON), `${JSON.stringify(manifest, null, 2)}\n`);
  return manifest;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const t0 = Date.now();
  buildFromSource().then(
    (m) => console.log(`moeflash: CUDA addon built from source in ${((Date.now() - t0) / 1000).toFixed(0)} s (ABI ${m.abiVersion}, nvcc ${m.nvcc}, sources ${m.sourceHash.slice(0, 12)})`),
    (e) => {
      console.error(`moeflash: CUDA addon build failed: ${e.message}`);
      process.exit(1);
    },
  );
}
