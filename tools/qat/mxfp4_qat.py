"""MXFP4 fake quantization for quantization-aware training, and an export moeflash loads.

The forward pass is bit-identical to @moeflash/quant's encoder (packages/quant/src/mxfp4.ts):
the same decisions, taken on the float32 bit patterns with integer arithmetic, so that a weight
trained through this module is stored by `moeflash quantize` (or by `export_checkpoint` below)
exactly as the training forward saw it.

- Blocks of 32 along the input (reduction) axis share one E8M0 scale X = 2^e.
- Scale rule 'ocp' (OCP MX v1.0): e = floor(log2(amax)) - 2, read from amax's exponent field;
  'no-clip': one more where amax's mantissa exceeds 1.5 (so nothing saturates). e is clamped to
  [-127, 127]; an all-zero block, or one whose amax is a float32 subnormal, gets e = -127.
- Each element rounds to the nearest E2M1 value of v / X, ties to even, magnitudes above 6 saturate
  to 6. The rounding compares |v|'s bits with the bits of the decision thresholds t * 2^e (exact in
  float32), so no float division rounds first. The sign is kept (-0.1 gives code 0x8, -0).
- A NaN or an infinity in a block: scale code 0xFF, every code 0, and the block decodes to NaN.
- Packing: element 2i in the low nibble of byte i (gpt-oss `*_blocks`).

The backward pass is the straight-through estimator: the gradient goes through unchanged.

Works with PyTorch 1.13 and 2.x, on the CPU and on CUDA (integer ops only, plus one float32 multiply
per element on decode, exact for every representable result). Denormals must not be flushed
(the default; do not call torch.set_flush_denormal(True)): blocks with tiny scales decode to
float32 subnormals.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

BLOCK = 32
E8M0_BIAS = 127
E8M0_NAN = 0xFF
SCALE_RULES = ("ocp", "no-clip")
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Midpoints between neighbouring E2M1 magnitudes. At a midpoint the even mantissa wins: 0.25, 1.25,
# 2.5 and 5 round down (|v| must exceed them), 0.75, 1.75 and 3.5 round up (reaching them is enough,
# hence their bit patterns lowered by one).
_THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_GOES_UP = (False, True, False, True, False, True, False)
_F32_MAX = 3.4028234663852886e38
_F32_INF_BITS = 0x7F800000


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _threshold_rows() -> List[List[int]]:
    """For e in -127..127, the 7 thresholds t * 2^e as float32 bits (tie-up ones minus one)."""
    rows = []
    for e in range(-127, 128):
        row = []
        for t, up in zip(_THRESHOLDS, _TIE_GOES_UP):
            v = t * 2.0 ** e  # exact in a double; exact in float32 whenever finite there
            bits = _F32_INF_BITS if v > _F32_MAX else _f32_bits(v)
            row.append(bits - 1 if up else bits)
        rows.append(row)
    return rows


def _scale_values() -> List[float]:
    return [2.0 ** (c - E8M0_BIAS) for c in range(255)] + [float("nan")]


_TABLES: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(threshold bits int32 [255, 7], scale values float32 [256], E2M1 values float32 [16])."""
    key = str(device)
    if key not in _TABLES:
        thr = torch.tensor(_threshold_rows(), dtype=torch.int32)
        # 2^-127 is a float32 subnormal; built from its bits so no conversion can flush it.
        scale_bits = [_f32_bits(v) if v == v else 0x7FC00000 for v in _scale_values()]
        scale_bits = [b - (1 << 32) if b >= (1 << 31) else b for b in scale_bits]
        scales = torch.tensor(scale_bits, dtype=torch.int32).view(torch.float32)
        e2m1 = torch.tensor(E2M1_VALUES, dtype=torch.float32)
        _TABLES[key] = (thr.to(device), scales.to(device), e2m1.to(device))
    return _TABLES[key]


def _check_rule(scale_rule: str) -> None:
    if scale_rule not in SCALE_RULES:
        raise ValueError("unknown scale_rule %r; use 'ocp' or 'no-clip'" % (scale_rule,))


