#!/usr/bin/env python3
"""Model cards (README.md) for the trained folders, filled from their train_results.json.

The training stages call write_target_card / write_draft_card; to rewrite both cards from the
results already on disk (after editing this file, or to change the licence line):

    python3 tools/train/model_card.py OUT_ROOT [--weights-licence "PSF-2.0"]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DRAFT_NAME, TARGET_NAME  # noqa: E402

PSF_LINK = "https://docs.python.org/3/license.html"
WEIGHTS_LICENCE = "PSF-2.0"
REPRODUCE = "bash tools/train/run_all.sh OUT_ROOT   # from the moeflash repository root, on a host with one GPU"


def _front_matter(tags: list[str], licence: str) -> str:
    # The Hub has no identifier for the PSF licence: it is "other" with a name and a link.
    if licence.lower() == WEIGHTS_LICENCE.lower():
        lic = ["license: other", f"license_name: {licence.lower()}", f"license_link: {PSF_LINK}"]
    else:
        lic = [f"license: {licence.lower()}"]
    return "\n".join([
        "---",
        *lic,
        "library_name: transformers" if "dflash" not in tags else "library_name: moeflash",
        "pipeline_tag: text-generation",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
    ])


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _timings(t: dict) -> str:
    return ", ".join(f"{k} {v:.0f} s" for k, v in t.items())


def target_card(r: dict, licence: str = WEIGHTS_LICENCE) -> str:
    c, p, tr, h, d, tok = r["config"], r["parameters"], r["training"], r["heldout"], r["data"], r["tokenizer"]
    load = r["expert_load"]["max_over_min_per_layer"]
    return _front_matter(["moeflash", "qwen3_moe", "mixture-of-experts", "code", "python", "tiny"], licence) + f"""
# {TARGET_NAME}

A tiny Mixture-of-Experts code model (transformers `Qwen3MoeForCausalLM`, `model_type: qwen3_moe`),
trained from scratch on the Python standard library so that moeflash has a real, trained MoE to
test, demonstrate and benchmark with (a random-weight model has no meaningful greedy output and
no acceptance rate for speculative decoding). It writes Python-looking code; it is not a useful
assistant, and its chat template is there only so that the chat paths have something to render.
Its DFlash drafter is `{DRAFT_NAME}`.

## Model

| | |
| --- | --- |
| layers | {c['num_hidden_layers']} |
| hidden size | {c['hidden_size']} |
| attention | {c['num_attention_heads']} query heads x {c['head_dim']}, {c['num_key_value_heads']} KV heads, q/k RMSNorm, RoPE theta {c['rope_theta']:g} |
| experts | {c['num_experts']} per layer, top-{c['num_experts_per_tok']}, moe_intermediate_size {c['moe_intermediate_size']}, norm_topk_prob true, every layer MoE |
| vocabulary | {c['vocab_size']} (byte-level BPE), embedding tied to the LM head |
| context | max_position_embeddings {c['max_position_embeddings']} (trained on {tr['seq_len']}-token windows) |
| parameters | {p['total']:,} ({p['active_per_token']:,} active a token) |
| weights | bf16 safetensors, {_mb(r['safetensors']['bytes'])}; experts {r['safetensors']['expert_layout']} |

## Data

