"""PyTorch / transformers helpers shared by train_target.py and train_draft.py.

Written against transformers 5.x (fused MoE experts, `experts_implementation`, `dtype=`), with
fallbacks where 4.x spelled things differently, so that an API difference shows up as a clear
message instead of a silent change of behaviour.
"""

from __future__ import annotations

import json
import math
import struct
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from common import log, require


def setup_cuda(seed: int) -> torch.device:
    require(torch.cuda.is_available(), "no CUDA device visible to PyTorch; these stages need the GPU host")
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    # TF32 for the fp32 parts of training (optimizer math, fp32 matmuls outside autocast).
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device("cuda", 0)
    props = torch.cuda.get_device_properties(dev)
    log(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
    return dev


def bf16_autocast():
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


@contextmanager
def exact_fp32():
    """Plain fp32 matmuls (no TF32) for comparisons that should agree to the last bits."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def experts_impl(model) -> str:
    return str(getattr(model.config, "_experts_implementation", None) or "unknown")


def set_experts_impl(model, name: str) -> str:
    """Selects transformers' MoE expert kernel path; returns what the model reports afterwards."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(name)
    else:
        # transformers without the setter reads the private attribute at every forward.
        model.config._experts_implementation = name
    got = experts_impl(model)
    require(got == name, f"asked for experts implementation {name!r}, the model reports {got!r}")
    return got


def load_causal_lm(folder: Path, dtype: torch.dtype, experts: str | None = None):
    """AutoModelForCausalLM.from_pretrained with the keyword spellings of transformers 5 and 4."""
    from transformers import AutoModelForCausalLM

    variants = []
    for dtype_key in ("dtype", "torch_dtype"):
        kw = {"attn_implementation": "sdpa", dtype_key: dtype}
        if experts is not None:
            variants.append(dict(kw, experts_implementation=experts))
        variants.append(kw)
    errors = []
    model = None
    for kw in variants:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), **kw)
            break
        except TypeError as exc:  # a keyword this transformers does not know
            errors.append(f"{sorted(kw)}: {exc}")
    require(model is not None, f"cannot load {folder} with AutoModelForCausalLM: " + " | ".join(errors))
    if experts is not None and experts_impl(model) != experts:
        set_experts_impl(model, experts)
    bad = [n for n, p in model.named_parameters() if p.dtype != dtype]
    require(not bad, f"{folder}: parameters not in {dtype}: {bad[:3]}")
    return model


def router_logits(out, layers: int) -> list[torch.Tensor]:
    """The per-layer router outputs recorded by output_router_logits=True, each [tokens, experts]."""
    rl = getattr(out, "router_logits", None)
    require(
        rl is not None and len(rl) == layers,
        f"the model returned {0 if rl is None else len(rl)} router outputs for {layers} MoE layers; "
        "this transformers version does not honour output_router_logits=True",
    )
    return list(rl)


def router_outputs_are_probabilities(rl: torch.Tensor) -> bool:
    """Some transformers 5 releases record the softmax of the router instead of its logits."""
    x = rl.detach().float()
    return bool(x.min() >= 0) and bool((x.sum(-1) - 1).abs().max() < 1e-3)


