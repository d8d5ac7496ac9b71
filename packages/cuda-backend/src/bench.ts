/** Device measurements the model benchmark reports next to its own numbers. */
import { loadAddon } from './native.js';

/**
 * Device-to-device copy bandwidth in bytes per second (bytes read plus bytes written over the
 * median time of `iters` copies of `bytes`): the ceiling a memory-bound step is compared with.
 */
export function measureCopyBandwidth(bytes = 1 << 30, iters = 20): number {
  const times = Array.from(loadAddon().bench.copy(bytes, iters)).sort((a, b) => a - b);
  const ms = times[times.length >> 1];
  return (2 * bytes) / (ms / 1e3);
}

/** Free and total memory of the current device, in bytes. */
export function deviceMemory(): { free: number; total: number } {
  return loadAddon().memInfo();
}
