#!/usr/bin/env python3
"""Checks the PyTorch MXFP4 fake-quant (tools/qat/mxfp4_qat.py) against moeflash's encoder, bit for bit.

    python tools/qat/test_bit_identity.py RESULT.json [--vectors DIR] [--devices cpu,cuda]
                                          [--require-cuda] [--export-dir DIR] [--no-node]

Reads the committed vectors packages/quant/test/vectors/mxfp4_* (float32 inputs and what
@moeflash/quant's quantizeMxfp4 / dequantizeMxfp4 make of them under the 'ocp' and 'no-clip' scale
rules) and checks, on every device asked for (CUDA is skipped, and said so, when none is visible):

1. quantize: packed codes and E8M0 scales equal the vectors byte for byte;
2. dequantize of the vectors' codes, and the fake-quant forward of the inputs: float32 bit patterns
   equal the vectors' (NaN blocks: NaN at the same places; NaN bits are not compared: CUDA and the
   CPU produce different NaN payloads), output dtype and shape as the input's;
3. the quantized axis can be any axis (a transposed input gives the same codes);
4. backward: the straight-through gradient is the upstream gradient, unchanged;
5. export (CPU): tiny qwen3_moe, mixtral and gpt_oss models in their HF layouts are exported; the
   fused `*_blocks` / `*_scales` have the shapes moeflash loads and equal the quantization of the
   experts stacked in the family's row order (gate rows then up; gpt-oss interleaved);
6. when `node` and the built packages are present (pnpm build), `moeflash quantize` converts the same
   models' bf16 checkpoints, and its expert tensors must equal the export's byte for byte.

Writes a JSON result to RESULT.json and exits 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ beside the sources in the checkout

import torch  # noqa: E402

from mxfp4_qat import (  # noqa: E402
    E8M0_NAN,
    attach_fake_quant,
    export_checkpoint,
    mxfp4_codes,
    mxfp4_dequantize,
    mxfp4_fake_quant,
    mxfp4_quantize,
    pack_codes,
    read_safetensors,
    write_safetensors,
)

RULES = ("ocp", "no-clip")


def load_vectors(vdir):
    with open(os.path.join(vdir, "mxfp4_vectors.json")) as f:
        manifest = json.load(f)

    def load(spec):
        path = os.path.join(vdir, spec["file"])
        with open(path, "rb") as f:
            raw = f.read()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != spec["sha256"]:
            raise RuntimeError("%s: sha256 %s does not match the manifest (%s); the file is damaged" % (path, digest, spec["sha256"]))
        dtype = {"float32": torch.float32, "uint8": torch.uint8}[spec["dtype"]]
        storage = torch.int32 if dtype == torch.float32 else torch.uint8
        return torch.frombuffer(bytearray(raw), dtype=storage).view(dtype).reshape(spec["shape"]).clone()

    inputs = load(manifest["inputs"])
    rules = {rule: {k: load(v) for k, v in manifest["rules"][rule].items()} for rule in RULES}
    return manifest, inputs, rules


def f32_bits(t):
    return t.detach().to(torch.float32).contiguous().cpu().view(torch.int32)


def mismatches(got, want, what, limit=5):
    """Byte / element mismatches of two integer tensors: count and the first few."""
    got = got.cpu()
    want = want.cpu()
    if tuple(got.shape) != tuple(want.shape):
        return {"what": what, "count": -1, "error": "shape %s, expected %s" % (tuple(got.shape), tuple(want.shape))}
    bad = (got != want).nonzero()
    out = {"what": what, "count": int(bad.shape[0])}
    if bad.shape[0]:
        out["first"] = [{"index": [int(i) for i in idx], "got": int(got[tuple(idx)]), "want": int(want[tuple(idx)])} for idx in bad[:limit]]
    return out


def float_mismatches(got, want, what, limit=5):
    """float32 bit-pattern mismatches, NaN matching NaN whatever its bits."""
    if tuple(got.shape) != tuple(want.shape):
        return {"what": what, "count": -1, "error": "shape %s, expected %s" % (tuple(got.shape), tuple(want.shape))}
    g = got.detach().to(torch.float32).cpu()
    w = want.detach().to(torch.float32).cpu()
    gb = f32_bits(g)
    wb = f32_bits(w)
    both_nan = torch.isnan(g) & torch.isnan(w)
    bad = ((gb != wb) & ~both_nan).nonzero()
    out = {"what": what, "count": int(bad.shape[0]), "nan": int(both_nan.sum())}
    if bad.shape[0]:
        out["first"] = [
            {"index": [int(i) for i in idx], "got": "%08x" % (int(gb[tuple(idx)]) & 0xFFFFFFFF), "want": "%08x" % (int(wb[tuple(idx)]) & 0xFFFFFFFF)}
            for idx in bad[:limit]
        ]
    return out


def check_device(device, inputs, rules):
    checks = []
    x = inputs.to(device)
    for rule in RULES:
        want = rules[rule]
        blocks, scales = mxfp4_quantize(x, rule)
        checks.append(mismatches(blocks, want["blocks"], "%s quantize blocks" % rule))
        checks.append(mismatches(scales, want["scales"], "%s quantize scales" % rule))
        codes, scales2 = mxfp4_codes(x, rule)
        checks.append(mismatches(pack_codes(codes), want["blocks"], "%s codes packed" % rule))
        checks.append(mismatches(scales2, want["scales"], "%s codes scales" % rule))

        deq = mxfp4_dequantize(want["blocks"].to(device), want["scales"].to(device))
        checks.append(float_mismatches(deq, want["dequant"], "%s dequantize" % rule))

        xg = x.clone().requires_grad_(True)
        y = mxfp4_fake_quant(xg, rule)
        checks.append({"what": "%s fake-quant dtype/shape" % rule, "count": int(y.dtype != torch.float32 or tuple(y.shape) != tuple(x.shape))})
        checks.append(float_mismatches(y, want["dequant"], "%s fake-quant forward" % rule))
        g = torch.arange(x.numel(), dtype=torch.float32, device=device).reshape(x.shape) * 0.5 - 7.0
        y.backward(g)
        checks.append(float_mismatches(xg.grad, g, "%s straight-through gradient" % rule))

        # Quantized axis first instead of last: the same blocks, transposed.
        bt, st = mxfp4_quantize(x.t().contiguous(), rule, axis=0)
        checks.append(mismatches(bt, want["blocks"], "%s quantize along axis 0" % rule))
        checks.append(mismatches(st, want["scales"], "%s scales along axis 0" % rule))
        yt = mxfp4_fake_quant(x.t().contiguous(), rule, axis=0)
        checks.append(float_mismatches(yt.t(), want["dequant"], "%s fake-quant along axis 0" % rule))

        # bf16 input: codes of x.bfloat16() equal those of its exact float32 value; output is bf16.
        xb = x.to(torch.bfloat16)
        yb = mxfp4_fake_quant(xb, rule)
        ref = mxfp4_fake_quant(xb.to(torch.float32), rule)
        finite = torch.isfinite(ref)
        checks.append({"what": "%s bf16 input" % rule, "count": int(yb.dtype != torch.bfloat16) + int((yb.to(torch.float32)[finite] != ref[finite]).sum())})
    return checks


# ------------------------------------------------------------------------------------------------
# export


def tiny_model(family, seed):
    """A random model in a HF layout: (config, bf16 state dict)."""
    g = torch.Generator().manual_seed(seed)
    H, I, E, L, V, heads, kv, hd = 64, 96, 4, 2, 256, 4, 2, 16

    def w(*shape, std=None):
        std = std if std is not None else shape[-1] ** -0.5
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    def ones(n):
        return (1 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)

    if family == "qwen3_moe":
        config = {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": V, "hidden_size": H,
            "intermediate_size": 128, "moe_intermediate_size": I, "num_hidden_layers": L, "mlp_only_layers": [],
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd, "num_experts": E,
            "num_experts_per_tok": 2, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "max_position_embeddings": 512, "tie_word_embeddings": False, "hidden_act": "silu", "decoder_sparse_step": 1,
        }
    elif family == "mixtral":
        config = {
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": V, "hidden_size": H,
            "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": heads, "num_key_value_heads": kv,
            "num_local_experts": E, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
            "max_position_embeddings": 512, "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu",
        }
    else:
        config = {
            "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": V, "hidden_size": H,
            "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": heads, "num_key_value_heads": kv,
            "head_dim": hd, "num_local_experts": E, "num_experts_per_tok": 2, "experts_per_token": 2, "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 4096, "rope_theta": 150000,
            "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 512},
            "attention_bias": True, "rms_norm_eps": 1e-5, "swiglu_limit": 7.0, "tie_word_embeddings": False, "hidden_act": "silu",
        }
    q, k = heads * (hd if family != "mixtral" else H // heads), kv * (hd if family != "mixtral" else H // heads)
    s = {"model.embed_tokens.weight": w(V, H, std=1.0), "model.norm.weight": ones(H), "lm_head.weight": w(V, H)}
    for layer in range(L):
        p = "model.layers.%d" % layer
        s[p + ".input_layernorm.weight"] = ones(H)
        s[p + ".post_attention_layernorm.weight"] = ones(H)
        s[p + ".self_attn.q_proj.weight"] = w(q, H)
        s[p + ".self_attn.k_proj.weight"] = w(k, H)
        s[p + ".self_attn.v_proj.weight"] = w(k, H)
        s[p + ".self_attn.o_proj.weight"] = w(H, q)
        if family == "qwen3_moe":
            s[p + ".self_attn.q_norm.weight"] = ones(hd)
            s[p + ".self_attn.k_norm.weight"] = ones(hd)
        if family == "gpt_oss":
            for n, d in (("q", q), ("k", k), ("v", k), ("o", H)):
                s[p + ".self_attn.%s_proj.bias" % n] = w(d, std=0.1)
            s[p + ".self_attn.sinks"] = w(heads, std=0.5)
            s[p + ".mlp.router.weight"] = w(E, H)
            s[p + ".mlp.router.bias"] = w(E, std=0.1)
            s[p + ".mlp.experts.gate_up_proj"] = w(E, H, 2 * I, std=H ** -0.5)  # HF: x @ W, interleaved columns
            s[p + ".mlp.experts.gate_up_proj_bias"] = w(E, 2 * I, std=0.1)
            s[p + ".mlp.experts.down_proj"] = w(E, I, H, std=I ** -0.5)
            s[p + ".mlp.experts.down_proj_bias"] = w(E, H, std=0.1)
        elif family == "qwen3_moe":
            s[p + ".mlp.gate.weight"] = w(E, H)
            for j in range(E):
                s[p + ".mlp.experts.%d.gate_proj.weight" % j] = w(I, H)
                s[p + ".mlp.experts.%d.up_proj.weight" % j] = w(I, H)
                s[p + ".mlp.experts.%d.down_proj.weight" % j] = w(H, I)
        else:
            s[p + ".block_sparse_moe.gate.weight"] = w(E, H)
            for j in range(E):
                s[p + ".block_sparse_moe.experts.%d.w1.weight" % j] = w(I, H)
                s[p + ".block_sparse_moe.experts.%d.w3.weight" % j] = w(I, H)
                s[p + ".block_sparse_moe.experts.%d.w2.weight" % j] = w(H, I)
    return config, s


def expected_experts(family, s, layer):
    """gate_up [E, 2I, H] in the family's row order and down [E, H, I], built independently."""
    if family == "gpt_oss":
        gu = s["model.layers.%d.mlp.experts.gate_up_proj" % layer].float().transpose(1, 2)
        dn = s["model.layers.%d.mlp.experts.down_proj" % layer].float().transpose(1, 2)
        return gu.contiguous(), dn.contiguous()
    pre, names = (("model.layers.%d.mlp.experts" % layer, ("gate_proj", "up_proj", "down_proj")) if family == "qwen3_moe"
                  else ("model.layers.%d.block_sparse_moe.experts" % layer, ("w1", "w3", "w2")))
    E = 4
    gu = torch.stack([torch.cat([s["%s.%d.%s.weight" % (pre, j, names[0])], s["%s.%d.%s.weight" % (pre, j, names[1])]]) for j in range(E)])
    dn = torch.stack([s["%s.%d.%s.weight" % (pre, j, names[2])] for j in range(E)])
    return gu.float(), dn.float()


