"""Benchmark tasks built from one held-out split, scored per document, and retention with bootstrap CIs.

The paper reports retention as the average over benchmarks of (score under the policy / score under Top-K).
This module builds three such tasks from a split's documents (the corpus's files) and the tokenizer, scores
a model under a routing hook on all three in one pass per batch, and gives retention with a 95% confidence
interval from a bootstrap over documents.

Construction (deterministic: the same documents, tokenizer, sizes and seed give the same tasks)
-------------------------------------------------------------------------------------------
Documents are encoded as for training (``bos + tokens + eos``) and packed in ``concat`` mode into rows of
``S + 1`` tokens (``beam_jax.data.packing``), in the split's (sorted) order; the first ``max_batches``
batches of ``batch_size`` rows are used (0 = the whole split; the last batch is padded with empty rows).
The model reads each row causally from its start, as in training. A *line-end token* is a token whose decoded
text contains a newline (byte-level BPE merges the newline with the next line's indentation, so this is a
token-level notion). A *line* is the run of ``n >= 1`` tokens strictly between two consecutive line-end
tokens of the same document inside one row, holding a non-whitespace character, with at least
``min_context`` tokens of the row before it.

1. ``next_token``: top-1 next-token accuracy on every target that carries loss. Per document: (correct,
   targets).
2. ``line_completion``: greedy exact-match line completion, on every line of ``n <= lc_max_tokens`` tokens.
   Given the row up to the line, the model decodes greedily until it emits a line-end token; the item is
   exact when the decoded tokens before that are the line's. Scored by teacher forcing, which is the same
   thing for greedy decoding: exact iff the argmax at each of the ``n`` positions is the reference token and
   the argmax after the last one is a line-end token. Per document: (exact, lines).
3. ``multiple_choice``: ``mc_items`` lines with ``mc_tokens[0] <= n <= mc_tokens[1]`` drawn without
   replacement (numpy ``default_rng(seed)``) from the scored rows; for each, 3 distractors drawn from the lines
   of *other* documents anywhere in the split (scored rows or not) with the same token count ``n`` and
   different tokens (a line with fewer than 3 such
   distractors is skipped); the 4 choices in a random order. At most ``ceil(1.25 * mc_items / batches)``
   items are taken from one batch's rows (one padded shape for every batch); a sampled line past that cap is
   passed over. Score: log p(choice tokens | the row up to the
   line), summed over the ``n`` tokens (all choices have ``n`` tokens, so no length normalisation is needed);
   correct when the true line scores highest (ties go to the first listed). The context is shared: the row's
   KV cache from the next-token pass is reused with the slots after the context masked off, so a choice
   costs ``n - 1`` extra token forwards. Per document of the true line: (correct, items).

A task's score over a set of documents is (sum of numerators) / (sum of denominators) (micro average).
`bootstrap_retention` resamples documents with replacement, recomputes every task's score under the policy
and under Top-K on the same resample, and takes retention = mean over tasks of the ratios; the interval is the
2.5 / 97.5 percentiles.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from functools import partial
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .data.encode import encode_examples
from .data.packing import pack

TASKS = ("next_token", "line_completion", "multiple_choice")
NUM_CHOICES = 4


@dataclasses.dataclass(frozen=True)
class TaskSet:
    """Tasks of one split. ``batches``: dicts of numpy arrays, all batches the same shapes:

    input_ids, targets [B, S] int32; loss_mask [B, S] float32; doc [B, S] int32 (document of each target, -1
    where no loss); lc_row, lc_pos, lc_len, lc_doc [N] int32 (line-completion items: row in the batch, input
    column whose logits predict the line's first token, its token count, document; -1 doc = padding);
    mc_row, mc_pos, mc_len, mc_label, mc_doc [M] int32 and mc_choices [M, 4, L] int32 (multiple-choice items,
    choices right-padded to L = mc_tokens[1]; -1 doc = padding).
    """

    split: str
    documents: tuple[str, ...]
    batches: tuple[dict, ...]
    line_end: np.ndarray  # [V] bool: the token's text contains a newline
    construction: dict  # the parameters it was built with

    @property
    def num_documents(self) -> int:
        return len(self.documents)

    def sizes(self) -> dict:
        """Sample sizes: tokens (next-token targets), line-completion and multiple-choice items, documents."""
        return {"tokens": int(sum(b["loss_mask"].sum() for b in self.batches)),
                "line_completion_items": int(sum((b["lc_doc"] >= 0).sum() for b in self.batches)),
                "multiple_choice_items": int(sum((b["mc_doc"] >= 0).sum() for b in self.batches)),
                "documents": int(len({int(d) for b in self.batches for d in np.unique(b["doc"]) if d >= 0}))}


def line_end_table(tokenizer, vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> (line_end [V] bool, blank [V] bool): a token's decoded text contains a newline / is whitespace only
    (empty included). V = max(len(tokenizer), vocab_size); ids the tokenizer lacks are neither."""
    n = len(tokenizer)
    V = max(n, vocab_size or 0)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    line_end = np.zeros(V, bool)
    blank = np.zeros(V, bool)
    line_end[:n] = ["\n" in t for t in texts]
    blank[:n] = [t.strip() == "" for t in texts]
    return line_end, blank


def _rows_lines(tokens, docs, loss, line_end, blank, min_context):
    """Lines in one packed row. tokens [S+1], docs [S+1] (-1 beyond the data), loss [S] (input column ->
    target carries loss). -> list of (pos, n, doc): the line's tokens are columns pos+1 .. pos+n, predicted
    from input columns pos .. pos+n-1; column pos+n+1 is the line-end token that closes it."""
    out = []
    ends = np.flatnonzero(line_end[tokens] & (docs >= 0))
    for e, e2 in zip(ends[:-1], ends[1:]):
        n = int(e2 - e - 1)
        if n < 1 or docs[e] != docs[e2] or e + 1 < min_context:
            continue
        if blank[tokens[e + 1:e2]].all() or not loss[e:e2].all():
            continue
        out.append((int(e), n, int(docs[e])))
    return out


def build_tasks(examples: Sequence, tokenizer, seq_len: int, batch_size: int, *, split: str = "test",
                max_batches: int = 0, mc_items: int = 2000, mc_tokens: tuple[int, int] = (2, 8),
                lc_max_tokens: int = 16, min_context: int = 16, seed: int = 0,
                vocab_size: int | None = None) -> TaskSet:
    """The three tasks of the module docstring from a split's examples (one per document, e.g.
    `Corpus.examples("test")`). vocab_size: the model's (predictions index the line-end table)."""
    lo, hi = int(mc_tokens[0]), int(mc_tokens[1])
    if not 2 <= lo <= hi:
        raise ValueError(f"mc_tokens must be (lo, hi) with 2 <= lo <= hi, got {mc_tokens}")
    encoded = encode_examples(examples, tokenizer)
    keep = [i for i, (ids, _) in enumerate(encoded) if len(ids)]
    names = tuple(str(getattr(examples[i], "path", None) or f"{split}[{i}]") for i in keep)
    docs = [encoded[i] for i in keep]
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    packed = pack(docs, seq_len, "concat", pad_id=pad)
    S = seq_len
    lens = np.array([len(ids) for ids, _ in docs], np.int64)
    stream_doc = np.repeat(np.arange(len(docs), dtype=np.int32), lens)
    n_rows = len(packed) if not max_batches else min(len(packed), max_batches * batch_size)
    idx = np.arange(len(packed))[:, None] * S + np.arange(S + 1)[None, :]
    row_doc = np.where(idx < stream_doc.size, stream_doc[np.minimum(idx, stream_doc.size - 1)], -1)
    line_end, blank = line_end_table(tokenizer, vocab_size)
    line_end = np.pad(line_end, (0, max(0, int(packed.tokens.max()) + 1 - line_end.size)))
    blank = np.pad(blank, (0, line_end.size - blank.size))

    full = packed.batch(np.arange(len(packed)))
    lines = []  # (row, pos, n, doc), over every row of the split: rows >= n_rows only supply distractors
    for r in range(len(packed)):
        for pos, n, d in _rows_lines(packed.tokens[r], row_doc[r], full["loss_mask"][r] > 0, line_end, blank,
                                     min_context):
            lines.append((r, pos, n, d))
    lc = [ln for ln in lines if ln[2] <= lc_max_tokens and ln[0] < n_rows]

    # multiple choice: sampled true lines of the scored rows, same-length distractors from the lines of other
    # documents anywhere in the split (the scored rows alone may hold a single document)
    rng = np.random.default_rng(seed)
    content = [tuple(packed.tokens[r, pos + 1:pos + 1 + n].tolist()) for r, pos, n, _ in lines]
    pool_ids = [i for i, ln in enumerate(lines) if lo <= ln[2] <= hi]
    cand = [i for i in pool_ids if lines[i][0] < n_rows]
    by_len: dict[int, np.ndarray] = {}
    for i in pool_ids:
        by_len.setdefault(lines[i][2], []).append(i)
    by_len = {k: np.array(v) for k, v in by_len.items()}
    order = rng.permutation(len(cand)) if cand else np.zeros(0, int)
    n_batches = max(1, -(-n_rows // batch_size))
    cap = max(8, -(-5 * mc_items // (4 * n_batches)))  # items per batch: one padded shape, little padding
    per_batch = np.zeros(n_batches, int)
    mc = []  # (row, pos, n, doc, choices [4][n], label)
    for j in order:
        if len(mc) >= mc_items:
            break
        i = cand[j]
        r, pos, n, d = lines[i]
        if per_batch[r // batch_size] >= cap:
            continue
        pool = by_len[n]
        picked, seen = [], {content[i]}
        for k in rng.permutation(pool.size):
            o = int(pool[k])
            if lines[o][3] != d and content[o] not in seen:
                picked.append(content[o])
                seen.add(content[o])
                if len(picked) == NUM_CHOICES - 1:
                    break
        if len(picked) < NUM_CHOICES - 1:
            continue
        label = int(rng.integers(NUM_CHOICES))
        choices = picked[:label] + [content[i]] + picked[label:]
        mc.append((r, pos, n, d, choices, label))
        per_batch[r // batch_size] += 1
    mc.sort(key=lambda m: (m[0], m[1]))
    if len(mc) < mc_items:
        warnings.warn(f"{split}: {len(mc)} multiple-choice items built of the {mc_items} asked for ({len(cand)} "
                      f"candidate lines of {lo}-{hi} tokens in {n_rows} rows; raise the batches scored)",
                      stacklevel=2)

    lc_per = [[x for x in lc if x[0] // batch_size == b] for b in range(n_batches)]
    mc_per = [[x for x in mc if x[0] // batch_size == b] for b in range(n_batches)]
    N = max(1, max(map(len, lc_per)))
    M = max(1, max(map(len, mc_per)))
    M = -(-M // 8) * 8  # fewer distinct shapes between task sets
    batches = []
    for b in range(n_batches):
        rows = np.arange(b * batch_size, (b + 1) * batch_size)
        rows = np.where(rows < n_rows, rows, -1)
        bt = packed.batch(rows)
        d = np.where(rows[:, None] >= 0, row_doc[np.maximum(rows, 0), 1:], -1)
        d = np.where(bt["loss_mask"] > 0, d, -1).astype(np.int32)
        item = {"input_ids": bt["input_ids"].astype(np.int32), "targets": bt["targets"].astype(np.int32),
                "loss_mask": bt["loss_mask"].astype(np.float32), "doc": d}
        lcb = lc_per[b]
        item["lc_row"] = np.array([x[0] - b * batch_size for x in lcb] + [0] * (N - len(lcb)), np.int32)
        item["lc_pos"] = np.array([x[1] for x in lcb] + [0] * (N - len(lcb)), np.int32)
        item["lc_len"] = np.array([x[2] for x in lcb] + [1] * (N - len(lcb)), np.int32)
        item["lc_doc"] = np.array([x[3] for x in lcb] + [-1] * (N - len(lcb)), np.int32)
        mcb = mc_per[b]
        ch = np.zeros((M, NUM_CHOICES, hi), np.int32)
        for k, x in enumerate(mcb):
            for c, toks in enumerate(x[4]):
                ch[k, c, :len(toks)] = toks
        item["mc_row"] = np.array([x[0] - b * batch_size for x in mcb] + [0] * (M - len(mcb)), np.int32)
        item["mc_pos"] = np.array([x[1] for x in mcb] + [0] * (M - len(mcb)), np.int32)
        item["mc_len"] = np.array([x[2] for x in mcb] + [1] * (M - len(mcb)), np.int32)
        item["mc_label"] = np.array([x[5] for x in mcb] + [0] * (M - len(mcb)), np.int32)
        item["mc_doc"] = np.array([x[3] for x in mcb] + [-1] * (M - len(mcb)), np.int32)
        item["mc_choices"] = ch
        batches.append(item)
    construction = {"seq_len": S, "batch_size": batch_size, "max_batches": max_batches, "rows": int(n_rows),
                    "mc_items": mc_items, "mc_tokens": [lo, hi], "lc_max_tokens": lc_max_tokens,
                    "min_context": min_context, "seed": seed, "choices": NUM_CHOICES}
    return TaskSet(split, names, tuple(batches), line_end, construction)


def _kept(out, n_tokens):
    kept = [r.kept.reshape(n_tokens, -1) for r in out.moe]
    return jnp.stack(kept) if kept else jnp.zeros((0, n_tokens, 1), bool)  # [L, T, K]


@partial(nnx.jit, static_argnames=("impl",))
def _score_batch(model, b, hook, impl):
    """One batch of a TaskSet under `hook`: per-target correctness and nll, the argmax, the multiple-choice
    log-likelihoods [M, 4], and the kept (token, candidate) counts of the next-token pass and of the choices."""
    ids, targets, m = b["input_ids"], b["targets"], b["loss_mask"]
    B, S = ids.shape
    M, C, L = b["mc_choices"].shape
    cache = model.init_cache(B, S + L - 1)
    out = model(ids, cache=cache, mask_hook=hook, impl=impl)
    logp = jax.nn.log_softmax(out.logits, -1)  # [B, S, V]
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    pred = jnp.argmax(out.logits, -1).astype(jnp.int32)
    w = m.reshape(-1)
    kept = _kept(out, B * S)
    res = {"nll": nll * m, "pred": pred,
           "kept_per_layer": jnp.sum(kept.sum(-1) * w, -1), "kept_per_rank": jnp.sum(kept * w[None, :, None], 1)}

    # multiple choice on the shared context: rows' caches, slots after the context masked off
    row = jnp.repeat(b["mc_row"], C)  # [M*C]
    pos = jnp.repeat(b["mc_pos"], C)
    n = jnp.repeat(b["mc_len"], C)
    ch = b["mc_choices"].reshape(M * C, L)
    first = logp[row, pos, ch[:, 0]]  # log p(token 0 | context)
    slots = jnp.arange(S + L - 1)
    valid = (slots[None, :] <= pos[:, None]) & (slots[None, :] < S)
    c = out.cache
    tiled = {"layers": [{k: v[row] for k, v in layer.items()} for layer in c["layers"]], "index": c["index"],
             "valid": valid}
    chunk = ch[:, :L - 1]
    cmask = jnp.arange(L - 1)[None, :] < (n - 1)[:, None]  # [M*C, L-1]
    out2 = model(chunk, attention_mask=cmask, cache=tiled, mask_hook=hook, impl=impl)
    lp2 = jax.nn.log_softmax(out2.logits, -1)
    rest = jnp.take_along_axis(lp2, ch[:, 1:, None], -1)[..., 0]
    ll = first + jnp.sum(jnp.where(cmask, rest, 0.0), -1)
    res["mc_ll"] = ll.reshape(M, C)
    real = (jnp.repeat(b["mc_doc"], C) >= 0)[:, None] & cmask
    k2 = _kept(out2, M * C * (L - 1))
    res["mc_kept"] = jnp.sum(k2.sum(-1) * real.reshape(-1).astype(jnp.float32), -1)  # [L]
    res["mc_tokens"] = jnp.sum(real)
    return res


def score(model, tasks: TaskSet, hook, impl: str = "dense") -> dict:
    """Score `model` under `hook` on every task of `tasks`.

    -> evaluate()'s metrics of the next-token pass (loss, perplexity, accuracy, tokens, experts_per_token,
    experts_per_token_per_layer, rank_drop_rate, moe_flops_reduction), plus task_scores {task: score},
    task_experts_per_token {task: mean routed experts per token over the tokens that task computed; the
    multiple-choice figure counts the choice tokens, its shared context is the next-token pass},
    per_document {task: (numerators [D] float64, denominators [D] float64)} for `bootstrap_retention`."""
    from . import flops

    D = tasks.num_documents
    per = {t: (np.zeros(D), np.zeros(D)) for t in TASKS}
    nll = 0.0
    kept_l = kept_r = mc_kept = None
    mc_tok = 0.0
    line_end = tasks.line_end
    for b in tasks.batches:
        r = _score_batch(model, {k: jnp.asarray(v) for k, v in b.items()}, hook, impl)
        r = jax.tree.map(np.asarray, r)
        mask = b["loss_mask"] > 0
        doc = b["doc"]
        correct = (r["pred"] == b["targets"]) & mask
        np.add.at(per["next_token"][0], doc[mask], correct[mask])
        np.add.at(per["next_token"][1], doc[mask], 1.0)
        nll += float(r["nll"].sum())
        # line completion by teacher forcing: argmax right at each of the n positions, then a line end
        lc = b["lc_doc"] >= 0
        if lc.any():
            span = np.arange(int(b["lc_len"].max()) + 1)
            cols = b["lc_pos"][:, None] + span[None, :]
            inside = span[None, :] < b["lc_len"][:, None]
            cols_c = np.minimum(cols, b["targets"].shape[1] - 1)
            p = r["pred"][b["lc_row"][:, None], cols_c]
            t = b["targets"][b["lc_row"][:, None], cols_c]
            ok = np.where(inside, p == t, True).all(-1)
            endp = p[np.arange(len(p)), b["lc_len"]]
            exact = ok & line_end[np.minimum(endp, line_end.size - 1)] & (endp < line_end.size)
            np.add.at(per["line_completion"][0], b["lc_doc"][lc], exact[lc])
            np.add.at(per["line_completion"][1], b["lc_doc"][lc], 1.0)
        mc = b["mc_doc"] >= 0
        if mc.any():
            right = np.argmax(r["mc_ll"], -1) == b["mc_label"]
            np.add.at(per["multiple_choice"][0], b["mc_doc"][mc], right[mc])
            np.add.at(per["multiple_choice"][1], b["mc_doc"][mc], 1.0)
        kept_l = r["kept_per_layer"] if kept_l is None else kept_l + r["kept_per_layer"]
        kept_r = r["kept_per_rank"] if kept_r is None else kept_r + r["kept_per_rank"]
        mc_kept = r["mc_kept"] if mc_kept is None else mc_kept + r["mc_kept"]
        mc_tok += float(r["mc_tokens"])
    n = float(per["next_token"][1].sum())
    K = model.cfg.num_experts_per_tok
    per_layer = (kept_l / n).tolist()
    mean_k = float(np.mean(per_layer)) if per_layer else 0.0
    mc_k = float(np.mean(mc_kept / mc_tok)) if mc_tok and len(mc_kept) else mean_k
    loss = nll / n
    return {
        "loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": float(per["next_token"][0].sum()) / n,
        "tokens": int(n), "experts_per_token": mean_k, "experts_per_token_per_layer": per_layer,
        "rank_drop_rate": (1 - kept_r / n).tolist(),
        "moe_flops_reduction": flops.moe_flops_reduction(mean_k, K) if K else 0.0,
        "task_scores": {t: task_score(*per[t]) for t in TASKS},
        "task_experts_per_token": {"next_token": mean_k, "line_completion": mean_k, "multiple_choice": mc_k},
        "per_document": per,
    }


def task_score(num, den) -> float:
    """Micro average sum(num) / sum(den) (nan when there is nothing to score)."""
    d = float(np.sum(den))
    return float(np.sum(num)) / d if d else float("nan")


def resample_weights(num_documents: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """[resamples, D] float64: how many times each document is drawn in each bootstrap resample (D draws with
    replacement). Fixed seed, so every policy is resampled identically (paired comparison)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_documents, np.full(num_documents, 1.0 / num_documents), size=resamples).astype(
        np.float64)


def bootstrap_retention(policy: Mapping[str, tuple], reference: Mapping[str, tuple], resamples: int = 1000,
                        seed: int = 0, tasks: Sequence[str] | None = None) -> dict:
    """Retention = mean over tasks of score(policy) / score(reference), with a 95% bootstrap CI over documents.

    policy, reference: {task: (numerators [D], denominators [D])} over the same D documents (per_document of
    `score`). Tasks whose reference score is 0 or undefined are left out (named in "skipped").
    -> {"retention", "ci95": [lo, hi], "tasks": {task: {"ratio", "ci95", "score", "score_ci95",
    "reference_score"}}, "documents", "resamples", "skipped"}."""
    tasks = [t for t in (tasks or list(reference)) if t in policy]
    # documents that hold no item of any task (outside the evaluated rows) are not drawn
    active = np.zeros(np.asarray(reference[tasks[0]][1]).size, bool) if tasks else np.zeros(0, bool)
    for t in tasks:
        active |= np.asarray(reference[t][1]) > 0
    policy = {t: tuple(np.asarray(a, np.float64)[active] for a in policy[t]) for t in tasks}
    reference = {t: tuple(np.asarray(a, np.float64)[active] for a in reference[t]) for t in tasks}
    W = None
    ratios, boots, out, skipped = [], [], {}, []
    for t in tasks:
        pn, pd = (np.asarray(a, np.float64) for a in policy[t])
        rn, rd = (np.asarray(a, np.float64) for a in reference[t])
        ref = task_score(rn, rd)
        if not ref or ref != ref:
            skipped.append(t)
            continue
        if W is None:
            W = resample_weights(pn.size, resamples, seed)
        with np.errstate(divide="ignore", invalid="ignore"):
            ps = (W @ pn) / (W @ pd)
            rs = (W @ rn) / (W @ rd)
            ratio = ps / rs
        ratio = np.where(np.isfinite(ratio), ratio, np.nan)
        point = task_score(pn, pd) / ref
        ratios.append(point)
        boots.append(ratio)
        out[t] = {"ratio": point, "ci95": _ci(ratio), "score": task_score(pn, pd), "score_ci95": _ci(ps),
                  "reference_score": ref}
    if not ratios:
        return {"retention": float("nan"), "ci95": [float("nan")] * 2, "tasks": out, "documents": 0,
                "resamples": resamples, "skipped": skipped}
    with warnings.catch_warnings():  # a resample without items of a task: nan, left out of that mean
        warnings.simplefilter("ignore", RuntimeWarning)
        ret = np.nanmean(np.stack(boots), 0)
    return {"retention": float(np.mean(ratios)), "ci95": _ci(ret), "tasks": out, "documents": int(W.shape[1]),
            "resamples": resamples, "skipped": skipped}


def _ci(x) -> list[float]:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(x, [2.5, 97.5])
    return [float(lo), float(hi)]
