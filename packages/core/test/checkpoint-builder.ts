/**
 * Checkpoints held in memory, for tests that take a real checkpoint apart and put a broken one
 * together: tensors as {dtype, shape, bytes}, laid out into safetensors bytes by the writer's own
 * layout, and opened by the same reader a model folder goes through.
 */
import path from 'node:path';
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { loadModelSpec } from '../src/model/config.js';
import type { ModelSpec } from '../src/model/spec.js';
import { memoryOpener, type MemorySegment } from '../src/weights/byte-source.js';
import { layoutSafetensors } from '../src/weights/safetensors-writer.js';
import { openSafetensorsFiles, openWeights, type SafetensorsSource } from '../src/weights/safetensors.js';
import type { DType } from '../src/weights/tensor.js';

export interface HeldTensor {
  dtype: DType;
  shape: number[];
  /** The stored bytes, or a byte count of zeros (for shapes whose content does not matter). */
  data: Uint8Array | { zeros: number };
}

/** Tensors by name, in file order. */
export type HeldCheckpoint = Map<string, HeldTensor>;

export interface Fixture {
  name: string;
  dir: string;
  spec: ModelSpec;
  config: Record<string, unknown>;
  tensors: HeldCheckpoint;
}

export const goldenRoot = path.resolve(__dirname, 'fixtures/golden');
/** Every golden fixture (each family in each expert layout HF writes). */
export const GOLDEN: string[] = (JSON.parse(readFileSync(path.join(goldenRoot, 'fixtures.json'), 'utf8')) as { fixtures: string[] }).fixtures;

/** Every tensor of a model folder, read into memory (the fixtures are a few hundred KB). */
export async function holdFolder(dir: string, name = path.basename(dir)): Promise<Fixture> {
  const spec = await loadModelSpec(dir);
  const config = JSON.parse(await readFile(path.join(dir, 'config.json'), 'utf8')) as Record<string, unknown>;
  const w = await openWeights(dir);
  const tensors: HeldCheckpoint = new Map();
  try {
    for (const n of w.names()) {
      const info = w.info(n);
      tensors.set(n, { dtype: info.dtype, shape: [...info.shape], data: await w.read(n) });
    }
  } finally {
    await w.close();
  }
  return { name, dir, spec, config, tensors };
}

/** The bytes of one safetensors file holding `tensors`, as segments (tensor data is not copied). */
export function fileSegments(tensors: HeldCheckpoint, metadata: Record<string, string> = { format: 'pt' }): MemorySegment[] {
  const entries = [...tensors].map(([name, t]) => ({ name, dtype: t.dtype, shape: t.shape }));
  const layout = layoutSafetensors(entries, metadata);
  const out: MemorySegment[] = [layout.prefix];
  for (const [name, t] of tensors) {
    const [begin, end] = layout.offsets.get(name)!;
    const have = t.data instanceof Uint8Array ? t.data.length : t.data.zeros;
    // A tensor whose shape was changed keeps its bytes where they fit and pads or cuts the rest,
    // so that the file is well formed and only the shape is wrong.
    const want = end - begin;
    if (t.data instanceof Uint8Array) out.push(have >= want ? t.data.subarray(0, want) : t.data);
    else out.push({ zeros: Math.min(have, want) });
    if (have < want) out.push({ zeros: want - have });
  }
  return out;
}

/** Opens in-memory files (path -> segments) as one checkpoint, through the safetensors reader. */
export function openHeld(files: ReadonlyMap<string, readonly MemorySegment[]>, origin = '/mem/model'): Promise<SafetensorsSource> {
  return openSafetensorsFiles(origin, [...files.keys()], memoryOpener(files));
}

/** One file holding `tensors`, opened. */
export function openCheckpoint(tensors: HeldCheckpoint, origin = '/mem/model'): Promise<SafetensorsSource> {
  return openHeld(new Map([[`${origin}/model.safetensors`, fileSegments(tensors)]]), origin);
}

/** A copy of `tensors` with `edit` applied (the map is copied; tensor bytes are shared). */
export function edited(tensors: HeldCheckpoint, edit: (t: HeldCheckpoint) => void): HeldCheckpoint {
  const copy: HeldCheckpoint = new Map([...tensors].map(([n, t]) => [n, { ...t, shape: [...t.shape] }]));
  edit(copy);
  return copy;
}
