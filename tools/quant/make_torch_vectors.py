#!/usr/bin/env python3
"""Write PyTorch's own FP8 / bf16 / MXFP4 conversions as test vectors for @moeflash/quant.

Run once on a host with PyTorch (2.11 targeted; any version with float8 dtypes works), from the
repository root or anywhere:

    python tools/quant/make_torch_vectors.py            # writes packages/quant/test/vectors/torch_fp8.json
    python tools/quant/make_torch_vectors.py --out X.json

Needs only torch (no numpy). Uses the GPU too when one is visible, recording CPU and CUDA results
side by side. packages/quant/test/torch-vectors.test.ts compares the TypeScript encoders with it.

Every array is stored as base64 of its little-endian bytes; float32 values are stored as their bit
patterns so nothing is lost to decimal printing. Optional sections (those that depend on helpers a
given torch may lack) are left out with a note in meta.notes instead of failing the run.
"""

import argparse
import base64
import datetime
import json
import os
import platform
import random
import struct
import sys
import traceback

import torch

SCHEMA = "moeflash.torch-vectors.v1"
NOTES = []


def note(msg):
    NOTES.append(msg)
    print("note:", msg)


# ----------------------------------------------------------------------------------------------
# bit helpers (pure Python, exact)


def f32_bits(v):
    """float32 bit pattern of a Python float that is exactly representable in float32."""
    b = struct.unpack("<I", struct.pack("<f", v))[0]
    back = struct.unpack("<f", struct.pack("<I", b))[0]
    if not (back == v or (v != v and back != back)):
        raise ValueError("not exactly representable in float32: %r" % (v,))
    return b


def bits_to_f32_tensor(bits):
    """1-D float32 tensor from a list of uint32 bit patterns (through int32, which CPU ops support)."""
    signed = [b - (1 << 32) if b >= (1 << 31) else b for b in bits]
    return torch.tensor(signed, dtype=torch.int32).view(torch.float32)


def tensor_b64(t):
    """base64 of a tensor's raw bytes (host byte order, checked to be little-endian below)."""
    t = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return base64.b64encode(bytes(t.tolist())).decode("ascii")


def u32_list_b64(bits):
    return base64.b64encode(struct.pack("<%dI" % len(bits), *bits)).decode("ascii")


def with_neighbours(bits_list):
    """Each pattern with the float32 patterns one step below and above it (same sign)."""
    out = []
    for b in bits_list:
        out.append(b)
        mag = b & 0x7FFFFFFF
        sign = b & 0x80000000
        if mag > 0:
            out.append(sign | (mag - 1))
        if mag < 0x7F7FFFFF:
            out.append(sign | (mag + 1))
    return out


def both_signs(bits_list):
    out = []
    for b in bits_list:
        out.append(b & 0x7FFFFFFF)
        out.append((b & 0x7FFFFFFF) | 0x80000000)
    return out


def dedupe(bits_list):
    seen = set()
    out = []
    for b in bits_list:
        if b not in seen:
            seen.add(b)
            out.append(b)
    return out


# ----------------------------------------------------------------------------------------------
# grids of the formats, from their definitions


def small_float_values(ebits, mbits, bias, max_mag_code):
    """Positive values of codes 0..max_mag_code of a sign/exponent/mantissa format."""
    vals = []
    for c in range(max_mag_code + 1):
        e = c >> mbits
        m = c & ((1 << mbits) - 1)
        if e == 0:
            v = m * 2.0 ** (1 - bias - mbits)
        else:
            v = (1 + m / float(1 << mbits)) * 2.0 ** (e - bias)
        vals.append(v)
    return vals


E4M3_POS = small_float_values(4, 3, 7, 0x7E)  # up to 448
E5M2_POS = small_float_values(5, 2, 15, 0x7B)  # up to 57344
E2M1_POS = small_float_values(2, 1, 1, 0x7)  # up to 6


def grid_points(pos_values, extra):
    """Grid values, midpoints (the ties) and extra points, with float32 neighbours, both signs."""
    pts = list(pos_values)
    for a, b in zip(pos_values, pos_values[1:]):
        pts.append((a + b) / 2.0)
    pts.extend(extra)
    return both_signs(with_neighbours([f32_bits(v) for v in pts]))


