#!/usr/bin/env python3
"""Golden parity fixtures for moeflash.

Writes tiny random Mixture-of-Experts checkpoints in the tensor layouts real Hugging Face
checkpoints use, and the float32 logits HF transformers computes for them, so that the
TypeScript CPU backend (and later the CUDA backend) can be checked against HF itself.

    python tools/golden/make_fixtures.py [OUT_DIR] [--only NAME[,NAME]] [--allow-reference-mismatch]
    python tools/golden/make_fixtures.py /tmp/x --dry-run        # no torch / transformers needed

OUT_DIR defaults to packages/core/test/fixtures/golden (relative to the repository root).
For every fixture NAME it writes OUT_DIR/NAME/ with config.json, the weights (safetensors,
one file or shards + model.safetensors.index.json), input.json, logits.safetensors and
meta.json. tools/golden/README.md lists the exact tensor names and shapes.

How a fixture is made:
  1. Random weights are drawn with numpy from a fixed seed, rounded to bf16 (MXFP4 experts are
     quantized with the OCP MX rule), and written with a small safetensors writer below.
  2. config.json comes from the HF config class's save_pretrained (optionally rewritten into the
     key style released checkpoints use), and is read back with AutoConfig to check it.
  3. The folder is loaded with AutoModelForCausalLM.from_pretrained(dir, dtype=float32,
     attn_implementation="eager"); every parameter HF holds must equal the generated value
     exactly (max |diff| 0), which proves HF reads the layout that was written.
  4. The logits of that reloaded model, one sequence at a time from an empty cache, are the
     fixture. An independent float64 numpy forward pass written from the formulas in
     shared/refs/FORMATS.md must agree with them (default tolerance 1e-3); that check pins the
     semantics of the layout (gate/up order, interleaving, window, sinks, YaRN) to what the
     README documents.
Any mismatch is reported and makes the script exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import struct
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

# Run on the CPU even on a GPU host: the fixture is a float32 CPU computation, and hiding the
# accelerator keeps cuBLAS / TF32 out of it. Set MOEFLASH_GOLDEN_KEEP_GPU=1 to opt out.
if os.environ.get("MOEFLASH_GOLDEN_KEEP_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
# The GPU host has no network; never let transformers or huggingface_hub try to reach it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "packages" / "core" / "test" / "fixtures" / "golden"
SEQ_LENGTHS = (7, 19, 33)
# Router top-k margin (in router-logit units) below which a draw is rejected and redrawn, so a
# float32 engine cannot pick a different expert set than HF did.
MIN_ROUTER_MARGIN = 1e-3
REFERENCE_TOLERANCE = 1e-3
MAX_DRAWS = 6


class FixtureError(Exception):
    pass


def log(msg: str = "") -> None:
    print(msg, flush=True)


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise FixtureError(msg)


# --------------------------------------------------------------------------------------------
# Fixture specifications
# --------------------------------------------------------------------------------------------


@dataclass
class Spec:
    name: str
    family: str  # "qwen3_moe" | "mixtral" | "gpt_oss" | "deepseek_v3"
    layout: str  # "fused" | "per_expert" | "mxfp4" | "bf16"
    description: str
    seed: int
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    moe_inter: int
    head_dim: int | None = None  # None: not written to config.json, HF derives hidden // heads
    dense_inter: int | None = None  # qwen3_moe: intermediate_size of the dense layers
    dense_layers: list[int] = field(default_factory=list)  # qwen3_moe: mlp_only_layers
    norm_topk: bool = True  # qwen3_moe: norm_topk_prob
    rope: dict = field(default_factory=dict)  # {"rope_type": ..., "rope_theta": ..., yarn keys}
    max_pos: int = 4096
    eps: float = 1e-6
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # gpt_oss
    shards: int = 1
    config_style: str = "saved"  # "saved": as save_pretrained writes it; "released": legacy keys
    seq_lengths: tuple[int, ...] = SEQ_LENGTHS
    # Smallest router top-k margin a draw may have. The near-tie fixtures take any draw (0): they
    # exist to hold the close calls a float32 engine must still route as HF does.
    min_router_margin: float = MIN_ROUTER_MARGIN
    # deepseek_v3 only: multi-head latent attention, grouped sigmoid routing, shared experts, and
    # block-scaled FP8 E4M3 projections when fp8_block is set (None: bf16).
    mla: dict | None = None  # q_lora_rank (None: plain q_proj), kv_lora_rank, qk_nope/qk_rope/v_head_dim
    rope_interleave: bool | None = None  # None: key not written (HF default true)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling: float = 1.0
    n_shared: int = 0
    first_k_dense: int = 0
    fp8_block: int | None = None

    @property
    def hd(self) -> int:
        """The query/key head width (deepseek_v3: qk_nope_head_dim + qk_rope_head_dim)."""
        if self.mla is not None:
            return self.mla["qk_nope_head_dim"] + self.mla["qk_rope_head_dim"]
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    @property
    def rope_dim(self) -> int:
        """Dims the RoPE table spans (deepseek_v3: qk_rope_head_dim, HF's config.head_dim there)."""
        return self.mla["qk_rope_head_dim"] if self.mla is not None else self.hd

    @property
    def interleaved_rope(self) -> bool:
        return self.rope_interleave is not False

    def window_for_layer(self, layer: int) -> int | None:
        if self.family == "gpt_oss":
            assert self.layer_types is not None
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
        if self.family == "mixtral":
            return self.sliding_window
        return None

    def is_sparse(self, layer: int) -> bool:
        if self.family == "deepseek_v3":
            return layer >= self.first_k_dense
        return not (self.family == "qwen3_moe" and layer in self.dense_layers)

    def validate(self) -> None:
        H, I = self.hidden, self.moe_inter
        require(self.layers >= 2, f"{self.name}: needs at least 2 layers")
        require(self.heads % self.kv_heads == 0, f"{self.name}: heads must be a multiple of kv_heads")
        require(self.rope_dim % 2 == 0, f"{self.name}: the rotary dims must be even for RoPE")
        require(self.head_dim is not None or self.mla is not None or self.hidden % self.heads == 0, f"{self.name}: hidden % heads")
        require(0 < self.top_k < self.experts, f"{self.name}: need 0 < top_k < experts")
        # Expert tensors must not be square in the dims a transpose would swap, so that a layout
        # mistake shows up as a shape error instead of silently loading transposed values.
        require(2 * I != H and I != H, f"{self.name}: 2*moe_inter and moe_inter must differ from hidden")
        if self.layout == "mxfp4":
            require(H % 32 == 0 and I % 32 == 0, f"{self.name}: MXFP4 needs hidden and intermediate % 32 == 0")
        if self.family == "qwen3_moe":
            require(self.dense_inter is not None, f"{self.name}: qwen3_moe needs dense_inter")
            require(all(0 <= l < self.layers for l in self.dense_layers), f"{self.name}: bad dense_layers")
            require(any(self.is_sparse(l) for l in range(self.layers)), f"{self.name}: no MoE layer")
        if self.family == "gpt_oss":
            require(self.layer_types is not None and len(self.layer_types) == self.layers, f"{self.name}: layer_types")
        if self.family == "deepseek_v3":
            require(self.mla is not None, f"{self.name}: deepseek_v3 needs mla dims")
            require(self.heads == self.kv_heads, f"{self.name}: latent attention has kv_heads == heads")
            require(self.dense_inter is not None or self.first_k_dense == 0, f"{self.name}: dense layers need dense_inter")
            per_group = self.experts // self.n_group
            require(self.experts % self.n_group == 0 and per_group >= 2, f"{self.name}: groups of >= 2 experts")
            require(self.topk_group <= self.n_group and self.top_k <= self.topk_group * per_group,
                    f"{self.name}: top_k must fit in the kept groups")
            require(any(self.is_sparse(l) for l in range(self.layers)), f"{self.name}: no MoE layer")
            if self.fp8_block is not None:
                # Partial edge blocks must occur, so that the scale indexing of a ragged edge is tested.
                require(H % self.fp8_block != 0, f"{self.name}: hidden must not be a multiple of the FP8 block")
        if self.rope.get("rope_type") == "yarn":
            # Old transformers releases derived the YaRN factor from max_position_embeddings /
            # original_max_position_embeddings; keep both readings identical.
            require(
                self.max_pos == int(self.rope["factor"] * self.rope["original_max_position_embeddings"]),
                f"{self.name}: max_pos must equal factor * original_max_position_embeddings",
            )


YARN = {
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 8.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 64,
}

SPECS: list[Spec] = [
    Spec(
        name="qwen3_moe_fused",
        family="qwen3_moe",
        layout="fused",
        description="Qwen3-MoE, transformers-5 fused experts (gate_up_proj [E,2I,H] gate rows first, "
        "down_proj [E,H,I]); explicit head_dim (32) != hidden/heads (16); norm_topk_prob true; all layers MoE.",
        seed=101,
        vocab=384,
        hidden=64,
        layers=3,
        heads=4,
        kv_heads=2,
        head_dim=32,
        experts=8,
        top_k=2,
        moe_inter=48,
        dense_inter=128,
        dense_layers=[],
        norm_topk=True,
        rope={"rope_type": "default", "rope_theta": 1000000.0},
        eps=1e-6,
        shards=1,
        config_style="saved",
    ),
    Spec(
        name="qwen3_moe_per_expert",
        family="qwen3_moe",
        layout="per_expert",
        description="Qwen3-MoE, per-expert tensors as on released checkpoints; norm_topk_prob false; "
        "layer 1 dense (mlp_only_layers); head_dim absent (hidden/heads = 16); 2 shards; legacy config keys.",
        seed=202,
        vocab=320,
        hidden=96,
        layers=3,
        heads=6,
        kv_heads=2,
        head_dim=None,
        experts=6,
        top_k=3,
        moe_inter=40,
        dense_inter=160,
        dense_layers=[1],
        norm_topk=False,
        rope={"rope_type": "default", "rope_theta": 1000000.0},
        eps=1e-6,
        shards=2,
        config_style="released",
    ),
    Spec(
        name="mixtral_fused",
        family="mixtral",
        layout="fused",
        description="Mixtral, transformers-5 fused experts under mlp.* (router mlp.gate); one KV head "
        "(MQA); sliding_window 16 < longest sequence (33).",
        seed=303,
        vocab=256,
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=1,
        experts=8,
        top_k=2,
        moe_inter=96,
        rope={"rope_type": "default", "rope_theta": 1000000.0},
        eps=1e-5,
        sliding_window=16,
        shards=1,
        config_style="saved",
    ),
    Spec(
        name="mixtral_per_expert",
        family="mixtral",
        layout="per_expert",
        description="Mixtral, released layout block_sparse_moe.experts.J.w1/w2/w3; odd sizes (hidden 72, "
        "intermediate 40, 6 heads / 3 KV heads, head_dim 12, vocab 301); 2 shards; legacy config keys.",
        seed=404,
        vocab=301,
        hidden=72,
        layers=3,
        heads=6,
        kv_heads=3,
        experts=4,
        top_k=2,
        moe_inter=40,
        rope={"rope_type": "default", "rope_theta": 10000.0},
        eps=1e-5,
        sliding_window=None,
        shards=2,
        config_style="released",
    ),
    Spec(
        name="gpt_oss_mxfp4",
        family="gpt_oss",
        layout="mxfp4",
        description="gpt-oss with MXFP4 experts exactly as released (*_blocks / *_scales uint8 + bf16 biases), "
        "quantization_config mxfp4; sliding window 8 on alternating layers; sinks; YaRN (factor 8, "
        "original 64, truncate false); head_dim 24; 2 shards; legacy config keys.",
        seed=505,
        vocab=288,
        hidden=64,
        layers=4,
        heads=4,
        kv_heads=2,
        head_dim=24,
        experts=8,
        top_k=4,
        moe_inter=96,
        rope=dict(YARN),
        max_pos=512,
        eps=1e-5,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        shards=2,
        config_style="released",
    ),
    Spec(
        name="gpt_oss_bf16",
        family="gpt_oss",
        layout="bf16",
        description="gpt-oss with plain bf16 experts in HF's in-memory layout (gate_up_proj [E,H,2I] "
        "interleaved gate/up columns, down_proj [E,I,H]), as bf16 re-uploads of gpt-oss ship them.",
        seed=606,
        vocab=288,
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=24,
        experts=4,
        top_k=2,
        moe_inter=96,
        rope=dict(YARN),
        max_pos=512,
        eps=1e-5,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        shards=1,
        config_style="saved",
    ),
    # The two checkpoints below are drawn without the router-margin filter, at the sizes where a
    # bf16 KV cache was seen to flip a near-tie (CUDA against CPU: one position jumps to 0.3
    # relative error and later ones inherit it through attention). Sequences stay under 64 tokens
    # so that a whole-sequence step runs the GEMV projections, like decode.
    Spec(
        name="gpt_oss_neartie",
        family="gpt_oss",
        layout="mxfp4",
        description="gpt-oss, MXFP4 experts whose widths (hidden 64, expert 128) take the tensor-core path; "
        "4 heads of 16 over 2 KV heads, 8 experts top-2; sliding window 8 on alternate layers; sinks; "
        "YaRN factor 32 over 128 original positions; no router-margin filter (near-ties kept).",
        seed=707,
        vocab=288,
        hidden=64,
        layers=4,
        heads=4,
        kv_heads=2,
        head_dim=16,
        experts=8,
        top_k=2,
        moe_inter=128,
        rope={**YARN, "factor": 32.0, "original_max_position_embeddings": 128},
        max_pos=4096,
        eps=1e-5,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        shards=1,
        config_style="saved",
        seq_lengths=(37, 50, 63),
        min_router_margin=0.0,
    ),
    Spec(
        name="qwen3_moe_neartie",
        family="qwen3_moe",
        layout="fused",
        description="Qwen3-MoE, hidden 96, 12 experts top-3, norm_topk_prob false, expert width 40 (bf16 "
        "experts: not a multiple of 32), 6 heads of 16 over 2 KV heads, 4 layers; no router-margin filter.",
        seed=808,
        vocab=320,
        hidden=96,
        layers=4,
        heads=6,
        kv_heads=2,
        head_dim=16,
        experts=12,
        top_k=3,
        moe_inter=40,
        dense_inter=160,
        dense_layers=[],
        norm_topk=False,
        rope={"rope_type": "default", "rope_theta": 1000000.0},
        eps=1e-6,
        shards=1,
        config_style="saved",
        seq_lengths=(37, 50, 63),
        min_router_margin=0.0,
    ),
]


SPECS += [
    Spec(
        name="deepseek_v3_fp8",
        family="deepseek_v3",
        layout="per_expert",
        description="DeepSeek-V3 as released: per-expert tensors, every projection in the layers block-scaled "
        "FP8 E4M3 (weight_scale_inv, 32x32 blocks, ragged edges), router bf16 and e_score_correction_bias F32; "
        "latent attention with q_lora_rank set; interleaved rotary dims (rope_interleave default); YaRN with "
        "mscale 0.9 / mscale_all_dim 0.8 (both the cos/sin factor and the softmax scale); 8 experts in 4 "
        "groups, 2 groups kept, top-3; one shared expert; layer 0 dense; legacy config keys.",
        seed=909,
        vocab=300,
        hidden=80,
        layers=3,
        heads=4,
        kv_heads=4,
        experts=8,
        top_k=3,
        moe_inter=24,
        dense_inter=112,
        norm_topk=True,
        rope={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
              "mscale": 0.9, "mscale_all_dim": 0.8, "original_max_position_embeddings": 64},
        max_pos=256,
        eps=1e-6,
        shards=2,
        config_style="released",
        mla={"q_lora_rank": 40, "kv_lora_rank": 48, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 20},
        n_group=4,
        topk_group=2,
        routed_scaling=2.5,
        n_shared=1,
        first_k_dense=1,
        fp8_block=32,
    ),
    Spec(
        name="deepseek_v3_bf16",
        family="deepseek_v3",
        layout="fused",
        description="deepseek_v3 in bf16 with transformers-5 fused experts; q_lora_rank null (plain q_proj); "
        "rope_interleave false; default RoPE; 12 experts in one group, top-4; norm_topk_prob false with "
        "routed_scaling_factor 1.5; two shared experts; layers 0-1 dense; 3 heads.",
        seed=1010,
        vocab=256,
        hidden=64,
        layers=4,
        heads=3,
        kv_heads=3,
        experts=12,
        top_k=4,
        moe_inter=20,
        dense_inter=96,
        norm_topk=False,
        rope={"rope_type": "default", "rope_theta": 10000.0},
        eps=1e-6,
        shards=1,
        config_style="saved",
        mla={"q_lora_rank": None, "kv_lora_rank": 40, "qk_nope_head_dim": 12, "qk_rope_head_dim": 16, "v_head_dim": 28},
        rope_interleave=False,
        n_group=1,
        topk_group=1,
        routed_scaling=1.5,
        n_shared=2,
        first_k_dense=2,
    ),
]


# --------------------------------------------------------------------------------------------
# bf16 and MXFP4 in numpy
# --------------------------------------------------------------------------------------------


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 -> float32, round to nearest even on the dropped 16 bits."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    require(bool(np.isfinite(x).all()), "round_bf16: non-finite input")
    b = x.view(np.uint32).astype(np.uint64)
    lsb = (b >> np.uint64(16)) & np.uint64(1)
    b = (b + np.uint64(0x7FFF) + lsb) & np.uint64(0xFFFF0000)
    return b.astype(np.uint32).view(np.float32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    require(bool(np.array_equal(round_bf16(x), x)), "bf16_bits: value is not exactly representable in bf16")
    return (x.view(np.uint32) >> np.uint32(16)).astype(np.uint16)


FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float64
)


def e2m1_magnitude_code(a: np.ndarray) -> np.ndarray:
    """Nearest E2M1 magnitude code (0..7) for a >= 0; ties go to the even code; saturates at 6.

    Grid 0, .5, 1, 1.5, 2, 3, 4, 6. Even codes keep both tie points of their interval:
    0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
    """
    conds = [a <= 0.25, a < 0.75, a <= 1.25, a < 1.75, a <= 2.5, a < 3.5, a <= 5.0]
    return np.select(conds, [0, 1, 2, 3, 4, 5, 6], default=7).astype(np.uint8)


def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OCP MX v1.0 MXFP4 along the last axis.

    w: [..., K] (K % 32 == 0). Returns blocks uint8 [..., K/32, 16] (element 2i in the low
    nibble, 2i+1 in the high nibble) and scales uint8 [..., K/32] (E8M0, bias 127).
    shared_exp = floor(log2(max|v|)) - 2, clamped to [-127, 127]; an all-zero block gets code 0.
    A negative value keeps its sign bit even when it rounds to zero (code 0x8, -0).
    """
    w = np.asarray(w, dtype=np.float64)
    *prefix, K = w.shape
    require(K % 32 == 0, f"quantize_mxfp4: last axis {K} is not a multiple of 32")
    blocks = w.reshape(*prefix, K // 32, 32)
    amax = np.abs(blocks).max(axis=-1)
    _, exp2 = np.frexp(amax)  # amax = m * 2**exp2, m in [0.5, 1) -> floor(log2(amax)) = exp2 - 1
    shared = np.where(amax > 0, exp2.astype(np.int64) - 1 - 2, -127)
    shared = np.clip(shared, -127, 127)
    scales = (shared + 127).astype(np.uint8)
    scaled = blocks / np.ldexp(1.0, shared)[..., None]  # exact: division by a power of two
    codes = e2m1_magnitude_code(np.abs(scaled)) | np.where(scaled < 0, 8, 0).astype(np.uint8)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return packed, scales


def dequantize_mxfp4(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of quantize_mxfp4 (exact): blocks [..., G, 16] + scales [..., G] -> float32 [..., G*32]."""
    require(packed.shape[:-1] == scales.shape and packed.shape[-1] == 16, "dequantize_mxfp4: shape mismatch")
    require(bool((scales != 255).all()), "dequantize_mxfp4: NaN scale (0xFF) present")
    lo = packed & 0x0F
    hi = packed >> 4
    codes = np.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], 32)
    vals = FP4_VALUES[codes] * np.ldexp(1.0, scales.astype(np.int64) - 127)[..., None]
    return vals.reshape(*packed.shape[:-2], packed.shape[-2] * 32).astype(np.float32)


