"""Readers for local training data: plain text, JSONL, parquet and ``datasets.save_to_disk`` directories.

Every reader yields :class:`Example` records, each either a plain ``text`` document or a chat ``messages``
list of ``{"role": str, "content": str}`` dicts, with the file and line/row it came from. Bad input raises
:class:`~beam_jax.data.errors.DataError` naming the file, the line (or row, or byte offset) and the field.

Formats (``format=`` overrides the detection):

============  ==================================================  ==========================================
format        picked for                                          one example per
============  ==================================================  ==========================================
``text``      ``.txt .text .md .py``                              file (the whole file, strict UTF-8)
``jsonl``     ``.jsonl .ndjson``                                  non-blank line (a JSON object)
``parquet``   ``.parquet``                                        row
``hf_disk``   a directory holding ``dataset_info.json``,          row of ``datasets.load_from_disk(path)``
              ``state.json`` or ``dataset_dict.json``             (``split=`` picks from a DatasetDict)
============  ==================================================  ==========================================

Any other directory is walked recursively in sorted order of relative path (hidden entries skipped); each
file with a known extension is read by its own format, or every file by ``format`` when one is given.

A record (JSONL line, parquet/dataset row) becomes a chat example when it has a non-null ``messages`` field,
otherwise a text example from ``text`` (field names configurable); having neither is an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator

from beam_jax.data.errors import DataError
from beam_jax.extras import require

__all__ = ["Example", "FORMATS", "EXTENSIONS", "detect_format", "list_data_files", "read_text_file", "read_examples"]

FORMATS = ("text", "jsonl", "parquet", "hf_disk")
EXTENSIONS = {
    ".txt": "text", ".text": "text", ".md": "text", ".py": "text",
    ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet",
}
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclasses.dataclass(frozen=True)
class Example:
    """One training document.

    Exactly one of ``text`` and ``messages`` is set. ``messages`` is a tuple of ``{"role", "content"}``
    dicts (both str). ``path``/``where`` locate it (``where`` like ``"line 3"``, ``"row 0"`` or ``None``).
    """

    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    path: str = ""
    where: str | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _HF_MARKERS)


def detect_format(path: str | os.PathLike) -> str:
    """Format of a single file or of a ``save_to_disk`` directory, from its extension / marker files."""
    path = Path(path)
    if _is_hf_dir(path):
        return "hf_disk"
    if path.is_dir():
        raise DataError(path, "is a plain directory: its files are read one by one (see list_data_files)")
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(path, f"unknown extension {path.suffix!r}; known: {sorted(EXTENSIONS)}, or pass format=")
    return fmt


def list_data_files(path: str | os.PathLike, format: str | None = None) -> list[tuple[Path, str]]:
    """``[(file, format), ...]`` that ``path`` stands for, in sorted order of relative path.

    A file or a ``save_to_disk`` directory stands for itself. A plain directory stands for its non-hidden
    files (recursively) with a known extension, or all of them when ``format`` is given.
    """
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not path.exists():
        raise DataError(path, "no such file or directory")
    if path.is_file() or _is_hf_dir(path) or format == "hf_disk":
        return [(path, format or detect_format(path))]
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            f = Path(root) / name
            fmt = format or EXTENSIONS.get(f.suffix.lower())
            if fmt is not None:
                found.append((f, fmt))
    found.sort(key=lambda pf: pf[0].relative_to(path).as_posix())
    if not found:
        raise DataError(path, f"directory holds no data files (known extensions: {sorted(EXTENSIONS)})")
    return found


def read_text_file(path: str | os.PathLike) -> str:
    """The whole file as str. Raises DataError for an empty (or whitespace-only) file or invalid UTF-8."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"not valid UTF-8 ({e.reason})", where=f"byte {e.start}") from None
    if not text.strip():
        raise DataError(path, "empty file")
    return text


