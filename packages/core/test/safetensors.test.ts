import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MoeflashError, type ErrorCode } from '../src/errors.js';
import { listTensorInfos, openWeights, totalByteLength } from '../src/weights/safetensors.js';
import { writeSafetensors } from '../src/weights/safetensors-writer.js';
import type { DType } from '../src/weights/tensor.js';

let dir: string;
let n = 0;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'moeflash-st-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** A fresh folder inside the temp dir. */
async function subdir(): Promise<string> {
  return mkdtemp(join(dir, `case${n++}-`));
}

/** A file with a raw header (object or literal text) followed by `dataBytes` zero bytes. */
async function rawFile(header: unknown, dataBytes = 0, name = 'bad.safetensors'): Promise<string> {
  const path = join(await subdir(), name);
  const json = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  await writeFile(path, Buffer.concat([len, json, Buffer.alloc(dataBytes)]));
  return path;
}

async function expectError(p: Promise<unknown>, code: ErrorCode, ...parts: (string | RegExp)[]): Promise<MoeflashError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(MoeflashError);
  const e = err as MoeflashError;
  expect(e.code).toBe(code);
  for (const part of parts) expect(e.message).toMatch(part);
  return e;
}

const bytesOf = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

// One tensor per dtype, with bytes and the values they decode to.
const samples: Record<DType, { shape: number[]; data: Uint8Array; values: number[] }> = {
  BF16: { shape: [2, 2], data: bytesOf(new Uint16Array([0x3f80, 0xc000, 0x3e80, 0x0000])), values: [1, -2, 0.25, 0] },
  F16: { shape: [3], data: bytesOf(new Uint16Array([0x3c00, 0xc400, 0x0001])), values: [1, -4, 2 ** -24] },
  F32: { shape: [2], data: bytesOf(new Float32Array([1.5, -3.25])), values: [1.5, -3.25] },
  F64: { shape: [1, 2], data: bytesOf(new Float64Array([0.5, 1e10])), values: [0.5, Math.fround(1e10)] },
  F8_E4M3: { shape: [4], data: new Uint8Array([0x38, 0x7e, 0x01, 0xb8]), values: [1, 448, 2 ** -9, -1] },
  F8_E5M2: { shape: [3], data: new Uint8Array([0x3c, 0x7b, 0x01]), values: [1, 57344, 2 ** -16] },
  U8: { shape: [3], data: new Uint8Array([0, 7, 255]), values: [0, 7, 255] },
  I8: { shape: [2], data: new Uint8Array([0xff, 0x05]), values: [-1, 5] },
  I16: { shape: [2], data: bytesOf(new Int16Array([-1000, 1000])), values: [-1000, 1000] },
  I32: { shape: [2], data: bytesOf(new Int32Array([-70000, 3])), values: [-70000, 3] },
  I64: { shape: [2], data: bytesOf(new BigInt64Array([-9n, 1n << 40n])), values: [-9, 2 ** 40] },
  BOOL: { shape: [3], data: new Uint8Array([1, 0, 1]), values: [1, 0, 1] },
};

describe('round trip writer -> reader', () => {
  it('keeps bytes, shape, dtype and values of every dtype', async () => {
    const path = join(await subdir(), 'all.safetensors');
    const tensors = Object.fromEntries(
      Object.entries(samples).map(([d, s]) => [`t.${d}`, { dtype: d as DType, shape: s.shape, data: s.data }]),
    );
    await writeSafetensors(path, tensors, { format: 'pt' });
    const w = await openWeights(path);
    try {
      expect(w.origin).toBe(path);
      expect(w.metadata).toEqual({ format: 'pt' });
      expect(w.names()).toEqual(Object.keys(tensors));
      for (const [d, s] of Object.entries(samples)) {
        const name = `t.${d}`;
        const info = w.info(name);
        expect(info).toMatchObject({ name, dtype: d, shape: s.shape, file: path, byteLength: s.data.length });
        expect(info.offset % 1).toBe(0);
        expect(await w.read(name)).toEqual(s.data);
        expect([...(await w.readFloat32(name))]).toEqual(s.values);
      }
      expect(totalByteLength(w)).toBe(Object.values(samples).reduce((a, s) => a + s.data.length, 0));
      expect(listTensorInfos(w).map((t) => t.name)).toEqual(w.names());
    } finally {
      await w.close();
    }
  });

  it('handles scalars and empty tensors', async () => {
    const path = join(await subdir(), 'edge.safetensors');
    await writeSafetensors(path, {
      scalar: { dtype: 'F32', shape: [], data: new Float32Array([7]) },
      empty: { dtype: 'BF16', shape: [0, 4], data: new Uint8Array(0) },
      after: { dtype: 'I32', shape: [1], data: new Int32Array([-2]) },
    });
    const w = await openWeights(path);
    expect([...(await w.readFloat32('scalar'))]).toEqual([7]);
    expect((await w.read('empty')).length).toBe(0);
    expect([...(await w.readFloat32('after'))]).toEqual([-2]);
    await w.close();
  });
});

