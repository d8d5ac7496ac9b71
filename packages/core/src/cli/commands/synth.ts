import { importOptional } from '../../backends/registry.js';
import { MoeflashError } from '../../errors.js';
import { PRESETS } from '../../synth/presets.js';
import { synthesizeModel } from '../../synth/synth.js';
import { num, parse, required } from '../args.js';
import { fmtBytes } from '../progress.js';

export const synthHelp = `moeflash synth --preset NAME --out DIR [--family F] [--seed S] [--experts mxfp4|bf16] [--layers N]
  Write random weights at a real model's shapes and layout (presets: ${Object.keys(PRESETS).join(', ')}).
  --layers N keeps only the first N layers (quick runs).
moeflash synth --draft-for TARGET_DIR --out DIR [--draft-layers N] [--draft-inter I] [--seed S]
  Write a DFlash drafter of random weights for the target in TARGET_DIR, in z-lab's format: by
  default at the shape of z-lab's released gpt-oss-20b drafter (8 layers at the target's width and
  attention shape, intermediate 7680, 8 target layers: about 0.8 B parameters).`;

interface SpeculativeSynth {
  synthesizeDflashDraft(target: string, out: string, opts: { numLayers?: number; intermediateSize?: number; seed?: number }): Promise<string>;
}

export async function synth(argv: string[]): Promise<void> {
  const { values: v } = parse('synth', argv, {
    preset: { type: 'string' }, out: { type: 'string' }, family: { type: 'string' }, seed: { type: 'string' },
    experts: { type: 'string' }, layers: { type: 'string' }, 'draft-for': { type: 'string' }, 'draft-layers': { type: 'string' },
    'draft-inter': { type: 'string' },
  });
  if (v.help) return void console.log(synthHelp);
  if (v['draft-for']) {
    const sp = await importOptional<SpeculativeSynth>('@moeflash/speculative');
    if (typeof sp === 'string') throw new MoeflashError('BACKEND_UNAVAILABLE', `moeflash synth --draft-for needs ${sp}`);
    const t0 = performance.now();
    const out = await sp.synthesizeDflashDraft(v['draft-for'], required('synth', 'out', v.out), {
      numLayers: num('synth', 'draft-layers', v['draft-layers'], 8),
      intermediateSize: num('synth', 'draft-inter', v['draft-inter'], 7680),
      seed: num('synth', 'seed', v.seed),
    });
    console.error(`wrote a DFlash drafter for ${v['draft-for']} to ${out} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    return;
  }
  const preset = required('synth', 'preset', v.preset);
  if (v.family && PRESETS[preset] && PRESETS[preset].family !== v.family) {
    throw new Error(`preset ${preset} is of family ${PRESETS[preset].family}, not ${v.family}`);
  }
  const layers = num('synth', 'layers', v.layers);
  const overrides: Record<string, unknown> = {};
  if (layers !== undefined) {
    overrides.num_hidden_layers = layers;
    const lt = PRESETS[preset]?.config.layer_types as string[] | undefined;
    if (lt) overrides.layer_types = lt.slice(0, layers);
  }
  const t0 = performance.now();
  let last = 0;
  const r = await synthesizeModel({
    preset,
    out: required('synth', 'out', v.out),
    seed: num('synth', 'seed', v.seed),
    mxfp4Experts: v.experts === undefined ? undefined : v.experts === 'mxfp4',
    overrides,
    onProgress: (w, t) => {
      const now = performance.now();
      if (now - last > 2000 || w === t) {
        last = now;
        process.stderr.write(`synth ${fmtBytes(w)}/${fmtBytes(t)}\n`);
      }
    },
  });
  const s = (performance.now() - t0) / 1000;
  console.error(`wrote ${r.dir}: ${fmtBytes(r.bytes)} in ${s.toFixed(1)} s (${fmtBytes(r.bytes / s)}/s)`);
}
