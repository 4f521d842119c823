"""The training loop shared by `beam_jax.train` (BEAM mask routers) and `beam_jax.pretrain` (a base model).

The model is split into the trainable parameters (an `nnx` filter: the mask routers, the routers, or all)
and the frozen rest; `jax.grad` runs over the trainable `nnx.State` only, optax updates it, and orbax saves
only it (plus optimizer state, step, RNG, data position and the beta controller) under `workdir/ckpt`
(`beam_jax.checkpoint`); `beam_jax.metrics` records the run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from . import beam
from .checkpoint import Checkpointer
from .flops import experts_per_token_per_layer
from .metrics import MetricsLog, NoLog, Throughput, peak_memory_bytes, to_host
from .trainable import trainable_filter


def _optimizer_group(path) -> str:
    """A parameter's group under `train.base_lr`: "mask" for BEAM's mask routers, "base" for the rest."""
    return "mask" if "mask_router" in jax.tree_util.keystr(path) else "base"


def make_optimizer(tc) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay, global-norm clipping and gradient accumulation.

    `tc.base_lr` > 0 (train.trainable mask+router or all): the trained parameters other than the mask routers
    follow the same schedule at that peak rate instead of `tc.lr` (a fresh mask router learns fast, a pretrained
    model must move little)."""
    warmup = max(tc.warmup_steps, 1)  # optax needs >= 1 warm-up step and >= 1 decay step (train.steps may be 1)

    def adamw(lr):
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(tc.steps, warmup + 1),
                                                   end_value=lr * tc.final_lr_fraction)
        return optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=tc.weight_decay)

    base_lr = float(getattr(tc, "base_lr", 0.0) or 0.0)  # a ConfigDict or any namespace (bench/gpu_train.py)
    if base_lr > 0:
        update = optax.multi_transform({"mask": adamw(tc.lr), "base": adamw(base_lr)},
                                       lambda params: jax.tree_util.tree_map_with_path(
                                           lambda p, _: _optimizer_group(p), params))
    else:
        update = adamw(tc.lr)
    # grad_clip 0 = no clipping (optax's clip_by_global_norm(0) would zero every update)
    tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip), update) if tc.grad_clip > 0 else update
    if tc.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=tc.grad_accum)
    return tx


@dataclasses.dataclass
class LossConfig:
    alpha: float = 0.0  # load-balancing coefficient
    balance: str = "pooled"  # "pooled": transformers' multi-layer loss; "per_layer": each layer's own, averaged
    hook: Any = None  # routing hook used in training (e.g. BeamHook(train=True))
    impl: str = "dense"  # expert path
    distill: float = 0.0  # weight of KL(Top-K teacher || student) in the task loss: (1 - d) * L_lm + d * L_kl


def keeps_teacher_copy(distill: float, trainable: str) -> bool:
    """Whether distillation needs a frozen copy of the trainable weights as its teacher: when more than the mask
    routers train (mask-only training leaves the model as loaded, so the student under Top-K is the teacher)."""
    return distill > 0 and trainable != "mask"


def compute_loss(model, batch, beta, lc: LossConfig, teacher=None):
    """-> (total, metrics). batch: input_ids, targets, loss_mask [B, S].
    teacher: the model whose Top-K logits `lc.distill` matches (the weights as loaded, when training changes
    more than the mask routers); None = `model` itself under Top-K (what mask-only training leaves unchanged)."""
    cfg = model.cfg
    out = model(batch["input_ids"], mask_hook=lc.hook, impl=lc.impl)
    lm, ntok = beam.lm_loss(out.logits, batch["targets"], batch["loss_mask"])
    acc, _ = beam.next_token_accuracy(out.logits, batch["targets"], batch["loss_mask"])
    valid = (batch["loss_mask"] > 0).reshape(-1)
    metrics = {"lm_loss": lm, "accuracy": acc, "tokens": ntok}
    total = lm
    if lc.distill > 0:  # the teacher under plain Top-K, no gradient
        t_logits = (model if teacher is None else teacher)(batch["input_ids"], impl=lc.impl).logits
        kl, _ = beam.distill_loss(out.logits, t_logits, batch["loss_mask"])
        metrics["distill_loss"] = kl
        total = (1 - lc.distill) * lm + lc.distill * kl
    if out.moe:
        T = valid.shape[0]
        logits = [m.router_logits.reshape(T, -1) for m in out.moe]
        ids = [m.topk_ids.reshape(T, -1) for m in out.moe]
        balance_loss = {"pooled": beam.load_balancing_loss_layers,
                        "per_layer": beam.load_balancing_loss_per_layer}[lc.balance]
        bal = balance_loss(logits, ids, cfg.num_experts, cfg.num_experts_per_tok, valid)
        metrics["balance_loss"] = bal
        metrics["load_min_over_mean"] = beam.expert_load_min_over_mean(ids, cfg.num_experts, valid)
        total = total + lc.alpha * bal
        kept = [m.kept.reshape(T, -1) for m in out.moe]
        metrics["experts_per_layer"] = experts_per_token_per_layer(kept, valid)
        metrics["finite_router_logits"] = jnp.stack([jnp.all(jnp.isfinite(x)) for x in logits])
        if out.moe[0].m_hat is not None:  # BEAM's hooks
            regs = jnp.stack([beam.reg_loss(m.m_hat.reshape(T, -1), valid) for m in out.moe])
            metrics["reg_loss"] = jnp.mean(regs)
            # beta: a scalar, or [L] one per MoE layer (beam.controller = "per_layer")
            total = total + jnp.mean(beta * regs)
    metrics["loss"] = total
    return total, metrics