def fp8_inputs(rng, gen):
    e4 = grid_points(
        E4M3_POS,
        # past the top: 464 is the tie to the would-be 480 (NaN's slot), 480 itself, far values
        [464.0, 480.0, 496.0, 512.0, 896.0, 1e6, 2.0 ** -10, 2.0 ** -11, 3 * 2.0 ** -11],
    )
    e5 = grid_points(
        E5M2_POS,
        [61440.0, 65536.0, 2.0 ** 17, 1e9, 2.0 ** -17, 2.0 ** -18, 3 * 2.0 ** -18],
    )
    special = both_signs(
        [
            0x00000000,  # zero
            0x00000001,  # smallest float32 subnormal
            0x007FFFFF,  # largest float32 subnormal
            0x00800000,  # smallest float32 normal
            0x7F7FFFFF,  # largest float32
            0x7F800000,  # infinity
            0x7FC00000,  # quiet NaN
            0x7F800001,  # signalling NaN, payload in the low bits
            0x7FFFFFFF,  # NaN, all payload bits
        ]
    )
    # random bit patterns: every exponent, NaNs and infinities included
    rand_bits = [rng.getrandbits(32) for _ in range(6000)]
    # random magnitudes spread log-uniformly over both formats' ranges (2^-20 .. 2^17), as float32
    expo = torch.rand(6000, generator=gen, dtype=torch.float64) * 37.0 - 20.0
    mant = torch.rand(6000, generator=gen, dtype=torch.float64) + 1.0
    sign = 1.0 - 2.0 * (torch.rand(6000, generator=gen) < 0.5).to(torch.float64)
    x = (sign * mant * torch.pow(2.0, torch.floor(expo))).to(torch.float32)
    rand_range = [v & 0xFFFFFFFF for v in x.view(torch.int32).tolist()]
    return dedupe(e4 + e5 + special + rand_bits + rand_range)


def bf16_inputs(rng):
    pats = []
    for hi in range(0, 0x10000, 1):
        exp = (hi >> 7) & 0xFF
        if exp == 0xFF:
            continue
        # sample: every exponent with a few mantissas, ties for even and odd kept patterns
        if (hi & 0x7F) not in (0x00, 0x01, 0x02, 0x3F, 0x40, 0x7E, 0x7F):
            continue
        base = hi << 16
        for lo in (0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF):
            pats.append(base | lo)
    pats += [
        0x7F800000,
        0xFF800000,
        0x7FC00000,
        0xFFC00000,
        0x7F800001,  # NaN that truncation would turn into Inf
        0xFF800001,
        0x7FFFFFFF,  # NaN that rounding would carry into the sign bit
        0xFFFFFFFF,
        0x7F7FFFFF,  # rounds to Inf
        0x7F7F7FFF,
        0x7F7F8000,  # tie at the top: odd kept pattern, rounds up to Inf
    ]
    pats += [rng.getrandbits(32) for _ in range(12000)]
    return dedupe(pats)


def e2m1_inputs(rng, gen):
    pts = grid_points(E2M1_POS, [6.5, 7.0, 8.0, 12.0, 1e6, 2.0 ** -3, 2.0 ** -20])
    # no NaN / Inf: the torch helper does not define them
    x = (torch.rand(4096, generator=gen, dtype=torch.float64) * 18.0 - 9.0).to(torch.float32)
    pts += [v & 0xFFFFFFFF for v in x.view(torch.int32).tolist()]
    pts += both_signs([0x00000001, 0x007FFFFF, 0x7F7FFFFF])
    return dedupe(pts)


# ----------------------------------------------------------------------------------------------


def devices():
    devs = ["cpu"]
    try:
        if torch.cuda.is_available():
            devs.append("cuda")
    except Exception as e:  # a broken CUDA install should not stop the CPU vectors
        note("cuda check failed: %r" % (e,))
    return devs


