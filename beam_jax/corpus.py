"""The default corpus (the running interpreter's standard library sources), its tokenizer and a baseline.

Corpus: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, as relative POSIX paths in sorted
order, excluding

- ``site-packages`` / ``dist-packages`` (installed third-party code, not the standard library),
- test directories (any path component ``test``, ``tests`` or ``idle_test``) unless ``include_tests=True``:
  they are about 60% of the bytes, hold deliberately odd inputs (encoding tests, huge literals) and make the
  corpus less like ordinary code,
- platform build files (``config-*/``, ``_sysconfigdata_*.py``), which differ between machines,
- files that are empty (whitespace only) or not valid UTF-8.

Each file is one document. Files are split train / validation / test (90 / 5 / 5) by a stable hash of the
relative path (``beam_jax.data.splits``), so the split does not depend on the machine or on which other
files exist.

``"stdlib+tests"`` (``stdlib_corpus(tests_in_train=True)``, the pretraining corpus of the shipped base model)
adds every test-directory file to the TRAIN split only: validation and test are file for file those of
``"stdlib"``, so a model pretrained on it is evaluated on text it never saw. On CPython 3.11.7 that adds 1,027
files, 19.4 MB, to the 11.1 MB of train (the standard library and its tests are under the PSF licence).

``Corpus.fingerprint`` is a sha256 over the Python version, the split fractions and every included file's
relative path and size: record it with a model to say what it was trained on.

Tokenizer: ``train_tokenizer`` trains a byte-level BPE (``tokenizers``; no normaliser, so decoding
inverts encoding exactly) and saves a ``transformers`` fast tokenizer that ``AutoTokenizer.from_pretrained``
loads offline, with special tokens ``<|pad|>`` (0), ``<|bos|>`` (1), ``<|eos|>`` (2), role markers
``<|system|> <|user|> <|assistant|>`` and ``CHAT_TEMPLATE``. Plain ``tokenizer(text)`` adds no special
tokens; the data pipeline adds bos/eos itself.

Baseline: ``unigram_loss`` is the cross-entropy of an add-one-smoothed unigram model, the loss a model
would reach by learning token frequencies only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from beam_jax.data.errors import DataError
from beam_jax.data.readers import Example, read_text_file
from beam_jax.data.splits import DEFAULT_FRACTIONS, assign_split

__all__ = [
    "SPECIAL_TOKENS", "CHAT_TEMPLATE", "Corpus", "stdlib_root", "list_stdlib_files", "corpus_fingerprint",
    "stdlib_corpus", "CORPORA", "named_corpus", "train_tokenizer", "ensure_tokenizer", "token_counts", "unigram_loss",
]

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS) + ROLE_TOKENS

# Turns are "<|role|>\n" + content, joined by "\n"; an assistant turn ends with eos. The generation prompt
# is "<|assistant|>\n", so an assistant turn's trained span (see data/encode.py) is its content plus eos.
# Newlines are written as {{ '\n' }}: transformers renders with trim_blocks, which drops a newline that
# follows a block tag.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "<|{{ message['role'] }}|>{{ '\\n' }}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}<|assistant|>{{ '\\n' }}{% endif %}"
)

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}
_TOKENIZER_META = "beam_tokenizer.json"


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _wanted(rel: str, include_tests: bool) -> bool:
    parts = rel.split("/")
    dirs, name = parts[:-1], parts[-1]
    if any(d in _EXCLUDED_DIRS or d.startswith("config-") or d.startswith(".") for d in dirs):
        return False
    if not include_tests and any(d in _TEST_DIRS for d in dirs):
        return False
    return name.endswith(".py") and not name.startswith("_sysconfigdata")


def _usable(path: Path) -> bool:
    try:
        read_text_file(path)
    except DataError:
        return False
    return True


def list_stdlib_files(root: str | os.PathLike | None = None, include_tests: bool = False) -> list[str]:
    """Sorted relative POSIX paths of the corpus files under ``root`` (default: ``stdlib_root()``)."""
    root = Path(root) if root is not None else stdlib_root()
    rels = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if _wanted(f"{d}/x.py", include_tests))  # prune excluded trees
        for name in files:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if _wanted(rel, include_tests) and _usable(root / rel):
                rels.append(rel)
    return sorted(rels)


def corpus_fingerprint(root: str | os.PathLike, rel_paths: Sequence[str], fractions: Mapping[str, float],
                       python_version: str) -> str:
    """sha256 hex over the Python version, split fractions and each ``relpath<TAB>size`` line."""
    h = hashlib.sha256()
    h.update(f"python {python_version}\n".encode())
    h.update(("fractions " + json.dumps(dict(fractions), sort_keys=True) + "\n").encode())
    for rel in sorted(rel_paths):
        h.update(f"{rel}\t{(Path(root) / rel).stat().st_size}\n".encode("utf-8"))
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A file corpus split into named parts. ``splits`` maps split name -> sorted relative paths."""

    root: Path
    splits: Mapping[str, tuple[str, ...]]
    fingerprint: str
    python_version: str
    name: str = "python-stdlib"

    def paths(self, split: str) -> list[Path]:
        """Absolute paths of a split's files, sorted by relative path."""
        return [self.root / rel for rel in self.splits[split]]

    def examples(self, split: str) -> list[Example]:
        """One text Example per file of the split."""
        return [Example(text=read_text_file(p), path=str(p)) for p in self.paths(split)]

    def describe(self) -> dict:
        """Small JSON-able record of what the corpus is (store it with a trained model)."""
        return {"name": self.name, "python_version": self.python_version, "fingerprint": self.fingerprint,
                "files": {k: len(v) for k, v in self.splits.items()},
                "bytes": {k: sum(p.stat().st_size for p in self.paths(k)) for k in self.splits}}