def _split_loss(graphdef, lc: LossConfig, params, frozen, batch, beta, teacher=None):
    t_model = None if teacher is None else nnx.merge(graphdef, teacher, frozen)  # not differentiated (argnums)
    return compute_loss(nnx.merge(graphdef, params, frozen), batch, beta, lc, teacher=t_model)


def train_step(graphdef, tx, lc: LossConfig, params, opt_state, frozen, batch, beta, teacher=None):
    """One optimizer step as a pure function of the split model (`nnx.split`: graphdef, trainable `params`,
    `frozen` rest) -> (params, opt_state, metrics). A step whose loss or gradients are not finite is refused:
    parameters and optimizer state come back as they were, metrics["finite"] False. `teacher`: the trainable
    parameters of the distillation teacher (`Trainer.teacher`), None = the model itself (see compute_loss)."""
    (loss, metrics), grads = jax.value_and_grad(_split_loss, argnums=2, has_aux=True)(graphdef, lc, params, frozen,
                                                                                     batch, beta, teacher)
    metrics["grad_norm"] = optax.tree.norm(grads)
    leaf_ok = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    ok = jnp.isfinite(loss) & jnp.all(leaf_ok)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    metrics["finite"] = ok
    metrics["finite_grad_leaves"] = leaf_ok
    return keep(new_params, params), keep(new_opt, opt_state), metrics


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
        # distillation when more than the mask routers train: the teacher is the model as loaded (a frozen copy
        # of the trainable weights, made here, before any step or restore), not the drifting student
        self.teacher = None
        if keeps_teacher_copy(lc.distill, trainable):
            self.teacher = jax.tree.map(jnp.copy, self.params)
        if mesh is None:
            self.opt_state = self.tx.init(self.params)
            self._step = jax.jit(self._train_step, donate_argnums=(0, 1))
            self._eval = jax.jit(self._eval_step)
            return
        from . import sharding

        p_sh, f_sh = sharding.tree_shardings(self.params, mesh), sharding.tree_shardings(self.frozen, mesh)
        self.params, self.frozen = jax.device_put(self.params, p_sh), jax.device_put(self.frozen, f_sh)
        if self.teacher is not None:
            self.teacher = jax.device_put(self.teacher, p_sh)
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

    def loss(self, params, frozen, batch, beta, teacher=None):
        """-> (total loss, metrics) of the split model on a device batch (`_put`), differentiable in params.
        teacher: the distillation teacher's trainable parameters (`self.teacher`); None = the model itself."""
        return _split_loss(self.graphdef, self.lc, params, frozen, batch, beta, teacher)

    def _train_step(self, params, opt_state, frozen, batch, beta, teacher=None):
        return train_step(self.graphdef, self.tx, self.lc, params, opt_state, frozen, batch, beta, teacher)

    def _eval_step(self, params, frozen, batch, beta, teacher=None):
        return self.loss(params, frozen, batch, beta, teacher)[1]

    def step(self, batch, beta) -> dict:
        """beta: the sparsity coefficient, a float or one per MoE layer."""
        batch = self._put(batch)
        self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, self.frozen, batch,
                                                          jnp.asarray(beta, jnp.float32), self.teacher)
        return metrics

    def nonfinite_params(self, leaf_ok) -> list[str]:
        """Names of the trainable parameters whose gradient was not finite (`finite_grad_leaves` is False)."""
        paths = [jax.tree_util.keystr(p, simple=True, separator=".").removesuffix(".value")
                 for p, _ in jax.tree_util.tree_flatten_with_path(self.params)[0]]
        return [p for p, ok in zip(paths, np.asarray(leaf_ok)) if not ok]

    def evaluate(self, batch, beta=0.0) -> dict:
        batch = self._put(batch)
        return self._eval(self.params, self.frozen, batch, jnp.asarray(beta, jnp.float32), self.teacher)

    # ---- checkpoint state: only the trainable parameters and the optimizer state
    def state_tree(self) -> dict:
        return {"params": nnx.to_pure_dict(self.params),
                "opt": {str(i): x for i, x in enumerate(jax.tree.leaves(self.opt_state))}}

    def load_state_tree(self, tree: dict):
        nnx.replace_by_pure_dict(self.params, tree["params"])
        leaves, treedef = jax.tree.flatten(self.opt_state)
        self.opt_state = jax.tree.unflatten(treedef, [jnp.asarray(tree["opt"][str(i)]) for i in range(len(leaves))])