def _blocked_bits(x: torch.Tensor, axis: int) -> torch.Tensor:
    """float32 bit patterns of x as int32 [..., n/32, 32], the quantized axis moved last."""
    if not (x.is_floating_point()):
        raise TypeError("MXFP4 quantizes floating-point tensors, got %s" % (x.dtype,))
    if x.dim() == 0:
        raise ValueError("MXFP4 needs at least one axis")
    x = x.detach()
    if axis % x.dim() != x.dim() - 1:
        x = x.movedim(axis, -1)
    n = x.shape[-1]
    if n % BLOCK != 0:
        raise ValueError(
            "the quantized axis has %d elements, not a multiple of %d; MXFP4 blocks run along the "
            "input axis, whose size must be a multiple of 32" % (n, BLOCK)
        )
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    return bits.reshape(*x.shape[:-1], n // BLOCK, BLOCK)


def mxfp4_codes(x: torch.Tensor, scale_rule: str = "ocp", axis: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unpacked E2M1 codes (uint8 [..., n/32, 32]) and E8M0 scale codes (uint8 [..., n/32]).

    `axis` is the input (reduction) axis of the weight; it comes out last.
    """
    _check_rule(scale_rule)
    bits = _blocked_bits(x, axis)
    thr, _, _ = _tables(bits.device)
    mag = bits & 0x7FFFFFFF
    amax = mag.amax(dim=-1)
    nan_block = amax >= _F32_INF_BITS
    ef = amax >> 23
    e = ef - 129  # floor(log2(amax)) - 2 for a normal amax
    if scale_rule == "no-clip":
        e = e + ((amax & 0x7FFFFF) > 0x400000).to(torch.int32)
    # A zero or subnormal amax gives an exponent below -127 under either rule: the lower clamp.
    e = torch.where(ef > 0, e, torch.full_like(e, -127)).clamp(-127, 127)
    row = thr[(e + 127).long()]  # [..., nb, 7]
    codes = torch.zeros(mag.shape, dtype=torch.uint8, device=mag.device)
    for k in range(len(_THRESHOLDS)):
        codes += (mag > row[..., k : k + 1]).to(torch.uint8)
    codes += (bits < 0).to(torch.uint8) * 8
    codes = torch.where(nan_block.unsqueeze(-1), torch.zeros_like(codes), codes)
    scales = torch.where(nan_block, torch.full_like(e, E8M0_NAN), e + E8M0_BIAS).to(torch.uint8)
    return codes, scales


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 32] codes -> uint8 [..., 16] bytes, element 2i in the low nibble of byte i."""
    return codes[..., 0::2] + codes[..., 1::2] * 16


def unpack_codes(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 16] bytes -> uint8 [..., 32] codes."""
    lo = blocks & 15
    hi = blocks >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*blocks.shape[:-1], 2 * blocks.shape[-1])


def mxfp4_quantize(x: torch.Tensor, scale_rule: str = "ocp", axis: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [..., n/32, 16], scales uint8 [..., n/32]): the gpt-oss `*_blocks` / `*_scales`."""
    codes, scales = mxfp4_codes(x, scale_rule, axis)
    return pack_codes(codes), scales


def _decode(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    _, scale_values, e2m1 = _tables(codes.device)
    # E2M1 value times a power of two: exact whenever float32 can hold the result, and +-inf beyond
    # (6 * 2^126 with the no-clip rule), as the TypeScript decoder's single rounding gives.
    values = e2m1[codes.long()] * scale_values[scales.long()].unsqueeze(-1)
    return values.reshape(*codes.shape[:-2], codes.shape[-2] * codes.shape[-1])


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [..., n] from blocks [..., n/32, 16] and scales [..., n/32] (NaN blocks: NaN)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError("blocks and scales must be uint8")
    if tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != 16:
        raise ValueError("blocks %s and scales %s do not match" % (tuple(blocks.shape), tuple(scales.shape)))
    return _decode(unpack_codes(blocks), scales)


def mxfp4_round_trip(x: torch.Tensor, scale_rule: str = "ocp", axis: int = -1) -> torch.Tensor:
    """dequantize(quantize(x)) in float32, with x's shape (no gradient; see mxfp4_fake_quant)."""
    codes, scales = mxfp4_codes(x, scale_rule, axis)
    y = _decode(codes, scales)
    if axis % x.dim() != x.dim() - 1:
        moved = list(x.movedim(axis, -1).shape)
        return y.reshape(moved).movedim(-1, axis)
    return y.reshape(x.shape)


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale_rule, axis):  # type: ignore[override]
        return mxfp4_round_trip(x, scale_rule, axis).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # Straight-through: quantization is treated as the identity for the gradient.
        return grad, None, None


def mxfp4_fake_quant(x: torch.Tensor, scale_rule: str = "ocp", axis: int = -1) -> torch.Tensor:
    """Forward: the MXFP4 round trip of x (bit-identical to moeflash), in x's dtype (every MXFP4
    value is exact in bf16 and float32). Backward: straight-through."""
    _check_rule(scale_rule)
    return _FakeQuant.apply(x, scale_rule, axis)


class MXFP4FakeQuant(torch.nn.Module):
    """Fake-quantizes a weight; use as a parametrization:

        torch.nn.utils.parametrize.register_parametrization(linear, "weight", MXFP4FakeQuant())

    `axis` is the weight's input axis: -1 for nn.Linear weights [out, in] and for fused experts
    stored [E, 2I, H]; -2 for gpt-oss's fused experts, which HF keeps as [E, H, 2I] (x @ W).
    """

    def __init__(self, scale_rule: str = "ocp", axis: int = -1, enabled: bool = True):
        super().__init__()
        _check_rule(scale_rule)
        self.scale_rule = scale_rule
        self.axis = axis
        self.enabled = enabled

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return mxfp4_fake_quant(w, self.scale_rule, self.axis) if self.enabled else w

    def extra_repr(self) -> str:
        return "scale_rule=%s, axis=%d, enabled=%s" % (self.scale_rule, self.axis, self.enabled)


_EXPERT_PARAM = re.compile(r"\.experts\.(?:\d+\.(?:gate_proj|up_proj|down_proj|w1|w2|w3)\.weight|gate_up_proj|down_proj)$")


def attach_fake_quant(model: torch.nn.Module, scale_rule: str = "ocp", family: Optional[str] = None) -> List[str]:
    """Registers MXFP4FakeQuant on every expert weight of a HF MoE model; returns their names.

    family: the config's model_type (read from model.config when absent); gpt_oss fused experts
    are input-major, so their input axis is -2.
    """
    from torch.nn.utils import parametrize

    if family is None:
        family = getattr(getattr(model, "config", None), "model_type", None)
    done = []
    for name, param in list(model.named_parameters()):
        if not _EXPERT_PARAM.search(name) or param.dim() < 2:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        axis = -2 if (family == "gpt_oss" and param.dim() == 3) else -1
        parametrize.register_parametrization(module, attr, MXFP4FakeQuant(scale_rule, axis))
        done.append(name)
    return done


# ------------------------------------------------------------------------------------------------
# safetensors, written and read without the safetensors package

_DTYPES = {
    torch.bfloat16: ("BF16", torch.int16),
    torch.float16: ("F16", torch.int16),
    torch.float32: ("F32", torch.int32),
    torch.float64: ("F64", torch.int64),
    torch.uint8: ("U8", torch.uint8),
    torch.int8: ("I8", torch.int8),
    torch.int16: ("I16", torch.int16),
    torch.int32: ("I32", torch.int32),
    torch.int64: ("I64", torch.int64),
    torch.bool: ("BOOL", torch.uint8),
}
_BY_NAME = {v[0]: (k, v[1]) for k, v in _DTYPES.items()}


def _raw_bytes(t: torch.Tensor) -> bytes:
    if t.dtype not in _DTYPES:
        raise TypeError("cannot store dtype %s" % (t.dtype,))
    if struct.pack("=H", 1) != struct.pack("<H", 1):
        raise RuntimeError("safetensors are little-endian; this writer runs on little-endian hosts only")
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.view(_DTYPES[t.dtype][1]).numpy().tobytes()


def write_safetensors(path: str, entries: Iterable[Tuple[str, str, List[int], Callable[[], torch.Tensor]]]) -> None:
    """Writes (name, dtype name, shape, produce) entries; each tensor is produced when written, so
    only one is in memory at a time. Written to path + '.partial', renamed when complete."""
    entries = list(entries)
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, _ in entries:
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * ((8 - len(blob) % 8) % 8)
    partial = path + ".partial"
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape, produce in entries:
            t = produce()
            if list(t.shape) != list(shape) or _DTYPES[t.dtype][0] != dtype:
                raise ValueError("%s: produced %s %s, declared %s %s" % (name, t.dtype, list(t.shape), dtype, shape))
            f.write(_raw_bytes(t))
    os.replace(partial, path)


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (for tests and small checkpoints)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype, storage = _BY_NAME[info["dtype"]]
        raw = bytearray(data[begin:end])
        t = torch.frombuffer(raw, dtype=storage) if raw else torch.empty(0, dtype=storage)
        out[name] = t.view(dtype).reshape(info["shape"]) if dtype != torch.bool else t.to(torch.bool).reshape(info["shape"])
    return out


# ------------------------------------------------------------------------------------------------
# export

_LAYER_MOE = re.compile(r"^model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.(.*)$")
_COPIED = re.compile(
    r"^(tokenizer(\.json|_config\.json|\.model)|special_tokens_map\.json|added_tokens\.json|"
    r"vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json)|.*\.jinja|generation_config\.json)$"
)


def _normalize_names(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Parametrized modules save `X.parametrizations.W.original`; the checkpoint name is `X.W`."""
    out = {}
    for k, v in state.items():
        out[re.sub(r"\.parametrizations\.([^.]+)\.original\d*$", r".\1", k)] = v
    return out


def export_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, object],
    out_dir: str,
    scale_rule: str = "ocp",
    copy_files_from: Optional[str] = None,
) -> Dict[str, object]:
    """Writes a model folder moeflash loads: experts as MXFP4 in the gpt-oss layout for every family
    (fused `model.layers.L.mlp.experts.gate_up_proj_blocks/_scales` [E, 2I, H/32, 16] + [E, 2I, H/32]
    with gate rows first then up for qwen3_moe / mixtral, interleaved for gpt_oss, and
    `down_proj_blocks/_scales`), every other floating tensor as bf16, config.json with gpt-oss's
    mxfp4 `quantization_config`. The expert codes equal `moeflash quantize` on the same weights.

    state_dict: HF names, experts per-expert (`mlp.experts.J.gate_proj.weight`, Mixtral
    `block_sparse_moe.experts.J.w1/w3/w2.weight`) or fused (`mlp.experts.gate_up_proj`: [E, 2I, H]
    for qwen3_moe / mixtral, [E, H, 2I] for gpt_oss). Returns a summary.
    """
    _check_rule(scale_rule)
    family = config.get("model_type")
    if family not in ("qwen3_moe", "mixtral", "gpt_oss"):
        raise ValueError("model_type %r: export supports qwen3_moe, mixtral and gpt_oss" % (family,))
    state = _normalize_names(state_dict)
    layers: Dict[int, Dict[str, torch.Tensor]] = {}
    plain: Dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = _LAYER_MOE.match(name)
        if m and (m.group(3).startswith("experts.") or m.group(3).startswith("gate.") or m.group(3).startswith("router.")):
            layers.setdefault(int(m.group(1)), {})[m.group(3)] = t
        else:
            plain[name] = t

    interleaved = family == "gpt_oss"
    entries = []

    def bf16(name: str, t: torch.Tensor) -> None:
        if t.is_floating_point():
            entries.append((name, "BF16", list(t.shape), lambda t=t: t.detach().to(torch.bfloat16)))
        else:
            entries.append((name, _DTYPES[t.dtype][0], list(t.shape), lambda t=t: t.detach()))

    for name in sorted(plain):
        bf16(name, plain[name])
    for layer in sorted(layers):
        parts = layers[layer]
        out = "model.layers.%d.mlp" % layer
        for k, t in parts.items():
            if not k.startswith("experts."):
                bf16("%s.%s" % (out, k), t)  # router weight and bias
        if "experts.gate_up_proj_blocks" in parts:
            for k in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"):
                t = parts["experts." + k]
                entries.append(("%s.experts.%s" % (out, k), "U8", list(t.shape), lambda t=t: t))
        else:
            gate_up, down = _fused_experts(parts, family, interleaved)
            for key, w in (("gate_up_proj", gate_up), ("down_proj", down)):
                e, rows, cols = w.shape
                if cols % BLOCK:
                    raise ValueError("layer %d: %s has %d input columns, not a multiple of 32" % (layer, key, cols))

                # Blocks and scales come from one quantization; the scales wait for their turn.
                memo: Dict[str, torch.Tensor] = {}

                def blocks(w=w, memo=memo):
                    b, memo["scales"] = mxfp4_quantize(w.to(torch.float32), scale_rule)
                    return b

                entries.append(("%s.experts.%s_blocks" % (out, key), "U8", [e, rows, cols // BLOCK, 16], blocks))
                entries.append(("%s.experts.%s_scales" % (out, key), "U8", [e, rows, cols // BLOCK], lambda memo=memo: memo.pop("scales")))
        for k in ("gate_up_proj_bias", "down_proj_bias"):
            if "experts." + k in parts:
                bf16("%s.experts.%s" % (out, k), parts["experts." + k])

    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), entries)
    cfg = dict(config)
    router = "model.layers.*.mlp.router" if family == "gpt_oss" else "model.layers.*.mlp.gate"
    dense_layers = ["model.layers.%d.mlp" % i for i in range(int(cfg.get("num_hidden_layers", 0))) if i not in layers]
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", router, "model.embed_tokens", "lm_head"] + dense_layers,
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    copied = []
    if copy_files_from:
        for f in sorted(os.listdir(copy_files_from)):
            if f != "config.json" and _COPIED.match(f) and os.path.isfile(os.path.join(copy_files_from, f)):
                shutil.copyfile(os.path.join(copy_files_from, f), os.path.join(out_dir, f))
                copied.append(f)
    return {"tensors": len(entries), "moe_layers": sorted(layers), "copied": copied, "scale_rule": scale_rule}


def _fused_experts(parts: Mapping[str, torch.Tensor], family: str, interleaved: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """One layer's experts as gate_up [E, 2I, H] (in the family's row order) and down [E, H, I]."""
    if "experts.gate_up_proj" in parts:
        gu = parts["experts.gate_up_proj"].detach()
        dn = parts["experts.down_proj"].detach()
        if family == "gpt_oss":  # HF keeps x @ W: [E, H, 2I] and [E, I, H]
            gu = gu.transpose(1, 2)
            dn = dn.transpose(1, 2)
        return gu.contiguous(), dn.contiguous()
    names = ("w1", "w3", "w2") if "experts.0.w1.weight" in parts else ("gate_proj", "up_proj", "down_proj")
    count = 0
    while "experts.%d.%s.weight" % (count, names[0]) in parts:
        count += 1
    if count == 0:
        raise ValueError("no expert weights found among %s" % (sorted(parts)[:5],))
    gus, dns = [], []
    for j in range(count):
        g = parts["experts.%d.%s.weight" % (j, names[0])].detach()
        u = parts["experts.%d.%s.weight" % (j, names[1])].detach()
        if interleaved:
            gus.append(torch.stack([g, u], dim=1).reshape(2 * g.shape[0], g.shape[1]))
        else:
            gus.append(torch.cat([g, u], dim=0))
        dns.append(parts["experts.%d.%s.weight" % (j, names[2])].detach())
    return torch.stack(gus), torch.stack(dns)