describe('folders', () => {
  it('opens a sharded checkpoint through model.safetensors.index.json', async () => {
    const d = await subdir();
    const s1 = 'model-00001-of-00002.safetensors';
    const s2 = 'model-00002-of-00002.safetensors';
    await writeSafetensors(join(d, s1), {
      'model.embed_tokens.weight': { dtype: 'F32', shape: [2, 2], data: new Float32Array([1, 2, 3, 4]) },
      'model.layers.0.mlp.gate.weight': { dtype: 'F32', shape: [1], data: new Float32Array([5]) },
    });
    await writeSafetensors(join(d, s2), {
      'lm_head.weight': { dtype: 'BF16', shape: [2], data: samples.BF16.data.subarray(0, 4) },
    });
    const weightMap = {
      'lm_head.weight': s2,
      'model.embed_tokens.weight': s1,
      'model.layers.0.mlp.gate.weight': s1,
    };
    await writeFile(join(d, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: 24 }, weight_map: weightMap }));
    const w = await openWeights(d);
    try {
      expect(w.origin).toBe(d);
      expect(w.names()).toEqual(Object.keys(weightMap));
      expect(w.info('lm_head.weight').file).toBe(join(d, s2));
      expect(w.info('model.embed_tokens.weight').file).toBe(join(d, s1));
      expect([...(await w.readFloat32('model.embed_tokens.weight'))]).toEqual([1, 2, 3, 4]);
      expect([...(await w.readFloat32('lm_head.weight'))]).toEqual([1, -2]);
      expect([...(await w.readFloat32('model.layers.0.mlp.gate.weight'))]).toEqual([5]);
      expect(totalByteLength(w)).toBe(24);
    } finally {
      await w.close();
    }
  });

  it('prefers model.safetensors, else reads every .safetensors file', async () => {
    const d = await subdir();
    await writeSafetensors(join(d, 'a.safetensors'), { a: { dtype: 'U8', shape: [1], data: new Uint8Array([1]) } });
    await writeSafetensors(join(d, 'b.safetensors'), { b: { dtype: 'U8', shape: [1], data: new Uint8Array([2]) } });
    const both = await openWeights(d);
    expect(both.names()).toEqual(['a', 'b']);
    expect([...(await both.read('b'))]).toEqual([2]);
    await both.close();

    await writeSafetensors(join(d, 'model.safetensors'), { m: { dtype: 'U8', shape: [1], data: new Uint8Array([3]) } });
    const single = await openWeights(d);
    expect(single.names()).toEqual(['m']);
    await single.close();
  });

  it('refuses a tensor name found in two files', async () => {
    const d = await subdir();
    await writeSafetensors(join(d, 'consolidated.safetensors'), { x: { dtype: 'U8', shape: [1], data: new Uint8Array([1]) } });
    await writeSafetensors(join(d, 'model-00001.safetensors'), { x: { dtype: 'U8', shape: [1], data: new Uint8Array([1]) } });
    await expectError(openWeights(d), 'WEIGHTS_INVALID', "'x'", 'consolidated.safetensors', 'model-00001.safetensors', /remove one/);
  });

  it('names a path that does not exist, and a folder without weights', async () => {
    const d = await subdir();
    await expectError(openWeights(join(d, 'nope')), 'WEIGHTS_MISSING', join(d, 'nope'));
    await expectError(openWeights(d), 'WEIGHTS_MISSING', d, /no \.safetensors/);
  });
});

