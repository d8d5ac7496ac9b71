/**
 * The strict loader: each rule of the safetensors format and of the model spec, with the error a
 * user gets when a checkpoint breaks it, and the checkpoints that must still load.
 */
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { beforeAll, describe, expect, it } from 'vitest';
import { CpuBackend, createEngine, loadModel } from '@moeflash/core';
import { run } from '../src/cli/commands/run.js';
import { MoeflashError, type ErrorCode } from '../src/errors.js';
import { memoryOpener, type MemorySegment } from '../src/weights/byte-source.js';
import { decodeToFloat32 } from '../src/weights/dtypes.js';
import { countNonFinite } from '../src/weights/finite.js';
import { layoutSafetensors } from '../src/weights/safetensors-writer.js';
import { openShardedCheckpoint, openWeights, readSafetensorsHeader } from '../src/weights/safetensors.js';
import type { DType } from '../src/weights/tensor.js';
import { validateCheckpoint } from '../src/weights/validate-checkpoint.js';
import { edited, fileSegments, GOLDEN, goldenRoot, holdFolder, openCheckpoint, type Fixture, type HeldCheckpoint } from './checkpoint-builder.js';
import { repoRoot, tinyModel } from './helpers.js';

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

const FILE = '/mem/m/model.safetensors';
const header = (segments: MemorySegment[]) => readSafetensorsHeader(FILE, memoryOpener(new Map([[FILE, segments]])));

/** A raw file: u64 length (default: the JSON's), JSON text, then data. */
function raw(json: string, data: Uint8Array, headerLen = Buffer.byteLength(json)): MemorySegment[] {
  const len = new Uint8Array(8);
  new DataView(len.buffer).setBigUint64(0, BigInt(headerLen), true);
  return [len, new TextEncoder().encode(json), data];
}

const two = '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}';

describe('format: the tensors tile the data section, and the file ends with the last tensor', () => {
  it('accepts a file the writer lays out (header padded with spaces)', async () => {
    const layout = layoutSafetensors([{ name: 'a', dtype: 'BF16', shape: [3] }]);
    const h = await header([layout.prefix, new Uint8Array(6)]);
    expect(h.tensors.map((t) => [t.name, t.offset, t.byteLength])).toEqual([['a', layout.prefix.length, 6]]);
  });

  it('a header length one byte short (padding absorbs it, every tensor would shift by a byte)', async () => {
    const layout = layoutSafetensors([{ name: 'a', dtype: 'BF16', shape: [3] }]);
    expect(layout.prefix[layout.prefix.length - 1]).toBe(0x20); // the JSON still parses
    const prefix = layout.prefix.slice();
    new DataView(prefix.buffer).setBigUint64(0, BigInt(prefix.length - 8 - 1), true);
    await expectError(header([prefix, new Uint8Array(6)]), 'WEIGHTS_INVALID', FILE, /data section is 7 bytes/, /1 bytes follow that no tensor owns/, /header length/);
  });

  it('bytes appended after the last tensor', async () => {
    await expectError(header(raw(two, new Uint8Array(8 + 5))), 'WEIGHTS_INVALID', FILE, "last tensor 'b' ends at 8", /5 bytes follow/, /appended/);
  });

  it('a gap between two tensors', async () => {
    const json = '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}';
    await expectError(header(raw(json, new Uint8Array(12))), 'WEIGHTS_INVALID', FILE, "bytes [4, 8) after tensor 'a' belong to no tensor", "'b'", /contiguous from 0/);
  });

  it('a first tensor that does not start at 0', async () => {
    const json = '{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}';
    await expectError(header(raw(json, new Uint8Array(8))), 'WEIGHTS_INVALID', FILE, /bytes \[0, 4\) at the start of the data section/);
  });

  it('an empty tensor inside another one overlaps it', async () => {
    const json = '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}';
    await expectError(header(raw(json, new Uint8Array(8))), 'WEIGHTS_INVALID', "'a' [0, 8]", "'e' [4, 4]", /overlap/);
  });

  it('accepts empty tensors on a boundary, and a header with no tensors and no data', async () => {
    const json = '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}';
    expect((await header(raw(json, new Uint8Array(4)))).tensors).toHaveLength(2);
    expect((await header(raw('{"__metadata__":{"k":"v"}}', new Uint8Array(0)))).tensors).toHaveLength(0);
  });

  it('a truncated file', async () => {
    await expectError(header(raw(two, new Uint8Array(6))), 'WEIGHTS_INVALID', FILE, /truncated/, "tensor 'b'");
  });

  it('a header that opens with whitespace', async () => {
    await expectError(header(raw(` ${two}`, new Uint8Array(8))), 'WEIGHTS_INVALID', /starts with whitespace/);
  });

  it('metadata values that are not strings', async () => {
    await expectError(header(raw('{"__metadata__":{"n":3}}', new Uint8Array(0))), 'WEIGHTS_INVALID', /__metadata__ 'n' is 3, not a string/);
  });

  it('property: any header length but the right one is refused', async () => {
    const layout = layoutSafetensors([
      { name: 'a', dtype: 'BF16', shape: [5] },
      { name: 'b', dtype: 'F32', shape: [2, 2] },
    ]);
    const right = layout.prefix.length - 8;
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 0, max: right + 64 }).filter((n) => n !== right), async (n) => {
        const prefix = layout.prefix.slice();
        new DataView(prefix.buffer).setBigUint64(0, BigInt(n), true);
        await expectError(header([prefix, new Uint8Array(layout.dataBytes).fill(0x20)]), 'WEIGHTS_INVALID', FILE);
      }),
      { numRuns: 100 },
    );
  });
});