def cast_codes(x_cpu, dtype, dev):
    """torch's cast of a float32 tensor to an 8-bit float dtype, as raw codes."""
    return x_cpu.to(dev).to(dtype).view(torch.uint8).cpu()


def cast_bf16(x_cpu, dev):
    return x_cpu.to(dev).to(torch.bfloat16).view(torch.int16).cpu()


def decode_all(dtype, dev):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    return codes.to(dev).view(dtype).to(torch.float32).cpu()


def section_fp8(out, rng, gen):
    inputs = fp8_inputs(rng, gen)
    x = bits_to_f32_tensor(inputs)
    out["fp8_inputs_f32"] = u32_list_b64(inputs)
    out["fp8_input_count"] = len(inputs)
    for key, name in (("e4m3fn", "float8_e4m3fn"), ("e5m2", "float8_e5m2")):
        if not hasattr(torch, name):
            note("torch has no %s; section skipped" % name)
            continue
        dtype = getattr(torch, name)
        enc = {}
        dec = {}
        for dev in devices():
            try:
                enc[dev] = tensor_b64(cast_codes(x, dtype, dev))
            except Exception as e:
                note("%s cast on %s failed: %r" % (name, dev, e))
            try:
                dec[dev] = tensor_b64(decode_all(dtype, dev))
            except Exception as e:
                note("%s decode on %s failed: %r" % (name, dev, e))
        out["f32_to_" + key] = enc
        out[key + "_to_f32"] = dec


def section_bf16(out, rng):
    inputs = bf16_inputs(rng)
    x = bits_to_f32_tensor(inputs)
    out["bf16_inputs_f32"] = u32_list_b64(inputs)
    out["bf16_input_count"] = len(inputs)
    enc = {}
    for dev in devices():
        try:
            enc[dev] = tensor_b64(cast_bf16(x, dev))
        except Exception as e:
            note("bf16 cast on %s failed: %r" % (dev, e))
    out["f32_to_bf16"] = enc


def section_e8m0(out):
    if not hasattr(torch, "float8_e8m0fnu"):
        note("torch has no float8_e8m0fnu; e8m0 decode vectors skipped")
        return
    dec = {}
    for dev in devices():
        try:
            dec[dev] = tensor_b64(decode_all(torch.float8_e8m0fnu, dev))
        except Exception as e:
            note("float8_e8m0fnu decode on %s failed: %r" % (dev, e))
    if dec:
        out["e8m0fnu_to_f32"] = dec


FP4_HELPERS = [
    "_n_ones",
    "_f32_to_floatx_unpacked",
    "_floatx_unpacked_to_f32",
    "down_size",
    "pack_uint4",
    "_bfloat16_to_float4_e2m1fn_x2",
    "to_mxfp",
]
FP4_CONSTANTS = {"EBITS_F32", "MBITS_F32", "F32_EXP_BIAS", "FP4_EBITS", "FP4_MBITS"}


class _Helpers(object):
    pass


def _extract_fp4_helpers(path):
    """The FP4 helper functions of common_quantized.py, executed on their own: importing the
    module pulls in test-only packages (numpy, expecttest) a runtime install may lack."""
    import ast

    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)

    def assigned_names(node):
        names = []
        for t in node.targets:
            elts = t.elts if isinstance(t, ast.Tuple) else [t]
            for e in elts:
                if not isinstance(e, ast.Name):
                    return None
                names.append(e.id)
        return names

    keep = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in FP4_HELPERS:
            keep.append(node)
        elif isinstance(node, ast.Assign):
            names = assigned_names(node)
            if names and all(n in FP4_CONSTANTS for n in names):
                keep.append(node)
    module = ast.Module(body=keep, type_ignores=[])
    ns = {"torch": torch, "Tensor": torch.Tensor}
    exec(compile(module, path, "exec"), ns)
    h = _Helpers()
    for name in FP4_HELPERS:
        if name in ns:
            setattr(h, name, ns[name])
    return h


