"""The training loop shared by `beam_jax.train` (BEAM mask routers) and `beam_jax.pretrain` (a base model).

The model is split into the trainable parameters (an `nnx` filter: the mask routers, the routers, or all)
and the frozen rest; `jax.grad` runs over the trainable `nnx.State` only, optax updates it, and orbax saves
only it (plus optimizer state, step, RNG, data position and the beta controller) under `workdir/ckpt`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from . import beam
from .flops import experts_per_token_per_layer
from .moe import MaskRouterParam

TRAINABLE = {
    "mask": nnx.OfType(MaskRouterParam),
    "mask+router": nnx.Any(nnx.OfType(MaskRouterParam), nnx.PathContains("gate")),
    "all": nnx.Param,
}


def trainable_filter(name: str):
    if name not in TRAINABLE:
        raise ValueError(f"train.trainable must be one of {sorted(TRAINABLE)}, got {name!r}")
    return TRAINABLE[name]


def make_optimizer(tc) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay, global-norm clipping and gradient accumulation."""
    sched = optax.warmup_cosine_decay_schedule(0.0, tc.lr, max(tc.warmup_steps, 1), max(tc.steps, tc.warmup_steps + 1),
                                               end_value=tc.lr * tc.final_lr_fraction)
    tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                     optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=tc.weight_decay))
    if tc.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=tc.grad_accum)
    return tx


@dataclasses.dataclass
class LossConfig:
    alpha: float = 0.0  # load-balancing coefficient
    hook: Any = None  # routing hook used in training (e.g. BeamHook(train=True))
    impl: str = "dense"  # expert path


def compute_loss(model, batch, beta, lc: LossConfig):
    """-> (total, metrics). batch: input_ids, targets, loss_mask [B, S]."""
    cfg = model.cfg
    out = model(batch["input_ids"], mask_hook=lc.hook, impl=lc.impl)
    lm, ntok = beam.lm_loss(out.logits, batch["targets"], batch["loss_mask"])
    acc, _ = beam.next_token_accuracy(out.logits, batch["targets"], batch["loss_mask"])
    valid = (batch["loss_mask"] > 0).reshape(-1)
    metrics = {"lm_loss": lm, "accuracy": acc, "tokens": ntok}
    total = lm
    if out.moe:
        T = valid.shape[0]
        logits = [m.router_logits.reshape(T, -1) for m in out.moe]
        ids = [m.topk_ids.reshape(T, -1) for m in out.moe]
        bal = beam.load_balancing_loss_layers(logits, ids, cfg.num_experts, cfg.num_experts_per_tok, valid)
        metrics["balance_loss"] = bal
        total = total + lc.alpha * bal
        kept = [m.aux.get("kept", jnp.ones(m.topk_ids.shape, bool)).reshape(T, -1) for m in out.moe]
        metrics["experts_per_layer"] = experts_per_token_per_layer(kept, valid)
        metrics["finite_router_logits"] = jnp.stack([jnp.all(jnp.isfinite(x)) for x in logits])
        if "m_hat" in out.moe[0].aux:
            reg = jnp.mean(jnp.stack([beam.reg_loss(m.aux["m_hat"].reshape(T, -1), valid) for m in out.moe]))
            metrics["reg_loss"] = reg
            total = total + beta * reg
    metrics["loss"] = total
    return total, metrics