describe('reads on demand', () => {
  it('reads a small tensor at the end of a 64 MiB sparse file without reading the file', async () => {
    const size = 64 * 2 ** 20;
    const header = Buffer.from(
      JSON.stringify({
        big: { dtype: 'U8', shape: [size - 16], data_offsets: [0, size - 16] },
        small: { dtype: 'F32', shape: [4], data_offsets: [size - 16, size] },
      }),
    );
    const path = join(await subdir(), 'sparse.safetensors');
    const fh = await open(path, 'w');
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(header.length));
    await fh.truncate(8 + header.length + size);
    await fh.write(Buffer.concat([len, header]), 0, 8 + header.length, 0);
    await fh.write(bytesOf(new Float32Array([1, 2, 3, 4])), 0, 16, 8 + header.length + size - 16);
    await fh.close();

    const before = process.memoryUsage().arrayBuffers;
    const w = await openWeights(path);
    const bytes = await w.read('small');
    // The result owns exactly its tensor's bytes: not a view into a bigger read.
    expect(bytes.byteLength).toBe(16);
    expect(bytes.buffer.byteLength).toBe(16);
    expect([...(await w.readFloat32('small'))]).toEqual([1, 2, 3, 4]);
    expect(process.memoryUsage().arrayBuffers - before).toBeLessThan(16 * 2 ** 20);
    expect(w.info('big').byteLength).toBe(size - 16);
    await w.close();
  });

  it('refuses reads after close()', async () => {
    const path = join(await subdir(), 'c.safetensors');
    await writeSafetensors(path, { a: { dtype: 'U8', shape: [1], data: new Uint8Array([1]) } });
    const w = await openWeights(path);
    await w.read('a');
    await w.close();
    await expectError(w.read('a'), 'CLOSED', path);
  });
});

