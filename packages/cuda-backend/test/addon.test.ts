/**
 * Runs everywhere, GPU or not: the addon builds where nvcc is installed, loads, and
 * isCudaAvailable() answers with a reason instead of crashing when CUDA cannot run.
 */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { ADDON_PATH, isCudaAvailable, loadAddon } from '../src/index.js';

function nvccPath(): string | null {
  for (const home of [process.env.CUDA_HOME, process.env.CUDA_PATH, '/usr/local/cuda']) {
    if (home && existsSync(join(home, 'bin', 'nvcc'))) return join(home, 'bin', 'nvcc');
  }
  try {
    return execFileSync('sh', ['-c', 'command -v nvcc'], { encoding: 'utf8' }).trim() || null;
  } catch {
    return null;
  }
}

const nvcc = nvccPath();
if (!nvcc) console.log('[cuda] no nvcc on this machine: the addon build check is skipped');

describe('CUDA addon', () => {
  it.skipIf(!nvcc)('is built by `pnpm --filter @moeflash/cuda-backend build:native`', () => {
    expect(existsSync(ADDON_PATH), `${ADDON_PATH} should exist after the native build`).toBe(true);
    const addon = loadAddon();
    expect(typeof addon.probe).toBe('function');
    expect(Object.keys(addon.ops)).toContain('gemvBf16');
  });

  it('isCudaAvailable() never throws and explains a negative answer', () => {
    const r = isCudaAvailable();
    if (r.ok) {
      console.log(`[cuda] available: ${r.devices.map((d) => `${d.name} ${d.computeCapability}`).join(', ')}`);
      expect(r.devices.length).toBeGreaterThan(0);
      for (const d of r.devices) {
        expect(d.name.length).toBeGreaterThan(0);
        expect(d.totalMemory).toBeGreaterThan(0);
        expect(d.multiprocessors).toBeGreaterThan(0);
        expect(d.computeCapability).toMatch(/^\d+\.\d+$/);
      }
      return;
    }
    console.log(`[cuda] not available: ${r.reason}`);
    if (existsSync(ADDON_PATH)) {
      // Built but no usable GPU: the reason names the driver or the device.
      expect(r.reason).toMatch(/driver|GPU|device/i);
    } else {
      expect(r.reason).toContain('pnpm --filter @moeflash/cuda-backend build:native');
      expect(r.reason).toContain('nvcc');
    }
  });
});