class Trainer:
    """Owns the split model, optimizer state and the jitted step."""

    def __init__(self, model, trainable: str, tc, lc: LossConfig, mesh=None):
        """mesh: a `jax.sharding.Mesh` from `beam_jax.sharding.make_mesh`; None = one device, as before.
        With a mesh, parameters and optimizer state are laid out by `sharding.RULES` and batches split
        over (data, fsdp, expert); `step` then takes this process's rows of the global batch."""
        model.remat = bool(getattr(tc, "remat", False))  # rematerialise per decoder layer (nnx.remat)
        self.graphdef, self.params, self.frozen = nnx.split(model, trainable_filter(trainable), ...)
        n = sum(x.size for x in jax.tree.leaves(self.params))
        if n == 0:
            raise ValueError(f"train.trainable={trainable!r} selects no parameters in {model.cfg.architecture}")
        self.num_trainable = n
        self.tx = make_optimizer(tc)
        self.lc = lc
        self.mesh = mesh
        if mesh is None:
            self.opt_state = self.tx.init(self.params)
            self._step = jax.jit(self._train_step, donate_argnums=(0, 1))
            self._eval = jax.jit(self._eval_step)
            return
        from . import sharding

        p_sh, f_sh = sharding.tree_shardings(self.params, mesh), sharding.tree_shardings(self.frozen, mesh)
        self.params, self.frozen = jax.device_put(self.params, p_sh), jax.device_put(self.frozen, f_sh)
        o_sh = sharding.opt_state_shardings(self.tx, self.params, p_sh, mesh)
        self.opt_state = jax.jit(self.tx.init, out_shardings=o_sh)(self.params)
        rep = sharding.replicated(mesh)
        self._batch_sharding = sharding.batch_sharding(mesh)
        self._step = jax.jit(self._train_step, donate_argnums=(0, 1), out_shardings=(p_sh, o_sh, rep))
        self._eval = jax.jit(self._eval_step, out_shardings=rep)

    def _put(self, batch) -> dict:
        """Host batch (this process's rows) -> device arrays: one device, or the global array on the mesh."""
        keys = ("input_ids", "targets", "loss_mask")
        if self.mesh is None:
            return {k: jnp.asarray(batch[k]) for k in keys}
        from .sharding import check_batch, put_batch

        check_batch(len(batch["input_ids"]) * jax.process_count(), self.mesh)
        return {k: put_batch(batch[k], self._batch_sharding) for k in keys}

    def model(self, params=None):
        return nnx.merge(self.graphdef, self.params if params is None else params, self.frozen)

    def _loss(self, params, frozen, batch, beta):
        model = nnx.merge(self.graphdef, params, frozen)
        return compute_loss(model, batch, beta, self.lc)

    def _train_step(self, params, opt_state, frozen, batch, beta):
        (loss, metrics), grads = jax.value_and_grad(self._loss, has_aux=True)(params, frozen, batch, beta)
        metrics["grad_norm"] = optax.tree.norm(grads)
        # a step whose loss or gradients are not finite is refused: parameters and optimizer state stay as they were
        leaf_ok = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        ok = jnp.isfinite(loss) & jnp.all(leaf_ok)
        updates, new_opt = self.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        metrics["finite"] = ok
        metrics["finite_grad_leaves"] = leaf_ok
        return keep(new_params, params), keep(new_opt, opt_state), metrics

    def _eval_step(self, params, frozen, batch, beta):
        return self._loss(params, frozen, batch, beta)[1]

    def step(self, batch, beta) -> dict:
        batch = self._put(batch)
        self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, self.frozen, batch,
                                                          jnp.float32(beta))
        return metrics

    def nonfinite_params(self, leaf_ok) -> list[str]:
        """Names of the trainable parameters whose gradient was not finite (`finite_grad_leaves` is False)."""
        paths = [jax.tree_util.keystr(p, simple=True, separator=".").removesuffix(".value")
                 for p, _ in jax.tree_util.tree_flatten_with_path(self.params)[0]]
        return [p for p, ok in zip(paths, np.asarray(leaf_ok)) if not ok]

    def evaluate(self, batch, beta=0.0) -> dict:
        batch = self._put(batch)
        return self._eval(self.params, self.frozen, batch, jnp.float32(beta))

    # ---- checkpoint state: only the trainable parameters and the optimizer state
    def state_tree(self) -> dict:
        return {"params": nnx.to_pure_dict(self.params),
                "opt": {str(i): x for i, x in enumerate(jax.tree.leaves(self.opt_state))}}

    def load_state_tree(self, tree: dict):
        nnx.replace_by_pure_dict(self.params, tree["params"])
        leaves, treedef = jax.tree.flatten(self.opt_state)
        self.opt_state = jax.tree.unflatten(treedef, [jnp.asarray(tree["opt"][str(i)]) for i in range(len(leaves))])


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (full disk, unwritable directory, ...); the previous one is intact."""


def _save_failure_reason(e: BaseException) -> str:
    """The OS-level reason of a failed save, in one short line (orbax and tensorstore wrap it in their own types)."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return f"{seen.strerror} [errno {seen.errno}]" + (f": {seen.filename}" if seen.filename else "")
        seen = seen.__cause__ or seen.__context__
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}{' ...' if len(msg) > 300 else ''}"


