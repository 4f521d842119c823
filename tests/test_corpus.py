"""Tests for beam_jax.corpus: the stdlib corpus listing, split, fingerprint, tokenizer and unigram baseline."""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from beam_jax import corpus as C


@pytest.fixture(scope="module")
def stdlib():
    return C.stdlib_corpus()


@pytest.fixture(scope="module")
def tok_dir(stdlib, tmp_path_factory):
    """Tokenizer trained on a handful of train files (small vocab, fast)."""
    out = tmp_path_factory.mktemp("tok") / "bpe"
    C.train_tokenizer(stdlib.paths("train")[:8], 600, out)
    return out


def fake_tree(root):
    files = {
        "a.py": "x = 1\n",
        "pkg/__init__.py": "",  # empty: skipped
        "pkg/mod.py": "def f():\n    return 2\n",
        "pkg/tests/test_mod.py": "assert True\n",
        "test/test_x.py": "pass\n",
        "site-packages/third.py": "import os\n",
        "latin1.py": b"s = '\xe9'\n",  # not UTF-8: skipped
        "notes.txt": "not python\n",
        "_sysconfigdata__linux.py": "build = {}\n",
        "config-3.11-x86_64/python-config.py": "pass\n",
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(data, bytes) else p.write_text)(data)
    return root


def test_listing_rules_on_a_fake_tree(tmp_path):
    root = fake_tree(tmp_path)
    assert C.list_stdlib_files(root) == ["a.py", "pkg/mod.py"]
    assert C.list_stdlib_files(root, include_tests=True) == ["a.py", "pkg/mod.py", "pkg/tests/test_mod.py",
                                                             "test/test_x.py"]


def test_tests_in_train_adds_test_files_to_train_only(tmp_path):
    root = fake_tree(tmp_path)
    for i in range(200):  # enough files that every split gets some
        (root / f"m{i}.py").write_text(f"v = {i}\n")
        (root / "test" / f"test_m{i}.py").write_text(f"assert {i}\n")
    plain, extended = C.stdlib_corpus(root), C.stdlib_corpus(root, tests_in_train=True)
    for split in ("validation", "test"):
        assert extended.splits[split] == plain.splits[split] and plain.splits[split]
    added = set(extended.splits["train"]) - set(plain.splits["train"])
    assert added == {"pkg/tests/test_mod.py", *(f"test/test_m{i}.py" for i in range(200)), "test/test_x.py"}
    assert set(plain.splits["train"]) <= set(extended.splits["train"])
    assert list(extended.splits["train"]) == sorted(extended.splits["train"])
    assert extended.fingerprint != plain.fingerprint and extended.describe()["name"] != plain.describe()["name"]
    with pytest.raises(ValueError, match="exclusive"):
        C.stdlib_corpus(root, include_tests=True, tests_in_train=True)
    with pytest.raises(ValueError, match="needs a 'train' split"):
        C.stdlib_corpus(root, fractions={"a": 0.5, "b": 0.5}, tests_in_train=True)


def test_named_corpus(stdlib):
    assert C.named_corpus("stdlib").splits == stdlib.splits
    with pytest.raises(ValueError, match="unknown corpus 'stdlb'.*stdlib, stdlib\\+tests"):
        C.named_corpus("stdlb")


def test_stdlib_listing_is_sorted_and_clean(stdlib):
    rels = [r for files in stdlib.splits.values() for r in files]
    assert len(rels) > 300 and C.stdlib_root() == stdlib.root
    assert sorted(rels) == sorted(set(rels))
    assert all(r.endswith(".py") for r in rels)
    assert not any(part in ("site-packages", "test", "tests") for r in rels for part in r.split("/"))
    assert "os.py" in rels and "json/decoder.py" in rels