describe('format: a sharded folder', () => {
  it('a shard holding a tensor its index does not list', async () => {
    const dir = path.join(goldenRoot, 'mixtral_per_expert');
    const index = JSON.parse(fs.readFileSync(path.join(dir, 'model.safetensors.index.json'), 'utf8')) as { weight_map: Record<string, string> };
    const files = new Map(
      [...new Set(Object.values(index.weight_map))].map((n) => [`/mem/m/${n}`, [new Uint8Array(fs.readFileSync(path.join(dir, n)))] as MemorySegment[]]),
    );
    const open = (weightMap: Record<string, string>) => openShardedCheckpoint('/mem/m', '/mem/m/model.safetensors.index.json', JSON.stringify({ weight_map: weightMap }), memoryOpener(files));
    expect((await open(index.weight_map)).names()).toHaveLength(Object.keys(index.weight_map).length);
    const { ['model.norm.weight']: dropped, ...rest } = index.weight_map;
    await expectError(open(rest), 'WEIGHTS_INVALID', `shard /mem/m/${dropped}`, "holds tensor 'model.norm.weight', which the index does not list", /different versions/);
  });
});

describe('spec: every tensor config.json implies, at its shape and in a dtype that holds it', () => {
  const fx: Record<string, Fixture> = {};
  beforeAll(async () => {
    for (const name of GOLDEN) fx[name] = await holdFolder(path.join(goldenRoot, name));
  });
  const check = async (f: Fixture, tensors: HeldCheckpoint, opts = {}) => validateCheckpoint(f.spec, await openCheckpoint(tensors), opts);
  const without = (f: Fixture, ...names: string[]) =>
    edited(f.tensors, (t) => {
      for (const n of names) expect(t.delete(n)).toBe(true);
    });

  it('accepts every golden fixture and the bundled model, NaN scan included', async () => {
    for (const name of GOLDEN) await validateCheckpoint(fx[name].spec, await openCheckpoint(fx[name].tensors), { checkFinite: true });
    const coder = path.join(repoRoot, 'models/moeflash-tiny-coder');
    const h = await holdFolder(coder);
    const w = await openWeights(coder);
    await validateCheckpoint(h.spec, w, { checkFinite: true });
    await w.close();
  });

  it('gpt_oss with attention_bias: true and no attention biases', async () => {
    const f = fx.gpt_oss_bf16;
    expect(f.config.attention_bias).toBe(true);
    await expectError(check(f, without(f, 'model.layers.1.self_attn.q_proj.bias')), 'WEIGHTS_MISSING', "'model.layers.1.self_attn.q_proj.bias' is missing", /attention_bias/, f.spec.source);
  });

  it('attention sinks, norms, q/k norms, router and expert biases, the LM head', async () => {
    const g = fx.gpt_oss_mxfp4;
    await expectError(check(g, without(g, 'model.layers.2.self_attn.sinks')), 'WEIGHTS_MISSING', "'model.layers.2.self_attn.sinks'", /sink logit per head/);
    await expectError(check(g, without(g, 'model.layers.0.mlp.router.bias')), 'WEIGHTS_MISSING', "'model.layers.0.mlp.router.bias'", /router carries a bias/);
    await expectError(check(g, without(g, 'model.layers.3.mlp.experts.down_proj_bias')), 'WEIGHTS_MISSING', /down_proj_bias/, /experts carry biases/);
    const q = fx.qwen3_moe_fused;
    await expectError(check(q, without(q, 'model.layers.0.self_attn.k_norm.weight')), 'WEIGHTS_MISSING', "'model.layers.0.self_attn.k_norm.weight'", /normalizes q and k/);
    await expectError(check(q, without(q, 'model.layers.2.post_attention_layernorm.weight')), 'WEIGHTS_MISSING', /post_attention_layernorm/);
    await expectError(check(q, without(q, 'model.norm.weight')), 'WEIGHTS_MISSING', "'model.norm.weight'", /final norm/);
    await expectError(check(q, without(q, 'lm_head.weight')), 'WEIGHTS_MISSING', "'lm_head.weight'", /tie_word_embeddings is false/);
  });

  it('one expert of a per-expert layout, with the names that are there', async () => {
    const m = fx.mixtral_per_expert;
    const e = await expectError(check(m, without(m, 'model.layers.1.block_sparse_moe.experts.3.w2.weight')), 'WEIGHTS_MISSING', /experts\.3\.w2\.weight/, /expert 3 of 4/);
    expect(e.message).toMatch(/similar names/);
  });

  it('reports how many problems there are', async () => {
    const q = fx.qwen3_moe_per_expert;
    const names = [...q.tensors.keys()].filter((n) => n.includes('layers.1.self_attn'));
    await expectError(check(q, without(q, ...names)), 'WEIGHTS_MISSING', new RegExp(`\\(${names.length - 1} more problems in this checkpoint\\)`));
  });

  it('a shape other than the one config.json implies', async () => {
    const f = fx.mixtral_fused;
    const t = edited(f.tensors, (m) => {
      m.get('model.layers.0.self_attn.k_proj.weight')!.shape = [64, 16];
    });
    await expectError(check(f, t), 'WEIGHTS_INVALID', "'model.layers.0.self_attn.k_proj.weight'", /shape \[64, 16\]/, /implies \[16, 64\]/, /num_key_value_heads 1/);
  });

  it('fused experts in either orientation, with down_proj oriented as gate_up_proj', async () => {
    const f = fx.gpt_oss_bf16; // stored input-major: gate_up_proj [E, H, 2I], down_proj [E, I, H]
    const t = edited(f.tensors, (m) => {
      m.get('model.layers.0.mlp.experts.down_proj')!.shape = [4, 64, 96];
    });
    await expectError(check(f, t), 'WEIGHTS_INVALID', /down_proj' .* has shape \[4, 64, 96\]/, /implies \[4, 96, 64\]/, /oriented as gate_up_proj/);
  });

  it('a dtype that holds no weights, and MXFP4 data that is not U8', async () => {
    const q = fx.qwen3_moe_fused;
    const t = edited(q.tensors, (m) => {
      const w = m.get('model.layers.1.self_attn.q_norm.weight')!;
      w.dtype = 'I16'; // same size as BF16: the file stays well formed
    });
    await expectError(check(q, t), 'WEIGHTS_INVALID', "'model.layers.1.self_attn.q_norm.weight'", /dtype I16, which holds no weights/, /BF16, F16, F32/);
    const g = fx.gpt_oss_mxfp4;
    const u = edited(g.tensors, (m) => {
      m.get('model.layers.0.mlp.experts.gate_up_proj_scales')!.dtype = 'I8';
    });
    await expectError(check(g, u), 'WEIGHTS_INVALID', /gate_up_proj_scales' .* dtype I8; MXFP4 blocks and scales are stored as U8/);
  });

  it('accepts another float dtype of a weight (F16 for BF16)', async () => {
    const q = fx.qwen3_moe_fused;
    await check(q, edited(q.tensors, (m) => void (m.get('model.layers.0.mlp.gate.weight')!.dtype = 'F16')));
  });

  it('attention biases where config.json has attention_bias false', async () => {
    const q = fx.qwen3_moe_fused;
    expect(q.spec.attention.bias).toBe(false);
    const t = edited(q.tensors, (m) => void m.set('model.layers.0.self_attn.v_proj.bias', { dtype: 'BF16', shape: [64], data: { zeros: 128 } }));
    await expectError(check(q, t), 'WEIGHTS_INVALID', "'model.layers.0.self_attn.v_proj.bias'", /no attention_bias/);
  });

  it('a layer past num_hidden_layers, an expert past num_experts', async () => {
    const q = fx.qwen3_moe_fused;
    const extraLayer = edited(q.tensors, (m) => void m.set('model.layers.3.input_layernorm.weight', { dtype: 'BF16', shape: [64], data: { zeros: 128 } }));
    await expectError(check(q, extraLayer), 'WEIGHTS_INVALID', "'model.layers.3.input_layernorm.weight'", /num_hidden_layers 3/);
    const m = fx.mixtral_per_expert;
    const extraExpert = edited(m.tensors, (t) => void t.set('model.layers.0.block_sparse_moe.experts.4.w1.weight', { dtype: 'BF16', shape: [40, 72], data: { zeros: 5760 } }));
    await expectError(check(m, extraExpert), 'WEIGHTS_INVALID', /experts\.4\.w1\.weight/, /4 experts a layer/);
  });

  it('FP8 block scales of the wrong shape, or on a 3-D tensor', async () => {
    const q = fx.qwen3_moe_fused;
    const fp8 = (scaleShape: number[]) =>
      edited(q.tensors, (m) => {
        m.get('model.layers.0.self_attn.q_proj.weight')!.dtype = 'F8_E4M3';
        m.get('model.layers.0.self_attn.q_proj.weight')!.data = { zeros: 128 * 64 };
        m.set('model.layers.0.self_attn.q_proj.weight_scale_inv', { dtype: 'F32', shape: scaleShape, data: { zeros: 4 * scaleShape.reduce((a, b) => a * b, 1) } });
      });
    await check(q, fp8([1, 1])); // [128, 64] in 128x128 blocks
    await expectError(check(q, fp8([2, 1])), 'WEIGHTS_INVALID', /q_proj\.weight_scale_inv' .* has shape \[2, 1\]/, /needs \[1, 1\]/, /weight_block_size/);
    const t = edited(q.tensors, (m) => void m.set('model.layers.0.mlp.experts.down_proj_scale_inv', { dtype: 'F32', shape: [1, 1], data: { zeros: 4 } }));
    await expectError(check(q, t), 'WEIGHTS_INVALID', /down_proj_scale_inv/, /2-D weights only/);
  });

  it('gpt_oss experts stored per expert keep their (fused) biases: same logits as the fused layout', async () => {
    const f = fx.gpt_oss_bf16; // gate_up_proj [E, H, 2I] (gate and up interleaved), down_proj [E, I, H]
    const [E, H, I] = [f.spec.moe.numExperts, f.spec.hiddenSize, f.spec.moe.intermediateSize];
    const src = await openCheckpoint(f.tensors);
    const perExpert = new Map(f.tensors);
    for (let l = 0; l < f.spec.numLayers; l++) {
      const ex = `model.layers.${l}.mlp.experts`;
      const gu = await src.readFloat32(`${ex}.gate_up_proj`);
      const down = await src.readFloat32(`${ex}.down_proj`);
      perExpert.delete(`${ex}.gate_up_proj`);
      perExpert.delete(`${ex}.down_proj`);
      for (let j = 0; j < E; j++) {
        const gate = new Float32Array(I * H);
        const up = new Float32Array(I * H);
        const dn = new Float32Array(H * I);
        for (let i = 0; i < I; i++) {
          for (let h = 0; h < H; h++) {
            gate[i * H + h] = gu[(j * H + h) * 2 * I + 2 * i];
            up[i * H + h] = gu[(j * H + h) * 2 * I + 2 * i + 1];
            dn[h * I + i] = down[(j * I + i) * H + h];
          }
        }
        const f32 = (a: Float32Array, shape: number[]) => ({ dtype: 'F32' as const, shape, data: new Uint8Array(a.buffer) });
        perExpert.set(`${ex}.${j}.gate_proj.weight`, f32(gate, [I, H]));
        perExpert.set(`${ex}.${j}.up_proj.weight`, f32(up, [I, H]));
        perExpert.set(`${ex}.${j}.down_proj.weight`, f32(dn, [H, I]));
      }
    }
    await check(f, perExpert);
    await expectError(check(f, without({ ...f, tensors: perExpert }, 'model.layers.1.mlp.experts.gate_up_proj_bias')), 'WEIGHTS_MISSING', /gate_up_proj_bias/);
    const logits = async (t: HeldCheckpoint) => {
      const model = await new CpuBackend().load(f.spec, await openCheckpoint(t), {});
      const res = await model.step({ sequences: [{ seq: 0, tokens: [1, 5, 9, 2], logits: 'all' }] });
      await model.dispose();
      return res.sequences[0].logits!;
    };
    const want = await logits(f.tensors);
    const got = await logits(perExpert);
    let maxDiff = 0;
    for (let i = 0; i < want.length; i++) maxDiff = Math.max(maxDiff, Math.abs(want[i] - got[i]));
    expect(maxDiff).toBeLessThan(1e-4);
  });

  it('non-finite weights, when asked: NaN in bf16, infinity in f32, an MXFP4 scale of 255', async () => {
    const q = fx.qwen3_moe_fused;
    const poisoned = edited(q.tensors, (m) => {
      const w = m.get('model.layers.1.self_attn.o_proj.weight')!;
      const bytes = (w.data as Uint8Array).slice();
      new DataView(bytes.buffer).setUint16(2 * 77, 0x7fc0, true);
      w.data = bytes;
    });
    await check(q, poisoned); // off by default
    await expectError(check(q, poisoned, { checkFinite: true }), 'WEIGHTS_INVALID', /1 tensor of .* hold NaN or infinite/, "'model.layers.1.self_attn.o_proj.weight'", /1 of 8192 values, the first at element 77/);

    const f32 = edited(q.tensors, (m) => {
      const norm = new Float32Array(64).fill(1);
      norm[5] = -Infinity;
      m.set('model.norm.weight', { dtype: 'F32', shape: [64], data: new Uint8Array(norm.buffer) });
    });
    await expectError(check(q, f32, { checkFinite: true }), 'WEIGHTS_INVALID', "'model.norm.weight'", /element 5/);

    const g = fx.gpt_oss_mxfp4;
    const scales = edited(g.tensors, (m) => {
      const s = m.get('model.layers.3.mlp.experts.down_proj_scales')!;
      const bytes = (s.data as Uint8Array).slice();
      bytes[10] = 255;
      s.data = bytes;
    });
    await expectError(check(g, scales, { checkFinite: true }), 'WEIGHTS_INVALID', /down_proj_scales/, /element 10/);
  });
});

describe('countNonFinite agrees with decoding', () => {
  const dtypes: DType[] = ['BF16', 'F16', 'F32', 'F8_E4M3', 'F8_E5M2'];
  it('property: for random bytes of each float dtype, the count of NaN and infinite decoded values', () => {
    fc.assert(
      fc.property(fc.constantFrom(...dtypes), fc.uint8Array({ minLength: 0, maxLength: 256 }), fc.boolean(), (dtype, data, offsetByOne) => {
        const size = { BF16: 2, F16: 2, F32: 4, F8_E4M3: 1, F8_E5M2: 1 }[dtype as 'BF16']!;
        const n = Math.floor(data.length / size) * size;
        // An unaligned view takes the DataView path, an aligned one the typed-array path.
        const buf = new Uint8Array(n + 1);
        const bytes = offsetByOne ? buf.subarray(1) : buf.subarray(0, n);
        bytes.set(data.subarray(0, n));
        const decoded = decodeToFloat32(bytes.slice(), dtype);
        const want = decoded.filter((v) => !Number.isFinite(v)).length;
        const got = countNonFinite(bytes, dtype);
        expect(got.count).toBe(want);
        expect(got.first).toBe(decoded.findIndex((v) => !Number.isFinite(v)));
      }),
      { numRuns: 500 },
    );
  });
});

describe('loads go through the checks', () => {
  it('loadModel refuses a checkpoint that lacks a tensor its config implies', async () => {
    const dir = await tinyModel('gpt_oss');
    const f = await holdFolder(dir);
    const t = edited(f.tensors, (m) => void m.delete('model.layers.0.self_attn.o_proj.bias'));
    const segments = fileSegments(t);
    const fh = fs.openSync(path.join(dir, 'model.safetensors'), 'w');
    for (const s of segments) fs.writeSync(fh, s instanceof Uint8Array ? s : new Uint8Array(s.zeros));
    fs.closeSync(fh);
    await expectError(loadModel({ model: dir, backend: 'cpu' }), 'WEIGHTS_MISSING', /o_proj\.bias/, /attention_bias/);
    await expectError(createEngine({ model: dir, backend: 'cpu', log: () => {} }), 'WEIGHTS_MISSING', /o_proj\.bias/);
  });

  it('moeflash run refuses NaN weights unless --skip-finite-check', async () => {
    const dir = await tinyModel('qwen3_moe');
    const w = await openWeights(dir);
    const info = w.info('model.layers.0.self_attn.q_proj.weight');
    await w.close();
    const fh = fs.openSync(path.join(dir, 'model.safetensors'), 'r+');
    fs.writeSync(fh, new Uint8Array([0x80, 0x7f]), 0, 2, info.offset + 2 * 9); // +Inf in bf16
    fs.closeSync(fh);
    const args = ['--model', dir, '--prompt', 'a', '--max-tokens', '1', '--backend', 'cpu', '--temperature', '0'];
    await expectError(run(args), 'WEIGHTS_INVALID', /q_proj\.weight/, /NaN or infinite/);
    const write = process.stdout.write;
    process.stdout.write = (() => true) as typeof process.stdout.write;
    try {
      await run([...args, '--skip-finite-check']);
    } finally {
      process.stdout.write = write;
    }
  });
});