{d['source']}: Python {d['python_version']} at `{d['stdlib_path']}`, `.py` files only, without
site-packages, test suites (`test/`, `tests/`, `idlelib/idle_test`, lib2to3's test data) and any
file that is not UTF-8. Licence of the data: {d['licence']} ({PSF_LINK}).
Split by file, never by line (a file is held out when {d['split']}): {d['files']['train']} train files
({_mb(d['bytes']['train'])}, {d['tokens']['train']:,} tokens) and {d['files']['held_out']} held-out files
({_mb(d['bytes']['held_out'])}, {d['tokens']['held_out']:,} tokens). Corpus fingerprint
`{d['fingerprint_sha256'][:16]}` (another Python patch version gives another corpus).

## Tokenizer

Byte-level BPE trained with the `tokenizers` library on the train files: {tok['pre_tokenizer']},
ByteLevel decoder, no normalizer; {tok['learned_ids']} learned ids, then the special tokens
{', '.join(f'`{k}` {v}' for k, v in tok['special_tokens'].items())}. `<|mask|>` never occurs in
text: it is the DFlash drafter's mask token. Round trip decode(encode(text)) == text:
{tok['round_trip']['held_out']} (held out), {tok['round_trip']['train']} (train).
tokenizer_config.json: ChatML chat template, eos `<|im_end|>`, pad `<|endoftext|>`;
generation_config.json: eos ids of `<|im_end|>` and `<|endoftext|>`, do_sample true, temperature 0.8, top_p 0.95.

## Training

- {tr['steps']} steps of {tr['batch_size']} x {tr['seq_len']} tokens ({tr['tokens_seen']:,} tokens, {tr['epochs']} epochs), stopped by {tr['stopped_by']}; kept the weights of step {tr['best_step']}, the best held-out loss
- {tr['optimizer']}; peak lr {tr['peak_lr']}, {tr['schedule']}; gradient clip {tr['grad_clip']}
- {tr['precision']}; router load-balancing loss: {tr['router_aux_loss']}
- the embedding rows of the {tr['absent_tokens']['absent_token_ids']} token ids that never occur in the training text (`<|im_start|>`, `<|im_end|>`, `<|mask|>`, bytes no UTF-8 text contains) are held at the median row norm after every step, so that Adam's drift does not blow them up (the drafter embeds `<|mask|>`)
- transformers experts implementation `{tr['experts_implementation']}`, torch.compile {'on' if tr['torch_compile'] else 'off'}, {tr['tokens_per_second']:,} tokens/s
- budget {tr['minutes_budget']:g} minutes; {_timings(r['timings_s'])}
- on {r['versions'].get('gpu', 'a GPU')}; torch {r['versions'].get('torch')}, transformers {r['versions'].get('transformers')}, tokenizers {r['versions'].get('tokenizers')}

Command: `{r['command']}`

## Results (held-out files)

| | |
| --- | --- |
| loss (mean cross-entropy per token, nats) | {h['loss']:.4f} |
| perplexity per token | {h['perplexity']:.2f} |
| bits per byte (approx.) | {h['bits_per_byte_approx']:.3f} |
| tokens evaluated | {h['tokens']:,} |
| expert load, busiest / idlest expert, per layer | {', '.join(f'{x:g}' for x in load)} |

Reload check: AutoModelForCausalLM.from_pretrained gives back the {r['reload_check']['tensors']} tensors
bit for bit, max |logit difference| {r['reload_check']['max_abs_logit_diff_fp32']:.1e} (fp32).

## Licence

Weights: {licence}. Training data: the Python standard library sources, under the Python Software
Foundation License (PSF-2.0, {PSF_LINK}). The training code is part of the moeflash repository
(tools/train).

## Reproduce

```
{REPRODUCE}
```
"""


def draft_card(r: dict, licence: str = WEIGHTS_LICENCE) -> str:
    c, d, tr, ev = r["config"], r["data"], r["training"], r["evaluation"]
    dc = c["dflash_config"]
    rows = "\n".join(
        f"| {B} | {g['tokens_per_round']:.3f} | {', '.join(f'{x:.2f}' for x in g['acceptance_by_position'][:8])} |"
        for B, g in ev["greedy"].items()
    )
    se = ev["sampling_estimate"]
    return _front_matter(["moeflash", "dflash", "speculative-decoding", "draft-model", "code"], licence) + f"""
# {DRAFT_NAME}

A DFlash block drafter for `{TARGET_NAME}`: given the target's hidden states of the verified
context, it fills a block [anchor, mask x B] in one forward pass with B draft tokens, which the
target then verifies in one pass (moeflash `speculative: {{ method: 'dflash', draft: <this folder> }}`).
It has no embedding and no LM head of its own: it reads the target's tied embedding matrix for both,
so it only works with that target.

## Format

z-lab's published DFlash layout, as packages/speculative loads it: config.json (Qwen3 fields,
`architectures: ["DFlashDraftModel"]`, `dflash_config`) and model.safetensors (bf16; `fc.weight`,
`hidden_norm.weight`, `layers.N.*` of a Qwen3 decoder layer, `norm.weight`).

