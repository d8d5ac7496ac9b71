import type { LoadProgress } from '../backends/backend.js';

/** A one-line load progress bar on stderr (redrawn in place on a TTY, a few lines otherwise). */
export function progressBar(label = 'loading'): (p: LoadProgress) => void {
  const tty = process.stderr.isTTY;
  let lastPct = -1;
  return (p) => {
    const pct = p.totalBytes ? Math.floor((100 * p.loadedBytes) / p.totalBytes) : 100;
    if (pct === lastPct && p.loadedTensors !== p.totalTensors) return;
    if (!tty && pct < 100 && pct - lastPct < 25) return;
    lastPct = pct;
    const width = 30;
    const filled = Math.round((width * pct) / 100);
    const line = `${label} [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${pct}% ${fmtBytes(p.loadedBytes)}/${fmtBytes(p.totalBytes)} (${p.loadedTensors}/${p.totalTensors} tensors)`;
    process.stderr.write(tty ? `\r${line}` : `${line}\n`);
    if (tty && p.loadedTensors === p.totalTensors) process.stderr.write('\n');
  };
}

export function fmtBytes(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB`;
  return `${n} B`;
}
