"""`python -m beam_jax.pretrain --config tiny_pretrain.py [--workdir DIR] [--resume]`

Trains the project's small base MoE from scratch on a shipped corpus (`data.train`: "stdlib", or "stdlib+tests",
the standard library's source with its tests added to train only; `corpus.named_corpus`) and writes it
in Hugging Face format (safetensors, config.json, tokenizer files) with PRETRAIN.json: the command, seed,
corpus fingerprint, validation/test loss against a unigram model, and the routing statistics showing
that the experts specialise (per-expert load, routing entropy).
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import corpus as corpus_lib
from .config import config_from_arch
from .data import BatchIterator, pack_examples
from .experts import expert_impl
from .export_hf import save_pretrained
from .model import MoECausalLM
from .routing import TOPK
from .trainer import LossConfig, Trainer, fit


def routing_stats(trainer: Trainer, batches) -> dict:
    """Per-layer expert load (fraction of Top-K slots) and routing entropy over held-out batches."""
    model = trainer.model()
    E = model.cfg.num_experts
    fwd = nnx.jit(lambda m, x: m(x, impl="dense"))
    loads, ents = None, None
    for b in batches:
        out = fwd(model, jnp.asarray(b["input_ids"]))
        valid = np.asarray(b["loss_mask"]).reshape(-1) > 0
        L = []
        H = []
        for rec in out.moe:
            ids = np.asarray(rec.topk_ids).reshape(-1, rec.topk_ids.shape[-1])[valid]
            L.append(np.bincount(ids.reshape(-1), minlength=E))
            p = np.asarray(jax.nn.softmax(rec.router_logits.astype(jnp.float32), -1)).reshape(-1, E)[valid]
            H.append(float(np.mean(-np.sum(p * np.log(p + 1e-12), -1))))
        loads = np.array(L) if loads is None else loads + np.array(L)
        ents = [H] if ents is None else ents + [H]
    load_frac = loads / loads.sum(1, keepdims=True)
    return {"expert_load": load_frac.round(4).tolist(),
            "routing_entropy_nats": np.mean(ents, 0).round(4).tolist(),
            "uniform_entropy_nats": float(np.log(E)),
            "load_max_over_mean": (load_frac.max(1) * E).round(3).tolist()}


def evaluate_split(trainer: Trainer, packed, batch_size: int, max_batches: int = 0) -> dict:
    it = BatchIterator(packed, batch_size, shuffle=False, num_epochs=1, drop_remainder=False)
    tot, acc, n = 0.0, 0.0, 0.0
    for i, b in enumerate(it):
        if max_batches and i >= max_batches:
            break
        m = trainer.evaluate(b)
        t = float(m["tokens"])
        tot += float(m["lm_loss"]) * t
        acc += float(m["accuracy"]) * t
        n += t
    return {"loss": tot / n, "accuracy": acc / n, "tokens": int(n)}


def main(config, workdir: Path, resume: bool):
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "commands.txt", "a") as f:  # every invocation, so a resumed run's history is exact
        f.write(" ".join(["python", "-m", "beam_jax.pretrain"] + sys.argv[1:]) + "\n")
    corpus = corpus_lib.named_corpus(config.data.train)
    tok = corpus_lib.ensure_tokenizer(corpus, config.tokenizer_vocab, workdir / "tokenizer")
    S, B = config.data.seq_len, config.data.batch_size
    packed = {s: pack_examples(corpus.examples(s), tok, S, mode="concat") for s in ("train", "validation", "test")}
    print(f"corpus {corpus.fingerprint[:12]}: " + ", ".join(f"{s} {len(p)} rows" for s, p in packed.items()))

    cfg = config_from_arch(config.model.arch, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    model = MoECausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(config.seed))
    lc = LossConfig(alpha=config.beam.alpha, balance=config.beam.balance, hook=TOPK,
                    impl=expert_impl(config.model.impl))
    trainer = Trainer(model, "all", config.train, lc)
    print(f"{cfg.architecture}: {trainer.num_trainable / 1e6:.2f}M parameters")
    it = BatchIterator(packed["train"], B, seed=config.seed)
    summary = fit(trainer, it, workdir, config.train, resume=resume, desc="pretrain",
                  meta={"corpus_fingerprint": corpus.fingerprint})

    counts = corpus_lib.token_counts([p.tokens[:, 1:][p.train[:, 1:]] for p in [packed["train"]]], cfg.vocab_size)
    result = {}
    for split in ("validation", "test"):
        p = packed[split]
        m = evaluate_split(trainer, p, B)
        m["unigram_loss"] = corpus_lib.unigram_loss(counts, p.tokens[:, 1:][p.train[:, 1:]])
        result[split] = m
    stats_batches = list(BatchIterator(packed["validation"], B, shuffle=False, num_epochs=1))[:8]
    result["routing"] = routing_stats(trainer, stats_batches)
    record = {
        "commands": (workdir / "commands.txt").read_text().splitlines(),
        "seed": config.seed, "config": config.to_dict(), "corpus_fingerprint": corpus.fingerprint,
        "corpus": corpus.describe(), "python": platform.python_version(), "jax": jax.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} x{len(jax.devices())} "
                   f"{jax.devices()[0].platform}",
        "train_tokens_per_s": summary["train_tokens_per_s"], "steps": config.train.steps,
        "tokens_seen": config.train.steps * config.train.grad_accum * B * S, **result,
    }
    out = Path(config.output) if config.output else workdir / "model"
    save_pretrained(trainer.model(), out, tokenizer_dir=workdir / "tokenizer",
                    extra_files={"PRETRAIN.json": json.dumps(record, indent=2, default=str) + "\n"})
    print(json.dumps({k: record[k] for k in ("validation", "test")}, indent=2))
    print(f"routing entropy (nats, uniform={np.log(cfg.num_experts):.2f}): {result['routing']['routing_entropy_nats']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    from .cli import run

    run(main, "tiny_pretrain.py")
