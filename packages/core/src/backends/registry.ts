import { createRequire } from 'node:module';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { MoeflashError } from '../errors.js';
import type { Backend } from './backend.js';
import { CpuBackend } from './cpu/cpu-backend.js';

/** Backend names createEngine accepts, or a Backend object of your own. */
export type BackendChoice = 'auto' | 'cpu' | 'cuda' | Backend;

interface CudaModule {
  createCudaBackend(): Backend;
  isCudaAvailable(): { ok: true } | { ok: false; reason: string };
}

/**
 * The optional packages (@moeflash/cuda-backend, @moeflash/speculative) depend on core, so core
 * finds them at run time: from core itself when an application installed both, else from the
 * working directory. Returns the module, or why it could not be loaded.
 */
export async function importOptional<T>(id: string): Promise<T | string> {
  try {
    return (await import(/* @vite-ignore */ id)) as T;
  } catch {
    try {
      const req = createRequire(path.join(process.cwd(), 'package.json'));
      return (await import(/* @vite-ignore */ pathToFileURL(req.resolve(id)).href)) as T;
    } catch (e) {
      return `the package ${id} is not installed or failed to load (${(e as Error).message.split('\n')[0]}); add it with \`pnpm add ${id}\``;
    }
  }
}

/**
 * Picks the backend: `cuda` must work or fail with the reason; `auto` falls back to the CPU with
 * one log line saying why.
 */
export async function resolveBackend(choice: BackendChoice, log: (line: string) => void = console.warn): Promise<Backend> {
  if (typeof choice === 'object') return choice;
  if (choice === 'cpu') return new CpuBackend();
  if (choice !== 'cuda' && choice !== 'auto') {
    throw new MoeflashError('INVALID_ARGUMENT', `unknown backend '${String(choice)}'; use 'auto', 'cpu', 'cuda' or a Backend object`);
  }
  const mod = await importOptional<CudaModule>('@moeflash/cuda-backend');
  let reason: string;
  if (typeof mod === 'string') reason = mod;
  else if (typeof mod.isCudaAvailable !== 'function') reason = '@moeflash/cuda-backend does not export isCudaAvailable (a mismatched version?)';
  else {
    const avail = mod.isCudaAvailable();
    if (avail.ok) return mod.createCudaBackend();
    reason = avail.reason;
  }
  if (choice === 'cuda') throw new MoeflashError('BACKEND_UNAVAILABLE', `backend 'cuda' is unavailable: ${reason}`);
  log(`moeflash: using the CPU backend (CUDA unavailable: ${reason})`);
  return new CpuBackend();
}
