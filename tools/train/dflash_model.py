"""The DFlash drafter in PyTorch, the same forward pass as packages/speculative/src/dflash/model.ts.

    target hidden states at target_layer_ids --concat--> fc --> hidden_norm --> c (one per context token)
    c --k_proj, k_norm, RoPE / v_proj (every draft layer)--> context keys and values
    [anchor, mask, ..., mask] --target embedding--> h --N x layer--> norm --target LM head--> logits
    layer: h += o(attn(q(norm h) over [context keys | block keys])); h += mlp(norm h)

A block query attends to every context key before the anchor and to every key of its own block,
before or after it (bidirectional). The drafter owns no embedding and no LM head: it reads the
target's (tied) embedding matrix for both. A context feature of the target's last layer is taken
after the target's final norm (HF's hidden_states[L]); other layers are the raw residual stream.

Tensor names are those of z-lab's published drafters (fc.weight, hidden_norm.weight,
layers.N.{input_layernorm,post_attention_layernorm}.weight, layers.N.self_attn.{q,k,v,o}_proj.weight,
layers.N.self_attn.{q,k}_norm.weight, layers.N.mlp.{gate,up,down}_proj.weight, norm.weight), and
config.json is a Qwen3 config with architectures ["DFlashDraftModel"] and dflash_config
{mask_token_id, target_layer_ids, block_size}.

Two ways to run it, one computation:
  - training: many blocks of one sequence in one pass; `mask` says which context positions and
    which block rows each query row may see (block_attention_mask builds it);
  - the engine's way: one block whose context is every position before its anchor (mask None).
test_dflash_model.py checks that both agree, and that they agree with a loop-by-loop transcription
of model.ts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DFlashConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    mask_token_id: int
    target_layer_ids: list[int]
    num_target_layers: int
    target_hidden_size: int
    block_size: int = 17
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    extra: dict = field(default_factory=dict)

    @property
    def feature_size(self) -> int:
        return len(self.target_layer_ids) * self.target_hidden_size

    def to_config_json(self) -> dict:
        """config.json in the published format (what packages/speculative's parseDflashConfig reads)."""
        cfg = {
            "architectures": ["DFlashDraftModel"],
            "model_type": "qwen3",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "block_size": self.block_size,
            "dflash_config": {
                "mask_token_id": self.mask_token_id,
                "target_layer_ids": list(self.target_layer_ids),
                "block_size": self.block_size,
            },
            "dtype": "bfloat16",
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_target_layers": self.num_target_layers,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_theta": self.rope_theta,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "use_sliding_window": False,
            "vocab_size": self.vocab_size,
        }
        cfg.update(self.extra)
        return cfg

    @classmethod
    def from_config_json(cls, d: dict, target_hidden_size: int) -> "DFlashConfig":
        """Reads config.json with parseDflashConfig's rules, refusing what this module does not run."""
        arch = d.get("architectures") or []
        if any(a != "DFlashDraftModel" for a in arch):
            raise ValueError(f"architectures {arch}: expected DFlashDraftModel")
        dc = d.get("dflash_config") or {}

        def pick(key, default=None):
            return dc[key] if dc.get(key) is not None else d.get(key, default)

        if d.get("is_causal") is True or d.get("use_sliding_window") is True:
            raise ValueError("causal or sliding-window drafter attention is not implemented here")
        if any(t != "full_attention" for t in d.get("layer_types") or []):
            raise ValueError(f"layer_types {d.get('layer_types')}: only full_attention is implemented here")
        for key, identity in (("input_embedding_scale", 1), ("output_multiplier", 1), ("final_logit_softcapping", 0)):
            if pick(key) is not None and pick(key) != identity:
                raise ValueError(f"{key} = {pick(key)} is not implemented here")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d.get('hidden_act')!r}: DFlash drafters use silu")
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"rope {rope}: only default RoPE is implemented here")
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        heads = int(d["num_attention_heads"])
        mask = pick("mask_token_id")
        ids = pick("target_layer_ids")
        if mask is None or ids is None:
            raise ValueError("dflash_config needs mask_token_id and target_layer_ids")
        return cls(
            hidden_size=int(d["hidden_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            intermediate_size=int(d["intermediate_size"]),
            vocab_size=int(d["vocab_size"]),
            mask_token_id=int(mask),
            target_layer_ids=[int(i) for i in ids],
            num_target_layers=int(pick("num_target_layers", 0) or 0),
            target_hidden_size=target_hidden_size,
            block_size=int(pick("block_size", 16)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        )

    def describe(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, the statistics in float32 (HF's Qwen3RMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(_compute_dtype(dtype))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 and narrower (as HF computes norms and RoPE); float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., head_dim] for integer positions [...] (HF default RoPE, float32 unless asked)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).to(dtype) / head_dim))
    freqs = positions.to(dtype)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, S, D], cos/sin [N, S, D]; HF's rotate_half pairing (dim i with i + D/2)."""
    dtype = x.dtype
    x = x.to(_compute_dtype(dtype))
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [N, H, Q, D], k/v [N, H, K, D] (kv heads already repeated), mask bool [N, 1, Q, K] or None."""
    if hasattr(F, "scaled_dot_product_attention") and q.dtype != torch.float64:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # float64 (the CPU self-test's exact reference) and old torch: the plain formula
    cd = _compute_dtype(q.dtype)
    scores = (q.to(cd) @ k.to(cd).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.to(cd)).to(q.dtype)


class DFlashAttention(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.cfg = cfg
        H, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(H, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(H, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(H, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, H, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (k_proj, per-head k_norm, RoPE) and values (v_proj) of rows x [N, S, H]."""
        N, S, _ = x.shape
        hd, kvh = self.cfg.head_dim, self.cfg.num_key_value_heads
        k = self.k_norm(self.k_proj(x).view(N, S, kvh, hd)).transpose(1, 2)
        v = self.v_proj(x).view(N, S, kvh, hd).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, h: torch.Tensor, c: torch.Tensor, noise_rope, ctx_rope, mask: torch.Tensor | None) -> torch.Tensor:
        N, Q, _ = h.shape
        hd, nh = self.cfg.head_dim, self.cfg.num_attention_heads
        q = self.q_norm(self.q_proj(h).view(N, Q, nh, hd)).transpose(1, 2)
        q = apply_rope(q, *noise_rope)
        k_ctx, v_ctx = self.keys_values(c, *ctx_rope)
        k_blk, v_blk = self.keys_values(h, *noise_rope)
        k = torch.cat((k_ctx, k_blk), dim=2)
        v = torch.cat((v_ctx, v_blk), dim=2)
        group = nh // self.cfg.num_key_value_heads
        if group > 1:  # query head i reads kv head i // group
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        out = attention(q, k.to(q.dtype), v.to(q.dtype), mask)
        return self.o_proj(out.transpose(1, 2).reshape(N, Q, nh * hd))


class DFlashMLP(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DFlashLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DFlashAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DFlashMLP(cfg)

    def forward(self, h, c, noise_rope, ctx_rope, mask):
        h = h + self.self_attn(self.input_layernorm(h), c, noise_rope, ctx_rope, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class DFlashDraft(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(cfg.feature_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=generator)

    def context(self, features: torch.Tensor) -> torch.Tensor:
        """c = hidden_norm(fc(features)): the per-token context the draft layers read keys from."""
        return self.hidden_norm(self.fc(features))

    def forward(self, noise: torch.Tensor, noise_pos: torch.Tensor, features: torch.Tensor, ctx_pos: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states of the block rows.

        noise [N, Q, H]: embeddings of the block rows (anchor, masks); noise_pos [N, Q] their positions;
        features [N, C, F]: target features of context positions ctx_pos [N, C];
        mask bool [N, Q, C + Q] (True: may attend) or None for one block seeing all its context.
        """
        cfg = self.cfg
        c = self.context(features)
        rd = _compute_dtype(self.fc.weight.dtype)
        noise_rope = rope_cos_sin(noise_pos, cfg.head_dim, cfg.rope_theta, rd)
        ctx_rope = rope_cos_sin(ctx_pos, cfg.head_dim, cfg.rope_theta, rd)
        m = None if mask is None else mask[:, None]
        h = noise
        for layer in self.layers:
            h = layer(h, c, noise_rope, ctx_rope, m)
        return self.norm(h)

    @torch.no_grad()
    def draft_block(self, embed: torch.Tensor, features: torch.Tensor, anchor: int, drafts: int) -> torch.Tensor:
        """The engine's call (DflashDraft.block): logits [drafts, V] for the block anchored right after
        the context whose features [C, F] are given (positions 0..C-1)."""
        C = features.shape[0]
        dev = features.device
        tokens = torch.full((drafts + 1,), self.cfg.mask_token_id, dtype=torch.long, device=dev)
        tokens[0] = anchor
        noise = F.embedding(tokens, embed)[None]
        pos = torch.arange(C, C + drafts + 1, device=dev)[None]
        ctx_pos = torch.arange(C, device=dev)[None]
        h = self.forward(noise, pos, features[None], ctx_pos, None)
        return F.linear(h[0, 1:], embed)


def block_attention_mask(anchors: torch.Tensor, drafts: torch.Tensor, rows: int, ctx_len: int) -> torch.Tensor:
    """Attention mask for many blocks of one sequence in one pass: bool [N, B * rows, ctx_len + B * rows].

    anchors [N, B]: anchor positions; drafts [N, B]: masks after each anchor (block b uses rows
    0..drafts[b] of its `rows` slots; the rest are padding). A used row of block b sees context
    positions < anchors[b] and the used rows of block b. A padding row sees only itself, so that
    its softmax stays finite; nothing reads it.
    """
    N, B = anchors.shape
    dev = anchors.device
    j = torch.arange(rows, device=dev)
    used = j[None, None, :] <= drafts[..., None]  # [N, B, R]
    ctx = torch.arange(ctx_len, device=dev)[None, None, None, :] < anchors[..., None, None]  # [N, B, 1, C]
    ctx = ctx & used[..., None]  # [N, B, R, C]
    same_block = torch.eye(B, dtype=torch.bool, device=dev)[None, :, None, :, None]  # [1, B, 1, B, 1]
    blk = same_block & used[:, None, None, :, :] & used[:, :, :, None, None]  # [N, B, R, B, R]
    eye = torch.eye(B * rows, dtype=torch.bool, device=dev).view(1, B, rows, B, rows)
    blk = blk | (eye & ~used[:, :, :, None, None])
    return torch.cat((ctx.reshape(N, B * rows, ctx_len), blk.reshape(N, B * rows, B * rows)), dim=-1)


def expected_tensor_names(cfg: DFlashConfig) -> dict[str, list[int]]:
    """Every tensor packages/speculative/src/dflash/weights.ts reads, with its shape."""
    H, hd, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    names = {"fc.weight": [H, cfg.feature_size], "hidden_norm.weight": [H], "norm.weight": [H]}
    for l in range(cfg.num_hidden_layers):
        p = f"layers.{l}"
        names |= {
            f"{p}.input_layernorm.weight": [H],
            f"{p}.post_attention_layernorm.weight": [H],
            f"{p}.self_attn.q_proj.weight": [q, H],
            f"{p}.self_attn.k_proj.weight": [kv, H],
            f"{p}.self_attn.v_proj.weight": [kv, H],
            f"{p}.self_attn.o_proj.weight": [H, q],
            f"{p}.self_attn.q_norm.weight": [hd],
            f"{p}.self_attn.k_norm.weight": [hd],
            f"{p}.mlp.gate_proj.weight": [I, H],
            f"{p}.mlp.up_proj.weight": [I, H],
            f"{p}.mlp.down_proj.weight": [H, I],
        }
    return names


def target_features(layer_outputs: dict[int, torch.Tensor], cfg: DFlashConfig, final_norm: nn.Module) -> torch.Tensor:
    """Concatenated context features [N, T, F] from the target's layer outputs, in target_layer_ids
    order; the target's last layer is taken after its final norm (DflashDraft.features)."""
    parts = []
    for i in cfg.target_layer_ids:
        h = layer_outputs[i]
        if i == cfg.num_target_layers - 1:
            h = final_norm(h)
        parts.append(h)
    return torch.cat(parts, dim=-1)
