import type { ModelSpec } from '../model/spec.js';
import type { WeightSource } from './tensor.js';

/**
 * Tensors of the multi-token-prediction layers a deepseek_v3 checkpoint ships after its decoder
 * layers: `model.layers.{numLayers + i}.*` for i < num_nextn_predict_layers, each holding the
 * `eh_proj` that makes it an MTP layer. They are a drafter for speculative decoding, not part of the
 * model's forward pass, so loaders and the strict checks pass over them. A layer index past them,
 * or one without `eh_proj` (a decoder layer a too small num_hidden_layers leaves out), is still an
 * error.
 */
export function mtpTensorNames(spec: ModelSpec, src: WeightSource): string[] {
  const count = spec.mtpLayers ?? 0;
  if (count === 0) return [];
  const layers = new Set<number>();
  for (let l = spec.numLayers; l < spec.numLayers + count; l++) if (src.has(`model.layers.${l}.eh_proj.weight`)) layers.add(l);
  if (layers.size === 0) return [];
  return src.names().filter((n) => {
    const m = /^model\.layers\.(\d+)\./.exec(n);
    return m !== null && layers.has(Number(m[1]));
  });
}
