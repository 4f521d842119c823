"""Tests for beam_jax.data: readers and their errors, chat loss masks, packing, the batch iterator, splits."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from beam_jax.corpus import train_tokenizer
from beam_jax.data import (BatchIterator, DataError, Example, assign_split, encode_chat, encode_examples,
                           epoch_permutation, list_data_files, load_packed, pack, read_all, read_examples,
                           split_examples)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, of course."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small byte-level BPE with the project's chat template, trained on a few strings."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    src = d / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.txt").write_text("def f(x):\n    return x + 1\n" * (i + 3) + "It is 4. Of course 6.\n")
    train_tokenizer(sorted(src.iterdir()), 300, d / "tok", min_frequency=1)
    return AutoTokenizer.from_pretrained(str(d / "tok"))


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def jsonl(path, records):
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------- readers


def test_text_file_and_directory_order(tmp_path):
    write(tmp_path / "b.txt", "second")
    write(tmp_path / "a" / "z.md", "first")
    write(tmp_path / "c.bin", b"\x00ignored")
    write(tmp_path / ".hidden.txt", "ignored")
    files = list_data_files(tmp_path)
    assert [(f.relative_to(tmp_path).as_posix(), fmt) for f, fmt in files] == [("a/z.md", "text"), ("b.txt", "text")]
    assert [e.text for e in read_examples(tmp_path)] == ["first", "second"]


def test_format_override_reads_every_file(tmp_path):
    write(tmp_path / "x.data", "abc")
    assert [e.text for e in read_examples(tmp_path, format="text")] == ["abc"]
    with pytest.raises(DataError, match="x.data.*unknown extension"):
        list(read_examples(tmp_path / "x.data"))


def test_jsonl_text_and_chat(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"text": "hello"}, {"messages": CHAT, "text": "ignored"}])
    write(f, f.read_text() + "\n  \n")  # trailing blank lines are skipped
    a, b = read_examples(f)
    assert a.text == "hello" and not a.is_chat and a.where == "line 1"
    assert b.is_chat and list(b.messages) == CHAT and b.where == "line 2"
    bom = write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + json.dumps({"text": "x"}).encode() + b"\n")
    assert next(read_examples(bom)).text == "x"


def test_parquet_and_hf_disk(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p0", "p1"]}), tmp_path / "t.parquet")
    assert [e.text for e in read_examples(tmp_path / "t.parquet")] == ["p0", "p1"]
    pq.write_table(pa.table({"messages": [CHAT]}), tmp_path / "c.parquet")
    assert list(next(read_examples(tmp_path / "c.parquet")).messages) == CHAT

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["h0", "h1"]}),
                          "test": datasets.Dataset.from_dict({"text": ["t0"]})}).save_to_disk(tmp_path / "hf")
    assert [e.text for e in read_examples(tmp_path / "hf")] == ["h0", "h1"]
    assert [e.text for e in read_examples(tmp_path / "hf", split="test")] == ["t0"]
    with pytest.raises(DataError, match="hf.*no split 'dev'"):
        list(read_examples(tmp_path / "hf", split="dev"))


# ---------------------------------------------------------------- bad input names file and line/field


def raises(path, match, **kw):
    with pytest.raises(DataError, match=match) as e:
        list(read_examples(path, **kw))
    assert str(path) in str(e.value)
    return e.value


def test_empty_files(tmp_path):
    raises(write(tmp_path / "e.txt", ""), "empty file")
    raises(write(tmp_path / "w.txt", " \n\t"), "empty file")
    raises(write(tmp_path / "e.jsonl", "\n\n"), "empty file")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    raises(tmp_path / "e.parquet", "empty file")


def test_not_utf8_reports_byte_offset(tmp_path):
    err = raises(write(tmp_path / "bad.txt", b"abc\xffdef"), "byte 3: not valid UTF-8")
    assert err.where == "byte 3"
    good = json.dumps({"text": "ok"}).encode() + b"\n"
    offset = len(good) + len(b'{"text": "')  # file offset of the bad byte
    raises(write(tmp_path / "bad.jsonl", good + b'{"text": "\xe9"}\n'), rf"line 2: not valid UTF-8 at byte {offset} ")


def test_jsonl_not_json_names_line(tmp_path):
    f = write(tmp_path / "bad.jsonl", '{"text": "a"}\n\n{"text": oops}\n')
    assert raises(f, r"line 3: not valid JSON").where == "line 3"
    raises(write(tmp_path / "arr.jsonl", "[1, 2]\n"), r"line 1: expected a JSON object")


def test_missing_fields_name_line_and_field(tmp_path):
    f = jsonl(tmp_path / "m.jsonl", [{"text": "a"}, {"txt": "b"}])
    err = raises(f, r"line 2: field 'text': missing")
    assert (err.where, err.field) == ("line 2", "text")
    raises(jsonl(tmp_path / "n.jsonl", [{"text": 3}]), r"line 1: field 'text': must be a string")
    bad_chat = [{"role": "user", "content": "hi"}, {"role": "assistant"}]
    raises(jsonl(tmp_path / "c.jsonl", [{"messages": bad_chat}]), r"line 1: field 'messages\[1\].content': missing")
    raises(jsonl(tmp_path / "d.jsonl", [{"messages": []}]), r"line 1: field 'messages': must be a non-empty list")
    raises(jsonl(tmp_path / "body.jsonl", [{"body": "x"}]), "line 1: field 'text'", text_field="text")
    assert next(read_examples(tmp_path / "body.jsonl", text_field="body")).text == "x"


def test_parquet_missing_column_and_null_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "m.parquet")
    raises(tmp_path / "m.parquet", r"field 'text': missing column")
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "n.parquet")
    raises(tmp_path / "n.parquet", r"row 1: field 'text': missing")
    raises(write(tmp_path / "junk.parquet", b"not parquet"), "not a readable parquet file")


def test_chat_without_template_names_file_and_line(tmp_path, tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    f = jsonl(tmp_path / "chat.jsonl", [{"text": "x"}, {"messages": CHAT}])
    with pytest.raises(DataError, match=r"chat.jsonl: line 2: field 'messages': .*no chat template"):
        encode_examples(read_examples(f), plain)


def test_prefix_unstable_template_is_refused(tokenizer):
    import copy

    odd = copy.deepcopy(tokenizer)
    odd.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match=r"messages\[2\].*not prefix-stable"):
        encode_chat(CHAT, odd, "f.jsonl", "line 1")


# ---------------------------------------------------------------- encoding


def test_text_encoding_adds_bos_eos(tokenizer):
    [(ids, train)] = encode_examples([Example(text="return x")], tokenizer)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[1:-1]) == "return x"
    assert ids.dtype == np.int32 and train.tolist() == [False] + [True] * (len(ids) - 1)


def test_chat_loss_mask_is_exactly_assistant_tokens(tokenizer):
    ids, train = encode_chat(CHAT, tokenizer)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    # Independent expectation from the ids: after "<|assistant|>" and its "\n", everything through eos.
    asst, eos = tokenizer.convert_tokens_to_ids("<|assistant|>"), tokenizer.eos_token_id
    expected = np.zeros(len(ids), bool)
    for j in np.flatnonzero(ids == asst):
        assert tokenizer.decode([ids[j + 1]]) == "\n"
        k = j + 2
        while ids[k] != eos:
            expected[k] = True
            k += 1
        expected[k] = True
    assert train.tolist() == expected.tolist()
    assert tokenizer.decode(ids[train]) == "It is 4.<|eos|>6, of course.<|eos|>"


def test_chat_mask_with_plain_text_markers_keeps_straddling_tokens(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = ("{% for m in messages %}{{ m['role'] }}:{{ ' ' }}{{ m['content'] }}{{ '\\n' }}{% endfor %}"
                           "{% if add_generation_prompt %}assistant:{{ ' ' }}{% endif %}")
    ids, train = encode_chat(CHAT, plain)
    trained = plain.decode(ids[train])
    assert "It is 4.\n" in trained and "6, of course.\n" in trained  # " It" merges the header's space
    assert "2+2" not in trained and "3+3" not in trained and "brief" not in trained


# ---------------------------------------------------------------- packing


def docs_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        out.append((rng.integers(10, 100, n).astype(np.int32), rng.random(n) < 0.7))
    return out


def test_concat_packing_round_trips_in_order():
    docs = docs_of([5, 1, 17, 3, 9, 30, 2])
    p = pack(docs, seq_len=8, mode="concat", pad_id=0)
    assert p.tokens.shape[1] == 9 and p.tokens.dtype == np.int32
    stream = [p.tokens[0, p.segment_ids[0] > 0]] + [p.tokens[r, 1:][p.segment_ids[r, 1:] > 0] for r in range(1, len(p))]
    np.testing.assert_array_equal(np.concatenate(stream), np.concatenate([d for d, _ in docs]))
    # every token except document starts is a loss target exactly once
    expected = sum(int(t[1:].sum()) for _, t in docs)
    assert p.num_loss_tokens() == expected
    b = p.batch(np.arange(len(p)))
    assert b["loss_mask"].dtype == np.float32 and b["loss_mask"].sum() == expected
    np.testing.assert_array_equal(b["targets"][:, :-1], b["input_ids"][:, 1:])


def test_fit_packing_keeps_documents_whole_and_truncates_long_ones():
    docs = docs_of([4, 5, 3, 12, 2])
    p = pack(docs, seq_len=8, mode="fit", pad_id=0)
    got = [p.tokens[r, p.segment_ids[r] == s] for r in range(len(p)) for s in range(1, p.segment_ids[r].max() + 1)]
    want = [d[:9] for d, _ in docs]
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert p.truncated_docs == 1
    for r in range(len(p)):  # positions restart per document
        for s in range(1, p.segment_ids[r].max() + 1):
            assert p.positions[r, p.segment_ids[r] == s].tolist() == list(range((p.segment_ids[r] == s).sum()))


def test_loss_mask_zero_on_pad_and_across_documents():
    docs = [(np.array([1, 2, 3], np.int32), np.ones(3, bool)), (np.array([4, 5], np.int32), np.ones(2, bool))]
    b = pack(docs, seq_len=7, mode="fit", pad_id=0).batch(np.array([0]))
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0]]
    assert b["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0, 0]]
    assert b["positions"].tolist() == [[0, 1, 2, 0, 1, 0, 0]]
    # targets 2,3 (doc 1), not 4 (crosses into doc 2), 5 (doc 2), nothing on padding
    assert b["loss_mask"].tolist() == [[1, 1, 0, 1, 0, 0, 0]]
    pad_row = pack(docs, seq_len=7).batch(np.array([-1]))
    assert pad_row["loss_mask"].sum() == 0 and pad_row["segment_ids"].sum() == 0


# ---------------------------------------------------------------- iterator


@pytest.fixture
def packed():
    return pack(docs_of([7] * 40), seq_len=4, mode="fit")  # 40 rows


def test_resume_gives_identical_batches(packed):
    full = BatchIterator(packed, 3, seed=5)
    reference = [next(full) for _ in range(40)]  # crosses several epochs (13 steps each)
    it = BatchIterator(packed, 3, seed=5)
    for _ in range(17):
        next(it)
    state = json.loads(json.dumps(it.state()))
    resumed = BatchIterator(packed, 3, seed=5)
    resumed.restore(state)
    for want in reference[17:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_order_depends_on_seed_and_epoch_only():
    a = epoch_permutation(100, 1, 0)
    assert sorted(a.tolist()) == list(range(100))
    np.testing.assert_array_equal(a, epoch_permutation(100, 1, 0))
    assert not np.array_equal(a, epoch_permutation(100, 1, 1))
    assert not np.array_equal(a, epoch_permutation(100, 2, 0))


def test_process_shards_are_disjoint_and_cover(packed):
    P, B = 4, 2  # global batch 8, 40 rows -> 5 steps, every row once per epoch
    shards = [BatchIterator(packed, B, seed=3, process_index=p, process_count=P) for p in range(P)]
    single = BatchIterator(packed, B * P, seed=3)
    seen = []
    for step in range(single.steps_per_epoch):
        parts = [s.batch_rows(0, step) for s in shards]
        np.testing.assert_array_equal(np.concatenate(parts), single.batch_rows(0, step))
        seen += [r for part in parts for r in part]
    assert sorted(seen) == list(range(len(packed)))
    # a state saved with 4 processes restores into a 1-process iterator of the same global batch
    for s in shards:
        next(s)
    single.restore(shards[0].state())
    assert single.step == 1


def test_drop_remainder_false_covers_every_row_once(packed):
    it = BatchIterator(packed, 6, shuffle=False, num_epochs=1, drop_remainder=False)
    rows = [r for step in range(it.steps_per_epoch) for r in it.batch_rows(0, step)]
    assert [r for r in rows if r >= 0] == list(range(40)) and rows.count(-1) == 2
    assert len(list(it)) == 7


def test_restore_refuses_other_data(packed):
    it = BatchIterator(packed, 4, seed=0)
    with pytest.raises(ValueError, match="seed"):
        it.restore({**it.state(), "seed": 1})
    with pytest.raises(ValueError, match="global_batch_size"):
        BatchIterator(packed, 2).restore(it.state())


# ---------------------------------------------------------------- splits and the whole pipeline


def test_split_is_deterministic_disjoint_and_order_free():
    exs = [Example(text=f"doc {i}") for i in range(400)]
    a = split_examples(exs)
    b = split_examples(list(reversed(exs)))
    assert {k: sorted(e.text for e in v) for k, v in a.items()} == {k: sorted(e.text for e in v) for k, v in b.items()}
    names = [set(e.text for e in v) for v in a.values()]
    assert sum(map(len, names)) == 400 and len(set.union(*names)) == 400
    assert 320 < len(a["train"]) < 390 and len(a["validation"]) > 0 and len(a["test"]) > 0
    assert assign_split("x", {"a": 0.0, "b": 1.0}) == "b"
    with pytest.raises(ValueError, match="sum to 1"):
        assign_split("x", {"a": 0.5})


def test_load_packed_from_mixed_directory(tmp_path, tokenizer):
    write(tmp_path / "a.txt", "def f(x):\n    return x\n")
    jsonl(tmp_path / "b.jsonl", [{"messages": CHAT}, {"text": "It is 4."}])
    exs = read_all(tmp_path)
    assert [e.is_chat for e in exs] == [False, True, False]
    p = load_packed(tmp_path, tokenizer, seq_len=64, mode="fit")
    assert p.truncated_docs == 0
    enc = encode_examples(exs, tokenizer)
    assert p.num_loss_tokens() == sum(int(t[1:].sum()) for _, t in enc)
    assert (p.tokens[p.segment_ids == 0] == tokenizer.pad_token_id).all()