def load_fp4_helpers():
    """PyTorch's own FP4 helpers (torch.testing._internal.common_quantized); None when absent."""
    cq = None
    try:
        from torch.testing._internal import common_quantized as cq  # noqa: WPS433
        note("common_quantized imported")
    except Exception as e:
        note("common_quantized import failed (%r); extracting its FP4 helpers from source" % (e,))
        try:
            import importlib.util

            spec = importlib.util.find_spec("torch.testing._internal.common_quantized")
            if spec is None or not spec.origin:
                note("common_quantized.py not found")
                return None
            cq = _extract_fp4_helpers(spec.origin)
        except Exception:
            note("extracting FP4 helpers failed:\n%s" % traceback.format_exc())
            return None
    present = [n for n in FP4_HELPERS if hasattr(cq, n)]
    note("FP4 helpers present: %s" % (present,))
    return cq


def section_e2m1(out, rng, gen, cq):
    if cq is None or not hasattr(cq, "_f32_to_floatx_unpacked"):
        note("no _f32_to_floatx_unpacked; e2m1 element vectors skipped")
        return
    inputs = e2m1_inputs(rng, gen)
    x = bits_to_f32_tensor(inputs)
    sec = {"inputs_f32": u32_list_b64(inputs), "count": len(inputs)}
    try:
        codes = cq._f32_to_floatx_unpacked(x.clone(), 2, 1)
        sec["codes_u8"] = tensor_b64(codes.to(torch.uint8))
    except Exception as e:
        note("_f32_to_floatx_unpacked failed: %r" % (e,))
        return
    if hasattr(cq, "_floatx_unpacked_to_f32"):
        try:
            dec = cq._floatx_unpacked_to_f32(torch.arange(16, dtype=torch.uint8), 2, 1)
            sec["decode_f32"] = tensor_b64(dec.to(torch.float32))
        except Exception as e:
            note("_floatx_unpacked_to_f32 failed: %r" % (e,))
    if hasattr(cq, "pack_uint4"):
        try:
            seq = torch.tensor([(3 * i + 1) % 16 for i in range(32)], dtype=torch.uint8)
            sec["pack_in_u8"] = tensor_b64(seq)
            sec["pack_out_u8"] = tensor_b64(cq.pack_uint4(seq).to(torch.uint8))
        except Exception as e:
            note("pack_uint4 failed: %r" % (e,))
    out["e2m1"] = sec


def section_to_mxfp4(out, gen, cq):
    """torch's to_mxfp(format='mxfp4'): RCEIL scales through a bf16 intermediate, so not our
    rounding bit for bit; kept to check the packed layout and the E8M0 bias against ours."""
    if cq is None or not hasattr(cq, "to_mxfp") or not hasattr(torch, "float4_e2m1fn_x2"):
        note("to_mxfp / float4_e2m1fn_x2 missing; mxfp4 layout vectors skipped")
        return
    rows, cols = 64, 256
    try:
        row_exp = torch.randint(-12, 13, (rows, 1), generator=gen).to(torch.float32)
        x = (torch.randn(rows, cols, generator=gen) * torch.pow(2.0, row_exp)).to(torch.float32)
        scales, packed = cq.to_mxfp(x.contiguous(), 32, "mxfp4")
        out["to_mxfp4"] = {
            "rows": rows,
            "cols": cols,
            "rule": "rceil-via-bf16",
            "x_f32": tensor_b64(x),
            "scales_u8": tensor_b64(scales.view(torch.uint8)),
            "packed_u8": tensor_b64(packed.view(torch.uint8)),
        }
    except Exception as e:
        note("to_mxfp mxfp4 failed: %r" % (e,))