describe('malformed files', () => {
  it('file shorter than 8 bytes', async () => {
    const path = join(await subdir(), 'short.safetensors');
    await writeFile(path, Buffer.from([1, 2, 3, 4, 5]));
    await expectError(openWeights(path), 'WEIGHTS_INVALID', path, /5 bytes/, /re-download/);
  });

  it('header length larger than the file', async () => {
    const path = join(await subdir(), 'long.safetensors');
    const b = Buffer.alloc(20);
    b.writeBigUInt64LE(1000n);
    await writeFile(path, b);
    await expectError(openWeights(path), 'WEIGHTS_INVALID', path, /header length 1000/, /20 bytes/);
  });

  it('header length larger than 100 MiB', async () => {
    const path = join(await subdir(), 'huge-header.safetensors');
    const fh = await open(path, 'w');
    await fh.truncate(120 * 2 ** 20);
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(110 * 2 ** 20));
    await fh.write(b, 0, 8, 0);
    await fh.close();
    await expectError(openWeights(path), 'WEIGHTS_INVALID', path, /100 MiB/);
  });

  it('a Git LFS pointer instead of the weights', async () => {
    const path = join(await subdir(), 'model.safetensors');
    await writeFile(path, 'version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n');
    await expectError(openWeights(path), 'WEIGHTS_INVALID', path, /git lfs pull/);
  });

  it('header that is not valid JSON', async () => {
    const path = await rawFile('{"a": {"dtype": ');
    await expectError(openWeights(path), 'WEIGHTS_INVALID', path, /not valid JSON/);
  });

  it('header that is not an object', async () => {
    const path = await rawFile('[1, 2]');
    await expectError(openWeights(path), 'WEIGHTS_INVALID', path, /not a JSON object/);
  });

  it('unknown dtype', async () => {
    const path = await rawFile({ w: { dtype: 'U16', shape: [1], data_offsets: [0, 2] } }, 2);
    await expectError(openWeights(path), 'WEIGHTS_INVALID', path, "'w'", /"U16"/, /BF16/);
  });

  it('shape that is not an array of non-negative integers', async () => {
    for (const shape of [[2, -1], [1.5], '3', null]) {
      const path = await rawFile({ w: { dtype: 'U8', shape, data_offsets: [0, 2] } }, 2);
      await expectError(openWeights(path), 'WEIGHTS_INVALID', path, "'w'", /shape/);
    }
  });

  it('data_offsets that are not two ordered integers', async () => {
    for (const offsets of [[4, 0], [0], [0, 1.5], [-1, 1], 'x']) {
      const path = await rawFile({ w: { dtype: 'U8', shape: [1], data_offsets: offsets } }, 8);
      await expectError(openWeights(path), 'WEIGHTS_INVALID', path, "'w'", /data_offsets/);
    }
  });

  it('byte length that does not match shape and dtype', async () => {
    const path = await rawFile({ w: { dtype: 'F32', shape: [2, 3], data_offsets: [0, 12] } }, 24);
    await expectError(openWeights(path), 'WEIGHTS_INVALID', path, "'w'", /24 bytes/, /span 12 bytes/);
  });

  it('tensor beyond the end of the file (truncated)', async () => {
    const path = await rawFile(
      { a: { dtype: 'U8', shape: [8], data_offsets: [0, 8] }, w: { dtype: 'F32', shape: [256], data_offsets: [8, 1032] } },
      100,
    );
    const e = await expectError(openWeights(path), 'WEIGHTS_INVALID', path, "tensor 'w'", /re-download it/);
    expect(e.message).toMatch(/truncated: file is \d+ bytes, tensor 'w' needs up to \d+/);
  });

  it('overlapping tensors', async () => {
    const path = await rawFile(
      { a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] }, b: { dtype: 'F32', shape: [4], data_offsets: [8, 24] } },
      24,
    );
    await expectError(openWeights(path), 'WEIGHTS_INVALID', path, "'a'", "'b'", /overlap/);
  });

  it('index naming a shard that does not exist', async () => {
    const d = await subdir();
    await writeSafetensors(join(d, 'model-00001-of-00002.safetensors'), { a: { dtype: 'U8', shape: [1], data: new Uint8Array(1) } });
    const index = join(d, 'model.safetensors.index.json');
    await writeFile(index, JSON.stringify({ weight_map: { a: 'model-00001-of-00002.safetensors', b: 'model-00002-of-00002.safetensors' } }));
    await expectError(openWeights(d), 'WEIGHTS_MISSING', index, 'model-00002-of-00002.safetensors', "'b'", /download/);
  });

  it('index naming a tensor its shard does not hold', async () => {
    const d = await subdir();
    const shard = join(d, 'model-00001-of-00001.safetensors');
    await writeSafetensors(shard, { a: { dtype: 'U8', shape: [1], data: new Uint8Array(1) } });
    await writeFile(join(d, 'model.safetensors.index.json'), JSON.stringify({ weight_map: { a: 'model-00001-of-00001.safetensors', ghost: 'model-00001-of-00001.safetensors' } }));
    await expectError(openWeights(d), 'WEIGHTS_MISSING', shard, "'ghost'", /re-download/);
  });

  it('index whose shard lies outside the folder', async () => {
    const d = await subdir();
    await writeFile(join(d, 'model.safetensors.index.json'), JSON.stringify({ weight_map: { a: '../elsewhere.safetensors' } }));
    await expectError(openWeights(d), 'WEIGHTS_INVALID', /outside/);
  });

  it('info() and read() of a missing tensor, with suggestions', async () => {
    const path = join(await subdir(), 'm.safetensors');
    await writeSafetensors(path, {
      'model.language_model.layers.0.mlp.gate.weight': { dtype: 'U8', shape: [1], data: new Uint8Array(1) },
      'model.language_model.layers.0.self_attn.q_proj.weight': { dtype: 'U8', shape: [1], data: new Uint8Array(1) },
    });
    const w = await openWeights(path);
    // The near miss differs only in its prefix, so it is suggested.
    await expectError(
      (async () => w.info('model.layers.0.mlp.gate.weight'))(),
      'WEIGHTS_MISSING',
      path,
      "'model.language_model.layers.0.mlp.gate.weight'",
    );
    const e = await expectError(w.read('model.layers.0.mlp.gate.weight'), 'WEIGHTS_MISSING', "'model.layers.0.mlp.gate.weight'", path);
    expect(e.message).not.toMatch(/q_proj/);
    await expectError(w.readFloat32('lm_head.weight'), 'WEIGHTS_MISSING', "'lm_head.weight'", path);
    expect(w.has('lm_head.weight')).toBe(false);
    await w.close();
  });
});
