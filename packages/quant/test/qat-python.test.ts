/**
 * Runs tools/qat/test_bit_identity.py on the CPU when a Python with PyTorch is at hand (set PYTHON
 * to choose one); skipped, with a note, otherwise. The GPU host runs the same script with CUDA.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';

const script = path.resolve(__dirname, '../../../tools/qat/test_bit_identity.py');

function findPython(): string | null {
  const candidates = [process.env.PYTHON, 'python3', '/usr/bin/python3'].filter((p): p is string => !!p);
  for (const py of candidates) {
    const r = spawnSync(py, ['-c', 'import torch'], { encoding: 'utf8', timeout: 60_000 });
    if (r.status === 0) return py;
  }
  return null;
}

const python = findPython();
if (!python) console.log('qat-python: skipped, no Python with PyTorch found (set PYTHON to one)');

describe.skipIf(!python)('QAT fake-quant in PyTorch', () => {
  it('is bit-identical to the encoder on the CPU, and its export matches the converter', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moeflash-qat-'));
    try {
      const out = path.join(dir, 'result.json');
      const r = spawnSync(python!, [script, out, '--devices', 'cpu'], { encoding: 'utf8', timeout: 120_000 });
      const result = fs.existsSync(out) ? JSON.parse(fs.readFileSync(out, 'utf8')) : null;
      expect(result, `no result from ${script}:\n${r.stdout}\n${r.stderr}`).not.toBeNull();
      console.log(`qat-python: torch ${result.torch}: ${r.stdout.trim().split('\n').join('; ')}`);
      expect(result.devices.cpu.ok, JSON.stringify(result.devices.cpu.checks.filter((c: { count: number }) => c.count !== 0))).toBe(true);
      expect(result.export.ok).toBe(true);
      expect(result.ok, r.stdout + r.stderr).toBe(true);
      expect(r.status).toBe(0);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