def section_fp8_blocked(out, gen):
    """DeepSeek-V3 / HF block-scaled E4M3: s = amax / 448 per 128x128 block (1 for an all-zero
    block, the moeflash convention), q = (w / s).to(float8_e4m3fn); dequant q.float() * s."""
    if not hasattr(torch, "float8_e4m3fn"):
        return
    rows, cols, br, bc = 200, 300, 128, 128
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float32)
    w = w * torch.pow(2.0, torch.randint(-8, 3, (rows, 1), generator=gen).to(torch.float32))
    w[128:200, 256:300] = 0.0  # the whole (partial) block (1, 2) is zero
    sr, sc = (rows + br - 1) // br, (cols + bc - 1) // bc
    scale_inv = torch.empty(sr, sc, dtype=torch.float32)
    data = torch.empty(rows, cols, dtype=torch.uint8)
    deq = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(sr):
        for j in range(sc):
            blk = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            amax = blk.abs().amax()
            s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax)).to(torch.float32)
            q = (blk / s).to(torch.float8_e4m3fn)
            scale_inv[i, j] = s
            data[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = q.view(torch.uint8)
            deq[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = q.to(torch.float32) * s
    out["fp8_blocked"] = {
        "rows": rows,
        "cols": cols,
        "block": [br, bc],
        "w_f32": tensor_b64(w),
        "data_u8": tensor_b64(data),
        "scale_inv_f32": tensor_b64(scale_inv),
        "dequant_f32": tensor_b64(deq),
    }


def sanity(out):
    """Spot checks of well-known values, printed; they never stop the file from being written."""
    try:
        x = torch.tensor([448.0, 464.0, 480.0, 2.0 ** -10, 1.0 + 2.0 ** -8], dtype=torch.float32)
        print("sanity e4m3fn:", [hex(v) for v in x.to(torch.float8_e4m3fn).view(torch.uint8).tolist()],
              "expect ['0x7e', '0x7e', '0x7f', '0x0', '0x38']")
        y = torch.tensor([57344.0, 61440.0, 2.0 ** -17], dtype=torch.float32)
        print("sanity e5m2:", [hex(v) for v in y.to(torch.float8_e5m2).view(torch.uint8).tolist()],
              "expect ['0x7b', '0x7c', '0x0']")
        z = torch.tensor([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8], dtype=torch.float32)
        print("sanity bf16:", [hex(v & 0xFFFF) for v in z.to(torch.bfloat16).view(torch.int16).tolist()],
              "expect ['0x3f80', '0x3f82']")
    except Exception as e:
        note("sanity checks raised %r" % (e,))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    default_out = os.path.join(here, "..", "..", "packages", "quant", "test", "vectors", "torch_fp8.json")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.normpath(default_out))
    ap.add_argument("--seed", type=int, default=20261124)
    args = ap.parse_args()

    if sys.byteorder != "little":
        sys.exit("this script stores raw little-endian bytes; run it on a little-endian host")

    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    out = {"schema": SCHEMA}
    meta = {
        "torch": torch.__version__,
        "torch_cuda": getattr(torch.version, "cuda", None),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": args.seed,
        "devices": devices(),
        "has_float4_e2m1fn_x2": hasattr(torch, "float4_e2m1fn_x2"),
        "has_float8_e8m0fnu": hasattr(torch, "float8_e8m0fnu"),
    }
    if "cuda" in meta["devices"]:
        try:
            meta["cuda_device"] = torch.cuda.get_device_name(0)
        except Exception as e:
            note("get_device_name failed: %r" % (e,))

    sections = [
        ("fp8", lambda: section_fp8(out, rng, gen)),
        ("bf16", lambda: section_bf16(out, rng)),
        ("e8m0", lambda: section_e8m0(out)),
        ("fp8_blocked", lambda: section_fp8_blocked(out, gen)),
    ]
    for name, fn in sections:
        try:
            fn()
        except Exception:
            note("section %s failed:\n%s" % (name, traceback.format_exc()))
    try:
        cq = load_fp4_helpers()
        section_e2m1(out, rng, gen, cq)
        section_to_mxfp4(out, gen, cq)
    except Exception:
        note("fp4 sections failed:\n%s" % traceback.format_exc())

    sanity(out)
    meta["notes"] = NOTES
    out["meta"] = meta

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    with open(tmp) as f:
        json.load(f)  # the file parses before it replaces anything
    os.replace(tmp, args.out)
    size = os.path.getsize(args.out)
    print("wrote %s (%.0f KB); sections: %s" % (args.out, size / 1024.0,
                                                 sorted(k for k in out if k not in ("schema", "meta"))))


if __name__ == "__main__":
    main()
