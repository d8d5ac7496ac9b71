"""Helpers shared by the training stages in tools/train (no torch import here).

The stages run unattended on a GPU host without network, so every helper either works or stops
the run with a message that says what went wrong and what to do about it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# The GPU host has no network: never let transformers or huggingface_hub try to reach it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

REPO_ROOT = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE_PATH = REPO_ROOT / "tools" / "demo-tokenizer" / "chat_template.jinja"

# Learned ids first, then the added tokens in this order (Qwen keeps its specials after the
# learned vocabulary). <|mask|> is the DFlash drafter's mask token: it never occurs in training
# text, so its embedding row means nothing but "unknown token here".
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MASK = "<|mask|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, MASK]
VOCAB_SIZE = 4096

TARGET_NAME = "moeflash-tiny-coder"
DRAFT_NAME = "moeflash-tiny-coder-dflash"

# Held-out split: files whose path hash falls below this many per mille (about 2%).
HELD_OUT_PER_MILLE = 20

_T0 = time.time()


class StageError(RuntimeError):
    pass


def log(msg: str = "") -> None:
    print(f"[{time.time() - _T0:7.1f}s] {msg}", flush=True)


def require(cond: object, msg: str) -> None:
    if not cond:
        raise StageError(msg)


def run_main(main) -> None:
    """Runs a stage's main(); any failure prints one clear line and exits non-zero."""
    try:
        main()
    except StageError as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\nFAILED: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


class Timings:
    """Wall-clock seconds of named phases, printed as they end and kept for the results JSON."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start = time.time()

    @contextmanager
    def phase(self, name: str):
        t = time.time()
        log(f"--- {name} ...")
        try:
            yield
        finally:
            dt = time.time() - t
            self.seconds[name] = round(dt, 2)
            log(f"--- {name}: {dt:.1f} s")

    def total(self) -> float:
        return time.time() - self.start


def held_out(relpath: str) -> bool:
    """Deterministic split by file: the same file is held out on every host and every run."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < HELD_OUT_PER_MILLE


def read_json(path: Path) -> dict:
    require(path.is_file(), f"{path} does not exist; run the earlier stage first (tools/train/run_all.sh runs all)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "safetensors", "numpy"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "unknown")
        except Exception:  # noqa: BLE001 - only recorded, never required here
            out[name] = "unavailable"
    try:
        import torch

        if torch.cuda.is_available():
            out["cuda"] = torch.version.cuda
            out["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return out


def command_line() -> str:
    """The stage's command, with paths inside the repository written relative to its root."""
    def show(arg: str) -> str:
        p = Path(arg)
        if p.is_absolute():
            try:
                arg = p.resolve().relative_to(REPO_ROOT).as_posix()
            except ValueError:
                pass
        return arg if " " not in arg else repr(arg)

    return " ".join(["python3"] + [show(a) for a in sys.argv])


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"