def _check_messages(value: Any, path, where, field: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(path, "must be a non-empty list of {role, content} objects", where, field)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(path, "must be an object with 'role' and 'content'", where, f"{field}[{i}]")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                problem = "missing" if m.get(key) is None else f"must be a string, got {type(m[key]).__name__}"
                raise DataError(path, problem, where, f"{field}[{i}].{key}")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _record_to_example(record: dict, path, where: str, text_field: str, messages_field: str) -> Example:
    """A JSON object / table row -> Example (chat if ``messages_field`` is present and non-null)."""
    if record.get(messages_field) is not None:
        msgs = _check_messages(record[messages_field], path, where, messages_field)
        return Example(messages=msgs, path=str(path), where=where)
    text = record.get(text_field)
    if text is None:
        raise DataError(path, f"missing (nor is there a {messages_field!r} field)", where, text_field)
    if not isinstance(text, str):
        raise DataError(path, f"must be a string, got {type(text).__name__}", where, text_field)
    return Example(text=text, path=str(path), where=where)


def _read_jsonl(path: Path, text_field: str, messages_field: str) -> Iterator[Example]:
    n_records = 0
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, f"not valid UTF-8 at byte {offset + e.start} ({e.reason})", where) from None
            offset += len(raw)
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"not valid JSON: {e.msg} (column {e.colno})", where) from None
            if not isinstance(record, dict):
                raise DataError(path, f"expected a JSON object, got {type(record).__name__}", where)
            n_records += 1
            yield _record_to_example(record, path, where, text_field, messages_field)
    if n_records == 0:
        raise DataError(path, "empty file (no JSON lines)")


def _read_rows(path, rows: Iterator[dict], columns, text_field, messages_field) -> Iterator[Example]:
    if text_field not in columns and messages_field not in columns:
        raise DataError(path, f"missing column (nor is there a {messages_field!r} column); columns: {sorted(columns)}",
                        field=text_field)
    n = -1
    for n, row in enumerate(rows):
        yield _record_to_example(row, path, f"row {n}", text_field, messages_field)
    if n < 0:
        raise DataError(path, "empty file (no rows)")


def _read_parquet(path: Path, text_field: str, messages_field: str) -> Iterator[Example]:
    pa = require("pyarrow", "data", f"reading the parquet file {path}")
    pq = require("pyarrow.parquet", "data", f"reading the parquet file {path}")

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(path, f"not a readable parquet file ({e})") from None
    columns = set(pf.schema_arrow.names)
    wanted = [c for c in (text_field, messages_field) if c in columns]
    rows = (row for batch in pf.iter_batches(batch_size=1024, columns=wanted) for row in batch.to_pylist())
    yield from _read_rows(path, rows, columns, text_field, messages_field)


def _read_hf_disk(path: Path, text_field: str, messages_field: str, split: str) -> Iterator[Example]:
    datasets = require("datasets", "data", f"reading the datasets.save_to_disk directory {path}")

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(path, f"not a datasets.save_to_disk directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(path, f"has no split {split!r}; splits: {sorted(ds)}")
        ds = ds[split]
    yield from _read_rows(path, iter(ds), set(ds.column_names), text_field, messages_field)


def read_examples(
    path: str | os.PathLike,
    format: str | None = None,
    *,
    text_field: str = "text",
    messages_field: str = "messages",
    split: str = "train",
) -> Iterator[Example]:
    """Examples from a file or directory, in file order (see the module docstring for formats).

    Args:
        path: a file, a directory of files, or a ``datasets.save_to_disk`` directory.
        format: one of ``FORMATS`` to override detection by extension.
        text_field / messages_field: record fields holding a document / a chat.
        split: which split of a saved ``DatasetDict`` to read.
    """
    for f, fmt in list_data_files(path, format):
        if fmt == "text":
            yield Example(text=read_text_file(f), path=str(f))
        elif fmt == "jsonl":
            yield from _read_jsonl(f, text_field, messages_field)
        elif fmt == "parquet":
            yield from _read_parquet(f, text_field, messages_field)
        else:
            yield from _read_hf_disk(f, text_field, messages_field, split)