def write_source(dirpath, config, state):
    """The unquantized model as a bf16 HF checkpoint (the input of `moeflash quantize`)."""
    os.makedirs(dirpath, exist_ok=True)
    entries = [(n, "BF16", list(t.shape), (lambda t=t: t)) for n, t in sorted(state.items())]
    write_safetensors(os.path.join(dirpath, "model.safetensors"), entries)
    with open(os.path.join(dirpath, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def module_from_state(state):
    """An nn.Module tree whose parameter names are the state dict's (float32 master weights)."""
    root = torch.nn.Module()
    for name, t in state.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, torch.nn.Parameter(t.float()))
    return root


def check_parametrized(family, config, state, root):
    """attach_fake_quant on a model: expert weights read back fake-quantized (gradient flowing to
    the float32 masters), and exporting its state dict gives the same bytes as the plain weights."""
    checks = []
    model = module_from_state(state)
    names = attach_fake_quant(model, family=family)
    n_expert = sum(1 for n in state if ".experts." in n and not n.endswith("_bias"))
    checks.append({"what": "%s attach_fake_quant on every expert weight" % family, "count": abs(len(names) - n_expert)})
    name = names[0]
    module_name, _, attr = name.rpartition(".")
    w = getattr(model.get_submodule(module_name), attr)
    axis = -2 if (family == "gpt_oss" and w.dim() == 3) else -1
    checks.append(float_mismatches(w, mxfp4_fake_quant(state[name].float(), "ocp", axis), "%s parametrized weight" % family))
    w.sum().backward()
    grad = model.get_submodule(module_name).parametrizations[attr].original.grad
    checks.append({"what": "%s gradient reaches the master weight" % family, "count": int(grad is None or not bool((grad == 1).all()))})
    out = os.path.join(root, "%s-parametrized" % family)
    export_checkpoint(model.state_dict(), config, out)
    a = read_safetensors(os.path.join(out, "model.safetensors"))
    b = read_safetensors(os.path.join(root, "%s-mxfp4" % family, "model.safetensors"))
    checks.append({"what": "%s parametrized export names" % family, "count": int(sorted(a) != sorted(b))})
    for n in sorted(b):
        if n in a and (n.endswith("_blocks") or n.endswith("_scales")):
            checks.append(mismatches(a[n], b[n], "%s parametrized export %s" % (family, n)))
    return checks


def check_export(root, families):
    checks = []
    for i, family in enumerate(families):
        config, state = tiny_model(family, 100 + i)
        out = os.path.join(root, "%s-mxfp4" % family)
        write_source(os.path.join(root, "%s-bf16" % family), config, state)
        export_checkpoint(state, config, out)
        got = read_safetensors(os.path.join(out, "model.safetensors"))
        with open(os.path.join(out, "config.json")) as f:
            cfg = json.load(f)
        checks.append({"what": "%s export quantization_config" % family, "count": int(cfg["quantization_config"]["quant_method"] != "mxfp4")})
        leftovers = [n for n in got if "block_sparse_moe" in n or n.endswith("gate_up_proj") or ".experts.0." in n]
        checks.append({"what": "%s export has no unquantized experts" % family, "count": len(leftovers), "names": leftovers[:5]})
        for layer in range(2):
            gu, dn = expected_experts(family, state, layer)
            E, I2, H = gu.shape
            ex = "model.layers.%d.mlp.experts" % layer
            for key, wt in (("gate_up_proj", gu), ("down_proj", dn)):
                b, sc = mxfp4_quantize(wt)
                for suffix, want in (("_blocks", b), ("_scales", sc)):
                    name = ex + "." + key + suffix
                    if name not in got:
                        checks.append({"what": "%s %s present" % (family, name), "count": 1})
                        continue
                    checks.append(mismatches(got[name], want, "%s %s" % (family, name)))
            router = "router" if family == "gpt_oss" else "gate"
            checks.append({"what": "%s layer %d router renamed" % (family, layer), "count": int("model.layers.%d.mlp.%s.weight" % (layer, router) not in got)})
            if family == "gpt_oss":
                checks.append(mismatches(got[ex + ".gate_up_proj_bias"].view(torch.int16), state[ex + ".gate_up_proj_bias"].view(torch.int16), "gpt_oss bias kept"))
        checks.append(mismatches(got["model.layers.0.self_attn.q_proj.weight"].view(torch.int16),
                                 state["model.layers.0.self_attn.q_proj.weight"].view(torch.int16), "%s q_proj kept bf16" % family))
        checks.extend(check_parametrized(family, config, state, root))
    return checks


def node_cross_check(root, families):
    """`moeflash quantize` on the bf16 sources must write the export's expert bytes exactly."""
    cli = os.path.join(REPO, "packages", "core", "dist", "cli.js")
    quant_dist = os.path.join(REPO, "packages", "quant", "dist", "index.js")
    node = shutil.which("node")
    if not node or not os.path.exists(cli) or not os.path.exists(quant_dist):
        return None, "skipped: needs node and the built packages (pnpm build)"
    checks = []
    for family in families:
        src = os.path.join(root, "%s-bf16" % family)
        dst = os.path.join(root, "%s-moeflash" % family)
        shutil.rmtree(dst, ignore_errors=True)
        r = subprocess.run([node, cli, "quantize", "--in", src, "--out", dst], cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0:
            checks.append({"what": "%s moeflash quantize" % family, "count": 1, "stderr": r.stderr[-2000:]})
            continue
        ours = read_safetensors(os.path.join(dst, "model.safetensors"))
        theirs = read_safetensors(os.path.join(root, "%s-mxfp4" % family, "model.safetensors"))
        names = sorted(n for n in theirs if n.endswith("_blocks") or n.endswith("_scales"))
        checks.append({"what": "%s expert tensor names" % family, "count": int(names != sorted(n for n in ours if n.endswith("_blocks") or n.endswith("_scales")))})
        for n in names:
            if n in ours:
                checks.append(mismatches(ours[n], theirs[n], "%s moeflash vs export %s" % (family, n)))
    return checks, "ran"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result", help="where to write the JSON result")
    ap.add_argument("--vectors", default=os.path.join(REPO, "packages", "quant", "test", "vectors"))
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--require-cuda", action="store_true", help="fail when CUDA is asked for but not visible")
    ap.add_argument("--export-dir", help="keep the exported models here (default: a temporary folder)")
    ap.add_argument("--no-node", action="store_true", help="skip the cross-check with `moeflash quantize`")
    args = ap.parse_args()

    t0 = time.time()
    result = {
        "schema": "moeflash.qat-bit-identity.v1",
        "ok": False,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cuda": {"available": torch.cuda.is_available()},
        "devices": {},
        "notes": [],
    }
    if torch.cuda.is_available():
        result["cuda"]["device"] = torch.cuda.get_device_name(0)
        result["cuda"]["version"] = torch.version.cuda
    ok = True
    try:
        manifest, inputs, rules = load_vectors(args.vectors)
        result["vectors"] = {"dir": args.vectors, "rows": manifest["rows"], "cols": manifest["cols"], "blocks": inputs.numel() // 32,
                             "nan_blocks": {r: int((rules[r]["scales"] == E8M0_NAN).sum()) for r in RULES}}
        for dev in [d.strip() for d in args.devices.split(",") if d.strip()]:
            if dev.startswith("cuda") and not torch.cuda.is_available():
                result["devices"][dev] = {"skipped": "CUDA not visible"}
                result["notes"].append("%s skipped: CUDA not visible" % dev)
                ok = ok and not args.require_cuda
                continue
            checks = check_device(torch.device(dev), inputs, rules)
            dev_ok = all(c["count"] == 0 for c in checks)
            result["devices"][dev] = {"ok": dev_ok, "checks": checks}
            ok = ok and dev_ok
            print("%-5s %s" % (dev, "OK" if dev_ok else "MISMATCH"))
            for c in checks:
                if c["count"] != 0:
                    print("   ", json.dumps(c))

        root = args.export_dir or tempfile.mkdtemp(prefix="moeflash-qat-")
        try:
            families = ("qwen3_moe", "mixtral", "gpt_oss")
            checks = check_export(root, families)
            exp_ok = all(c["count"] == 0 for c in checks)
            result["export"] = {"ok": exp_ok, "dir": root if args.export_dir else None, "checks": checks}
            ok = ok and exp_ok
            print("export %s" % ("OK" if exp_ok else "MISMATCH"))
            if args.no_node:
                result["node_cross_check"] = {"skipped": "--no-node"}
            else:
                node_checks, status = node_cross_check(root, families)
                if node_checks is None:
                    result["node_cross_check"] = {"skipped": status}
                    result["notes"].append("node cross-check " + status)
                    print("node cross-check " + status)
                else:
                    node_ok = all(c["count"] == 0 for c in node_checks)
                    result["node_cross_check"] = {"ok": node_ok, "checks": node_checks}
                    ok = ok and node_ok
                    print("node cross-check %s" % ("OK" if node_ok else "MISMATCH"))
                    for c in node_checks:
                        if c["count"] != 0:
                            print("   ", json.dumps(c)[:500])
        finally:
            if not args.export_dir:
                shutil.rmtree(root, ignore_errors=True)
    except Exception as e:  # the JSON result must say what broke
        ok = False
        result["error"] = "%s: %s" % (type(e).__name__, e)
        result["traceback"] = traceback.format_exc()
        traceback.print_exc()
    result["ok"] = ok
    result["seconds"] = round(time.time() - t0, 2)
    os.makedirs(os.path.dirname(os.path.abspath(args.result)), exist_ok=True)
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print("%s -> %s" % ("PASS" if ok else "FAIL", args.result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