def load_balancing_loss(rls: list[torch.Tensor], num_experts: int, top_k: int, are_probs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch-Transformer balance loss, per layer then averaged; returns (loss, dispatch counts [L, E]).

    Per layer: E * sum_e (tokens dispatched to e / tokens) * mean router probability of e, the
    quantity transformers' load_balancing_loss_func computes (k at perfect balance), taken per
    layer so that one layer's imbalance cannot hide behind another's.
    """
    losses, counts = [], []
    for rl in rls:
        rl = rl.reshape(-1, num_experts).float()
        probs = rl if are_probs else torch.softmax(rl, dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        count = torch.zeros(num_experts, device=rl.device, dtype=torch.float32)
        count.scatter_add_(0, chosen.reshape(-1), torch.ones(chosen.numel(), device=rl.device))
        frac = count / rl.shape[0]
        losses.append(num_experts * (frac * probs.mean(dim=0)).sum())
        counts.append(count)
    return torch.stack(losses).mean(), torch.stack(counts)


@contextmanager
def capture_layer_outputs(model, layer_ids: list[int]):
    """Records the residual stream after the given decoder layers (what moeflash's backends return
    for `hiddenLayers`) on every forward inside the block; yields the dict layer -> tensor."""
    store: dict[int, torch.Tensor] = {}
    handles = []
    layers = model.model.layers

    def hook_for(i: int):
        def hook(_module, _inputs, output):
            store[i] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    for i in sorted(set(layer_ids)):
        require(0 <= i < len(layers), f"layer {i} is not a layer of the target (0..{len(layers) - 1})")
        handles.append(layers[i].register_forward_hook(hook_for(i)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def filter_top_p(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Probabilities after temperature and nucleus filtering (the generation_config.json transform)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = (sorted_p.cumsum(dim=-1) - sorted_p) < top_p
    sorted_p = sorted_p * keep
    out = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return out / out.sum(dim=-1, keepdim=True)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, new_tokens: int, sample: torch.Tensor, temperature: float, top_p: float,
             generator: torch.Generator | None = None, autocast: bool = True) -> torch.Tensor:
    """Continues every row of prompt [N, P] by new_tokens tokens with the KV cache.

    Rows where sample[i] is true draw from the temperature / top-p distribution, the others take
    the argmax. No row stops early: end-of-text is just another token here, so every row has the
    same length and no padding or attention mask is needed.
    """
    require(prompt.dim() == 2 and new_tokens >= 1, "generate: prompt must be [N, P] and new_tokens >= 1")
    def ctx():
        return bf16_autocast() if autocast else nullcontext()

    with ctx():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    past = out.past_key_values
    require(past is not None, "the model returned no KV cache with use_cache=True")
    logits = out.logits[:, -1, :]
    tokens = []
    for step in range(new_tokens):
        greedy = logits.argmax(dim=-1)
        if bool(sample.any()):
            probs = filter_top_p(logits, temperature, top_p)
            drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            nxt = torch.where(sample, drawn, greedy)
        else:
            nxt = greedy
        tokens.append(nxt)
        if step + 1 == new_tokens:
            break
        with ctx():
            out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        logits = out.logits[:, -1, :]
    return torch.stack(tokens, dim=1)


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (names, dtypes, shapes), read without any library."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        require(0 < n < 100_000_000, f"{path}: implausible safetensors header length {n}")
        header = json.loads(f.read(n))
    return header


def describe_safetensors(folder: Path) -> dict:
    """Every tensor of the folder's safetensors files: name, dtype, shape; and the expert layout."""
    files = sorted(folder.glob("*.safetensors"))
    require(files, f"no .safetensors file in {folder}")
    tensors = []
    for f in files:
        for name, info in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            tensors.append({"name": name, "dtype": info["dtype"], "shape": info["shape"], "file": f.name})
    tensors.sort(key=lambda t: _natural_key(t["name"]))
    names = {t["name"] for t in tensors}
    if any(n.endswith("mlp.experts.gate_up_proj") for n in names):
        layout = "fused (transformers 5): mlp.experts.gate_up_proj [E, 2I, H] (gate rows first), mlp.experts.down_proj [E, H, I]"
    elif any(".mlp.experts.0.gate_proj.weight" in n for n in names):
        layout = "per-expert: mlp.experts.{j}.{gate,up,down}_proj.weight"
    else:
        layout = "no MoE expert tensors"
    return {"files": [f.name for f in files], "bytes": sum(f.stat().st_size for f in files), "expert_layout": layout, "tensors": tensors}


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.replace("-", ".").split(".")]


def print_tensors(desc: dict) -> None:
    log(f"safetensors: {', '.join(desc['files'])}, {desc['bytes'] / 1e6:.2f} MB; experts: {desc['expert_layout']}")
    for t in desc["tensors"]:
        print(f"    {t['name']:<52} {t['dtype']:<5} {t['shape']}", flush=True)


def cosine_lr(step: int, peak: float, warmup: int, horizon: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, horizon - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def param_groups(model, weight_decay: float, no_decay_names: tuple[str, ...] = ()) -> list[dict]:
    """Decay matrices; leave norms, biases and the (tied) embedding alone."""
    decay, keep = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() >= 2 and not any(s in name for s in no_decay_names):
            decay.append(p)
        else:
            keep.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def make_adamw(groups: list[dict], lr: float, betas=(0.9, 0.95)) -> tuple[torch.optim.Optimizer, str]:
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=True), "fused"
    except (TypeError, RuntimeError) as exc:
        log(f"fused AdamW unavailable ({exc}); using the foreach implementation")
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, foreach=True), "foreach"


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