def mxfp4_self_test() -> None:
    """Checks the quantizer on hand-made blocks before anything depends on it."""
    # One block whose max is 7.9: floor(log2 7.9) = 2 -> shared_exp 0 -> scale 1 (code 127).
    probe = [7.9, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.1, -0.2, -2.6, 0.0, 1.0, -6.0, 0.74, 5.01]
    want = [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -3.0, 0.0, 1.0, -6.0, 0.5, 6.0]
    block = np.zeros(32)
    block[: len(probe)] = probe
    packed, scales = quantize_mxfp4(block[None, :])
    require(scales.ravel().tolist() == [127], f"mxfp4 self-test: scale code {scales.tolist()} != [127]")
    got = dequantize_mxfp4(packed, scales)[0]
    require(got[: len(want)].tolist() == want, f"mxfp4 self-test: {got[:len(want)].tolist()} != {want}")
    require(int(packed[0, 0, 0]) == (0x7 | (0x0 << 4)), f"mxfp4 self-test: nibble order, byte0={packed[0,0,0]:#x}")
    # Byte 4 holds elements 8 (6.1 -> 6, code 0x7, low nibble) and 9 (-0.2 -> -0, code 0x8: a negative
    # value keeps its sign bit even when it rounds to zero).
    require(int(packed[0, 0, 4]) == 0x87, f"mxfp4 self-test: byte4={packed[0,0,4]:#x}, expected 0x87")
    # Scales: amax 0.1 -> floor(log2 .1) = -4 -> shared -6 -> code 121; amax exactly 4 -> 2-2 = 0.
    _, s = quantize_mxfp4(np.array([[0.1] + [0.0] * 31, [4.0] + [0.0] * 31, [0.0] * 32]))
    require(s[:, 0].tolist() == [121, 127, 0], f"mxfp4 self-test: scales {s[:, 0].tolist()}")
    # Round trip of random data: every dequantized value is on the grid and bf16-exact.
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 5, 64)) * 0.05
    p, s = quantize_mxfp4(w)
    d = dequantize_mxfp4(p, s)
    require(bool(np.array_equal(round_bf16(d), d)), "mxfp4 self-test: dequantized values not bf16-exact")
    p2, s2 = quantize_mxfp4(d)
    require(bool(np.array_equal(dequantize_mxfp4(p2, s2), d)), "mxfp4 self-test: requantizing changed values")