def stdlib_corpus(root: str | os.PathLike | None = None, include_tests: bool = False,
                  fractions: Mapping[str, float] = DEFAULT_FRACTIONS, tests_in_train: bool = False) -> Corpus:
    """The standard-library corpus (see module docstring); ``root`` overrides the directory (tests).

    include_tests: test-directory files join the corpus and are split by hash like the others.
    tests_in_train: they join the "train" split only; every other split is the one without them.
    """
    if include_tests and tests_in_train:
        raise ValueError("stdlib_corpus: include_tests and tests_in_train are exclusive")
    if tests_in_train and "train" not in fractions:
        raise ValueError(f"stdlib_corpus(tests_in_train=True) needs a 'train' split; fractions {dict(fractions)}")
    root = Path(root) if root is not None else stdlib_root()
    listed = list_stdlib_files(root, include_tests or tests_in_train)  # one walk (it reads every file)
    rels = [r for r in listed if include_tests or _wanted(r, include_tests=False)]
    splits: dict[str, list[str]] = {name: [] for name in fractions}
    for rel in rels:
        splits[assign_split(rel, fractions)].append(rel)
    name = "python-stdlib"
    if tests_in_train:
        extra = [r for r in listed if not _wanted(r, include_tests=False)]
        splits["train"] = sorted(splits["train"] + extra)
        rels, name = rels + extra, "python-stdlib+tests-in-train"
    version = ".".join(map(str, sys.version_info[:3]))
    fp_fractions = {**fractions, "tests_in_train": True} if tests_in_train else fractions
    return Corpus(root, {k: tuple(v) for k, v in splits.items()},
                  corpus_fingerprint(root, rels, fp_fractions, version), version, name)


CORPORA = ("stdlib", "stdlib+tests")  # the names config.data.train accepts for the shipped corpora


def named_corpus(name: str) -> Corpus:
    """config.data.train's corpus names: "stdlib" (the default corpus) or "stdlib+tests" (the same validation and
    test splits; train adds the standard library's tests: the pretraining corpus)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; the shipped corpora are {', '.join(CORPORA)}")
    return stdlib_corpus(tests_in_train=name == "stdlib+tests")


def _atomic_replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` directory to ``out_dir``, replacing an old one only after the new one exists."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.rmdir(old)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def train_tokenizer(files: Sequence[str | os.PathLike], vocab_size: int, out_dir: str | os.PathLike,
                    min_frequency: int = 2, metadata: Mapping | None = None):
    """Train a byte-level BPE on ``files`` (each read whole, strict UTF-8) and save it to ``out_dir``.

    Deterministic for the same files (their order does not matter). The directory is written elsewhere
    and renamed into place. ``metadata`` (JSON-able) is stored beside it as ``beam_tokenizer.json``.
    Returns the ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes)")
    texts = [read_text_file(f) for f in sorted(map(str, files))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS), chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
    try:
        fast.save_pretrained(tmp)
        if metadata is not None:
            (tmp / _TOKENIZER_META).write_text(json.dumps(dict(metadata), indent=1, sort_keys=True) + "\n")
        _atomic_replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return fast


def ensure_tokenizer(corpus: Corpus, vocab_size: int, out_dir: str | os.PathLike, split: str = "train"):
    """Load the tokenizer in ``out_dir`` if it was trained on this corpus split and vocab, else train it."""
    from transformers import AutoTokenizer

    meta = {"corpus_fingerprint": corpus.fingerprint, "split": split, "vocab_size": vocab_size}
    meta_file = Path(out_dir) / _TOKENIZER_META
    if meta_file.is_file() and json.loads(meta_file.read_text()) == meta:
        return AutoTokenizer.from_pretrained(str(out_dir))
    train_tokenizer(corpus.paths(split), vocab_size, out_dir, metadata=meta)
    return AutoTokenizer.from_pretrained(str(out_dir))


def token_counts(token_arrays: Iterable[np.ndarray], vocab_size: int) -> np.ndarray:
    """Occurrences of each token id over the arrays: [vocab_size] int64."""
    counts = np.zeros(vocab_size, np.int64)
    for a in token_arrays:
        counts += np.bincount(np.asarray(a, np.int64).ravel(), minlength=vocab_size)[:vocab_size]
    return counts


def unigram_loss(train_token_counts: np.ndarray, eval_tokens: np.ndarray) -> float:
    """Mean cross-entropy (nats/token) of ``eval_tokens`` under an add-one-smoothed unigram model.

    Args:
        train_token_counts: [V] counts from the training data (``token_counts``); V is the vocabulary.
        eval_tokens: int array of evaluated target ids, e.g. ``batch["targets"][batch["loss_mask"] > 0]``.
    """
    counts = np.asarray(train_token_counts, np.float64)
    eval_tokens = np.asarray(eval_tokens, np.int64).ravel()
    if eval_tokens.size == 0:
        raise ValueError("no evaluation tokens")
    if eval_tokens.min() < 0 or eval_tokens.max() >= counts.size:
        raise ValueError(f"evaluation token ids must lie in [0, {counts.size})")
    logp = np.log(counts + 1.0) - np.log(counts.sum() + counts.size)
    return float(-logp[eval_tokens].mean())
