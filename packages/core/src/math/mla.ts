import type { MlaSpec } from '../model/spec.js';
import { linear } from './linear.js';
import { rmsNorm } from './norm.js';
import { applyRope, deinterleaveRotary, type RopeTable } from './rope.js';

/**
 * Multi-head latent attention (DeepSeek-V2/V3), in the "absorbed" form that attends over the
 * compressed cache. HF computes, per token and head h,
 *
 *   c      = RMSNorm(kv_a[0 .. kvLora))                      the latent, one per token
 *   k_rot  = RoPE(kv_a[kvLora ..])                           one rotary key part, shared by all heads
 *   k[h]   = [W_uk[h] c, k_rot],   v[h] = W_uv[h] c           (kv_b_proj = rows [W_uk[h]; W_uv[h]] per head)
 *   q[h]   = [q_nope[h], RoPE(q_rot[h])]
 *   out[h] = sum_t softmax_t(scale * q[h] . k_t[h]) v_t[h]
 *
 * Since q_nope[h] . (W_uk[h] c_t) = (W_uk[h]^T q_nope[h]) . c_t and v is linear in c, the same
 * numbers come from a cache row [c_t, k_rot_t] (kvLora + rope values a token, whatever the head
 * count) and an absorbed query [W_uk[h]^T q_nope[h], RoPE(q_rot[h])]: one multi-query attention
 * whose key is the whole row and whose value is its first kvLora values, followed by
 * out[h] = W_uv[h] (latent output of h). That attention is math/attention.ts's `attendOne` with one
 * KV head of kvLora + rope dims (values read from the same rows); this file holds the parts before
 * and after it. Only the order of float32 rounding differs from HF's expanded form.
 */

/** One layer's latent attention weights in float32, canonical orientation ([out, in] matrices). */
export interface MlaWeights {
  /** `q_proj` [heads * qkHead, hidden] when q_lora_rank is null, else null. */
  q: Float32Array | null;
  /** `q_a_proj` [qLora, hidden], `q_a_layernorm` [qLora], `q_b_proj` [heads * qkHead, qLora] (q_lora_rank set). */
  qA: Float32Array | null;
  qANorm: Float32Array | null;
  qB: Float32Array | null;
  /** `kv_a_proj_with_mqa` [kvLora + rope, hidden]: the latent, then the shared rotary key part. */
  kvA: Float32Array;
  /** `kv_a_layernorm` [kvLora]. */
  kvANorm: Float32Array;
  /** Per head, the key rows of `kv_b_proj` transposed: [kvLora, nope] (maps q_nope into latent space). */
  kUpT: Float32Array[];
  /** Per head, the value rows of `kv_b_proj`: [v, kvLora]. */
  vUp: Float32Array[];
  /** `o_proj` [hidden, heads * v]. */
  o: Float32Array;
}

/** Values a token keeps in the latent cache of one layer. */
export function latentRowSize(mla: MlaSpec): number {
  return mla.kvLoraRank + mla.qkRopeHeadDim;
}

/** Positions the rotary part of a head (or of the latent row) at `offset`: reorders pairs, then rotates. */
function rotate(v: Float32Array, offset: number, position: number, mla: MlaSpec, rope: RopeTable, scratch: Float32Array): void {
  if (mla.ropeInterleave) deinterleaveRotary(v, offset, mla.qkRopeHeadDim, scratch);
  applyRope(v, offset, position, rope);
}

/**
 * kv_a_proj_with_mqa's output of one token (kvA[kvOffset .. + kvLora + rope)) -> its cache row
 * [RMSNorm(latent), RoPE(k_rot)], written in place.
 */
export function latentRow(
  kvA: Float32Array,
  kvOffset: number,
  norm: Float32Array,
  eps: number,
  position: number,
  mla: MlaSpec,
  rope: RopeTable,
  scratch: Float32Array,
): void {
  rmsNorm(kvA, norm, eps, kvA, kvOffset);
  rotate(kvA, kvOffset + mla.kvLoraRank, position, mla, rope, scratch);
}

/**
 * One token's query heads (q[qOffset ..], heads x [nope | rope]) -> absorbed queries
 * (out[outOffset ..], heads x [W_uk[h]^T q_nope[h] | RoPE(q_rot[h])]). The query's rotary part
 * rotates in place in `q`.
 */
export function absorbQuery(
  q: Float32Array,
  qOffset: number,
  w: Pick<MlaWeights, 'kUpT'>,
  position: number,
  mla: MlaSpec,
  rope: RopeTable,
  out: Float32Array,
  outOffset: number,
  scratch: Float32Array,
): void {
  const { kvLoraRank: c, qkNopeHeadDim: nope, qkRopeHeadDim: r } = mla;
  const qkHead = nope + r;
  const row = c + r;
  const lat = scratch.subarray(r, r + c);
  for (let h = 0; h < w.kUpT.length; h++) {
    const qh = qOffset + h * qkHead;
    rotate(q, qh + nope, position, mla, rope, scratch);
    linear(q.subarray(qh, qh + nope), w.kUpT[h], c, nope, null, lat);
    out.set(lat, outOffset + h * row);
    out.set(q.subarray(qh + nope, qh + qkHead), outOffset + h * row + c);
  }
}

/**
 * Latent attention outputs of one token (latent[latOffset ..], heads x rows of kvLora + rope, of
 * which the first kvLora are the attention-weighted latent) -> value heads (out[outOffset ..],
 * heads x v): out[h] = W_uv[h] latent[h].
 */
export function expandValues(
  latent: Float32Array,
  latOffset: number,
  w: Pick<MlaWeights, 'vUp'>,
  mla: MlaSpec,
  out: Float32Array,
  outOffset: number,
): void {
  const { kvLoraRank: c, qkRopeHeadDim: r, vHeadDim: v } = mla;
  for (let h = 0; h < w.vUp.length; h++) {
    const lo = latOffset + h * (c + r);
    linear(latent.subarray(lo, lo + c), w.vUp[h], v, c, null, out.subarray(outOffset + h * v, outOffset + (h + 1) * v));
  }
}

/** Splits kv_b_proj [heads * (nope + v), kvLora] into the per-head {@link MlaWeights.kUpT} and {@link MlaWeights.vUp}. */
export function splitKvB(kvB: Float32Array, heads: number, mla: MlaSpec): Pick<MlaWeights, 'kUpT' | 'vUp'> {
  const { kvLoraRank: c, qkNopeHeadDim: nope, vHeadDim: v } = mla;
  const kUpT: Float32Array[] = [];
  const vUp: Float32Array[] = [];
  for (let h = 0; h < heads; h++) {
    const base = h * (nope + v) * c;
    const t = new Float32Array(c * nope);
    for (let d = 0; d < nope; d++) for (let j = 0; j < c; j++) t[j * nope + d] = kvB[base + d * c + j];
    kUpT.push(t);
    vUp.push(kvB.slice(base + nope * c, base + (nope + v) * c));
  }
  return { kUpT, vUp };
}
