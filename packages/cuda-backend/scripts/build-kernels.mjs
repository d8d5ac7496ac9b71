#!/usr/bin/env node
// Compiles kernels/*.cu with nvcc into one static archive that binding.gyp links into the addon.
//
// node-gyp runs make with one job unless told otherwise, and nvcc spends most of its time in
// ptxas, so this script runs one nvcc per file in parallel and skips files whose object is newer
// than the file and every header it can include. Used as a gyp action:
//   node scripts/build-kernels.mjs <out-dir> [stamp]  build <out-dir>/libmoeflash_kernels.a, and
//                                                     rewrite the stamp source when it changes
//   node scripts/build-kernels.mjs --cuda-home        print the CUDA toolkit folder (for gyp)
//   node scripts/build-kernels.mjs --stamp <file>     create the stamp source if missing (for gyp)
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const pkgRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const kernelsDir = join(pkgRoot, 'kernels');

export function cudaHome() {
  for (const c of [process.env.CUDA_HOME, process.env.CUDA_PATH, '/usr/local/cuda']) {
    if (c && existsSync(join(c, 'bin', 'nvcc'))) return c;
  }
  return null;
}

export const NVCC_FLAGS = [
  '-O3',
  '-std=c++17',
  '-gencode=arch=compute_90a,code=sm_90a',
  '-gencode=arch=compute_90,code=compute_90',
  '-Xcompiler',
  '-fPIC',
  '--expt-relaxed-constexpr',
  // Launch bounds and register use are tuned by reading this report; keep it in the build log.
  ...(process.env.MOEFLASH_PTXAS_VERBOSE ? ['-Xptxas', '-v'] : []),
];

function run(cmd, args) {
  return new Promise((res, rej) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'inherit', 'inherit'] });
    child.on('error', rej);
    child.on('close', (code) => (code === 0 ? res() : rej(new Error(`${cmd} exited with ${code}: ${args.join(' ')}`))));
  });
}

async function main() {
  const arg = process.argv[2];
  const home = cudaHome();
  if (arg === '--cuda-home') {
    if (!home) {
      console.error('moeflash: nvcc not found; set CUDA_HOME to the CUDA toolkit folder (it must hold bin/nvcc)');
      process.exit(1);
    }
    process.stdout.write(home);
    return;
  }
  if (arg === '--stamp') {
    // binding.gyp, at configure time: make sure the stamp source exists, print its path.
    const rel = process.argv[3];
    const file = resolve(pkgRoot, rel);
    mkdirSync(dirname(file), { recursive: true });
    if (!existsSync(file)) writeFileSync(file, '// Rewritten when libmoeflash_kernels.a changes: a new archive means a new link.\n');
    process.stdout.write(rel);
    return;
  }
  if (!arg) throw new Error('usage: build-kernels.mjs <out-dir> [stamp] | --cuda-home | --stamp <file>');
  if (!home) throw new Error('nvcc not found: install the CUDA toolkit or set CUDA_HOME (it must hold bin/nvcc)');
  const nvcc = join(home, 'bin', 'nvcc');
  const outDir = resolve(arg);
  mkdirSync(outDir, { recursive: true });

  const sources = readdirSync(kernelsDir).filter((f) => f.endsWith('.cu')).sort();
  const headers = readdirSync(kernelsDir).filter((f) => f.endsWith('.cuh') || f.endsWith('.h'));
  const newestHeader = Math.max(0, ...headers.map((h) => statSync(join(kernelsDir, h)).mtimeMs), statSync(fileURLToPath(import.meta.url)).mtimeMs);
  const objects = sources.map((s) => join(outDir, s.replace(/\.cu$/, '.o')));

  const stale = sources
    .map((s, i) => ({ src: join(kernelsDir, s), obj: objects[i] }))
    .filter(({ src, obj }) => !existsSync(obj) || statSync(obj).mtimeMs < Math.max(statSync(src).mtimeMs, newestHeader));

  const jobs = Math.max(1, Number(process.env.JOBS) || cpus().length);
  let next = 0;
  const worker = async () => {
    while (next < stale.length) {
      const { src, obj } = stale[next++];
      const t0 = Date.now();
      await run(nvcc, [...NVCC_FLAGS, '-I', kernelsDir, '-c', src, '-o', obj]);
      console.log(`  nvcc ${src.slice(pkgRoot.length + 1)} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
    }
  };
  await Promise.all(Array.from({ length: Math.min(jobs, stale.length) }, worker));

  const archive = join(outDir, 'libmoeflash_kernels.a');
  if (stale.length > 0 || !existsSync(archive)) {
    await run('rm', ['-f', archive]);
    await run('ar', ['rcs', archive, ...objects]);
  }
  // The addon compiles this file (binding.gyp), so a new archive means a new link.
  const stamp = resolve(pkgRoot, process.argv[3] ?? join(outDir, 'kernels_stamp.cc'));
  const archiveTime = statSync(archive).mtimeMs;
  if (!existsSync(stamp) || statSync(stamp).mtimeMs <= archiveTime)
    writeFileSync(stamp, `// Written when libmoeflash_kernels.a changes (${new Date(archiveTime).toISOString()}): a new archive means a new link.\n`);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  main().catch((e) => {
    console.error(`moeflash: kernel build failed: ${e.message}`);
    process.exit(1);
  });
}
