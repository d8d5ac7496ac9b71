#!/usr/bin/env python3
"""CPU checks of dflash_model.py (needs torch and numpy only; no GPU, no transformers).

    python3 tools/train/test_dflash_model.py

1. DFlashDraft.draft_block equals a loop-by-loop numpy transcription of DflashDraft.absorb and
   DflashDraft.block in packages/speculative/src/dflash/model.ts (float64 reference).
2. The training path (many blocks of one sequence in one pass under block_attention_mask) gives,
   row for row, what one-block-at-a-time calls give.
3. The module's tensors are exactly the names and shapes weights.ts reads, and config.json
   survives to_config_json / from_config_json.
Prints 'N passed, N failed' and exits non-zero on a failure.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dflash_model import DFlashConfig, DFlashDraft, block_attention_mask, expected_tensor_names, target_features  # noqa: E402


def small_config(**kw) -> DFlashConfig:
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                intermediate_size=48, vocab_size=50, mask_token_id=49, target_layer_ids=[0, 2], num_target_layers=3,
                target_hidden_size=32, block_size=6, rms_norm_eps=1e-6, rope_theta=10000.0)
    base.update(kw)
    return DFlashConfig(**base)


# --- numpy transcription of model.ts ---------------------------------------------------------


def np_rms(x, w, eps):
    return x / math.sqrt(float(np.mean(x * x)) + eps) * w


def np_rope(v, pos, theta, hd):
    half = hd // 2
    inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = pos * inv
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = v[:half].copy(), v[half:].copy()
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s])


def ts_reference(draft: DFlashDraft, embed: np.ndarray, features: np.ndarray, anchor: int, drafts: int) -> np.ndarray:
    cfg = draft.cfg
    W = {k: v.detach().double().numpy() for k, v in draft.state_dict().items()}
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    eps, theta = cfg.rms_norm_eps, cfg.rope_theta
    L = cfg.num_hidden_layers
    keys = [[] for _ in range(L)]
    values = [[] for _ in range(L)]

    def key(x, l, pos):
        k = W[f"layers.{l}.self_attn.k_proj.weight"] @ x
        out = []
        for h in range(nkv):
            kh = np_rms(k[h * hd:(h + 1) * hd], W[f"layers.{l}.self_attn.k_norm.weight"], eps)
            out.append(np_rope(kh, pos, theta, hd))
        return np.concatenate(out)

    # absorb: every context row
    for pos in range(features.shape[0]):
        c = np_rms(W["fc.weight"] @ features[pos], W["hidden_norm.weight"], eps)
        for l in range(L):
            keys[l].append(key(c, l, pos))
            values[l].append(W[f"layers.{l}.self_attn.v_proj.weight"] @ c)
    start = features.shape[0]
    n = drafts + 1
    x = [embed[anchor if i == 0 else cfg.mask_token_id].copy() for i in range(n)]
    group = nh // nkv
    for l in range(L):
        p = f"layers.{l}"
        qs = []
        for i in range(n):
            normed = np_rms(x[i], W[f"{p}.input_layernorm.weight"], eps)
            q = W[f"{p}.self_attn.q_proj.weight"] @ normed
            q = np.concatenate([np_rope(np_rms(q[h * hd:(h + 1) * hd], W[f"{p}.self_attn.q_norm.weight"], eps), start + i, theta, hd)
                                for h in range(nh)])
            qs.append(q)
            keys[l].append(key(normed, l, start + i))
            values[l].append(W[f"{p}.self_attn.v_proj.weight"] @ normed)
        K, V = np.stack(keys[l]), np.stack(values[l])
        for i in range(n):
            attn = []
            for h in range(nh):
                kv = (h // group) * hd
                sc = K[:, kv:kv + hd] @ qs[i][h * hd:(h + 1) * hd] / math.sqrt(hd)
                pr = np.exp(sc - sc.max())
                pr /= pr.sum()
                attn.append(pr @ V[:, kv:kv + hd])
            x[i] = x[i] + W[f"{p}.self_attn.o_proj.weight"] @ np.concatenate(attn)
            normed = np_rms(x[i], W[f"{p}.post_attention_layernorm.weight"], eps)
            g = W[f"{p}.mlp.gate_proj.weight"] @ normed
            u = W[f"{p}.mlp.up_proj.weight"] @ normed
            x[i] = x[i] + W[f"{p}.mlp.down_proj.weight"] @ (g / (1 + np.exp(-g)) * u)
        # the block's own keys are dropped again: the cache keeps only verified context
        keys[l] = keys[l][:start]
        values[l] = values[l][:start]
    return np.stack([embed @ np_rms(x[i], W["norm.weight"], eps) for i in range(1, n)])


# --- checks ------------------------------------------------------------------------------------


def check_against_ts(results):
    torch.manual_seed(0)
    cfg = small_config()
    draft = DFlashDraft(cfg).double()
    draft.init_weights(std=0.2)
    with torch.no_grad():  # norms away from 1 so that a skipped norm shows
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    embed = torch.randn(cfg.vocab_size, cfg.hidden_size, dtype=torch.float64)
    feats = torch.randn(9, cfg.feature_size, dtype=torch.float64)
    for drafts in (1, 3, 5):
        got = draft.draft_block(embed, feats, anchor=7, drafts=drafts).numpy()
        want = ts_reference(draft, embed.numpy(), feats.numpy(), 7, drafts)
        err = float(np.abs(got - want).max())
        results.append((f"draft_block == model.ts transcription (drafts={drafts}), max err {err:.2e}", err < 1e-9))


def check_packed_equals_single(results):
    torch.manual_seed(1)
    cfg = small_config()
    draft = DFlashDraft(cfg).double()
    draft.init_weights(std=0.2)
    embed = torch.randn(cfg.vocab_size, cfg.hidden_size, dtype=torch.float64)
    N, T, R = 2, 20, cfg.block_size
    tokens = torch.randint(0, cfg.vocab_size - 1, (N, T))
    feats = torch.randn(N, T, cfg.feature_size, dtype=torch.float64)
    anchors = torch.tensor([[3, 10, 10, 14], [5, 6, 12, 1]])
    drafts = torch.tensor([[5, 2, 4, 1], [3, 5, 1, 5]])
    B = anchors.shape[1]
    j = torch.arange(R)
    pos = anchors[..., None] + j  # [N, B, R]
    toks = torch.where(j == 0, tokens.gather(1, anchors)[..., None], torch.full_like(pos, cfg.mask_token_id))
    noise = F.embedding(toks.view(N, B * R), embed)
    mask = block_attention_mask(anchors, drafts, R, T)
    ctx_pos = torch.arange(T)[None].expand(N, T)
    with torch.no_grad():
        h = draft(noise, pos.view(N, B * R), feats, ctx_pos, mask)
        logits = F.linear(h, embed).view(N, B, R, -1)
    worst = 0.0
    for n in range(N):
        for b in range(B):
            a, d = int(anchors[n, b]), int(drafts[n, b])
            single = draft.draft_block(embed, feats[n, :a], int(tokens[n, a]), d)
            worst = max(worst, float((single - logits[n, b, 1:d + 1]).abs().max()))
    results.append((f"packed training blocks == one block at a time, max err {worst:.2e}", worst < 1e-9))
    results.append(("no NaN in padding rows", bool(torch.isfinite(logits).all())))


def check_mask_shape(results):
    anchors = torch.tensor([[4, 2]])
    drafts = torch.tensor([[2, 1]])
    m = block_attention_mask(anchors, drafts, 3, 6)
    want_row0 = [1, 1, 1, 1, 0, 0] + [1, 1, 1] + [0, 0, 0]
    want_pad = [0] * 6 + [0, 0, 0] + [0, 0, 1]  # block 1 row 2 is padding: sees itself only
    ok = m.shape == (1, 6, 12) and m[0, 0].int().tolist() == want_row0 and m[0, 5].int().tolist() == want_pad
    results.append(("block_attention_mask layout", ok))


def check_names_and_config(results):
    cfg = small_config()
    draft = DFlashDraft(cfg)
    sd = {k: list(v.shape) for k, v in draft.state_dict().items()}
    results.append(("tensor names and shapes == weights.ts", sd == expected_tensor_names(cfg)))
    back = DFlashConfig.from_config_json(cfg.to_config_json(), cfg.target_hidden_size)
    results.append(("config.json round trip", back == cfg))


def check_features(results):
    cfg = small_config(target_layer_ids=[0, 2], num_target_layers=3)
    outs = {0: torch.randn(1, 4, 32), 1: torch.randn(1, 4, 32), 2: torch.randn(1, 4, 32)}

    class Scale(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    f = target_features(outs, cfg, Scale())
    ok = torch.equal(f[..., :32], outs[0]) and torch.equal(f[..., 32:], 2 * outs[2])
    results.append(("last target layer taken after the final norm, others raw", ok))


def main() -> None:
    results: list[tuple[str, bool]] = []
    for check in (check_against_ts, check_packed_equals_single, check_mask_shape, check_names_and_config, check_features):
        check(results)
    for name, ok in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    failed = sum(1 for _, ok in results if not ok)
    print(f"{len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