def test_split_is_deterministic_disjoint_and_complete(stdlib, tmp_path):
    again = C.stdlib_corpus()
    assert again.splits == stdlib.splits
    sets = [set(v) for v in stdlib.splits.values()]
    assert sum(map(len, sets)) == len(set.union(*sets))  # disjoint
    assert set.union(*sets) == set(C.list_stdlib_files())  # complete
    n = sum(map(len, sets))
    assert 0.85 < len(stdlib.splits["train"]) / n < 0.95
    assert len(stdlib.splits["validation"]) > 5 and len(stdlib.splits["test"]) > 5
    for split, files in stdlib.splits.items():  # by path alone, whatever else is in the tree
        assert list(files) == sorted(files)
        assert all(C.assign_split(r) == split for r in files)


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    root = fake_tree(tmp_path)
    a = C.stdlib_corpus(root)
    assert C.stdlib_corpus(root).fingerprint == a.fingerprint and len(a.fingerprint) == 64
    (root / "pkg" / "mod.py").write_text("def f():\n    return 22\n")  # size changes
    b = C.stdlib_corpus(root)
    assert b.fingerprint != a.fingerprint
    (root / "b.py").write_text("y = 2\n")
    assert C.stdlib_corpus(root).fingerprint not in (a.fingerprint, b.fingerprint)
    assert C.stdlib_corpus(root, fractions={"train": 0.5, "test": 0.5}).fingerprint != C.stdlib_corpus(root).fingerprint
    d = C.stdlib_corpus(root).describe()
    assert d["python_version"] == C.stdlib_corpus(root).python_version and sum(d["files"].values()) == 3
    json.dumps(d)


def test_tokenizer_round_trips_stdlib_text(stdlib, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) == 600
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2]
    for p in stdlib.paths("validation")[:3] + stdlib.paths("test")[:3]:
        text = p.read_text(encoding="utf-8")
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert len(ids) < len(text.encode())  # BPE actually merges
    odd = "naïve ünïcödé — 🐍\t\r\n  trailing  "
    assert tok.decode(tok(odd)["input_ids"]) == odd


def test_tokenizer_chat_template(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<|bos|><|user|>\nhi\n<|assistant|>\nhello<|eos|>"
    assert tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True).endswith("\n<|assistant|>\n")


def test_tokenizer_is_deterministic_and_written_atomically(stdlib, tok_dir, tmp_path):
    files = stdlib.paths("train")[:8]
    out = tmp_path / "again"
    C.train_tokenizer(list(reversed(files)), 600, out)
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    (out / "stale.txt").write_text("old")
    C.train_tokenizer(files, 600, out)  # replaces the old directory as a whole
    assert not (out / "stale.txt").exists() and (out / "tokenizer_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temp dirs left


def test_ensure_tokenizer_reuses_a_matching_one(tmp_path):
    root = fake_tree(tmp_path / "src")
    (root / "big.py").write_text("def function(argument):\n    return argument\n" * 50)
    corpus = C.stdlib_corpus(root, fractions={"train": 1.0})
    out = tmp_path / "tok"
    C.ensure_tokenizer(corpus, 300, out)
    before = (out / "tokenizer.json").stat().st_mtime_ns
    C.ensure_tokenizer(corpus, 300, out)
    assert (out / "tokenizer.json").stat().st_mtime_ns == before
    C.ensure_tokenizer(corpus, 301, out)
    assert json.loads((out / "beam_tokenizer.json").read_text())["vocab_size"] == 301


def test_unigram_loss_matches_hand_computation():
    counts = C.token_counts([np.array([0, 0, 1]), np.array([[0, 2]])], vocab_size=4)
    assert counts.tolist() == [3, 1, 1, 0]
    # add-one: p = (c + 1) / (5 + 4) = [4, 2, 2, 1] / 9
    want = -(math.log(4 / 9) + math.log(1 / 9)) / 2
    assert C.unigram_loss(counts, np.array([0, 3])) == pytest.approx(want)
    assert C.unigram_loss(np.zeros(8), np.arange(8)) == pytest.approx(math.log(8))
    with pytest.raises(ValueError):
        C.unigram_loss(counts, np.array([4]))