class CheckpointRestoreError(ValueError):
    """A complete checkpoint's files are damaged (truncated, corrupt) or do not fit the run."""


class _HoldOrbaxErrors(logging.Filter):
    """Holds orbax's ERROR records (tracebacks logged by its writer threads) while a save runs: they are released
    when the save succeeds and dropped once it failed, where CheckpointSaveError gives the reason in one line
    (BEAM_TRACEBACK=1 lets them through)."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.failed = False

    def filter(self, record):
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            if not self.failed:
                self.held.append(record)
            return False
        return True


class _Stderr:
    """Holds what is written to stderr (fd 2: Python and C alike) during a checkpoint restore. A failed restore
    leaves orbax's other in-flight reads failing in its threads for a moment, each printing a traceback (from C
    callbacks too); `settle` lets them finish into the held output, which is then dropped, since the
    CheckpointRestoreError raised next says what failed. After a good restore the held output is written out."""

    def __enter__(self):
        import sys
        import tempfile

        self.active = not os.environ.get("BEAM_TRACEBACK")
        if self.active:
            sys.stderr.flush()
            self.file = tempfile.TemporaryFile()
            self.saved = os.dup(2)
            os.dup2(self.file.fileno(), 2)
        return self

    def settle(self, seconds: float = 0.3):
        import gc
        import sys

        if not self.active:
            return
        hook, sys.unraisablehook = sys.unraisablehook, lambda _: None  # un-awaited coroutines of the failed read
        try:
            time.sleep(seconds)
            gc.collect()
        finally:
            sys.unraisablehook = hook
        self.file.truncate(0)

    def __exit__(self, *exc):
        import sys

        if self.active:
            sys.stderr.flush()
            os.dup2(self.saved, 2)
            os.close(self.saved)
            self.file.seek(0)
            held = self.file.read()
            self.file.close()
            if held:
                os.write(2, held)
        return False


class Checkpointer:
    """orbax CheckpointManager under `workdir/ckpt`: the trainer's state tree plus JSON metadata.

    A save is atomic: orbax writes `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` when complete, so a
    process killed mid-save leaves at most a temporary directory, which `latest_step` ignores and the next
    manager on the directory deletes. Deleting an old checkpoint is atomic too: it is renamed into `.deleted/`
    (emptied after each save and on start), so a kill mid-deletion never leaves a half-deleted `<step>`. A save
    that fails raises CheckpointSaveError naming the directory and the OS error; the checkpoints already there
    are untouched.
    """

    TRASH = ".deleted"

    def __init__(self, directory: Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                     cleanup_tmp_directories=True,
                                                                     todelete_subdir=self.TRASH))
        except OSError as e:
            raise CheckpointSaveError(f"{self.directory}: cannot use as checkpoint directory "
                                      f"({_save_failure_reason(e)})") from e
        self._empty_trash()

    def _empty_trash(self):
        import shutil

        if jax.process_index() == 0:  # orbax's primary host is the one that deletes
            shutil.rmtree(self.directory / self.TRASH, ignore_errors=True)

    def save(self, step: int, tree: dict, meta: dict):
        previous = self.manager.latest_step()
        hold = _HoldOrbaxErrors()
        logger = logging.getLogger("absl")
        if not os.environ.get("BEAM_TRACEBACK"):
            logger.addFilter(hold)
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                            meta=ocp.args.JsonSave(meta)))
            self.manager.wait_until_finished()
        except Exception as e:  # orbax/tensorstore raise ValueError, OSError, RuntimeError... for a failed write
            hold.failed = True  # stays installed: orbax threads still failing after this must not print either
            kept = f"the last complete checkpoint is step {previous}" if previous is not None else \
                "no earlier checkpoint"
            raise CheckpointSaveError(f"{self.directory}: saving the checkpoint of step {step} failed "
                                      f"({_save_failure_reason(e)}); {kept}") from e
        logger.removeFilter(hold)
        for record in hold.held:
            logger.handle(record)
        self._empty_trash()

    def latest_step(self):
        return self.manager.latest_step()

    def restore(self, step: int, target: dict):
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        with _Stderr() as stderr:
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                         meta=ocp.args.JsonRestore()))
                return out.state, out.meta
            except Exception as e:  # a truncated or corrupt file: orbax and tensorstore raise many types
                earlier = [s for s in self.manager.all_steps() if s < step]
                hint = f"; delete it to resume from step {max(earlier)}" if earlier else ""
                msg = " ".join(str(e).split())
                failure = CheckpointRestoreError(f"{self.directory / str(step)}: checkpoint unreadable "
                                                 f"({type(e).__name__}: {msg[:300]}{' ...' if len(msg) > 300 else ''})"
                                                 f"{hint}")
            stderr.settle()
        raise failure

    def close(self):
        self.manager.close()


def peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it (GPU), else the process's peak RSS (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def to_host(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        out[k] = a.tolist() if a.ndim else float(a)
    return out


class MetricsLog:
    """metrics.jsonl + TensorBoard event files in the workdir."""

    def __init__(self, workdir: Path, resume: bool):
        from tensorboardX import SummaryWriter

        self.path = Path(workdir) / "metrics.jsonl"
        if not resume and self.path.exists():
            self.path.unlink()
        self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "train"):
        rec = {"step": step, "split": prefix, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        self.tb.flush()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int):
        """On resume: drop records written after the restored checkpoint (they will be written again)."""
        recs = [r for r in self.read() if r["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
        os.replace(tmp, self.path)


class Throughput:
    def __init__(self):
        self.tokens, self.seconds, self._t = 0, 0.0, None

    def start(self):
        self._t = time.perf_counter()

    def stop(self, tokens: int):
        self.seconds += time.perf_counter() - self._t
        self.tokens += tokens

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class _NoLog:
    """MetricsLog's interface, writing nothing (processes other than 0)."""

    def write(self, *args, **kw):
        pass

    def read(self) -> list[dict]:
        return []

    def truncate_after(self, step: int):
        pass