| | |
| --- | --- |
| layers | {c['num_hidden_layers']} (bidirectional attention inside the block) |
| hidden size | {c['hidden_size']} (the target's) |
| attention | {c['num_attention_heads']} x {c['head_dim']}, {c['num_key_value_heads']} KV heads, q/k RMSNorm, RoPE theta {c['rope_theta']:g} |
| MLP | SwiGLU, intermediate {c['intermediate_size']} |
| context features | outputs of target layers {dc['target_layer_ids']} (the last layer after the target's final norm), concatenated, fc -> hidden_norm |
| mask token | {dc['mask_token_id']} (`<|mask|>`) |
| block_size | {dc['block_size']} rows = anchor + up to {dc['block_size'] - 1} drafts (trained on every length 1..{dc['block_size'] - 1}) |
| parameters | {r['parameters']['total']:,} ({_mb(r['parameters']['bytes_bf16'])} bf16) |

## Data

The target's own continuations: {d['sequences']:,} prompts cut from the train split of the target's
corpus (Python standard library, {PSF_LINK}), prompt lengths {d['prompt_lengths']}, each continued by
{d['continuation_length']} tokens by the target ({d['greedy_fraction'] * 100:.0f}% greedy, the rest sampled with {d['sampling']});
{d['generated_tokens']:,} generated tokens in {d['seconds']:.0f} s.

## Training

- {tr['steps']} steps of {tr['batch']}; {tr['blocks']}
- loss: {tr['loss']}; frozen: {tr['frozen']}
- {tr['optimizer']}; {tr['precision']}; selection: {tr['selection']} (step {tr['best_step']})
- budget {tr['minutes_budget']:g} minutes; {_timings(r['timings_s'])}

Command: `{r['command']}`

## Results (held-out prompts)

{ev['prompts']}. Greedy: the engine's speculative loop simulated on the target's greedy
continuations; tokens a round = accepted drafts + 1 (what moeflash reports as meanAcceptedPerRound).

| B (drafts a round) | tokens a round | acceptance of draft 1..8 given the earlier ones |
| --- | --- | --- |
{rows}

Untrained drafter at B=8: {ev['untrained_drafter_tokens_per_round_b8']:.3f} tokens a round.
Sampling (temperature 0.8, top-p 0.95), B={se['block_size']}: about {se['tokens_per_round_estimate']:.2f} tokens a round
({se['note']}).

## Licence

Weights: {licence}. Training data: text written by `{TARGET_NAME}` from prompts taken from the
Python standard library sources (Python Software Foundation License, PSF-2.0, {PSF_LINK}).

## Reproduce

```
{REPRODUCE}
```
"""


def write_target_card(folder: Path, results: dict, licence: str = WEIGHTS_LICENCE) -> None:
    (folder / "README.md").write_text(target_card(results, licence), encoding="utf-8")


def write_draft_card(folder: Path, results: dict, licence: str = WEIGHTS_LICENCE) -> None:
    (folder / "README.md").write_text(draft_card(results, licence), encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--weights-licence", default=WEIGHTS_LICENCE)
    a = p.parse_args()
    for name, writer in ((TARGET_NAME, write_target_card), (DRAFT_NAME, write_draft_card)):
        folder = a.root / name
        res = folder / "train_results.json"
        if not res.is_file():
            print(f"skip {folder}: no train_results.json")
            continue
        writer(folder, json.loads(res.read_text()), a.weights_licence)
        print(f"wrote {folder / 'README.md'}")


if __name__ == "__main__":
    main()
