"""What a training run reads: its data splits (packed) and the fingerprint of the base model it trains on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import corpus as corpus_lib
from .data import pack_examples, read_all, split_examples


def split_examples_of(data) -> dict:
    """`data`: the config.data section -> {"train", "validation", "test"}: lists of Examples (one per document).

    data.train == "stdlib" (or "stdlib+tests", `corpus.named_corpus`): the standard-library corpus's train /
    validation / test splits (by file).
    Otherwise the user's files: with data.eval, test = data.eval and validation = a stable 5% hash split of
    data.train (`beam_jax.data.splits`), which is not trained on; without it, a stable 90/5/5 hash split of
    data.train. Validation is what every choice is made on (the sweep's selection, the baselines'
    calibration); test is only reported.
    """
    d = data
    fmt = d.format or None
    if d.train in corpus_lib.CORPORA:
        corpus = corpus_lib.named_corpus(d.train)
        return {k: corpus.examples(k) for k in ("train", "validation", "test")}
    if not d.train:
        raise ValueError("config field 'data.train' is empty: give a file or directory of training data, "
                         "or 'stdlib'")
    examples = read_all(d.train, fmt)
    if d.eval:
        split = split_examples(examples, {"train": 0.95, "validation": 0.05})
        if not split["validation"] or not split["train"]:
            raise ValueError(f"data.train={d.train!r} has {len(examples)} examples: too few to hold out a 5% "
                             "validation split (selection and calibration must not use data.eval, the test split)")
        return {"train": split["train"], "validation": split["validation"], "test": read_all(d.eval, fmt)}
    split = split_examples(examples)
    return {"train": split["train"], "validation": split["validation"] or split["test"],
            "test": split["test"] or split["validation"]}


def load_splits(data, tokenizer, examples: dict | None = None) -> dict:
    """`data`: the config.data section -> {"train", "validation", "test", "eval", "calib"}: Packed rows of
    `data.seq_len`
    (`split_examples_of`; "eval" is the test split, "calib", for the baselines' calibration, the validation
    split). `examples`: that function's result, if already read.
    """
    S = data.seq_len
    parts = examples if examples is not None else split_examples_of(data)
    out = {k: pack_examples(parts[k], tokenizer, S, mode=data.pack) for k in ("train", "validation", "test")}
    for k, p in out.items():
        if len(p) == 0:
            raise ValueError(f"data split '{k}' is empty after packing into sequences of {S} tokens "
                             f"(data.train={data.train!r}, data.eval={data.eval!r})")
    out["eval"], out["calib"] = out["test"], out["validation"]
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
