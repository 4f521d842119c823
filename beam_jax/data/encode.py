"""Examples -> token ids plus a per-token ``train`` flag (the tokens whose prediction carries loss).

A document is encoded to two aligned arrays of length L:

    ids    [L] int32   token ids
    train  [L] bool    True where the token is a training *target* (the model is taught to predict it)

Text documents: ``[bos] + tokens(text) + [eos]`` (bos/eos only where the tokenizer defines them); every
token but the bos is a target.

Chat documents (Tulu 3 SFT style): the conversation is rendered once with the tokenizer's chat template,
and only tokens inside assistant turns are targets. The character span of assistant turn i is found by
rendering prefixes: it starts where ``render(messages[:i], add_generation_prompt=True)`` ends (so the
role header is not trained) and ends where ``render(messages[:i+1])`` ends (so the turn's end-of-turn/eos
markup is trained). The full text is tokenized once with offsets and a token is a target when its characters
overlap an assistant span (so a token merging header and content, like " It" after "Assistant:", is
trained); the template must be prefix-stable (each prefix rendering a prefix of the next), which is checked.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from beam_jax.data.errors import DataError
from beam_jax.data.readers import Example

__all__ = ["render_chat", "assistant_spans", "encode_chat", "encode_texts", "encode_examples"]


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _require_template(tokenizer, path, where) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        name = f"{type(tokenizer).__name__} {getattr(tokenizer, 'name_or_path', '')!r}"
        raise DataError(path, f"chat data needs a chat template, but tokenizer {name} has no chat template",
                        where, "messages")


def render_chat(messages: Sequence[dict], tokenizer, path="<chat>", where=None) -> str:
    """The whole conversation rendered by the tokenizer's chat template (no generation prompt)."""
    _require_template(tokenizer, path, where)
    return _render(tokenizer, messages, False)


def assistant_spans(messages: Sequence[dict], tokenizer, path="<chat>",
                    where=None) -> tuple[str, list[tuple[int, int]]]:
    """``(rendered_text, [(start_char, end_char), ...])``, one span per assistant message.

    Raises DataError when the tokenizer has no chat template or the template is not prefix-stable.
    """
    full = render_chat(messages, tokenizer, path, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            try:
                head = _render(tokenizer, [], True)
            except Exception:  # some templates refuse an empty conversation
                head = ""
        else:
            head = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (upto.startswith(head) and full.startswith(upto)):
            raise DataError(path, "the chat template is not prefix-stable (rendering the conversation up to "
                            f"message {i} is not a prefix of the whole), so assistant tokens cannot be located",
                            where, f"messages[{i}]")
        if len(upto) > len(head):
            spans.append((len(head), len(upto)))
    return full, spans


def encode_chat(messages: Sequence[dict], tokenizer, path="<chat>", where=None) -> tuple[np.ndarray, np.ndarray]:
    """Chat -> (ids [L] int32, train [L] bool), train True exactly on assistant-turn tokens."""
    full, spans = assistant_spans(messages, tokenizer, path, where)
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError(path, "chat loss masks need a fast tokenizer (offset mapping)", where, "messages") from None
    ids = np.asarray(enc["input_ids"], np.int32)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)  # zero-width -> its start char
    train = np.zeros(ids.shape, bool)
    for s, e in spans:
        train |= (starts < e) & (ends > s)
    return ids, train


def encode_texts(texts: Sequence[str], tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """Plain documents -> [(ids [L] int32, train [L] bool)] with bos/eos added; bos is not a target."""
    if not texts:
        return []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for toks in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids = ([bos] if bos is not None else []) + list(toks) + ([eos] if eos is not None else [])
        train = np.ones(len(ids), bool)
        if bos is not None:
            train[0] = False
        out.append((np.asarray(ids, np.int32), train))
    return out


def encode_examples(examples: Iterable[Example], tokenizer,
                    batch_size: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    """Examples (text or chat, mixed) -> [(ids, train)] in input order; text is tokenized in batches."""
    out: list = []
    pending: list[tuple[int, str]] = []

    def flush():
        for (slot, _), enc in zip(pending, encode_texts([t for _, t in pending], tokenizer)):
            out[slot] = enc
        pending.clear()

    for ex in examples:
        out.append(None)
        if ex.is_chat:
            out[-1] = encode_chat(ex.messages, tokenizer, ex.path, ex.where)
        else:
            pending.append((len(out) - 1, ex.text))
            if len(pending) >= batch_size:
                flush()
    flush()
    return out