def decode_e4m3(codes: np.ndarray) -> np.ndarray:
    """FP8 E4M3 ("e4m3fn") codes -> float64: bias 7, subnormals m * 2^-9, 0x7F / 0xFF NaN, no Inf."""
    c = codes.astype(np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    e, m = (c >> 3) & 0xF, c & 7
    mag = np.where(e == 0, m * 2.0**-9, (1.0 + m / 8.0) * np.exp2(e - 7.0))
    return np.where((c & 0x7F) == 0x7F, np.nan, sign * mag)


_E4M3_MAGNITUDES = decode_e4m3(np.arange(0x7F, dtype=np.uint8))  # codes 0..126, increasing


def encode_e4m3(x: np.ndarray) -> np.ndarray:
    """float -> nearest E4M3 code, ties to the even code (even mantissa); |x| must be <= 448."""
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    require(bool((a <= 448.0).all()), "encode_e4m3: value beyond 448 (the caller scales into range)")
    hi = np.clip(np.searchsorted(_E4M3_MAGNITUDES, a), 0, 126)
    lo = np.clip(hi - 1, 0, 126)
    d_lo, d_hi = a - _E4M3_MAGNITUDES[lo], _E4M3_MAGNITUDES[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    return code | np.where(np.signbit(x) & (code != 0), 0x80, 0).astype(np.uint8)


def quantize_fp8_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block-scaled FP8 as DeepSeek-V3 ships it: codes uint8 [out, in], weight_scale_inv float32
    [ceil(out/b), ceil(in/b)] with value = E4M3(code) * scale_inv of its block. Scales are rounded to
    bf16 so that every value (4 significant bits times 8) is exact in float32, however HF multiplies.
    Returns (codes, scale_inv, dequantized float32)."""
    rows, cols = w.shape
    br, bc = -(-rows // block), -(-cols // block)
    scales = np.zeros((br, bc), dtype=np.float32)
    codes = np.zeros((rows, cols), dtype=np.uint8)
    for i in range(br):
        for j in range(bc):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block].astype(np.float64)
            amax = float(np.abs(blk).max())
            s = float(round_bf16(np.array([amax / 448.0 if amax > 0 else 1.0], dtype=np.float32))[0])
            # A bf16-rounded scale can fall below amax / 448: clip into range (saturating at 448).
            codes[i * block:(i + 1) * block, j * block:(j + 1) * block] = encode_e4m3(np.clip(blk / s, -448.0, 448.0))
            scales[i, j] = s
    deq = decode_e4m3(codes) * np.repeat(np.repeat(scales.astype(np.float64), block, 0), block, 1)[:rows, :cols]
    deq32 = deq.astype(np.float32)
    require(bool(np.array_equal(deq32.astype(np.float64), deq)), "FP8 dequantized values not exact in float32")
    return codes, scales, deq32


def fp8_self_test() -> None:
    """Checks the E4M3 codec on hand-made values before anything depends on it."""
    require(decode_e4m3(np.array([0x7E], dtype=np.uint8))[0] == 448.0, "fp8 self-test: max normal is not 448")
    require(decode_e4m3(np.array([0x01], dtype=np.uint8))[0] == 2.0**-9, "fp8 self-test: smallest subnormal")
    require(decode_e4m3(np.array([0x38], dtype=np.uint8))[0] == 1.0, "fp8 self-test: 1.0 is 0x38")
    # 1.0625 lies halfway between 1.0 (0x38, even) and 1.125 (0x39): ties go to the even code.
    got = encode_e4m3(np.array([1.0625, 1.1875, -2.0, 0.0, 448.0, 2.0**-10]))
    require(got.tolist() == [0x38, 0x3A, 0xC0, 0x00, 0x7E, 0x00], f"fp8 self-test: codes {[hex(v) for v in got]}")
    all_codes = np.array([c for c in range(256) if (c & 0x7F) != 0x7F], dtype=np.uint8)
    require(bool(np.array_equal(encode_e4m3(decode_e4m3(all_codes)) | 0, np.where(all_codes == 0x80, 0, all_codes))),
            "fp8 self-test: decode then encode is not the identity")


# --------------------------------------------------------------------------------------------
# Minimal safetensors writer / reader (little endian, dtype-size ordered, 8-byte aligned)
# --------------------------------------------------------------------------------------------

_ST = {"F32": (np.dtype("<f4"), 4), "BF16": (np.dtype("<u2"), 2), "U8": (np.dtype("u1"), 1), "F8_E4M3": (np.dtype("u1"), 1)}


def st_bf16(x: np.ndarray) -> tuple[str, np.ndarray]:
    return ("BF16", bf16_bits(x))


def st_u8(x: np.ndarray) -> tuple[str, np.ndarray]:
    require(x.dtype == np.uint8, "st_u8: expected uint8")
    return ("U8", x)


def st_f32(x: np.ndarray) -> tuple[str, np.ndarray]:
    return ("F32", np.asarray(x, dtype=np.float32))


def st_fp8(codes: np.ndarray) -> tuple[str, np.ndarray]:
    require(codes.dtype == np.uint8, "st_fp8: expected uint8 E4M3 codes")
    return ("F8_E4M3", codes)


def tensor_nbytes(t: tuple[str, np.ndarray]) -> int:
    return int(t[1].size) * _ST[t[0]][1]


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> int:
    items = sorted(tensors.items(), key=lambda kv: (-_ST[kv[1][0]][1], kv[0]))
    header: dict = {"__metadata__": {"format": "pt"}}
    chunks = []
    offset = 0
    for name, (dt, arr) in items:
        data = np.ascontiguousarray(arr, dtype=_ST[dt][0]).tobytes()
        header[name] = {"dtype": dt, "shape": [int(d) for d in arr.shape], "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for c in chunks:
            f.write(c)
    return offset


def read_safetensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        arr = np.frombuffer(raw[base + b : base + e], dtype=_ST[info["dtype"]][0]).reshape(info["shape"])
        out[name] = (info["dtype"], arr)
    return out


# --------------------------------------------------------------------------------------------
# Random weights (logical form) for one fixture
# --------------------------------------------------------------------------------------------
#
# Logical form: plain float32 numpy arrays, every value exactly representable in bf16, in the
# (out, in) orientation of nn.Linear:
#   embed [V,H], final_norm [H], lm_head [V,H]
#   layers[l]: input_norm, post_norm [H]; q [nh*hd,H], k/v [nkv*hd,H], o [H,nh*hd];
#              gpt_oss: q_bias, k_bias, v_bias, o_bias, sinks [nh]; qwen3_moe: q_norm, k_norm [hd]
#              mlp == "dense": gate/up [Id,H], down [H,Id]
#              mlp == "moe":   router [E,H] (+ router_bias [E] for gpt_oss)
#                 qwen3_moe / mixtral: gate/up [E,I,H], down [E,H,I]
#                 gpt_oss: gate_up [E,2I,H] (row 2j = gate j, row 2j+1 = up j), gate_up_bias [E,2I],
#                          down [E,H,I], down_bias [E,H]; mxfp4 adds the packed blocks / scales.


class Draw:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def raw(self, shape, std: float, mean: float = 0.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std + mean).astype(np.float32)

    def bf16(self, shape, std: float, mean: float = 0.0) -> np.ndarray:
        return round_bf16(self.raw(shape, std, mean))


def make_weights(spec: Spec, seed: int) -> dict:
    if spec.family == "deepseek_v3":
        return make_deepseek_weights(spec, seed)
    d = Draw(seed)
    H, V, nh, nkv, hd = spec.hidden, spec.vocab, spec.heads, spec.kv_heads, spec.hd
    E, I = spec.experts, spec.moe_inter
    W: dict = {
        "embed": d.bf16((V, H), 1.0),
        "lm_head": d.bf16((V, H), 1.5 / math.sqrt(H)),
        "final_norm": d.bf16((H,), 0.1, 1.0),
        "layers": [],
    }
    for l in range(spec.layers):
        lw: dict = {
            "input_norm": d.bf16((H,), 0.1, 1.0),
            "post_norm": d.bf16((H,), 0.1, 1.0),
            "q": d.bf16((nh * hd, H), 1.0 / math.sqrt(H)),
            "k": d.bf16((nkv * hd, H), 1.0 / math.sqrt(H)),
            "v": d.bf16((nkv * hd, H), 1.0 / math.sqrt(H)),
            "o": d.bf16((H, nh * hd), 1.0 / math.sqrt(nh * hd)),
        }
        if spec.family == "qwen3_moe":
            lw["q_norm"] = d.bf16((hd,), 0.1, 1.0)
            lw["k_norm"] = d.bf16((hd,), 0.1, 1.0)
        if spec.family == "gpt_oss":
            lw["q_bias"] = d.bf16((nh * hd,), 0.1)
            lw["k_bias"] = d.bf16((nkv * hd,), 0.1)
            lw["v_bias"] = d.bf16((nkv * hd,), 0.1)
            lw["o_bias"] = d.bf16((H,), 0.1)
            lw["sinks"] = d.bf16((nh,), 1.0, 0.5)
        if not spec.is_sparse(l):
            Id = spec.dense_inter
            assert Id is not None
            lw["mlp"] = "dense"
            lw["gate"] = d.bf16((Id, H), 1.0 / math.sqrt(H))
            lw["up"] = d.bf16((Id, H), 1.0 / math.sqrt(H))
            lw["down"] = d.bf16((H, Id), 1.0 / math.sqrt(Id))
        else:
            lw["mlp"] = "moe"
            # Router weights larger than the rest so routing is decisive (router-logit std ~2.5).
            lw["router"] = d.bf16((E, H), 2.5 / math.sqrt(H))
            if spec.family == "gpt_oss":
                lw["router_bias"] = d.bf16((E,), 0.5)
                # Large enough that the clamps at +-7 in the gpt-oss SwiGLU are hit.
                gate_up_std, down_std = 3.0 / math.sqrt(H), 0.3 / math.sqrt(I)
                lw["gate_up_bias"] = d.bf16((E, 2 * I), 1.0)
                lw["down_bias"] = d.bf16((E, H), 0.1)
                if spec.layout == "mxfp4":
                    gu = d.raw((E, 2 * I, H), gate_up_std)
                    dn = d.raw((E, H, I), down_std)
                    if l == 0:
                        gu[0, 0, :32] = 0.0  # one all-zero block (scale code 0)
                        dn[E - 1, H - 1, -32:] = 0.0
                    gu_blocks, gu_scales = quantize_mxfp4(gu)
                    dn_blocks, dn_scales = quantize_mxfp4(dn)
                    lw["gate_up"] = dequantize_mxfp4(gu_blocks, gu_scales)
                    lw["down"] = dequantize_mxfp4(dn_blocks, dn_scales)
                    lw["mx"] = {
                        "gate_up_blocks": gu_blocks,
                        "gate_up_scales": gu_scales,
                        "down_blocks": dn_blocks,
                        "down_scales": dn_scales,
                        "gate_up_source_maxerr": float(np.abs(lw["gate_up"] - gu).max()),
                        "down_source_maxerr": float(np.abs(lw["down"] - dn).max()),
                    }
                    for key in ("gate_up", "down"):
                        require(bool(np.array_equal(round_bf16(lw[key]), lw[key])), f"{key}: MXFP4 values not bf16-exact")
                else:
                    lw["gate_up"] = d.bf16((E, 2 * I, H), gate_up_std)
                    lw["down"] = d.bf16((E, H, I), down_std)
            else:
                lw["gate"] = d.bf16((E, I, H), 1.0 / math.sqrt(H))
                lw["up"] = d.bf16((E, I, H), 1.0 / math.sqrt(H))
                lw["down"] = d.bf16((E, H, I), 1.0 / math.sqrt(I))
        W["layers"].append(lw)
    return W


# deepseek_v3 logical form, per layer: input_norm, post_norm [H];
#   q [nh*qk, H] (q_lora_rank null) or q_a [r_q, H], q_a_norm [r_q], q_b [nh*qk, r_q];
#   kv_a [r_kv + rope, H], kv_a_norm [r_kv], kv_b [nh*(nope + v), r_kv], o [H, nh*v];
#   dense layers: gate/up [Id, H], down [H, Id];
#   MoE layers: router [E, H], e_bias [E], gate/up [E, I, H], down [E, H, I],
#               shared_gate/shared_up [S, H], shared_down [H, S] with S = n_shared * I;
#   fp8: lw["fp8"][key] = (codes, scale_inv) of each projection (experts: stacked over E), whose
#   logical value above is the exact dequantized one.


def make_deepseek_weights(spec: Spec, seed: int) -> dict:
    d = Draw(seed)
    H, V, nh, E, I = spec.hidden, spec.vocab, spec.heads, spec.experts, spec.moe_inter
    m = spec.mla
    assert m is not None
    nope, r, v, c, rq = m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["v_head_dim"], m["kv_lora_rank"], m["q_lora_rank"]
    qk = nope + r
    W: dict = {
        "embed": d.bf16((V, H), 1.0),
        "lm_head": d.bf16((V, H), 1.5 / math.sqrt(H)),
        "final_norm": d.bf16((H,), 0.1, 1.0),
        "layers": [],
    }
    for l in range(spec.layers):
        fp8: dict = {}

        def proj(key: str, shape: tuple, std: float) -> np.ndarray:
            """A projection in the layer: bf16 values, or FP8 codes + block scales and their exact values."""
            if spec.fp8_block is None:
                return d.bf16(shape, std)
            raw = d.raw(shape, std)
            if len(shape) == 2:
                codes, scales, deq = quantize_fp8_blocks(raw, spec.fp8_block)
            else:
                parts = [quantize_fp8_blocks(raw[j], spec.fp8_block) for j in range(shape[0])]
                codes, scales, deq = (np.stack([p[i] for p in parts]) for i in range(3))
            fp8[key] = (codes, scales)
            return deq

        lw: dict = {"input_norm": d.bf16((H,), 0.1, 1.0), "post_norm": d.bf16((H,), 0.1, 1.0), "fp8": fp8}
        if rq is None:
            lw["q"] = proj("q", (nh * qk, H), 1.0 / math.sqrt(H))
        else:
            lw["q_a"] = proj("q_a", (rq, H), 1.0 / math.sqrt(H))
            lw["q_a_norm"] = d.bf16((rq,), 0.1, 1.0)
            lw["q_b"] = proj("q_b", (nh * qk, rq), 1.0 / math.sqrt(rq))
        lw["kv_a"] = proj("kv_a", (c + r, H), 1.0 / math.sqrt(H))
        lw["kv_a_norm"] = d.bf16((c,), 0.1, 1.0)
        lw["kv_b"] = proj("kv_b", (nh * (nope + v), c), 1.0 / math.sqrt(c))
        lw["o"] = proj("o", (H, nh * v), 1.0 / math.sqrt(nh * v))
        if not spec.is_sparse(l):
            Id = spec.dense_inter
            assert Id is not None
            lw["mlp"] = "dense"
            lw["gate"] = proj("gate", (Id, H), 1.0 / math.sqrt(H))
            lw["up"] = proj("up", (Id, H), 1.0 / math.sqrt(H))
            lw["down"] = proj("down", (H, Id), 1.0 / math.sqrt(Id))
        else:
            S = spec.n_shared * I
            lw["mlp"] = "moe"
            lw["router"] = d.bf16((E, H), 2.5 / math.sqrt(H))
            # Small against the sigmoid scores, positive on average, both signs: it must move choices
            # without every choice value turning negative.
            lw["e_bias"] = d.bf16((E,), 0.05, 0.02)
            lw["gate"] = proj("gate", (E, I, H), 1.0 / math.sqrt(H))
            lw["up"] = proj("up", (E, I, H), 1.0 / math.sqrt(H))
            lw["down"] = proj("down", (E, H, I), 1.0 / math.sqrt(I))
            if S > 0:
                lw["shared_gate"] = proj("shared_gate", (S, H), 1.0 / math.sqrt(H))
                lw["shared_up"] = proj("shared_up", (S, H), 1.0 / math.sqrt(H))
                lw["shared_down"] = proj("shared_down", (H, S), 1.0 / math.sqrt(S))
        W["layers"].append(lw)
    return W


def deepseek_tensors(spec: Spec, W: dict, as_disk: bool) -> dict:
    """deepseek_v3 tensors: on disk (per-expert or fused, FP8 codes + weight_scale_inv where set), or
    as transformers 5 holds them after loading (fused experts, dequantized values)."""
    out: dict = {}

    def put(name: str, lw: dict | None, key: str, value: np.ndarray, index: int | None = None) -> None:
        if not as_disk:
            out[name] = np.asarray(value, dtype=np.float32)
            return
        fp8 = lw["fp8"].get(key) if lw is not None else None
        if fp8 is None:
            out[name] = st_bf16(value)
            return
        codes, scales = fp8
        if index is not None:
            codes, scales = codes[index], scales[index]
        out[name] = st_fp8(np.ascontiguousarray(codes))
        out[name + "_scale_inv"] = st_f32(np.ascontiguousarray(scales))

    put("model.embed_tokens.weight", None, "", W["embed"])
    put("model.norm.weight", None, "", W["final_norm"])
    put("lm_head.weight", None, "", W["lm_head"])
    for l, lw in enumerate(W["layers"]):
        p = f"model.layers.{l}."
        put(p + "input_layernorm.weight", None, "", lw["input_norm"])
        put(p + "post_attention_layernorm.weight", None, "", lw["post_norm"])
        at = p + "self_attn."
        for key, name in (("q", "q_proj"), ("q_a", "q_a_proj"), ("q_b", "q_b_proj"), ("kv_a", "kv_a_proj_with_mqa"),
                          ("kv_b", "kv_b_proj"), ("o", "o_proj")):
            if key in lw:
                put(at + name + ".weight", lw, key, lw[key])
        for key, name in (("q_a_norm", "q_a_layernorm"), ("kv_a_norm", "kv_a_layernorm")):
            if key in lw:
                put(at + name + ".weight", None, "", lw[key])
        if lw["mlp"] == "dense":
            for k in ("gate", "up", "down"):
                put(p + f"mlp.{k}_proj.weight", lw, k, lw[k])
            continue
        put(p + "mlp.gate.weight", None, "", lw["router"])
        # DeepSeek ships the selection bias in float32; HF keeps it float32 (_keep_in_fp32_modules_strict).
        out[p + "mlp.gate.e_score_correction_bias"] = st_f32(lw["e_bias"]) if as_disk else lw["e_bias"]
        if spec.layout == "per_expert" and as_disk:
            for j in range(spec.experts):
                for k in ("gate", "up", "down"):
                    put(p + f"mlp.experts.{j}.{k}_proj.weight", lw, k, lw[k][j], index=j)
        else:
            require(not (as_disk and spec.fp8_block is not None), f"{spec.name}: FP8 experts are written per expert")
            put(p + "mlp.experts.gate_up_proj", lw, "", np.concatenate([lw["gate"], lw["up"]], axis=1))
            put(p + "mlp.experts.down_proj", lw, "", lw["down"])
        if "shared_gate" in lw:
            for k in ("gate", "up", "down"):
                put(p + f"mlp.shared_experts.{k}_proj.weight", lw, "shared_" + k, lw["shared_" + k])
    return out


def make_inputs(spec: Spec, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed + 1_000_003)
    return [[int(t) for t in rng.integers(0, spec.vocab, size=n)] for n in spec.seq_lengths]


# --------------------------------------------------------------------------------------------
# Tensor names: what goes on disk, and what HF holds in memory after loading
# --------------------------------------------------------------------------------------------


def _attn_and_norm_tensors(spec: Spec, W: dict, as_disk: bool) -> dict:
    wrap = st_bf16 if as_disk else (lambda x: x)
    out = {
        "model.embed_tokens.weight": wrap(W["embed"]),
        "model.norm.weight": wrap(W["final_norm"]),
        "lm_head.weight": wrap(W["lm_head"]),
    }
    for l, lw in enumerate(W["layers"]):
        p = f"model.layers.{l}."
        out[p + "input_layernorm.weight"] = wrap(lw["input_norm"])
        out[p + "post_attention_layernorm.weight"] = wrap(lw["post_norm"])
        for k in ("q", "k", "v", "o"):
            out[p + f"self_attn.{k}_proj.weight"] = wrap(lw[k])
            if k + "_bias" in lw:
                out[p + f"self_attn.{k}_proj.bias"] = wrap(lw[k + "_bias"])
        if "q_norm" in lw:
            out[p + "self_attn.q_norm.weight"] = wrap(lw["q_norm"])
            out[p + "self_attn.k_norm.weight"] = wrap(lw["k_norm"])
        if "sinks" in lw:
            out[p + "self_attn.sinks"] = wrap(lw["sinks"])
        if lw["mlp"] == "dense":
            for k in ("gate", "up", "down"):
                out[p + f"mlp.{k}_proj.weight"] = wrap(lw[k])
    return out


def disk_tensors(spec: Spec, W: dict) -> dict[str, tuple[str, np.ndarray]]:
    """The checkpoint exactly as written to the safetensors file(s)."""
    if spec.family == "deepseek_v3":
        return deepseek_tensors(spec, W, as_disk=True)
    out = _attn_and_norm_tensors(spec, W, as_disk=True)
    for l, lw in enumerate(W["layers"]):
        if lw["mlp"] != "moe":
            continue
        p = f"model.layers.{l}."
        E = spec.experts
        if spec.family == "qwen3_moe":
            out[p + "mlp.gate.weight"] = st_bf16(lw["router"])
            if spec.layout == "fused":
                out[p + "mlp.experts.gate_up_proj"] = st_bf16(np.concatenate([lw["gate"], lw["up"]], axis=1))
                out[p + "mlp.experts.down_proj"] = st_bf16(lw["down"])
            else:
                for j in range(E):
                    out[p + f"mlp.experts.{j}.gate_proj.weight"] = st_bf16(lw["gate"][j])
                    out[p + f"mlp.experts.{j}.up_proj.weight"] = st_bf16(lw["up"][j])
                    out[p + f"mlp.experts.{j}.down_proj.weight"] = st_bf16(lw["down"][j])
        elif spec.family == "mixtral":
            if spec.layout == "fused":
                out[p + "mlp.gate.weight"] = st_bf16(lw["router"])
                out[p + "mlp.experts.gate_up_proj"] = st_bf16(np.concatenate([lw["gate"], lw["up"]], axis=1))
                out[p + "mlp.experts.down_proj"] = st_bf16(lw["down"])
            else:
                out[p + "block_sparse_moe.gate.weight"] = st_bf16(lw["router"])
                for j in range(E):
                    out[p + f"block_sparse_moe.experts.{j}.w1.weight"] = st_bf16(lw["gate"][j])
                    out[p + f"block_sparse_moe.experts.{j}.w2.weight"] = st_bf16(lw["down"][j])
                    out[p + f"block_sparse_moe.experts.{j}.w3.weight"] = st_bf16(lw["up"][j])
        elif spec.family == "gpt_oss":
            out[p + "mlp.router.weight"] = st_bf16(lw["router"])
            out[p + "mlp.router.bias"] = st_bf16(lw["router_bias"])
            out[p + "mlp.experts.gate_up_proj_bias"] = st_bf16(lw["gate_up_bias"])
            out[p + "mlp.experts.down_proj_bias"] = st_bf16(lw["down_bias"])
            if spec.layout == "mxfp4":
                mx = lw["mx"]
                out[p + "mlp.experts.gate_up_proj_blocks"] = st_u8(mx["gate_up_blocks"])
                out[p + "mlp.experts.gate_up_proj_scales"] = st_u8(mx["gate_up_scales"])
                out[p + "mlp.experts.down_proj_blocks"] = st_u8(mx["down_blocks"])
                out[p + "mlp.experts.down_proj_scales"] = st_u8(mx["down_scales"])
            else:
                out[p + "mlp.experts.gate_up_proj"] = st_bf16(np.ascontiguousarray(lw["gate_up"].transpose(0, 2, 1)))
                out[p + "mlp.experts.down_proj"] = st_bf16(np.ascontiguousarray(lw["down"].transpose(0, 2, 1)))
    return out


def expected_hf_params(spec: Spec, W: dict) -> dict[str, np.ndarray]:
    """The state_dict transformers 5 is expected to hold after from_pretrained (float32 values).

    qwen3_moe / mixtral: mlp.gate.weight [E,H]; mlp.experts.gate_up_proj [E,2I,H] (gate rows
    first), mlp.experts.down_proj [E,H,I] (GptOss-style `is_transposed` is False for them).
    gpt_oss: mlp.router.{weight,bias}; mlp.experts.gate_up_proj [E,H,2I] (interleaved columns),
    gate_up_proj_bias [E,2I], down_proj [E,I,H], down_proj_bias [E,H] (`is_transposed` True).
    """
    if spec.family == "deepseek_v3":
        return deepseek_tensors(spec, W, as_disk=False)
    out = {k: np.asarray(v, dtype=np.float32) for k, v in _attn_and_norm_tensors(spec, W, as_disk=False).items()}
    for l, lw in enumerate(W["layers"]):
        if lw["mlp"] != "moe":
            continue
        p = f"model.layers.{l}."
        if spec.family in ("qwen3_moe", "mixtral"):
            out[p + "mlp.gate.weight"] = lw["router"]
            out[p + "mlp.experts.gate_up_proj"] = np.concatenate([lw["gate"], lw["up"]], axis=1)
            out[p + "mlp.experts.down_proj"] = lw["down"]
        else:
            out[p + "mlp.router.weight"] = lw["router"]
            out[p + "mlp.router.bias"] = lw["router_bias"]
            out[p + "mlp.experts.gate_up_proj"] = np.ascontiguousarray(lw["gate_up"].transpose(0, 2, 1))
            out[p + "mlp.experts.gate_up_proj_bias"] = lw["gate_up_bias"]
            out[p + "mlp.experts.down_proj"] = np.ascontiguousarray(lw["down"].transpose(0, 2, 1))
            out[p + "mlp.experts.down_proj_bias"] = lw["down_bias"]
    return out


def collapse_name(name: str) -> str:
    name = re.sub(r"layers\.\d+\.", "layers.{L}.", name)
    return re.sub(r"experts\.\d+\.", "experts.{J}.", name)


def describe_tensors(tensors: dict[str, tuple[str, np.ndarray]]) -> list[str]:
    groups: dict[tuple, int] = {}
    for name, (dt, arr) in tensors.items():
        key = (collapse_name(name), dt, tuple(int(s) for s in arr.shape))
        groups[key] = groups.get(key, 0) + 1
    return [f"{n:<58} {dt:<5} {list(shape)!s:<20} x{c}" for (n, dt, shape), c in sorted(groups.items())]


# --------------------------------------------------------------------------------------------
# Independent reference forward pass (numpy float64), from shared/refs/FORMATS.md
# --------------------------------------------------------------------------------------------


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(spec: Spec) -> tuple[np.ndarray, float]:
    d = spec.rope_dim
    theta = float(spec.rope["rope_theta"])
    idx = np.arange(0, d, 2, dtype=np.float64) / d
    if spec.rope.get("rope_type", "default") == "default":
        return 1.0 / theta**idx, 1.0
    require(spec.rope["rope_type"] == "yarn", f"unsupported rope_type {spec.rope['rope_type']}")
    factor = float(spec.rope["factor"])
    orig = float(spec.rope["original_max_position_embeddings"])
    pos_freqs = theta**idx
    extrap, interp = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

    def corr_dim(rot: float) -> float:
        return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr_dim(float(spec.rope["beta_fast"])), corr_dim(float(spec.rope["beta_slow"]))
    if spec.rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrap_factor = 1.0 - ramp
    inv = interp * (1.0 - extrap_factor) + extrap * extrap_factor
    mscale, mscale_all_dim = spec.rope.get("mscale"), spec.rope.get("mscale_all_dim")
    if spec.rope.get("attention_factor") is not None:
        attn_factor = float(spec.rope["attention_factor"])
    elif mscale and mscale_all_dim:
        attn_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    else:
        attn_factor = yarn_get_mscale(factor)
    return inv, attn_factor


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _attention(spec: Spec, lw: dict, h: np.ndarray, layer: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    L = h.shape[0]
    nh, nkv, hd = spec.heads, spec.kv_heads, spec.hd

    def proj(key: str) -> np.ndarray:
        y = h @ lw[key].T
        return y + lw[key + "_bias"] if key + "_bias" in lw else y

    q = proj("q").reshape(L, nh, hd).transpose(1, 0, 2)
    k = proj("k").reshape(L, nkv, hd).transpose(1, 0, 2)
    v = proj("v").reshape(L, nkv, hd).transpose(1, 0, 2)
    if "q_norm" in lw:
        q = _rms(q, lw["q_norm"], spec.eps)
        k = _rms(k, lw["k_norm"], spec.eps)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    i = np.arange(L)[:, None]
    j = np.arange(L)[None, :]
    allowed = j <= i
    window = spec.window_for_layer(layer)
    if window is not None:
        allowed &= j > i - window
    group = nh // nkv
    out = np.zeros((nh, L, hd))
    for head in range(nh):
        s = (q[head] @ k[head // group].T) * hd**-0.5
        s = np.where(allowed, s, -np.inf)
        if "sinks" in lw:
            s = np.concatenate([s, np.full((L, 1), lw["sinks"][head])], axis=1)
            p = _softmax(s)[:, :-1]
        else:
            p = _softmax(s)
        out[head] = p @ v[head // group]
    o = out.transpose(1, 0, 2).reshape(L, nh * hd) @ lw["o"].T
    return o + lw["o_bias"] if "o_bias" in lw else o


def _moe(spec: Spec, lw: dict, x: np.ndarray) -> tuple[np.ndarray, float]:
    logits = x @ lw["router"].T
    if "router_bias" in lw:
        logits = logits + lw["router_bias"]
    k = spec.top_k
    order = np.argsort(-logits, axis=1, kind="stable")
    top = order[:, :k]
    ranked = np.take_along_axis(logits, order, axis=1)
    margin = float((ranked[:, k - 1] - ranked[:, k]).min())
    if spec.family == "gpt_oss":
        weights = _softmax(np.take_along_axis(logits, top, axis=1))
    else:
        probs = np.take_along_axis(_softmax(logits), top, axis=1)
        normalise = spec.family == "mixtral" or spec.norm_topk
        weights = probs / probs.sum(axis=1, keepdims=True) if normalise else probs
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(k):
            e = int(top[t, slot])
            xt = x[t]
            if spec.family == "gpt_oss":
                gu = lw["gate_up"][e] @ xt + lw["gate_up_bias"][e]
                gate, up = np.minimum(gu[0::2], 7.0), np.clip(gu[1::2], -7.0, 7.0)
                glu = gate / (1.0 + np.exp(-1.702 * gate))
                ye = lw["down"][e] @ ((up + 1.0) * glu) + lw["down_bias"][e]
            else:
                ye = lw["down"][e] @ (_silu(lw["gate"][e] @ xt) * (lw["up"][e] @ xt))
            y[t] += weights[t, slot] * ye
    return y, margin


def _deinterleave(x: np.ndarray) -> np.ndarray:
    """Rotary dims stored as pairs (2i, 2i+1) -> (i, i + d/2), as HF's apply_rotary_pos_emb_interleave."""
    d = x.shape[-1]
    return x.reshape(*x.shape[:-1], d // 2, 2).swapaxes(-1, -2).reshape(x.shape)


def mla_softmax_scale(spec: Spec) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under a scaled RoPE (DeepseekV3Attention)."""
    scale = spec.hd ** -0.5
    if spec.rope.get("rope_type", "default") != "default" and spec.rope.get("mscale_all_dim"):
        scale *= yarn_get_mscale(float(spec.rope["factor"]), float(spec.rope["mscale_all_dim"])) ** 2
    return scale


def _mla_attention(spec: Spec, lw: dict, h: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Multi-head latent attention in HF's expanded form (keys and values per head from the latent)."""
    L, nh = h.shape[0], spec.heads
    m = spec.mla
    nope, r, v, c = m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["v_head_dim"], m["kv_lora_rank"]
    q = h @ lw["q"].T if "q" in lw else _rms(h @ lw["q_a"].T, lw["q_a_norm"], spec.eps) @ lw["q_b"].T
    q = q.reshape(L, nh, nope + r).transpose(1, 0, 2)
    q_pass, q_rot = q[..., :nope], q[..., nope:]
    kva = h @ lw["kv_a"].T
    kv = (_rms(kva[:, :c], lw["kv_a_norm"], spec.eps) @ lw["kv_b"].T).reshape(L, nh, nope + v).transpose(1, 0, 2)
    k_pass, values = kv[..., :nope], kv[..., nope:]
    k_rot = kva[None, :, c:]
    if spec.interleaved_rope:
        q_rot, k_rot = _deinterleave(q_rot), _deinterleave(k_rot)
    q_rot, k_rot = _rope(q_rot, cos, sin), _rope(k_rot, cos, sin)
    allowed = np.arange(L)[None, :] <= np.arange(L)[:, None]
    scale = mla_softmax_scale(spec)
    out = np.zeros((nh, L, v))
    for head in range(nh):
        s = (q_pass[head] @ k_pass[head].T + q_rot[head] @ k_rot[0].T) * scale
        out[head] = _softmax(np.where(allowed, s, -np.inf)) @ values[head]
    return out.transpose(1, 0, 2).reshape(L, nh * v) @ lw["o"].T


def _grouped_moe(spec: Spec, lw: dict, x: np.ndarray) -> tuple[np.ndarray, float]:
    """DeepSeek-V3 routing (shared/refs/FORMATS.md) with HF's details: dropped groups' experts get a
    choice of 0.0; weights are the sigmoid scores, renormalized (+1e-20) iff norm_topk_prob, times
    routed_scaling_factor; shared experts added unweighted. The margin is the smaller of the k-th vs
    (k+1)-th choice and of the last kept vs first dropped group score."""
    scores = 1.0 / (1.0 + np.exp(-(x @ lw["router"].T)))
    choice = scores + lw["e_bias"]
    T, E = choice.shape
    G, k = spec.n_group, spec.top_k
    per = E // G
    group_scores = np.sort(choice.reshape(T, G, per), axis=-1)[..., -2:].sum(axis=-1)
    g_order = np.argsort(-group_scores, axis=1, kind="stable")
    keep = np.zeros((T, G), dtype=bool)
    np.put_along_axis(keep, g_order[:, : spec.topk_group], True, axis=1)
    masked = np.where(np.repeat(keep, per, axis=1), choice, 0.0)
    order = np.argsort(-masked, axis=1, kind="stable")
    top = order[:, :k]
    ranked = np.take_along_axis(masked, order, axis=1)
    margin = float((ranked[:, k - 1] - ranked[:, k]).min())
    if spec.topk_group < G:
        g_ranked = np.take_along_axis(group_scores, g_order, axis=1)
        margin = min(margin, float((g_ranked[:, spec.topk_group - 1] - g_ranked[:, spec.topk_group]).min()))
    weights = np.take_along_axis(scores, top, axis=1)
    if spec.norm_topk:
        weights = weights / (weights.sum(axis=1, keepdims=True) + 1e-20)
    weights = weights * spec.routed_scaling
    y = np.zeros_like(x)
    for t in range(T):
        xt = x[t]
        for slot in range(k):
            e = int(top[t, slot])
            y[t] += weights[t, slot] * (lw["down"][e] @ (_silu(lw["gate"][e] @ xt) * (lw["up"][e] @ xt)))
    if "shared_gate" in lw:
        y = y + (lw["shared_down"] @ (_silu(lw["shared_gate"] @ x.T) * (lw["shared_up"] @ x.T))).T
    return y, margin


def reference_forward(spec: Spec, W: dict, ids: list[int]) -> tuple[np.ndarray, float]:
    """Logits [L, V] (float64) and the smallest router top-k margin met on the way."""
    W64 = _to_f64(W)
    L = len(ids)
    inv, attn_factor = rope_inv_freq(spec)
    ang = np.arange(L, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(ang) * attn_factor, np.sin(ang) * attn_factor
    x = W64["embed"][np.asarray(ids)]
    margin = math.inf
    for l, lw in enumerate(W64["layers"]):
        hn = _rms(x, lw["input_norm"], spec.eps)
        x = x + (_mla_attention(spec, lw, hn, cos, sin) if spec.mla is not None else _attention(spec, lw, hn, l, cos, sin))
        h = _rms(x, lw["post_norm"], spec.eps)
        if lw["mlp"] == "dense":
            y = lw["down"] @ (_silu(lw["gate"] @ h.T) * (lw["up"] @ h.T))
            x = x + y.T
        else:
            y, m = _grouped_moe(spec, lw, h) if spec.family == "deepseek_v3" else _moe(spec, lw, h)
            margin = min(margin, m)
            x = x + y
    return _rms(x, W64["final_norm"], spec.eps) @ W64["lm_head"].T, margin


def _to_f64(obj):
    if isinstance(obj, np.ndarray):
        return obj.astype(np.float64) if obj.dtype == np.float32 else obj
    if isinstance(obj, dict):
        return {k: _to_f64(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_f64(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------

ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM", "gpt_oss": "GptOssForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM"}
GPT_OSS_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def deepseek_config_kwargs(spec: Spec) -> dict:
    """DeepseekV3Config arguments; every field the engine reads is explicit."""
    m = spec.mla
    kw = dict(
        architectures=[ARCHITECTURES[spec.family]],
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.dense_inter,
        moe_intermediate_size=spec.moe_inter,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        n_shared_experts=spec.n_shared,
        n_routed_experts=spec.experts,
        routed_scaling_factor=spec.routed_scaling,
        kv_lora_rank=m["kv_lora_rank"],
        q_lora_rank=m["q_lora_rank"],
        qk_rope_head_dim=m["qk_rope_head_dim"],
        v_head_dim=m["v_head_dim"],
        qk_nope_head_dim=m["qk_nope_head_dim"],
        n_group=spec.n_group,
        topk_group=spec.topk_group,
        num_experts_per_tok=spec.top_k,
        first_k_dense_replace=spec.first_k_dense,
        norm_topk_prob=spec.norm_topk,
        hidden_act="silu",
        max_position_embeddings=spec.max_pos,
        initializer_range=0.02,
        rms_norm_eps=spec.eps,
        use_cache=True,
        tie_word_embeddings=False,
        rope_parameters=dict(spec.rope),
        attention_bias=False,
        attention_dropout=0.0,
    )
    if spec.rope_interleave is not None:
        kw["rope_interleave"] = spec.rope_interleave
    if spec.fp8_block is not None:
        kw["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": [spec.fp8_block, spec.fp8_block]}
    return kw


def config_kwargs(spec: Spec) -> dict:
    if spec.family == "deepseek_v3":
        return deepseek_config_kwargs(spec)
    common = dict(
        architectures=[ARCHITECTURES[spec.family]],
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        hidden_act="silu",
        max_position_embeddings=spec.max_pos,
        initializer_range=0.02,
        rms_norm_eps=spec.eps,
        use_cache=True,
        tie_word_embeddings=False,
        rope_parameters=dict(spec.rope),
        attention_dropout=0.0,
        num_experts_per_tok=spec.top_k,
        output_router_logits=False,
    )
    if spec.head_dim is not None:
        common["head_dim"] = spec.head_dim
    if spec.family == "qwen3_moe":
        return dict(
            common,
            intermediate_size=spec.dense_inter,
            moe_intermediate_size=spec.moe_inter,
            num_experts=spec.experts,
            norm_topk_prob=spec.norm_topk,
            decoder_sparse_step=1,
            mlp_only_layers=list(spec.dense_layers),
            attention_bias=False,
            use_sliding_window=False,
            sliding_window=None,
            router_aux_loss_coef=0.001,
        )
    if spec.family == "mixtral":
        return dict(
            common,
            intermediate_size=spec.moe_inter,
            num_local_experts=spec.experts,
            sliding_window=spec.sliding_window,
            router_aux_loss_coef=0.001,
            router_jitter_noise=0.0,
        )
    kw = dict(
        common,
        intermediate_size=spec.moe_inter,
        num_local_experts=spec.experts,
        sliding_window=spec.sliding_window,
        layer_types=list(spec.layer_types or []),
        attention_bias=True,
        router_aux_loss_coef=0.9,
        swiglu_limit=7.0,
    )
    if spec.layout == "mxfp4":
        kw["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": list(GPT_OSS_NOT_CONVERTED)}
    return kw


def _flat_rope(rp):
    """A per-layer-type rope_parameters dict whose entries are all equal, flattened; else as is."""
    if isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()):
        first = next(iter(rp.values()))
        if all(v == first for v in rp.values()):
            return dict(first)
    return rp


def released_style(cfg: dict, spec: Spec) -> dict:
    """Rewrite a transformers-5 config dict into the key style of released checkpoints."""
    d = dict(cfg)
    rp = _flat_rope(d.pop("rope_parameters", None))
    require(isinstance(rp, dict) and "rope_theta" in rp, f"config.json has no flat rope_parameters: {rp!r}")
    rp = dict(rp)
    d["rope_theta"] = rp.pop("rope_theta")
    rp.setdefault("rope_type", "default")
    d["rope_scaling"] = None if (rp.get("rope_type") == "default" and set(rp) <= {"rope_type"}) else rp
    if "dtype" in d:
        d["torch_dtype"] = d.pop("dtype")
    if "head_dim" in d and d["head_dim"] is None:
        del d["head_dim"]
    if spec.family == "qwen3_moe" and "num_local_experts" in d:
        d["num_experts"] = d.pop("num_local_experts")
    if spec.family == "deepseek_v3" and isinstance(d["rope_scaling"], dict):
        # DeepSeek's own config.json names the RoPE kind "type", with the keys of DeepSeek's code.
        d["rope_scaling"]["type"] = d["rope_scaling"].pop("rope_type")
        d.update(scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1)
    if spec.family == "gpt_oss":
        d.setdefault("experts_per_token", spec.top_k)
        d.setdefault("initial_context_length", int(spec.rope.get("original_max_position_embeddings", 4096)))
    return d


def write_config(spec: Spec, folder: Path, dry_run: bool) -> tuple[dict, list[str]]:
    notes: list[str] = []
    kwargs = config_kwargs(spec)
    if dry_run:
        cfg = dict(kwargs, model_type=spec.family, dtype="bfloat16")
        notes.append("dry run: config.json written from the kwargs, not by save_pretrained")
    else:
        from transformers import AutoConfig

        try:
            cfg_obj = AutoConfig.for_model(spec.family, **kwargs)
        except AttributeError:
            from transformers import CONFIG_MAPPING

            cfg_obj = CONFIG_MAPPING[spec.family](**kwargs)
        for attr in ("dtype", "torch_dtype"):
            try:
                setattr(cfg_obj, attr, "bfloat16")
                break
            except Exception as exc:  # noqa: BLE001
                notes.append(f"setting config.{attr} failed: {exc}")
        cfg_obj.save_pretrained(str(folder))
        cfg = json.loads((folder / "config.json").read_text())
    require(cfg.get("model_type") == spec.family, f"config.json model_type {cfg.get('model_type')!r} != {spec.family!r}")
    if "dtype" not in cfg and "torch_dtype" not in cfg:
        cfg["dtype"] = "bfloat16"
        notes.append('added "dtype": "bfloat16" (save_pretrained left it out)')
    # save_pretrained may leave out values equal to its class defaults; make the ones the engine
    # reads explicit so the file does not depend on a transformers version's defaults.
    for key, value in kwargs.items():
        if key in ("quantization_config",):
            continue
        aliases = {"num_experts": "num_local_experts", "num_local_experts": "num_experts"}
        if key not in cfg and aliases.get(key) not in cfg and key != "rope_parameters":
            cfg[key] = value
            notes.append(f"added {key!r} (missing from save_pretrained output)")
    if spec.fp8_block is not None:
        if cfg.get("quantization_config") != kwargs["quantization_config"]:
            notes.append("quantization_config set to the generator's fp8 dict")
        cfg["quantization_config"] = kwargs["quantization_config"]
    if spec.layout == "mxfp4":
        qc = cfg.get("quantization_config")
        if not isinstance(qc, dict) or qc.get("quant_method") != "mxfp4":
            cfg["quantization_config"] = kwargs["quantization_config"]
            notes.append("added quantization_config (missing from save_pretrained output)")
        else:
            cfg["quantization_config"] = kwargs["quantization_config"]
    if "rope_parameters" not in cfg and "rope_scaling" not in cfg and "rope_theta" not in cfg:
        cfg["rope_parameters"] = dict(spec.rope)
        notes.append("added rope_parameters (missing from save_pretrained output)")
    if spec.config_style == "released":
        cfg = released_style(cfg, spec)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg, notes


def effective_config(spec: Spec) -> dict:
    """What the engine should derive from config.json (checked against HF's loaded config)."""
    return {
        "model_type": spec.family,
        "vocab_size": spec.vocab,
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.hd,
        "head_dim_in_config": spec.head_dim is not None,
        "rms_norm_eps": spec.eps,
        "num_experts": spec.experts,
        "num_experts_per_tok": spec.top_k,
        "moe_intermediate_size": spec.moe_inter,
        "dense_intermediate_size": spec.dense_inter,
        "moe_layers": [l for l in range(spec.layers) if spec.is_sparse(l)],
        "dense_layers": [l for l in range(spec.layers) if not spec.is_sparse(l)],
        "routing": {
            "qwen3_moe": "p = softmax(router logits) over all experts; top-k of p; divide by their sum iff norm_topk_prob",
            "mixtral": "p = softmax(router logits); top-k of p, divided by their sum (= softmax over the top-k logits)",
            "gpt_oss": "logits = W_r x + b_r; top-k logits; softmax over those k",
            "deepseek_v3": "s = sigmoid(router logits); choice = s + e_score_correction_bias; keep the topk_group best of "
            "n_group groups (score: sum of a group's top-2 choices), others' choices set to 0.0; top-k by choice; "
            "weights = s of those (divided by their sum + 1e-20 iff norm_topk_prob) * routed_scaling_factor; "
            "plus the shared experts, unweighted",
        }[spec.family],
        "norm_topk_prob": spec.norm_topk if spec.family in ("qwen3_moe", "deepseek_v3") else None,
        "sliding_window_per_layer": [spec.window_for_layer(l) for l in range(spec.layers)],
        "rope": dict(spec.rope),
        "max_position_embeddings": spec.max_pos,
        "tie_word_embeddings": False,
        **({"mla": dict(spec.mla), "rope_dim": spec.rope_dim, "rope_interleave": spec.interleaved_rope,
            "softmax_scale": mla_softmax_scale(spec), "n_group": spec.n_group, "topk_group": spec.topk_group,
            "routed_scaling_factor": spec.routed_scaling, "n_shared_experts": spec.n_shared,
            "first_k_dense_replace": spec.first_k_dense,
            "fp8_weight_block_size": None if spec.fp8_block is None else [spec.fp8_block, spec.fp8_block]}
           if spec.family == "deepseek_v3" else {}),
    }


def check_loaded_config(spec: Spec, cfg) -> list[str]:
    """Compare what HF made of config.json with the spec. Returns problems."""
    problems = []

    def chk(what: str, got, want) -> None:
        if got != want:
            problems.append(f"config {what}: HF has {got!r}, expected {want!r}")

    chk("vocab_size", cfg.vocab_size, spec.vocab)
    chk("hidden_size", cfg.hidden_size, spec.hidden)
    chk("num_hidden_layers", cfg.num_hidden_layers, spec.layers)
    chk("num_attention_heads", cfg.num_attention_heads, spec.heads)
    chk("num_key_value_heads", cfg.num_key_value_heads, spec.kv_heads)
    # DeepseekV3Config sets head_dim = qk_rope_head_dim (the span of its RoPE table).
    chk("head_dim", getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads, spec.rope_dim)
    n_exp = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    chk("num_experts", n_exp, spec.experts)
    chk("num_experts_per_tok", cfg.num_experts_per_tok, spec.top_k)
    chk("tie_word_embeddings", bool(getattr(cfg, "tie_word_embeddings", False)), False)
    if abs(float(cfg.rms_norm_eps) - spec.eps) > 1e-12:
        problems.append(f"config rms_norm_eps: HF has {cfg.rms_norm_eps}, expected {spec.eps}")
    if spec.family == "deepseek_v3":
        m = spec.mla
        chk("moe_intermediate_size", cfg.moe_intermediate_size, spec.moe_inter)
        chk("intermediate_size", cfg.intermediate_size, spec.dense_inter)
        chk("norm_topk_prob", bool(cfg.norm_topk_prob), spec.norm_topk)
        for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            chk(key, getattr(cfg, key, None), m[key])
        chk("qk_head_dim", getattr(cfg, "qk_head_dim", None), spec.hd)
        chk("n_group", cfg.n_group, spec.n_group)
        chk("topk_group", cfg.topk_group, spec.topk_group)
        chk("n_shared_experts", cfg.n_shared_experts, spec.n_shared)
        chk("first_k_dense_replace", cfg.first_k_dense_replace, spec.first_k_dense)
        chk("rope_interleave", bool(getattr(cfg, "rope_interleave", True)), spec.interleaved_rope)
        if abs(float(cfg.routed_scaling_factor) - spec.routed_scaling) > 1e-12:
            problems.append(f"config routed_scaling_factor: HF has {cfg.routed_scaling_factor}, expected {spec.routed_scaling}")
    elif spec.family == "qwen3_moe":
        chk("moe_intermediate_size", cfg.moe_intermediate_size, spec.moe_inter)
        chk("norm_topk_prob", bool(cfg.norm_topk_prob), spec.norm_topk)
        chk("mlp_only_layers", list(cfg.mlp_only_layers or []), spec.dense_layers)
        chk("sliding_window (effective)", getattr(cfg, "sliding_window", None), None)
    else:
        chk("intermediate_size", cfg.intermediate_size, spec.moe_inter)
        chk("sliding_window", getattr(cfg, "sliding_window", None), spec.sliding_window)
    if spec.family == "gpt_oss":
        chk("layer_types", list(cfg.layer_types), spec.layer_types)
    rp = _flat_rope(getattr(cfg, "rope_parameters", None))
    if rp is None:
        legacy = dict(getattr(cfg, "rope_scaling", None) or {})
        legacy.setdefault("rope_type", legacy.get("type", "default"))
        legacy["rope_theta"] = getattr(cfg, "rope_theta", None)
        rp = legacy
    if isinstance(rp, dict):
        for key, want in spec.rope.items():
            got = rp.get(key)
            if isinstance(want, float) or isinstance(got, float):
                if got is None or abs(float(got) - float(want)) > 1e-9 * max(1.0, abs(float(want))):
                    problems.append(f"config rope_parameters[{key}]: HF has {got!r}, expected {want!r}")
            elif got != want:
                problems.append(f"config rope_parameters[{key}]: HF has {got!r}, expected {want!r}")
        if spec.rope.get("rope_type") == "yarn":
            chk("rope truncate", rp.get("truncate", True), spec.rope.get("truncate", True))
    else:
        problems.append(f"config rope_parameters has unexpected type {type(rp).__name__}: {rp!r}")
    return problems


# --------------------------------------------------------------------------------------------
# Hugging Face side
# --------------------------------------------------------------------------------------------


def hf_versions() -> dict:
    import torch
    import transformers

    versions = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                "transformers": transformers.__version__}
    try:
        import safetensors

        versions["safetensors"] = safetensors.__version__
    except Exception:  # noqa: BLE001
        versions["safetensors"] = "unavailable"
    return versions


def force_float32(model) -> str:
    import torch

    try:
        model.float()
        how = "model.float()"
    except Exception as exc:  # noqa: BLE001  (quantized models may refuse .float())
        how = f"per-tensor cast (model.float() refused: {exc})"
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_floating_point() and p.dtype != torch.float32:
                    module._parameters[name] = torch.nn.Parameter(p.detach().float(), requires_grad=False)
            for name, b in list(module._buffers.items()):
                if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                    module._buffers[name] = b.float()
    bad = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != torch.float32]
    require(not bad, f"parameters not float32 after casting: {bad[:5]}")
    return how


def _as_dict(obj) -> dict:
    """output_loading_info's second value as a dict (a dict in transformers 4, maybe a dataclass later)."""
    import dataclasses

    if obj is None:
        return {}
    if isinstance(obj, dict):
        return obj
    if dataclasses.is_dataclass(obj):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if hasattr(obj, "_asdict"):
        return dict(obj._asdict())
    if hasattr(obj, "__dict__"):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    return {"value": obj}


def write_dequantized_shadow(spec: Spec, W: dict, folder: Path) -> Path:
    """The FP8 checkpoint's exact dequantized values as float32 at the same names, without
    quantization_config: what HF loads when its FP8 integration cannot dequantize on this machine."""
    shadow = folder.parent / f".{folder.name}-dequantized"
    if shadow.exists():
        shutil.rmtree(shadow)
    shadow.mkdir()
    tensors = {}
    for name, (dt, arr) in disk_tensors(spec, W).items():
        if name.endswith("_scale_inv"):
            continue
        if dt == "F8_E4M3":
            scales = disk_tensors(spec, W)[name + "_scale_inv"][1].astype(np.float64)
            b = spec.fp8_block
            full = np.repeat(np.repeat(scales, b, 0), b, 1)[: arr.shape[0], : arr.shape[1]]
            tensors[name] = st_f32((decode_e4m3(arr) * full).astype(np.float32))
        else:
            tensors[name] = (dt, arr)
    write_safetensors(shadow / "model.safetensors", tensors)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (shadow / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return shadow


def load_hf_model(spec: Spec, folder: Path, W: dict | None = None) -> tuple[object, dict]:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=torch.float32, attn_implementation="eager", experts_implementation="eager",
                  output_loading_info=True)
    info: dict = {"from_pretrained_kwargs": ["dtype=float32", "attn_implementation=eager", "experts_implementation=eager"]}
    if spec.layout == "mxfp4":
        try:
            from transformers import Mxfp4Config
        except ImportError:
            from transformers.utils.quantization_config import Mxfp4Config  # type: ignore
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
        info["from_pretrained_kwargs"].append("quantization_config=Mxfp4Config(dequantize=True)")
    if spec.fp8_block is not None:
        # HF's FP8 kernels need a GPU; dequantize=True (transformers >= 4.57) computes in float32 on the
        # CPU. Without it, HF loads the exact dequantized values from a float32 copy of the checkpoint.
        try:
            from transformers import FineGrainedFP8Config

            kwargs["quantization_config"] = FineGrainedFP8Config(weight_block_size=[spec.fp8_block] * 2, dequantize=True)
            info["from_pretrained_kwargs"].append("quantization_config=FineGrainedFP8Config(dequantize=True)")
        except (ImportError, TypeError) as exc:
            assert W is not None
            folder = write_dequantized_shadow(spec, W, folder)
            info["fp8"] = f"loaded the float32 dequantized copy ({type(exc).__name__}: {exc})"
            log(f"  FP8: HF cannot dequantize here ({exc}); loading the float32 dequantized copy")
    try:
        result = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except TypeError as exc:
        if "experts_implementation" not in str(exc):
            raise
        log(f"  from_pretrained rejected experts_implementation ({exc}); retrying without it")
        kwargs.pop("experts_implementation")
        info["from_pretrained_kwargs"].remove("experts_implementation=eager")
        result = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if isinstance(result, tuple):
        model, loading = result
    else:
        model, loading = result, {}
    problems = []
    summary = {}
    for key, value in _as_dict(loading).items():
        if isinstance(value, (list, set, tuple, dict, frozenset)):
            items = sorted(str(v) for v in value)
        elif value is None or isinstance(value, (bool, int, float, str)):
            items = value
        else:
            items = str(value)
        summary[str(key)] = items
        if any(w in str(key).lower() for w in ("missing", "unexpected", "mismatch", "error")) and items:
            problems.append(f"loading info {key}: {items}")
    info["loading_info"] = summary
    require(not problems, f"{spec.name}: HF reported loading problems:\n    " + "\n    ".join(problems))
    info["cast"] = force_float32(model)
    impl = getattr(model.config, "_experts_implementation", None)
    if impl not in (None, "eager") and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
        impl = getattr(model.config, "_experts_implementation", None)
    info["experts_implementation"] = impl
    info["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    require(info["attn_implementation"] == "eager", f"attn_implementation is {info['attn_implementation']!r}, not eager")
    model.eval()
    return model, info


def compare_params(spec: Spec, model, expected: dict[str, np.ndarray]) -> tuple[list[str], list[str], float]:
    """Exact comparison of HF's state_dict with the generated values. Returns (problems, notes, max diff)."""
    sd = model.state_dict()
    param_names = {n for n, _ in model.named_parameters()}
    problems, notes = [], []
    got_keys, want_keys = set(sd.keys()), set(expected.keys())
    for k in sorted(want_keys - got_keys):
        problems.append(f"HF has no tensor {k} (expected shape {list(expected[k].shape)})")
    for k in sorted(got_keys - want_keys):
        if k in param_names:
            problems.append(f"HF holds an unexpected parameter {k} {list(sd[k].shape)} (randomly initialised?)")
        else:
            notes.append(f"HF holds a persistent buffer {k} {list(sd[k].shape)} that is not in the checkpoint")
    worst = 0.0
    for k in sorted(want_keys & got_keys):
        got = sd[k].detach().to("cpu").float().numpy()
        want = expected[k]
        if got.shape != want.shape:
            if got.ndim == 3 and want.ndim == 3 and np.array_equal(got, want.transpose(0, 2, 1)):
                notes.append(f"{k}: HF holds it transposed {list(got.shape)} (values match after transpose)")
                continue
            problems.append(f"{k}: HF shape {list(got.shape)} != expected {list(want.shape)}")
            continue
        diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) if got.size else 0.0
        worst = max(worst, diff)
        if diff != 0.0:
            problems.append(f"{k}: max |HF - generated| = {diff:.3e} (must be 0)")
    if problems and len(problems) > 30:
        problems = problems[:30] + [f"... {len(problems) - 30} more"]
    if problems:
        shapes = sorted(f"{collapse_name(k)} {list(v.shape)}" for k, v in sd.items())
        problems.append("HF state_dict (collapsed): " + "; ".join(sorted(set(shapes))))
    return problems, notes, worst


def check_hf_mxfp4_decoder(W: dict) -> str:
    """Feed our blocks/scales to transformers' own MXFP4 decoder and compare with ours."""
    try:
        import torch
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    except Exception as exc:  # noqa: BLE001
        return f"skipped (transformers.integrations.mxfp4.convert_moe_packed_tensors unavailable: {exc})"
    worst = 0.0
    for lw in W["layers"]:
        if "mx" not in lw:
            continue
        for proj in ("gate_up", "down"):
            out = convert_moe_packed_tensors(torch.from_numpy(lw["mx"][f"{proj}_blocks"].copy()),
                                             torch.from_numpy(lw["mx"][f"{proj}_scales"].copy()))
            got = out.float().numpy()
            want = lw[proj].transpose(0, 2, 1)  # HF returns [E, in, out]
            require(got.shape == want.shape, f"HF MXFP4 decoder shape {list(got.shape)} != {list(want.shape)} ({proj})")
            worst = max(worst, float(np.abs(got - want).max()))
    require(worst == 0.0, f"HF's convert_moe_packed_tensors disagrees with our MXFP4 decode: max |diff| {worst:.3e}")
    return "convert_moe_packed_tensors == our decode (max |diff| 0)"


def hf_logits(model, sequences: list[list[int]]) -> list[np.ndarray]:
    import torch

    outs = []
    with torch.no_grad():
        for ids in sequences:
            res = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
            logits = res.logits
            require(logits.dim() == 3 and logits.shape[0] == 1 and logits.shape[1] == len(ids),
                    f"unexpected logits shape {list(logits.shape)}")
            arr = logits[0].detach().to("cpu").float().numpy()
            require(bool(np.isfinite(arr).all()), "HF logits contain non-finite values")
            outs.append(np.ascontiguousarray(arr, dtype=np.float32))
    return outs


# --------------------------------------------------------------------------------------------
# One fixture
# --------------------------------------------------------------------------------------------


def write_weights(spec: Spec, folder: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> list[str]:
    names = sorted(tensors)
    if spec.shards <= 1:
        write_safetensors(folder / "model.safetensors", tensors)
        return ["model.safetensors"]
    total = sum(tensor_nbytes(tensors[n]) for n in names)
    files = [f"model-{i + 1:05d}-of-{spec.shards:05d}.safetensors" for i in range(spec.shards)]
    groups: list[dict] = [{} for _ in files]
    acc = 0
    for n in names:
        shard = min(spec.shards - 1, int(acc * spec.shards // max(total, 1)))
        groups[shard][n] = tensors[n]
        acc += tensor_nbytes(tensors[n])
    require(all(groups), f"{spec.name}: an empty shard; lower shards")
    weight_map = {}
    for fname, group in zip(files, groups):
        write_safetensors(folder / fname, group)
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files + ["model.safetensors.index.json"]


def verify_written(folder: Path, files: list[str], tensors: dict[str, tuple[str, np.ndarray]], dry_run: bool) -> str:
    """Read the files back (our reader; plus safetensors' own when available)."""
    seen = {}
    for f in files:
        if f.endswith(".safetensors"):
            seen.update(read_safetensors(folder / f))
    require(set(seen) == set(tensors), "written tensor names differ from the intended ones")
    for n, (dt, arr) in tensors.items():
        require(seen[n][0] == dt and np.array_equal(seen[n][1], arr), f"{n}: read-back mismatch")
    if dry_run:
        return "own reader"
    import torch
    from safetensors.torch import load_file

    for f in files:
        if not f.endswith(".safetensors"):
            continue
        for n, t in load_file(str(folder / f)).items():
            dt, arr = tensors[n]
            if dt == "BF16":
                require(t.dtype == torch.bfloat16, f"{n}: safetensors dtype {t.dtype}")
                ok = np.array_equal(t.float().numpy(), (arr.astype(np.uint32) << 16).view(np.float32))
            elif dt == "F8_E4M3":
                require(t.dtype == torch.float8_e4m3fn, f"{n}: safetensors dtype {t.dtype}")
                ok = np.array_equal(t.view(torch.uint8).numpy(), arr) and np.array_equal(
                    t.float().numpy().astype(np.float64), decode_e4m3(arr))
            else:
                ok = np.array_equal(t.numpy(), arr)
            require(ok and list(t.shape) == list(arr.shape), f"{n}: safetensors.torch read-back mismatch")
    return "own reader + safetensors.torch.load_file"


def make_fixture(spec: Spec, out_root: Path, args) -> dict:
    t0 = time.time()
    spec.validate()
    log(f"\n=== {spec.name}  ({spec.family}, {spec.layout})")
    log(f"  {spec.description}")

    # 1. Weights and inputs; redraw while a router top-k choice is too close to call.
    for attempt in range(MAX_DRAWS):
        seed = spec.seed + 7919 * attempt
        W = make_weights(spec, seed)
        sequences = make_inputs(spec, seed)
        refs, margins = zip(*(reference_forward(spec, W, ids) for ids in sequences))
        margin = min(margins)
        log(f"  draw seed={seed}: min router top-k margin {margin:.4g}")
        if margin >= spec.min_router_margin:
            break
    else:
        raise FixtureError(f"{spec.name}: no draw with router margin >= {spec.min_router_margin} in {MAX_DRAWS} tries")

    folder = out_root / spec.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    # 2. Checkpoint files.
    tensors = disk_tensors(spec, W)
    files = write_weights(spec, folder, tensors)
    readback = verify_written(folder, files, tensors, args.dry_run)
    log(f"  wrote {', '.join(files)} ({sum(tensor_nbytes(t) for t in tensors.values())} bytes of tensors; "
        f"read back with {readback})")
    for line in describe_tensors(tensors):
        log("    " + line)

    # 3. config.json and input.json.
    cfg_json, cfg_notes = write_config(spec, folder, args.dry_run)
    for n in cfg_notes:
        log(f"  config: {n}")
    (folder / "input.json").write_text(json.dumps({"sequences": sequences}) + "\n")

    meta: dict = {
        "fixture": spec.name,
        "model_type": spec.family,
        "layout": spec.layout,
        "description": spec.description,
        "config_style": spec.config_style,
        "seed": seed,
        "input_seed": seed + 1_000_003,
        "sequence_lengths": [len(s) for s in sequences],
        "weights_files": files,
        "tensors": {n: {"dtype": dt, "shape": [int(s) for s in a.shape]} for n, (dt, a) in sorted(tensors.items())},
        "effective_config": effective_config(spec),
        "config_notes": cfg_notes,
        "router_min_topk_margin": margin,
    }
    if spec.layout == "mxfp4":
        zero_blocks = int(sum(int((lw["mx"][f"{p}_scales"] == 0).sum()) for lw in W["layers"] if "mx" in lw
                              for p in ("gate_up", "down")))
        scales = np.concatenate([lw["mx"][f"{p}_scales"].ravel() for lw in W["layers"] if "mx" in lw
                                 for p in ("gate_up", "down")])
        meta["mxfp4"] = {
            "rule": "OCP MX v1.0: shared_exp = floor(log2(amax)) - 2 clamped to [-127,127], scale code = "
            "shared_exp + 127; elements round to nearest E2M1, ties to even, saturate at 6; negative values "
            "keep the sign bit (0x8 = -0); all-zero block -> scale code 0; element 2i low nibble",
            "all_zero_blocks": zero_blocks,
            "scale_code_range": [int(scales[scales > 0].min()), int(scales.max())],
            "source_weight_max_quantization_error": max(
                max(lw["mx"]["gate_up_source_maxerr"], lw["mx"]["down_source_maxerr"]) for lw in W["layers"] if "mx" in lw
            ),
        }

    if spec.fp8_block is not None:
        scales = np.concatenate([sc.ravel() for lw in W["layers"] for _, sc in lw["fp8"].values()])
        meta["fp8"] = {
            "format": "F8_E4M3 codes + F32 weight_scale_inv per block; value = E4M3(code) * scale_inv; codes rounded "
            "to nearest, ties to even; scale_inv = bf16(amax / 448) (values exact in float32)",
            "weight_block_size": [spec.fp8_block, spec.fp8_block],
            "fp8_tensors": int(sum(1 for _, (dt, _) in tensors.items() if dt == "F8_E4M3")),
            "scale_range": [float(scales.min()), float(scales.max())],
        }
    if args.dry_run:
        # The float64 reference's logits (rounded to float32): what CI holds the CPU backend to
        # until HF's logits for the same checkpoint exist (packages/core/test/fixtures/reference).
        write_safetensors(folder / "reference_logits.safetensors", {f"logits.{i}": st_f32(r) for i, r in enumerate(refs)})
        meta["dry_run"] = True
        meta["reference_logits_max_abs"] = float(max(np.abs(r).max() for r in refs))
        (folder / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        log(f"  DRY RUN: no HF load, no logits.safetensors ({time.time() - t0:.1f}s)")
        return {"name": spec.name, "ok": True, "dry_run": True, "params": sum(v.size for v in expected_hf_params(spec, W).values()),
                "shapes": [list(r.shape) for r in refs], "max_logit": meta["reference_logits_max_abs"], "ref_diff": 0.0,
                "margin": margin, "secs": time.time() - t0}

    # 4. Config round trip through HF.
    from transformers import AutoConfig

    problems = check_loaded_config(spec, AutoConfig.from_pretrained(str(folder)))
    require(not problems, f"{spec.name}: AutoConfig read config.json differently:\n    " + "\n    ".join(problems))

    # 5. Load through HF and compare every parameter.
    model, load_info = load_hf_model(spec, folder, W)
    problems = check_loaded_config(spec, model.config)
    require(not problems, f"{spec.name}: model.config differs:\n    " + "\n    ".join(problems))
    expected = expected_hf_params(spec, W)
    problems, notes, worst = compare_params(spec, model, expected)
    for n in notes:
        log(f"  NOTE {n}")
    require(not problems, f"{spec.name}: HF parameters differ from the generated ones:\n    " + "\n    ".join(problems))
    n_params = int(sum(v.size for v in expected.values()))
    log(f"  HF reload: {len(expected)} tensors, {n_params} parameters, max |HF - generated| = {worst:.1e} "
        f"(experts_implementation={load_info['experts_implementation']}, cast: {load_info['cast']})")
    meta["hf_load"] = load_info
    meta["hf_param_layout_notes"] = notes
    meta["hf_state_dict"] = {k: list(v.shape) for k, v in sorted(expected.items())}
    if spec.layout == "mxfp4":
        meta["mxfp4"]["hf_decoder_check"] = check_hf_mxfp4_decoder(W)
        log(f"  MXFP4: {meta['mxfp4']['hf_decoder_check']}; HF's dequantized experts equal ours (max |diff| {worst:.1e})")

    # 6. Logits from the reloaded model, and the independent reference.
    logits = hf_logits(model, sequences)
    diffs = [float(np.abs(lg.astype(np.float64) - ref).max()) for lg, ref in zip(logits, refs)]
    argmax_agree = [float((lg.argmax(-1) == ref.argmax(-1)).mean()) for lg, ref in zip(logits, refs)]
    ref_diff = max(diffs)
    meta["reference_check"] = {"max_abs_diff_per_sequence": diffs, "argmax_agreement": argmax_agree,
                               "tolerance": args.reference_tolerance}
    write_safetensors(folder / "logits.safetensors", {f"logits.{i}": st_f32(lg) for i, lg in enumerate(logits)})
    max_logit = float(max(np.abs(lg).max() for lg in logits))
    meta["logits"] = {"names": [f"logits.{i}" for i in range(len(logits))], "shapes": [list(l.shape) for l in logits],
                      "max_abs": max_logit, "std": float(np.concatenate([l.ravel() for l in logits]).std())}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    log(f"  logits {[list(l.shape) for l in logits]}, max |logit| {max_logit:.3f}; "
        f"|HF - reference| per sequence {', '.join(f'{d:.2e}' for d in diffs)}")
    if ref_diff > args.reference_tolerance:
        msg = (f"{spec.name}: HF logits and the independent reference differ by {ref_diff:.3e} "
               f"(> {args.reference_tolerance}): the layout semantics the README documents may be wrong for this "
               f"fixture. Investigate; --allow-reference-mismatch keeps the fixture anyway.")
        if not args.allow_reference_mismatch:
            raise FixtureError(msg)
        log("  WARNING " + msg)
    del model
    return {"name": spec.name, "ok": True, "params": n_params, "shapes": [list(l.shape) for l in logits],
            "max_logit": max_logit, "ref_diff": ref_diff, "margin": margin, "secs": time.time() - t0}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Generate moeflash golden parity fixtures with HF transformers.")
    ap.add_argument("out", nargs="?", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--only", default="", help="comma-separated fixture names")
    ap.add_argument("--allow-reference-mismatch", action="store_true",
                    help="keep going when HF and the independent reference forward disagree")
    ap.add_argument("--reference-tolerance", type=float, default=REFERENCE_TOLERANCE)
    ap.add_argument("--dry-run", action="store_true",
                    help="numpy only: write weights/config/input/meta without HF (no logits); for testing this script")
    args = ap.parse_args(argv)

    out_root = Path(args.out).resolve()
    wanted = [s for s in args.only.split(",") if s]
    unknown = [w for w in wanted if w not in {s.name for s in SPECS}]
    if unknown:
        log(f"unknown fixture(s): {unknown}; known: {[s.name for s in SPECS]}")
        return 2
    specs = [s for s in SPECS if not wanted or s.name in wanted]
    if args.dry_run and out_root == DEFAULT_OUT.resolve():
        log("--dry-run must not write into the committed fixture folder; give another OUT_DIR")
        return 2

    t0 = time.time()
    log(f"moeflash golden fixtures -> {out_root}")
    mxfp4_self_test()
    log("MXFP4 quantizer self-test passed")
    fp8_self_test()
    log("FP8 E4M3 codec self-test passed")
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    if not args.dry_run:
        import torch

        torch.manual_seed(0)
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        torch.use_deterministic_algorithms(True, warn_only=True)
        versions = hf_versions()
        major = int(versions["transformers"].split(".")[0])
        if major < 5:
            log(f"WARNING: transformers {versions['transformers']} < 5; the fused layouts need transformers 5")
    log("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    out_root.mkdir(parents=True, exist_ok=True)

    results = []
    for spec in specs:
        try:
            if not args.dry_run:
                import torch

                torch.manual_seed(spec.seed)
            res = make_fixture(spec, out_root, args)
            meta_path = out_root / spec.name / "meta.json"
            meta = json.loads(meta_path.read_text())
            meta["versions"] = versions
            meta["generator"] = "tools/golden/make_fixtures.py"
            meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
            results.append(res)
        except Exception as exc:  # noqa: BLE001
            log(f"\n!!! {spec.name} FAILED: {exc}")
            traceback.print_exc()
            sys.stdout.flush()
            folder = out_root / spec.name
            if folder.exists():
                (folder / "logits.safetensors").unlink(missing_ok=True)
                (folder / "FAILED.txt").write_text(f"{exc}\n\n{traceback.format_exc()}")
            results.append({"name": spec.name, "ok": False, "error": str(exc).splitlines()[0]})

    ok = [r for r in results if r["ok"]]
    if ok and not args.dry_run:
        index = {"fixtures": [r["name"] for r in ok], "versions": versions,
                 "generator": "tools/golden/make_fixtures.py"}
        existing = out_root / "fixtures.json"
        if existing.exists() and wanted:
            prev = json.loads(existing.read_text())
            index["fixtures"] = sorted(set(prev.get("fixtures", [])) | set(index["fixtures"]))
        (out_root / "fixtures.json").write_text(json.dumps(index, indent=2) + "\n")

    log("\nSummary")
    log(f"{'fixture':<22} {'params':>8}  {'logits shapes':<32} {'max|logit|':>10} {'|HF-ref|':>9} {'margin':>7} {'secs':>5}")
    for r in results:
        if r["ok"]:
            log(f"{r['name']:<22} {r['params']:>8}  {str(r['shapes']):<32} {r['max_logit']:>10.3f} "
                f"{r['ref_diff']:>9.2e} {r['margin']:>7.3f} {r['secs']:>5.1f}")
        else:
            log(f"{r['name']:<22} FAILED: {r['error']}")
    total_bytes = sum(p.stat().st_size for p in out_root.rglob("*") if p.is_file())
    log(f"output {out_root}: {total_bytes / 1e6:.2f} MB, {time.time() - t0:.1f}s")
    failed = [r["name"] for r in results if not r["ok"]]
    if failed:
        log(f"FAILED: {', '.join(failed)}")
        return 1
    if total_bytes > 8_000_000:
        log("FAILED: output exceeds 8 MB")
        return 1
    log("all fixtures OK" + (" (dry run)" if args.dry_run else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