def fit(trainer: Trainer, train_iter, workdir: Path, tc, *, beta: float = 0.0, controller=None, target: float = 0.0,
        controller_rate: float = 0.05, resume: bool = False, meta: dict | None = None, desc: str = "train",
        on_log: Callable[[int, dict], None] | None = None) -> dict:
    """Run `tc.steps` optimizer steps (each `tc.grad_accum` micro-batches), logging and checkpointing.

    With `resume`, restores the latest checkpoint in `workdir/ckpt` (trainable params, optimizer state,
    data position, beta) and continues exactly where it stopped. Returns a summary dict.
    """
    from tqdm.auto import tqdm

    workdir = Path(workdir)
    ckpt = Checkpointer(workdir / "ckpt", tc.keep_ckpts)
    # one writer of metrics.jsonl / TensorBoard: process 0 (every process saves its shards of the checkpoints)
    log = MetricsLog(workdir, resume) if jax.process_index() == 0 else _NoLog()
    accum = max(tc.grad_accum, 1)
    micro = 0
    if resume and ckpt.latest_step() is not None:
        step0 = ckpt.latest_step()
        tree, saved = ckpt.restore(step0, trainer.state_tree())
        if meta and "base_model" in meta and "base_model" in saved:
            from .run_data import fingerprint_diff

            diffs = fingerprint_diff(saved["base_model"], meta["base_model"])
            if diffs:
                raise ValueError(f"{ckpt.directory}: this run was trained on another base model "
                                 f"({saved['base_model']['path']}): {'; '.join(diffs)}")
        trainer.load_state_tree(tree)
        train_iter.restore(saved["data"])
        beta = float(saved["beta"])
        micro = step0 * accum
        log.truncate_after(step0)
    elif ckpt.latest_step() is not None:
        raise FileExistsError(f"{ckpt.directory} already holds checkpoints (step {ckpt.latest_step()}): pass --resume "
                              f"to continue that run, or use another --workdir")
    elif resume:  # killed before its first checkpoint: start over, without the records it logged
        log.truncate_after(0)
    tp = Throughput()
    total_micro = tc.steps * accum
    bar = tqdm(total=tc.steps, initial=micro // accum, desc=desc, dynamic_ncols=True)
    last = {}
    bad = 0
    while micro < total_micro:
        batch = next(train_iter)
        tp.start()
        raw = trainer.step(batch, beta)
        leaf_ok = np.asarray(raw.pop("finite_grad_leaves"))
        metrics = to_host(raw)
        tp.stop(int(batch["input_ids"].size))
        if not metrics.pop("finite"):
            bad += 1
            where = trainer.nonfinite_params(leaf_ok) or ["the loss (gradients finite)"]
            layers = [i for i, ok in zip(trainer.model().cfg.moe_layer_ids, metrics.get("finite_router_logits", []))
                      if not ok]
            if layers:
                where = [f"activations first non-finite at MoE layer {layers[0]}"] + where
            msg = (f"step {micro // accum + 1}: non-finite loss or gradients, step refused "
                   f"({bad} in a row); from {', '.join(where[:4])}{' ...' if len(where) > 4 else ''}")
            bar.write(msg)
            log.write(micro // accum + 1, {"refused": 1.0}, prefix="refused")
            if bad >= tc.max_bad_steps:
                ckpt.close()
                raise FloatingPointError(f"{msg}; stopping after {bad} refused steps in a row. The last good "
                                         f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
            continue
        bad = 0
        metrics.pop("finite_router_logits", None)
        micro += 1
        if micro % accum:
            continue
        step = micro // accum
        kept = float(np.mean(metrics.get("experts_per_layer", [0.0])))
        if controller is not None and target > 0 and "experts_per_layer" in metrics:
            K = trainer.model().cfg.num_experts_per_tok
            beta = float(controller.update(jnp.float32(beta), kept / K, target, controller_rate))
        metrics.update(step=step, beta=beta, experts_per_token=kept, tokens_per_s=tp.tokens_per_s)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", ept=f"{kept:.2f}", tok_s=f"{tp.tokens_per_s:.0f}")
        if step % tc.log_every == 0 or step == tc.steps:
            log.write(step, {k: v for k, v in metrics.items() if k != "step"})
            if on_log is not None:
                on_log(step, metrics)
        if step % tc.ckpt_every == 0 or step == tc.steps:
            ckpt.save(step, trainer.state_tree(), {"step": step, "data": train_iter.state(), "beta": beta,
                                                   **(meta or {})})
        last = metrics
    bar.close()
    ckpt.close()
    return {"final": last, "train_tokens_per_s": tp.tokens_per_s, "peak_memory_bytes": peak_memory_bytes(),
            "log": log.read(), "beta": beta}


def restore_trainable(ckpt_dir, model, step: int | None = None) -> dict:
    """Load a run's trained parameters (e.g. the mask routers) into `model` in place; returns the checkpoint's
    metadata (step, base-model fingerprint, config). `ckpt_dir` is WORKDIR/ckpt or one step's folder in it."""
    ckpt_dir = Path(ckpt_dir).absolute()
    if step is None and ckpt_dir.name.isdigit() and (ckpt_dir / "state").exists():
        step, ckpt_dir = int(ckpt_dir.name), ckpt_dir.parent
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint found (no such directory)")
    mgr = ocp.CheckpointManager(ckpt_dir)
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint found")
    if step not in mgr.all_steps():
        raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint of step {step} (steps: {sorted(mgr.all_steps())})")
    try:
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises several types for a missing or corrupt item
        raise ValueError(f"{ckpt_dir / str(step)}: checkpoint metadata unreadable ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]})") from None
    trainable = trainable_filter(meta.get("trainable", "mask"))
    params = nnx.state(model, trainable)
    target = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(params))}
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    try:
        tree = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(target, restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target),
                                         partial_restore=True)))["state"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{ckpt_dir / str(step)}: trained parameters do not fit {model.cfg.architecture} "
                         f"({e})") from None
    nnx.replace_by_pure_dict(params, tree["params"])
    nnx.update(model, params)
    mgr.close()
    return {"step": step, **meta}