def fit(trainer: Trainer, train_iter, workdir: Path, tc, *, beta: float = 0.0, controller=None, target: float = 0.0,
        controller_rate: float = 0.05, per_layer_beta: bool = False, resume: bool = False, meta: dict | None = None,
        desc: str = "train", on_log: Callable[[int, dict], None] | None = None) -> dict:
    """Run `tc.steps` optimizer steps (each `tc.grad_accum` micro-batches), logging and checkpointing.

    With a `controller` and `target` > 0, beta follows the kept fraction of Top-K pairs towards `target`: one
    beta for the model, or with `per_layer_beta` one per MoE layer, each following its own layer's kept fraction
    (so every layer keeps about `target` of its pairs).

    With `resume`, restores the latest checkpoint in `workdir/ckpt` (trainable params, optimizer state,
    data position, beta) and continues exactly where it stopped. Returns a summary dict.
    """
    from tqdm.auto import tqdm

    workdir = Path(workdir)
    ckpt = Checkpointer(workdir / "ckpt", tc.keep_ckpts)
    # one writer of metrics.jsonl / TensorBoard: process 0 (every process saves its shards of the checkpoints)
    log = MetricsLog(workdir, resume) if jax.process_index() == 0 else NoLog()
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
        ckpt.prune()  # a kill right after a save can leave keep + 1 checkpoints, and the last step may be saved
        beta = saved["beta"]
        micro = step0 * accum
        log.truncate_after(step0)
    elif ckpt.latest_step() is not None:
        raise FileExistsError(f"{ckpt.directory} already holds checkpoints (step {ckpt.latest_step()}): pass --resume "
                              f"to continue that run, or use another --workdir")
    elif resume:  # killed before its first checkpoint: start over, without the records it logged
        log.truncate_after(0)
    n_moe = len(trainer.model().cfg.moe_layer_ids)
    beta = _beta_value(beta, n_moe if per_layer_beta else 0)
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
            observed = np.asarray(metrics["experts_per_layer"]) / K if per_layer_beta else kept / K
            beta = _beta_value(np.asarray(controller.update(jnp.asarray(beta, jnp.float32), observed, target,
                                                            controller_rate)), n_moe if per_layer_beta else 0)
        metrics.update(step=step, beta=beta, experts_per_token=kept, tokens_per_s=tp.tokens_per_s)
        bar.update(1)
        post = dict(loss=f"{metrics['loss']:.3f}", ept=f"{kept:.2f}", tok_s=f"{tp.tokens_per_s:.0f}")
        if "load_min_over_mean" in metrics:  # the least-loaded expert of the worst layer, over the mean load
            post["load_min"] = f"{float(np.min(metrics['load_min_over_mean'])):.2f}"
        bar.set_postfix(**post)
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


def _beta_value(beta, per_layer: int):
    """beta as the loop keeps it (and checkpoints, logs and reports it): a float, or with `per_layer` > 0 a list
    of that many floats (a scalar is broadcast: the configured beta is each layer's start)."""
    if not per_layer:
        return float(np.mean(beta))
    b = np.broadcast_to(np.asarray(beta, np.float64), (per_layer,)) if np.ndim(beta) == 0 else np.asarray(beta)
    if b.shape != (per_layer,):
        raise ValueError(f"per-layer beta has {b.shape[0]} values for {per_layer} MoE layers")
    return [float(x) for x in b]
