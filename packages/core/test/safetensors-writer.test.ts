import { access, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MoeflashError, type ErrorCode } from '../src/errors.js';
import { openWeights } from '../src/weights/safetensors.js';
import { createSafetensorsWriter, layoutSafetensors, writeSafetensors } from '../src/weights/safetensors-writer.js';

let dir: string;
let n = 0;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'moeflash-stw-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});
const file = () => join(dir, `out${n++}.safetensors`);
const exists = (p: string) => access(p).then(() => true, () => false);

async function expectError(p: Promise<unknown>, code: ErrorCode, ...parts: (string | RegExp)[]): Promise<void> {
  const e = await p.then(() => undefined, (err: unknown) => err);
  expect(e).toBeInstanceOf(MoeflashError);
  expect((e as MoeflashError).code).toBe(code);
  for (const part of parts) expect((e as MoeflashError).message).toMatch(part);
}

describe('layoutSafetensors', () => {
  it('writes the reference header: metadata first, declared order, space padding to 8 bytes', () => {
    const { prefix, offsets, dataBytes } = layoutSafetensors(
      [
        { name: 'b', dtype: 'F32', shape: [2] },
        { name: '0', dtype: 'BF16', shape: [3] },
      ],
      { format: 'pt' },
    );
    const json = '{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"0":{"dtype":"BF16","shape":[3],"data_offsets":[8,14]}}';
    const padded = json + ' '.repeat((8 - (json.length % 8)) % 8);
    expect(Number(new DataView(prefix.buffer).getBigUint64(0, true))).toBe(padded.length);
    expect(new TextDecoder().decode(prefix.subarray(8))).toBe(padded);
    expect(prefix.length % 8).toBe(0);
    expect(offsets.get('0')).toEqual([8, 14]);
    expect(dataBytes).toBe(14);
  });

  it('rejects bad declarations', () => {
    expect(() => layoutSafetensors([{ name: 'a', dtype: 'U8', shape: [1] }, { name: 'a', dtype: 'U8', shape: [1] }])).toThrow(/declared twice/);
    expect(() => layoutSafetensors([{ name: 'a', dtype: 'Q4' as 'U8', shape: [1] }])).toThrow(/unknown dtype/);
    expect(() => layoutSafetensors([{ name: 'a', dtype: 'U8', shape: [-1] }])).toThrow(/shape/);
    expect(() => layoutSafetensors([{ name: '__metadata__', dtype: 'U8', shape: [1] }])).toThrow(/name/);
  });
});

describe('createSafetensorsWriter', () => {
  it('takes tensors in any order and in chunks, and only then creates the file', async () => {
    const path = file();
    const w = await createSafetensorsWriter(path, [
      { name: 'first', dtype: 'U8', shape: [4] },
      { name: 'second', dtype: 'F32', shape: [2] },
    ]);
    expect(await exists(`${path}.partial`)).toBe(true);
    await w.write('second', new Uint8Array(new Float32Array([0.5, -1]).buffer));
    await Promise.all([w.write('first', new Uint8Array([1, 2])), w.write('first', new Uint8Array([3, 4]))]);
    expect(await exists(path)).toBe(false);
    await w.close();
    expect(await exists(`${path}.partial`)).toBe(false);
    const r = await openWeights(path);
    expect([...(await r.read('first'))]).toEqual([1, 2, 3, 4]);
    expect([...(await r.readFloat32('second'))]).toEqual([0.5, -1]);
    // Declared order is file order.
    expect(r.info('first').offset).toBeLessThan(r.info('second').offset);
    await r.close();
    await w.close(); // a second close is harmless
  });

  it('close() refuses while a tensor is missing or short, leaving no final file', async () => {
    const path = file();
    const w = await createSafetensorsWriter(path, [
      { name: 'a', dtype: 'U8', shape: [2] },
      { name: 'b', dtype: 'U8', shape: [3] },
    ]);
    await w.write('b', new Uint8Array([1]));
    await expectError(w.close(), 'INVALID_ARGUMENT', path, /'a' \(0 of 2 bytes\)/, /'b' \(1 of 3 bytes\)/);
    expect(await exists(path)).toBe(false);
    // Still usable: finish the tensors and close again.
    await w.write('a', new Uint8Array([9, 9]));
    await w.write('b', new Uint8Array([2, 3]));
    await w.close();
    expect(await exists(path)).toBe(true);
  });

  it('abort() deletes the partial file', async () => {
    const path = file();
    const w = await createSafetensorsWriter(path, [{ name: 'a', dtype: 'U8', shape: [2] }]);
    await w.write('a', new Uint8Array([1, 2]));
    await w.abort();
    expect(await exists(`${path}.partial`)).toBe(false);
    expect(await exists(path)).toBe(false);
    await expectError(w.write('a', new Uint8Array([1])), 'CLOSED', path);
    await w.abort();
  });

  it('refuses undeclared names, overruns, and writes after close', async () => {
    const path = file();
    const w = await createSafetensorsWriter(path, [{ name: 'a', dtype: 'F32', shape: [1] }]);
    await expectError(w.write('z', new Uint8Array(4)), 'INVALID_ARGUMENT', "'z'", /not declared/);
    await expectError(w.write('a', new Uint8Array(8)), 'INVALID_ARGUMENT', "'a'", /F32 \[1\] = 4 bytes/);
    await w.write('a', new Uint8Array(4));
    await w.close();
    await expectError(w.write('a', new Uint8Array(4)), 'CLOSED', path);
  });

  it('writes a file with no tensors', async () => {
    const path = file();
    await writeSafetensors(path, {}, { note: 'empty' });
    const r = await openWeights(path);
    expect(r.names()).toEqual([]);
    expect(r.metadata).toEqual({ note: 'empty' });
    await r.close();
  });
});

describe('writeSafetensors', () => {
  it('checks data lengths before creating anything', async () => {
    const path = file();
    await expectError(
      writeSafetensors(path, { w: { dtype: 'BF16', shape: [4], data: new Float32Array(4) } }),
      'INVALID_ARGUMENT',
      "'w'",
      /8 bytes/,
      /16 bytes/,
    );
    expect(await exists(path)).toBe(false);
    expect(await exists(`${path}.partial`)).toBe(false);
  });

  it('writes typed arrays as little-endian elements', async () => {
    const path = file();
    await writeSafetensors(path, {
      f: { dtype: 'F32', shape: [2], data: new Float32Array([1, 2]) },
      i: { dtype: 'I32', shape: [1], data: new Int32Array([-1]) },
    });
    const bytes = await readFile(path);
    expect([...bytes.subarray(bytes.length - 12)]).toEqual([0, 0, 0x80, 0x3f, 0, 0, 0, 0x40, 0xff, 0xff, 0xff, 0xff]);
  });
});
