"""What a training run reads: its data splits (packed) and the fingerprint of the base model it trains on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import corpus as corpus_lib
from .data import pack_examples, read_all, split_examples


def load_splits(config, tokenizer) -> dict:
    """-> {"train", "eval", "calib"}: Packed rows of `config.data.seq_len`.

    data.train == "stdlib": the standard-library corpus (train / test / validation splits). Otherwise the
    user's files; held-out data from data.eval if given, else a stable 90/5/5 hash split of data.train
    (eval = test part, calibration of baselines = validation part).
    """
    d = config.data
    fmt = d.format or None
    S = d.seq_len
    if d.train == "stdlib":
        corpus = corpus_lib.stdlib_corpus()
        parts = {"train": corpus.examples("train"), "eval": corpus.examples("test"),
                 "calib": corpus.examples("validation")}
    else:
        if not d.train:
            raise ValueError("config field 'data.train' is empty: give a file or directory of training data, "
                             "or 'stdlib'")
        examples = read_all(d.train, fmt)
        split = split_examples(examples)
        if d.eval:
            held = read_all(d.eval, fmt)
            parts = {"train": examples, "eval": held, "calib": held}
        else:
            parts = {"train": split["train"], "eval": split["test"] or split["validation"],
                     "calib": split["validation"] or split["test"]}
    out = {k: pack_examples(v, tokenizer, S, mode=d.pack) for k, v in parts.items()}
    for k, p in out.items():
        if len(p) == 0:
            raise ValueError(f"data split '{k}' is empty after packing into sequences of {S} tokens "
                             f"(data.train={d.train!r}, data.eval={d.eval!r})")
    return out


def model_fingerprint(path) -> dict:
    """A cheap identity of a Hugging Face model directory: its path, config.json's hash, and the names and
    sizes of its weight files (not their contents, which may be tens of GB)."""
    path = Path(path).absolute()
    cfg = (path / "config.json").read_bytes()
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.suffix in (".safetensors",)
             or f.name.endswith(".index.json")}
    digest = hashlib.sha256(cfg + json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"path": str(path), "config_sha256": hashlib.sha256(cfg).hexdigest(), "files": files,
            "fingerprint": digest}


def fingerprint_diff(recorded: dict, current: dict) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    diffs = []
    if recorded.get("config_sha256") != current.get("config_sha256"):
        diffs.append("config.json differs")
    a, b = recorded.get("files", {}), current.get("files", {})
    for name in sorted(set(a) | set(b)):
        if name not in b:
            diffs.append(f"{name} is missing")
        elif name not in a:
            diffs.append(f"{name} is new")
        elif a[name] != b[name]:
            diffs.append(f"{name} has size {b[name]}, recorded {a[name]}")
    return diffs
