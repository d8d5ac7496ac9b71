#!/usr/bin/env python3
"""Stage 3: train a DFlash drafter for the stage-2 target.

    python3 tools/train/train_draft.py --work WORK_DIR --target TARGET_DIR --out OUT_DIR [--minutes 6]

What the drafter must predict is the target's own output, so its data is the target's:
  1. generation: prompts cut from the train stream, continued by the target on the GPU (half
     greedy, half sampled at the generation_config.json setting, temperature 0.8, top-p 0.95);
  2. training: every step runs the frozen target over a batch of those sequences (the features:
     the residual stream after target_layer_ids, and the target's next-token distributions), puts
     --blocks-per-seq blocks at random anchors in the generated part of each sequence, each with a
     random number of masks (1..--max-drafts, so that every block length the engine may ask for
     is seen), and trains the drafter to fill them: cross-entropy against the generated token and
     against the target's distribution at that position (--soft-weight), weighted
     exp(-(j - 1) / --gamma) toward the first masks, whose acceptance every later one depends on.
     The target's embedding (the block's input) and LM head (tied to it) stay frozen;
  3. evaluation on held-out prompts: the engine's greedy speculative loop simulated exactly
     (tokens per verify round, per-position acceptance, for block sizes 1..16) and an estimate of
     the sampling-mode acceptance.
--minutes bounds the whole stage. Writes OUT_DIR/{config.json, model.safetensors (bf16),
train_results.json, README.md} in the format packages/speculative loads (dflash_model.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DRAFT_NAME,
    MASK,
    StageError,
    Timings,
    command_line,
    folder_bytes,
    log,
    read_json,
    require,
    run_main,
    versions,
    write_json,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, type=Path, help="stage 1 output folder")
    p.add_argument("--target", required=True, type=Path, help="stage 2 model folder")
    p.add_argument("--out", required=True, type=Path, help="drafter folder to write")
    p.add_argument("--minutes", type=float, default=6.0, help="wall-clock budget of the whole stage")
    p.add_argument("--reserve-s", type=float, default=45.0, help="seconds kept for the final evaluation and saving")
    p.add_argument("--seed", type=int, default=4321)
    # drafter shape
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--heads", type=int, default=0, help="0: the target's")
    p.add_argument("--kv-heads", type=int, default=0, help="0: the target's")
    p.add_argument("--head-dim", type=int, default=0, help="0: the target's")
    p.add_argument("--target-layers", default="1,3,5", help="target layers whose outputs feed the drafter")
    p.add_argument("--max-drafts", type=int, default=16, help="most masks after an anchor (the engine's largest B)")
    p.add_argument("--size-budget-mb", type=float, default=25.0, help="target folder + drafter folder must fit in this")
    # generation
    p.add_argument("--gen-fraction", type=float, default=0.3, help="share of the budget spent generating data")
    p.add_argument("--gen-batch", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=256, help="tokens the target adds to each prompt")
    p.add_argument("--prompt-lens", default="32,64,128,256")
    p.add_argument("--greedy-frac", type=float, default=0.5)
    p.add_argument("--max-gen-seqs", type=int, default=65536)
    # training
    p.add_argument("--batch-size", type=int, default=64, help="sequences a step")
    p.add_argument("--blocks-per-seq", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--gamma", type=float, default=7.0, help="position weight exp(-(j-1)/gamma)")
    p.add_argument("--soft-weight", type=float, default=0.5, help="share of the loss against the target's distribution")
    p.add_argument("--eval-every-s", type=float, default=30.0)
    # evaluation
    p.add_argument("--eval-seqs", type=int, default=64)
    p.add_argument("--eval-prompt-len", type=int, default=128)
    p.add_argument("--eval-len", type=int, default=192)
    return p.parse_args()


# ------------------------------------------------------------------------------------------------
# Target side
# ------------------------------------------------------------------------------------------------


class Target:
    """The frozen target: features for the drafter and next-token distributions."""

    def __init__(self, model, layer_ids: list[int], cfg):
        self.model = model
        self.layer_ids = layer_ids
        self.cfg = cfg
        self.embed = model.model.embed_tokens.weight
        self.final_norm = model.model.norm

    def run(self, tokens, autocast: bool = True):
        """(features [N, T, F], logits [N, T, V]) of token rows [N, T]."""
        import torch

        from dflash_model import target_features
        from torch_utils import bf16_autocast, capture_layer_outputs

        with torch.no_grad(), capture_layer_outputs(self.model, self.layer_ids) as store:
            if autocast:
                with bf16_autocast():
                    out = self.model(input_ids=tokens, use_cache=False)
                    feats = target_features(store, self.cfg, self.final_norm)
            else:
                out = self.model(input_ids=tokens, use_cache=False)
                feats = target_features(store, self.cfg, self.final_norm)
        return feats, out.logits


class Generated:
    """Target continuations grouped by prompt length (rows of one group have one length)."""

    def __init__(self):
        self.chunks: dict[int, list] = {}
        self.groups: dict = {}
        self.rows = 0
        self.numel = 0

    def add(self, prompt_len: int, rows) -> None:
        self.chunks.setdefault(prompt_len, []).append(rows)
        self.rows += rows.shape[0]
        self.numel += rows.numel()

    def finish(self) -> None:
        import torch

        self.groups = {p: torch.cat(chunks) for p, chunks in self.chunks.items()}
        self.chunks = {}

    def count(self) -> int:
        return self.rows

    def tokens(self) -> int:
        return self.numel

    def batch(self, n: int, gen):
        """n rows of one group, the group chosen in proportion to its size."""
        import torch

        keys = sorted(self.groups)
        sizes = torch.tensor([self.groups[k].shape[0] for k in keys], dtype=torch.float)
        k = keys[int(torch.multinomial(sizes, 1, generator=gen))]
        g = self.groups[k]
        rows = torch.randint(0, g.shape[0], (n,), generator=gen)
        return k, g[rows.to(g.device)]


def generate_data(target: Target, train_stream, args, deadline: float, device) -> tuple[Generated, dict]:
    import torch

    from torch_utils import generate

    prompt_lens = [int(x) for x in args.prompt_lens.split(",")]
    max_pos = target.model.config.max_position_embeddings
    for p in prompt_lens:
        require(p + args.gen_len <= max_pos, f"prompt {p} + {args.gen_len} generated tokens exceed max_position_embeddings {max_pos}")
    tokens = torch.from_numpy(train_stream.astype("int64")).to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    data = Generated()
    t0 = time.time()
    batches = 0
    while data.count() < args.max_gen_seqs:
        if batches > 0 and time.time() + (time.time() - t0) / batches > deadline:
            break
        P = prompt_lens[batches % len(prompt_lens)]
        n = min(args.gen_batch, args.max_gen_seqs - data.count())
        start = torch.randint(0, tokens.numel() - P, (n, 1), device=device, generator=gen)
        prompt = tokens[start + torch.arange(P, device=device)]
        sample = torch.rand(n, device=device, generator=gen) >= args.greedy_frac
        cont = generate(target.model, prompt, args.gen_len, sample, 0.8, 0.95, generator=gen, autocast=True)
        data.add(P, torch.cat((prompt, cont), dim=1))
        batches += 1
        if batches == 1 or batches % 8 == 0:
            el = time.time() - t0
            log(f"  generated {data.count():,} sequences ({data.count() * args.gen_len / el / 1e3:.0f}k new tokens/s)")
    data.finish()
    el = time.time() - t0
    require(data.count() >= args.batch_size, f"only {data.count()} sequences generated in the time given; raise --gen-fraction or --minutes")
    info = {
        "sequences": data.count(),
        "generated_tokens": data.count() * args.gen_len,
        "total_tokens": data.tokens(),
        "prompt_lengths": prompt_lens,
        "continuation_length": args.gen_len,
        "greedy_fraction": args.greedy_frac,
        "sampling": "temperature 0.8, top-p 0.95 (generation_config.json)",
        "prompts_from": "random windows of the train stream",
        "seconds": round(el, 1),
        "precision": "bf16 autocast",
    }
    log(f"generated {info['sequences']:,} sequences, {info['generated_tokens']:,} new tokens in {el:.1f} s")
    return data, info


# ------------------------------------------------------------------------------------------------
# Drafter side
# ------------------------------------------------------------------------------------------------


def sample_blocks(P: int, T: int, n_seq: int, n_blocks: int, max_drafts: int, gen, device):
    """Anchors in the generated part (anchor >= P, anchor + drafts <= T - 1) and draft counts."""
    import torch

    drafts = torch.randint(1, max_drafts + 1, (n_seq, n_blocks), generator=gen)
    hi = (T - 1 - drafts)  # last allowed anchor, inclusive
    require(int(hi.min()) >= P, f"sequences of {T} tokens with prompts of {P} leave no room for {max_drafts} drafts")
    u = torch.rand(n_seq, n_blocks, generator=gen)
    anchors = P + (u * (hi - P + 1).float()).long().clamp(max=hi - P)
    return anchors.to(device), drafts.to(device)


def block_inputs(tokens, anchors, drafts, rows: int, mask_id: int, embed):
    """Block rows for the packed pass: embeddings [N, B*R, H], positions [N, B*R], attention mask."""
    import torch
    import torch.nn.functional as F

    from dflash_model import block_attention_mask

    N, B = anchors.shape
    T = tokens.shape[1]
    j = torch.arange(rows, device=tokens.device)
    pos = anchors[..., None] + j
    anchor_tok = tokens.gather(1, anchors)[..., None]
    ids = torch.where(j == 0, anchor_tok, torch.full_like(pos, mask_id))
    noise = F.embedding(ids.view(N, B * rows), embed)
    mask = block_attention_mask(anchors, drafts, rows, T)
    return noise, pos.view(N, B * rows), mask


def draft_loss(draft, target: Target, tokens, P: int, args, gen, mask_id: int):
    """One training batch: the weighted block-filling loss and per-position accuracy."""
    import torch
    import torch.nn.functional as F

    from torch_utils import bf16_autocast

    N, T = tokens.shape
    R = args.max_drafts + 1
    feats, tlogits = target.run(tokens)
    anchors, drafts = sample_blocks(P, T, N, args.blocks_per_seq, args.max_drafts, gen, tokens.device)
    noise, pos, mask = block_inputs(tokens, anchors, drafts, R, mask_id, target.embed)
    ctx_pos = torch.arange(T, device=tokens.device)[None].expand(N, T)
    with bf16_autocast():
        h = draft(noise, pos, feats, ctx_pos, mask)
    j = torch.arange(R, device=tokens.device)
    used = (j >= 1) & (j[None, None] <= drafts[..., None])  # [N, B, R]: rows that predict a token
    n_idx, b_idx, j_idx = used.nonzero(as_tuple=True)
    a = anchors[n_idx, b_idx]
    where = a + j_idx
    hsel = h.view(N, args.blocks_per_seq, R, -1)[n_idx, b_idx, j_idx]
    with bf16_autocast():
        logits = F.linear(hsel, target.embed)
    logp = torch.log_softmax(logits.float(), dim=-1)
    hard = tokens[n_idx, where]
    ce_hard = -logp.gather(1, hard[:, None]).squeeze(1)
    p_t = torch.softmax(tlogits[n_idx, where - 1].float(), dim=-1)
    ce_soft = -(p_t * logp).sum(-1)
    w = torch.exp(-(j_idx.float() - 1) / args.gamma)
    loss = (w * ((1 - args.soft_weight) * ce_hard + args.soft_weight * ce_soft)).sum() / w.sum()
    with torch.no_grad():
        agree = (logits.argmax(-1) == tlogits[n_idx, where - 1].argmax(-1)).float()
        acc1 = float(agree[j_idx == 1].mean())
    return loss, {"ce_hard": float((w * ce_hard).sum() / w.sum()), "agree_first": acc1, "agree_all": float(agree.mean())}


def simulate_greedy(draft, target_embed, feats, tokens, P: int, B: int) -> dict:
    """The engine's greedy loop over known target-greedy sequences: at anchor a the drafter proposes
    B tokens, the longest prefix equal to tokens[a+1..] is accepted, the target adds one, the next
    anchor is a + accepted + 1. Rounds that cannot draft a full B at the end are not counted."""
    import torch
    import torch.nn.functional as F

    from dflash_model import block_attention_mask

    E, T = tokens.shape
    dev = tokens.device
    R = B + 1
    a = torch.full((E,), P, dtype=torch.long, device=dev)
    j = torch.arange(R, device=dev)
    ctx_pos = torch.arange(T, device=dev)[None].expand(E, T)
    accepted_hist = torch.zeros(B + 1, dtype=torch.long)
    reached = torch.zeros(B, dtype=torch.long)
    accepted_at = torch.zeros(B, dtype=torch.long)
    rounds = 0
    with torch.no_grad():
        while True:
            active = a + B <= T - 1
            if not bool(active.any()):
                break
            a_ = torch.where(active, a, torch.full_like(a, P))
            d = torch.full((E, 1), B, dtype=torch.long, device=dev)
            pos = a_[:, None] + j
            ids = torch.where(j == 0, tokens.gather(1, a_[:, None]), torch.full_like(pos, draft.cfg.mask_token_id))
            noise = F.embedding(ids, target_embed)
            mask = block_attention_mask(a_[:, None], d, R, T)
            h = draft(noise, pos, feats, ctx_pos, mask)
            pred = F.linear(h[:, 1:], target_embed).argmax(-1)  # [E, B]
            truth = tokens.gather(1, (a_[:, None] + j[1:]).clamp(max=T - 1))
            match = (pred == truth).long().cumprod(dim=1)
            k = match.sum(dim=1)
            k_host = k.tolist()
            for e in active.nonzero().flatten().tolist():
                ke = k_host[e]
                accepted_hist[ke] += 1
                reached[: min(ke + 1, B)] += 1
                accepted_at[:ke] += 1
                rounds += 1
            a = torch.where(active, a + k + 1, torch.full_like(a, T))
    require(rounds > 0, "no full speculative round fits in the evaluation sequences")
    mean_acc = float((accepted_hist * torch.arange(B + 1)).sum()) / rounds
    return {
        "block_size": B,
        "rounds": rounds,
        "mean_accepted": round(mean_acc, 4),
        "tokens_per_round": round(mean_acc + 1, 4),
        "acceptance_by_position": [round(float(accepted_at[i]) / max(1, int(reached[i])), 4) for i in range(B)],
        "accepted_histogram": accepted_hist.tolist(),
    }


def sampling_estimate(draft, target: Target, feats, tlogits, tokens, P: int, B: int, gen) -> dict:
    """Per-position acceptance of speculative sampling (temperature 0.8, top-p 0.95) along sampled
    target sequences: alpha_j = sum_x min(p_j(x), q_j(x)) with p_j the target's distribution
    after the true prefix; tokens a round estimated as 1 + sum_k prod_{j<=k} mean alpha_j."""
    import torch
    import torch.nn.functional as F

    from torch_utils import filter_top_p

    E, T = tokens.shape
    nb = 8
    anchors, drafts = sample_blocks(P, T, E, nb, B, gen, tokens.device)
    drafts = torch.full_like(drafts, B)
    anchors = anchors.clamp(max=T - 1 - B)
    noise, pos, mask = block_inputs(tokens, anchors, drafts, B + 1, draft.cfg.mask_token_id, target.embed)
    ctx_pos = torch.arange(T, device=tokens.device)[None].expand(E, T)
    with torch.no_grad():
        h = draft(noise, pos, feats, ctx_pos, mask).view(E, nb, B + 1, -1)[:, :, 1:]
        q = filter_top_p(F.linear(h, target.embed), 0.8, 0.95)  # [E, nb, B, V]
        where = anchors[..., None] + torch.arange(1, B + 1, device=tokens.device)  # predicted positions
        p = filter_top_p(tlogits.gather(1, (where - 1).reshape(E, -1, 1).expand(-1, -1, tlogits.shape[-1])).view(E, nb, B, -1), 0.8, 0.95)
        alpha = torch.minimum(p, q).sum(-1).mean(dim=(0, 1))
    est = 1.0
    prod = 1.0
    for x in alpha.tolist():
        prod *= x
        est += prod
    return {"block_size": B, "alpha_by_position": [round(x, 4) for x in alpha.tolist()], "tokens_per_round_estimate": round(est, 4),
            "note": "estimate from per-position acceptance probabilities on sampled target text, not a simulation"}


def eval_sets(target: Target, val_stream, args, device) -> dict:
    """Held-out prompts continued by the target in fp32 (greedy, and sampled), with their features."""
    import torch

    from torch_utils import exact_fp32, generate

    P, G, E = args.eval_prompt_len, args.eval_len, args.eval_seqs
    v = torch.from_numpy(val_stream.astype("int64")).to(device)
    require(v.numel() > E * P, f"held-out stream of {v.numel()} tokens is too short for {E} prompts of {P}")
    starts = torch.linspace(0, v.numel() - P - 1, E, device=device).long()
    prompt = v[starts[:, None] + torch.arange(P, device=device)]
    gen = torch.Generator(device=device)
    gen.manual_seed(777)
    out = {}
    with exact_fp32():
        for name, sample in (("greedy", False), ("sampled", True)):
            mask = torch.full((E,), sample, dtype=torch.bool, device=device)
            cont = generate(target.model, prompt, G, mask, 0.8, 0.95, generator=gen, autocast=False)
            seq = torch.cat((prompt, cont), dim=1)
            feats, logits = target.run(seq, autocast=False)
            if name == "greedy":
                # the continuation must be the target's argmax under this same full-sequence pass
                agree = float((logits[:, P - 1:-1].argmax(-1) == seq[:, P:]).float().mean())
                log(f"  eval greedy continuations agree with full-pass argmax on {agree * 100:.2f}% of tokens")
                out["greedy_self_agreement"] = agree
            out[name] = (seq, feats, logits)
    return out


def evaluate(draft, target: Target, sets: dict, args, sizes=(8,), sampling: bool = False) -> dict:
    import torch

    from torch_utils import exact_fp32

    draft.eval()
    res = {"greedy": {}}
    seq, feats, _ = sets["greedy"]
    with exact_fp32():
        for B in sizes:
            res["greedy"][str(B)] = simulate_greedy(draft, target.embed, feats, seq, args.eval_prompt_len, B)
        if sampling:
            seq_s, feats_s, logits_s = sets["sampled"]
            gen = torch.Generator(device="cpu")
            gen.manual_seed(99)
            res["sampling_estimate"] = sampling_estimate(draft, target, feats_s, logits_s, seq_s, args.eval_prompt_len, 8, gen)
    draft.train()
    return res


def mirror_self_check(draft_cls, cfg, target: Target, sets: dict) -> float:
    """Packed blocks == one block at a time on real target features, in fp32 on this GPU."""
    import torch

    from torch_utils import exact_fp32

    d = draft_cls(cfg).to(target.embed.device)
    d.init_weights(0.02)
    seq, feats, _ = sets["greedy"]
    seq, feats = seq[:2], feats[:2]
    T = seq.shape[1]
    anchors = torch.tensor([[T // 2, T - 8, T // 3], [T - 17, T // 2 + 3, T // 4]], device=seq.device)
    drafts = torch.tensor([[7, 4, 16], [16, 1, 9]], device=seq.device)
    R = 17
    noise, pos, mask = block_inputs(seq, anchors, drafts, R, cfg.mask_token_id, target.embed)
    worst = 0.0
    with torch.no_grad(), exact_fp32():
        h = d(noise, pos, feats, torch.arange(T, device=seq.device)[None].expand(2, T), mask)
        logits = torch.nn.functional.linear(h, target.embed).view(2, 3, R, -1)
        for n in range(2):
            for b in range(3):
                a, k = int(anchors[n, b]), int(drafts[n, b])
                single = d.draft_block(target.embed, feats[n, :a], int(seq[n, a]), k)
                worst = max(worst, float((single - logits[n, b, 1:k + 1]).abs().max()))
    return worst


def save_draft(draft, cfg, out: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    from dflash_model import expected_tensor_names

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in draft.state_dict().items()}
    want = expected_tensor_names(cfg)
    require({k: list(v.shape) for k, v in state.items()} == want, "drafter tensors differ from the names/shapes packages/speculative reads")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_config_json(), indent=2, sort_keys=True) + "\n")
    return state


def reload_draft(out: Path, target_hidden: int, device):
    import torch
    from safetensors.torch import load_file

    from dflash_model import DFlashConfig, DFlashDraft, expected_tensor_names

    cfg = DFlashConfig.from_config_json(json.loads((out / "config.json").read_text()), target_hidden)
    sd = load_file(str(out / "model.safetensors"))
    require({k: list(v.shape) for k, v in sd.items()} == expected_tensor_names(cfg), "reloaded drafter tensors differ from the expected names")
    require(all(v.dtype == torch.bfloat16 for v in sd.values()), "drafter tensors are not all bf16")
    d = DFlashDraft(cfg)
    d.load_state_dict({k: v.float() for k, v in sd.items()})
    return cfg, d.to(device).eval()


def main() -> None:
    args = parse_args()
    t_start = time.time()
    end = t_start + args.minutes * 60
    timings = Timings()
    work, target_dir, out = args.work.resolve(), args.target.resolve(), args.out.resolve()
    prep = read_json(work / "data" / "prepare_results.json")
    target_results = read_json(target_dir / "train_results.json")
    mask_id = prep["tokenizer"]["special_tokens"][MASK]

    with timings.phase("setup"):
        import numpy as np
        import torch

        from dflash_model import DFlashConfig, DFlashDraft
        from torch_utils import load_causal_lm, setup_cuda

        device = setup_cuda(args.seed)
        impl = target_results["training"].get("experts_implementation", "eager")
        model = load_causal_lm(target_dir, torch.float32, experts=impl).to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        tcfg = model.config
        L, H = tcfg.num_hidden_layers, tcfg.hidden_size
        layer_ids = [int(x) for x in args.target_layers.split(",")]
        require(all(0 <= i < L for i in layer_ids), f"--target-layers {layer_ids} must be layers of the {L}-layer target")
        require(0 <= mask_id < tcfg.vocab_size, f"mask token id {mask_id} outside the target vocabulary")
        heads = args.heads or tcfg.num_attention_heads
        kv = args.kv_heads or tcfg.num_key_value_heads
        hd = args.head_dim or getattr(tcfg, "head_dim", None) or H // heads
        rope = getattr(tcfg, "rope_parameters", None) or {}
        if rope and all(isinstance(v, dict) for v in rope.values()):
            rope = next(iter(rope.values()))  # one dict per layer type
        theta = float(rope.get("rope_theta", getattr(tcfg, "rope_theta", 10000.0)))
        require(rope.get("rope_type", "default") == "default", f"target RoPE {rope} is not the default kind this drafter writes")
        cfg = DFlashConfig(hidden_size=H, num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=kv,
                           head_dim=hd, intermediate_size=args.intermediate, vocab_size=tcfg.vocab_size, mask_token_id=mask_id,
                           target_layer_ids=layer_ids, num_target_layers=L, target_hidden_size=H, block_size=args.max_drafts + 1,
                           rms_norm_eps=tcfg.rms_norm_eps, rope_theta=theta, max_position_embeddings=tcfg.max_position_embeddings)
        target = Target(model, layer_ids, cfg)
        draft = DFlashDraft(cfg).to(device)
        draft.init_weights(0.02)
        with torch.no_grad():  # its output goes through the target's LM head: start from the target's output scale
            draft.norm.weight.copy_(model.model.norm.weight.float())
        n_params = sum(p.numel() for p in draft.parameters())
        draft_bytes = 2 * n_params
        target_bytes = folder_bytes(target_dir)
        log(f"drafter: {args.layers} layers, hidden {H}, {heads}x{hd} heads / {kv} KV, MLP {args.intermediate}, "
            f"features of target layers {layer_ids}, mask id {mask_id}, blocks of up to {args.max_drafts} drafts")
        log(f"drafter parameters {n_params:,} = {draft_bytes / 1e6:.2f} MB bf16; target folder {target_bytes / 1e6:.2f} MB; "
            f"together {(draft_bytes + target_bytes) / 1e6:.2f} MB of the {args.size_budget_mb:g} MB budget")
        require(draft_bytes + target_bytes + 100_000 <= args.size_budget_mb * 1e6,
                f"target + drafter would take {(draft_bytes + target_bytes) / 1e6:.1f} MB, over --size-budget-mb {args.size_budget_mb}")
        train_stream = np.load(work / "data" / "train.npy")
        val_stream = np.load(work / "data" / "val.npy")

    with timings.phase("held-out evaluation sets"):
        sets = eval_sets(target, val_stream, args, device)
        worst = mirror_self_check(DFlashDraft, cfg, target, sets)
        log(f"mirror check: packed training blocks vs one block at a time, max |logit diff| {worst:.2e} (fp32)")
        require(worst < 1e-3, f"packed and single-block drafter passes disagree by {worst}")
        base = evaluate(draft, target, sets, args, sizes=(8,))
        log(f"untrained drafter: {base['greedy']['8']['tokens_per_round']:.3f} tokens a round at B=8")

    with timings.phase("generation"):
        remaining = end - args.reserve_s - time.time()
        require(remaining > 20, f"only {remaining:.0f} s left for generation and training; raise --minutes")
        gen_deadline = time.time() + args.gen_fraction * remaining
        data, gen_info = generate_data(target, train_stream, args, gen_deadline, device)

    with timings.phase("training"):
        from torch_utils import cosine_lr, make_adamw, param_groups

        opt, opt_kind = make_adamw(param_groups(draft, args.weight_decay), args.lr)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(args.seed + 1)
        deadline = end - args.reserve_s
        horizon = 10 ** 9
        step, t_train = 0, time.time()
        step_times = []
        best = {"score": -1.0, "step": -1, "state": None}
        history = []
        last_eval = time.time()
        while step < horizon and time.time() < deadline:
            t = time.time()
            lr = cosine_lr(step, args.lr, args.warmup_steps, horizon if horizon < 10 ** 9 else 10 ** 6, args.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            P, tokens = data.batch(args.batch_size, gen)
            loss, stats = draft_loss(draft, target, tokens, P, args, gen, mask_id)
            if not torch.isfinite(loss):
                raise StageError(f"drafter loss is {float(loss)} at step {step}; lower --lr")
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(draft.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            step_times.append(time.time() - t)
            if step == 40:
                per = sum(step_times[10:]) / len(step_times[10:])
                horizon = step + int((deadline - time.time()) / (per * 1.08))  # evaluations take a few percent
                log(f"step time {per * 1000:.0f} ms: cosine horizon {horizon} steps")
            if step % 50 == 0 or step == 1:
                log(f"step {step:5d} loss {float(loss):.4f} ce(hard) {stats['ce_hard']:.3f} "
                    f"argmax = target's: first mask {stats['agree_first'] * 100:.1f}%, all {stats['agree_all'] * 100:.1f}% "
                    f"lr {lr:.2e} gnorm {float(gnorm):.2f}")
            if time.time() - last_eval > args.eval_every_s or step >= horizon:
                ev = evaluate(draft, target, sets, args, sizes=(8,))
                score = ev["greedy"]["8"]["tokens_per_round"]
                improved = score > best["score"]
                if improved:
                    best = {"score": score, "step": step, "state": {k: v.detach().clone() for k, v in draft.state_dict().items()}}
                history.append({"step": step, "loss": round(float(loss), 4), "tokens_per_round_b8": score})
                mark = "  * best" if improved else ""
                log(f"  held-out greedy B=8: {score:.3f} tokens a round, acceptance by position "
                    f"{ev['greedy']['8']['acceptance_by_position'][:4]}{mark}")
                last_eval = time.time()
        train_s = time.time() - t_train
        ev = evaluate(draft, target, sets, args, sizes=(8,))
        if ev["greedy"]["8"]["tokens_per_round"] > best["score"]:
            best = {"score": ev["greedy"]["8"]["tokens_per_round"], "step": step, "state": None}
        if best["state"] is not None:
            draft.load_state_dict(best["state"])
        log(f"trained {step} steps in {train_s:.0f} s; best held-out B=8 {best['score']:.3f} tokens a round at step {best['step']}")

    with timings.phase("save and reload"):
        save_draft(draft, cfg, out)
        cfg2, loaded = reload_draft(out, H, device)
        require(cfg2 == cfg, "config.json does not read back to the training configuration")
        # The saved weights are bf16: the reloaded drafter must equal the trained one rounded to bf16.
        rounded = DFlashDraft(cfg).to(device)
        rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in draft.state_dict().items()})
        seq, feats, _ = sets["greedy"]
        a = int(seq.shape[1] // 2)
        with torch.no_grad():
            x = rounded.draft_block(target.embed, feats[0, :a], int(seq[0, a]), 8)
            y = loaded.draft_block(target.embed, feats[0, :a], int(seq[0, a]), 8)
        diff = float((x - y).abs().max())
        require(diff < 1e-5, f"the reloaded drafter differs from the trained one (rounded to bf16) by {diff}")
        log(f"reload: {out / 'model.safetensors'} ({(out / 'model.safetensors').stat().st_size / 1e6:.2f} MB) reproduces the trained drafter")

    with timings.phase("final evaluation"):
        final = evaluate(loaded, target, sets, args, sizes=(1, 2, 4, 8, 16), sampling=True)
        for B, r in final["greedy"].items():
            log(f"  greedy B={B:>2}: {r['tokens_per_round']:.3f} tokens a round over {r['rounds']} rounds; "
                f"acceptance by position {r['acceptance_by_position'][:8]}")
        se = final["sampling_estimate"]
        log(f"  sampling (T 0.8, top-p 0.95) B=8 estimate: {se['tokens_per_round_estimate']:.3f} tokens a round, alpha {se['alpha_by_position']}")

    results = {
        "model": DRAFT_NAME,
        "stage": "train_draft",
        "command": command_line(),
        "target": {"folder": target_dir.name, "heldout_loss": target_results["heldout"]["loss"]},
        "format": "DFlash drafter (z-lab layout): config.json (Qwen3 fields + dflash_config), model.safetensors bf16; "
                  "reads the target's embedding and tied LM head",
        "config": cfg.to_config_json(),
        "parameters": {"total": n_params, "bytes_bf16": draft_bytes},
        "folder_bytes": folder_bytes(out),
        "data": gen_info,
        "training": {
            "steps": step,
            "best_step": best["step"],
            "train_seconds": round(train_s, 1),
            "batch": f"{args.batch_size} sequences x {args.blocks_per_seq} blocks",
            "blocks": f"anchor + 1..{args.max_drafts} masks (uniform), anchors uniform over the generated part",
            "loss": f"sum_j w_j [(1 - {args.soft_weight}) CE(generated token) + {args.soft_weight} CE(target distribution)] / sum_j w_j, "
                    f"w_j = exp(-(j - 1) / {args.gamma})",
            "frozen": "target embedding / LM head (tied), the whole target",
            "optimizer": f"AdamW ({opt_kind}), peak lr {args.lr}, warm-up {args.warmup_steps}, cosine to {args.min_lr_ratio} x, "
                         f"weight decay {args.weight_decay}, clip {args.grad_clip}",
            "precision": "bf16 autocast, fp32 master weights; saved as bf16",
            "selection": "best held-out greedy tokens a round at B=8",
            "history": history,
            "minutes_budget": args.minutes,
        },
        "evaluation": {
            "prompts": f"{args.eval_seqs} held-out prompts of {args.eval_prompt_len} tokens, {args.eval_len} target tokens each (fp32)",
            "untrained_drafter_tokens_per_round_b8": base["greedy"]["8"]["tokens_per_round"],
            "greedy": final["greedy"],
            "sampling_estimate": final["sampling_estimate"],
            "mirror_check_max_logit_diff": worst,
            "greedy_self_agreement": sets.get("greedy_self_agreement"),
            "note": "greedy: the engine's speculative loop simulated on the target's greedy continuations; "
                    "tokens_per_round = accepted + 1 (the engine's meanAcceptedPerRound)",
        },
        "timings_s": timings.seconds | {"total": round(time.time() - t_start, 1)},
        "versions": versions(),
    }
    write_json(out / "train_results.json", results)
    from model_card import write_draft_card

    write_draft_card(out, results)
    summary = {
        "model": DRAFT_NAME,
        "parameters": n_params,
        "folder_mb": round(folder_bytes(out) / 1e6, 2),
        "greedy_tokens_per_round": {B: r["tokens_per_round"] for B, r in final["greedy"].items()},
        "sampling_tokens_per_round_estimate_b8": final["sampling_estimate"]["tokens_per_round_estimate"],
        "steps": step,
        "total_seconds": round(time.time() - t_start, 1),
    }
    print(json.dumps(summary, indent=2), flush=True)
    if time.time() - t_start > args.minutes * 60:
        log(f"WARNING: the stage took {time.time() - t_start:.0f} s, over its {args.minutes * 60:.0f} s budget")
    log(f"stage 3 done -> {out}")


if __name__ == "__main__":
    run_main(main)
