#!/usr/bin/env python3
"""Stage 1: the code corpus, the tokenizer and the token streams.

    python3 tools/train/prepare_data.py --work WORK_DIR [--stdlib PATH]

Corpus: the .py sources of the Python standard library installed on this host
(sysconfig.get_paths()['stdlib'], PSF licence), without site-packages, test suites
(test/, tests/, idlelib/idle_test, lib2to3's test data lives under tests/) and without any file
that is not valid UTF-8. Files are split into train and held-out BY FILE, by a hash of the path
relative to the stdlib root (about 2% held out), so no held-out line was ever seen in training.

Tokenizer: byte-level BPE trained with the `tokenizers` library on the train files only:
ByteLevel pre-tokenizer (add_prefix_space=False, GPT-2 regex), ByteLevel decoder, no normalizer,
no post-processor. 4092 learned ids (256 bytes + merges), then the added special tokens
<|endoftext|> 4092, <|im_start|> 4093, <|im_end|> 4094, <|mask|> 4095 (the DFlash drafter's mask
token; it never occurs in text). Vocabulary: 4096.

Writes WORK_DIR/tokenizer/{tokenizer.json, tokenizer_config.json, generation_config.json} and
WORK_DIR/data/{train.npy, val.npy} (uint16 ids; documents joined by <|endoftext|>) and
WORK_DIR/data/prepare_results.json (corpus statistics, file lists, round-trip result).
Fails if any held-out file does not round-trip exactly (decode(encode(text)) == text).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CHAT_TEMPLATE_PATH,
    ENDOFTEXT,
    IM_END,
    IM_START,
    MASK,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    Timings,
    command_line,
    held_out,
    log,
    require,
    run_main,
    versions,
    write_json,
)

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, type=Path, help="scratch folder shared by the stages")
    p.add_argument("--stdlib", type=Path, default=None, help="override sysconfig's stdlib path")
    p.add_argument("--seed", type=int, default=1234, help="document order of the train stream")
    p.add_argument("--min-frequency", type=int, default=2, help="BPE: least count of a merged pair")
    return p.parse_args()


def collect_corpus(root: Path) -> tuple[list[tuple[str, str]], dict]:
    """(relpath, text) of every usable .py file under root, sorted by path, and what was skipped."""
    require(root.is_dir(), f"stdlib folder {root} does not exist; pass --stdlib PATH")
    files: list[tuple[str, str]] = []
    skipped = {"non_utf8": [], "empty": [], "contains_special_token": [], "excluded_dirs": []}
    paths = []
    # os.walk so that excluded trees (a large site-packages) are pruned, not listed.
    for dirpath, dirnames, filenames in os.walk(root):
        for d in sorted(dirnames):
            if d in EXCLUDED_DIRS and d != "__pycache__":
                skipped["excluded_dirs"].append((Path(dirpath) / d).relative_to(root).as_posix())
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        paths.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    for path in sorted(paths):
        rel = path.relative_to(root)
        if not path.is_file():
            continue
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped["non_utf8"].append(rel.as_posix())
            continue
        if not text.strip():
            skipped["empty"].append(rel.as_posix())
            continue
        # A literal special-token string in a file would be encoded as that special id: the
        # model would learn a control token from ordinary text. Keep such files out.
        if any(s in text for s in SPECIAL_TOKENS):
            skipped["contains_special_token"].append(rel.as_posix())
            continue
        files.append((rel.as_posix(), text))
    return files, skipped


def train_tokenizer(texts: list[str], min_frequency: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = None
    learned = VOCAB_SIZE - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=learned,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    require(
        tok.get_vocab_size(with_added_tokens=False) == learned,
        f"BPE training produced {tok.get_vocab_size(with_added_tokens=False)} ids, expected {learned}; "
        "the corpus is too small for this vocabulary (lower --min-frequency)",
    )
    tok.add_special_tokens(
        [AddedToken(s, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True) for s in SPECIAL_TOKENS]
    )
    ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
    want = {s: learned + i for i, s in enumerate(SPECIAL_TOKENS)}
    require(ids == want, f"special token ids {ids} differ from the intended {want}")
    require(tok.get_vocab_size() == VOCAB_SIZE, f"vocabulary {tok.get_vocab_size()} != {VOCAB_SIZE}")
    return tok, ids


def tokenizer_config(ids: dict[str, int]) -> dict:
    require(CHAT_TEMPLATE_PATH.is_file(), f"chat template {CHAT_TEMPLATE_PATH} is missing (it belongs to the repository)")
    template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[s]): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for s in SPECIAL_TOKENS
        },
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "mask_token": MASK,
        "model_max_length": 2048,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def generation_config(ids: dict[str, int]) -> dict:
    return {
        "bos_token_id": None,
        "do_sample": True,
        "eos_token_id": [ids[IM_END], ids[ENDOFTEXT]],
        "pad_token_id": ids[ENDOFTEXT],
        "temperature": 0.8,
        "top_p": 0.95,
    }


def round_trip(tok, files: list[tuple[str, str]], label: str) -> tuple[int, list[str], list[list[int]]]:
    """Encodes every file, checks decode(encode(text)) == text; returns (ok count, failures, ids)."""
    encs = tok.encode_batch([t for _, t in files], add_special_tokens=False)
    failures = []
    all_ids = []
    for (rel, text), enc in zip(files, encs):
        ids = list(enc.ids)
        back = tok.decode(ids, skip_special_tokens=False)
        if back != text:
            at = next((i for i, (a, b) in enumerate(zip(back, text)) if a != b), min(len(back), len(text)))
            failures.append(f"{rel}: first difference at char {at}: {text[at:at + 20]!r} -> {back[at:at + 20]!r}")
        all_ids.append(ids)
    log(f"round-trip ({label}): {len(files) - len(failures)}/{len(files)} files decode(encode(text)) == text exactly")
    for f in failures[:10]:
        log(f"  MISMATCH {f}")
    return len(files) - len(failures), failures, all_ids


def check_with_transformers(tok_dir: Path, files: list[tuple[str, str]], ids_list: list[list[int]], ids: dict[str, int]) -> dict:
    """The folder must load as a transformers tokenizer that agrees with the tokenizers library."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    report = {"class": type(hf).__name__}
    require(len(hf) == VOCAB_SIZE, f"transformers sees {len(hf)} tokens, expected {VOCAB_SIZE}")
    require(hf.eos_token_id == ids[IM_END], f"transformers eos_token_id {hf.eos_token_id} != {ids[IM_END]}")
    require(hf.pad_token_id == ids[ENDOFTEXT], f"transformers pad_token_id {hf.pad_token_id} != {ids[ENDOFTEXT]}")
    for (rel, text), want in zip(files, ids_list):
        got = hf.encode(text, add_special_tokens=False)
        require(list(got) == want, f"transformers encodes {rel} differently from the tokenizers library")
        back = hf.decode(want, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        require(back == text, f"transformers does not decode {rel} back to its text")
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    expected = "<|im_start|>system\nYou write Python.<|im_end|>\n<|im_start|>user\ndef add(a, b):<|im_end|>\n<|im_start|>assistant\n"
    try:
        rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except ImportError as exc:  # jinja2 is an optional dependency of transformers
        rendered = None
        report["chat_template"] = f"not rendered here ({exc})"
        log(f"WARNING: chat template not checked: {exc}")
    if rendered is not None:
        require(rendered == expected, f"chat template renders {rendered!r}, expected {expected!r}")
        report["chat_template"] = "renders ChatML as expected"
    chat_ids = hf.encode(expected, add_special_tokens=False)
    require(chat_ids[0] == ids[IM_START] and ids[IM_END] in chat_ids, "the chat markers are not encoded as their special ids")
    report["files_checked"] = len(files)
    log(f"transformers {type(hf).__name__}: same ids and text on {len(files)} held-out files; chat template: {report['chat_template']}")
    return report


def main() -> None:
    args = parse_args()
    timings = Timings()
    work: Path = args.work.resolve()
    tok_dir, data_dir = work / "tokenizer", work / "data"
    tok_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)

    with timings.phase("corpus"):
        root = (args.stdlib or Path(sysconfig.get_paths()["stdlib"])).resolve()
        log(f"stdlib: {root} (Python {sys.version.split()[0]})")
        files, skipped = collect_corpus(root)
        train = [f for f in files if not held_out(f[0])]
        val = [f for f in files if held_out(f[0])]
        require(len(train) > 100 and len(val) > 3, f"corpus too small: {len(train)} train / {len(val)} held-out files under {root}")
        train_bytes = sum(len(t.encode("utf-8")) for _, t in train)
        val_bytes = sum(len(t.encode("utf-8")) for _, t in val)
        log(f"files: {len(train)} train ({train_bytes / 1e6:.2f} MB), {len(val)} held-out ({val_bytes / 1e6:.2f} MB)")
        log(f"skipped: {len(skipped['excluded_dirs'])} excluded folders, {len(skipped['non_utf8'])} files not UTF-8, "
            f"{len(skipped['empty'])} empty, {len(skipped['contains_special_token'])} containing a special-token string")
        fingerprint = hashlib.sha256()
        for rel, text in files:
            fingerprint.update(rel.encode() + b"\0" + hashlib.sha256(text.encode("utf-8")).digest())

    with timings.phase("tokenizer training"):
        tok, ids = train_tokenizer([t for _, t in train], args.min_frequency)
        tok.save(str(tok_dir / "tokenizer.json"), pretty=True)
        write_json(tok_dir / "tokenizer_config.json", tokenizer_config(ids))
        write_json(tok_dir / "generation_config.json", generation_config(ids))
        log(f"tokenizer: {tok.get_vocab_size()} ids; specials {ids}")

    with timings.phase("round-trip and encoding"):
        val_ok, val_fail, val_ids = round_trip(tok, val, "held-out")
        require(not val_fail, f"{len(val_fail)} held-out files do not round-trip: {val_fail[:3]}")
        train_ok, train_fail, train_ids = round_trip(tok, train, "train")
        require(not train_fail, f"{len(train_fail)} train files do not round-trip: {train_fail[:3]}")

    with timings.phase("transformers check"):
        hf_report = check_with_transformers(tok_dir, val, val_ids, ids)

    with timings.phase("token streams"):
        import numpy as np

        eot = ids[ENDOFTEXT]
        order = list(range(len(train)))
        random.Random(args.seed).shuffle(order)

        def stream(doc_ids: list[list[int]], order: list[int]) -> np.ndarray:
            parts = []
            for i in order:
                parts.append(np.asarray(doc_ids[i], dtype=np.uint16))
                parts.append(np.asarray([eot], dtype=np.uint16))
            return np.concatenate(parts)

        train_stream = stream(train_ids, order)
        val_stream = stream(val_ids, list(range(len(val))))
        np.save(data_dir / "train.npy", train_stream)
        np.save(data_dir / "val.npy", val_stream)
        train_tokens = int(train_stream.size)
        val_tokens = int(val_stream.size)
        log(f"train stream: {train_tokens:,} tokens ({train_bytes / max(1, train_tokens - len(train)):.2f} bytes/token); "
            f"held-out stream: {val_tokens:,} tokens")

    results = {
        "stage": "prepare_data",
        "command": command_line(),
        "corpus": {
            "source": "Python standard library .py sources installed on the training host",
            "licence": "PSF-2.0 (Python Software Foundation License)",
            "stdlib_path": str(root),
            "python_version": sys.version.split()[0],
            "excluded_folders": sorted(EXCLUDED_DIRS),
            "split": "the sha256 of its path relative to the stdlib root, mod 1000, is below 20 (about 2%)",
            "files": {"train": len(train), "held_out": len(val)},
            "bytes": {"train": train_bytes, "held_out": val_bytes},
            "tokens": {"train": train_tokens, "held_out": val_tokens},
            "bytes_per_token": {"train": train_bytes / max(1, train_tokens - len(train)), "held_out": val_bytes / max(1, val_tokens - len(val))},
            "fingerprint_sha256": fingerprint.hexdigest(),
            "skipped": skipped,
            "held_out_files": [rel for rel, _ in val],
        },
        "tokenizer": {
            "type": "byte-level BPE (tokenizers library)",
            "vocab_size": VOCAB_SIZE,
            "learned_ids": VOCAB_SIZE - len(SPECIAL_TOKENS),
            "special_tokens": ids,
            "pre_tokenizer": "ByteLevel(add_prefix_space=False, use_regex=True)",
            "decoder": "ByteLevel",
            "normalizer": None,
            "min_frequency": args.min_frequency,
            "trained_on": "train files only",
            "round_trip": {
                "held_out": f"{val_ok}/{len(val)} files exact",
                "train": f"{train_ok}/{len(train)} files exact",
            },
            "transformers_check": hf_report,
        },
        "timings_s": timings.seconds,
        "versions": versions(),
    }
    write_json(data_dir / "prepare_results.json", results)
    log(f"held-out round-trip: {val_ok}/{len(val)} files exact (decode(encode(text)) == text)")
    log(f"stage 1 done in {timings.total():.1f} s -> {work}")


if __name__ == "__main__":
    run_main(main)
