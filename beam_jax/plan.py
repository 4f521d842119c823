"""`python -m beam_jax.plan --config mixtral.py --devices 8 [--device_memory 80GB] [--config.mesh.fsdp=8]`

Per-device memory of a training run on a mesh, before any weight is read: parameters, optimizer state, and
the activations, gradients and temporaries of one training step, and whether they fit.

How each figure is obtained (no checkpoint needed; nothing is allocated, nothing compiled):
- parameters and optimizer state: exact, from the abstract model (`nnx.eval_shape`) and the optimizer's
  abstract state (`jax.eval_shape(tx.init)`), each leaf divided as `beam_jax.sharding.RULES` lays it out;
- activations, gradients and temporaries of one step: the peak of a liveness walk over the jaxpr of the real
  training step traced for one device's rows of the batch (`step_memory`); platform-independent, so a GPU
  run is planned from a CPU host with the expert path it will use (`experts.training_impl`: grouped there today).

The model's sizes come from `model.path/config.json` when it exists, else from `model.arch` (as in
tiny_pretrain.py), else from the published Hugging Face configs `beam_jax.families` lists, matched by the
directory name.
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import partial
from pathlib import Path

class MemoryPlanError(ValueError):
    """The run does not fit in device memory; the message carries the per-device figures."""


def parse_bytes(text: str | int | float) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '512MB', '1.5TB', or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.I)
    if not m:
        raise ValueError(f"plan.device_memory: cannot read {text!r} as a size (e.g. 80GB, 80GiB, 512MB)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index((m.group(2) or " ").upper()))


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def published_config(name: str):
    """A Hugging Face config object for a published architecture, by repository name
    (`beam_jax.families.published`)."""
    import transformers

    from .families import published

    family, kwargs = published(name)
    return getattr(transformers, family.config_class)(**kwargs)


def model_config(config):
    """(ModelConfig, where it came from) for a run config: config.json, then model.arch, then the published
    sizes of `families.FAMILIES`."""
    from .config import ConfigError
    from .families import published, published_names

    path = Path(config.model.path)
    if (path / "config.json").is_file():
        from .loading import read_config

        return read_config(path)[0], str(path / "config.json")
    if "arch" in config.model and config.model.arch:
        from .config import config_from_arch

        return config_from_arch(config.model.arch), "model.arch"
    if path.name not in published_names():
        raise ConfigError(f"model.path={str(path)!r}: no config.json there, no model.arch, and no published sizes "
                          f"for '{path.name}' (known: {', '.join(published_names())})")
    family, _ = published(path.name)
    return family.build(published_config(path.name)), f"published {path.name} config"


@dataclasses.dataclass
class Plan:
    """Per-device bytes of one training run on a mesh."""

    mesh: dict
    global_batch: int
    rows_per_device: int
    seq_len: int
    num_params: int
    params: int  # parameters (frozen and trainable) held by one device
    opt_state: int  # optimizer state (AdamW moments, accumulation buffers, counters)
    step: int  # activations, gradients, temporaries and the updated state of one step (jaxpr liveness)
    device_memory: int | None = None
    headroom: float = 0.9

    @property
    def total(self) -> int:
        return self.params + self.opt_state + self.step

    @property
    def fits(self) -> bool | None:
        return None if not self.device_memory else self.total <= self.headroom * self.device_memory

    def table(self) -> str:
        mesh = ", ".join(f"{a}={v}" for a, v in self.mesh.items())
        lines = [f"mesh {mesh}; global batch {self.global_batch} x {self.seq_len} tokens "
                 f"({self.rows_per_device} rows per device); {self.num_params / 1e9:.2f}B parameters",
                 f"  parameters        {fmt_bytes(self.params):>12}",
                 f"  optimizer state   {fmt_bytes(self.opt_state):>12}",
                 f"  activations+temp  {fmt_bytes(self.step):>12}",
                 f"  total per device  {fmt_bytes(self.total):>12}"]
        if self.device_memory:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"  device memory     {fmt_bytes(self.device_memory):>12}   -> {verdict} "
                         f"(limit {self.headroom:.0%} = {fmt_bytes(self.headroom * self.device_memory)})")
        return "\n".join(lines)


def _dtypes(config):
    import jax.numpy as jnp

    dtype = jnp.dtype(config.model.dtype)
    param_dtype = dtype if config.train.trainable == "mask" else jnp.dtype("float32")  # as train.py loads
    return dtype, param_dtype


def _abstract_split(cfg, config):
    from flax import nnx

    from .model import MoECausalLM
    from .trainable import trainable_filter

    dtype, param_dtype = _dtypes(config)
    model = nnx.eval_shape(lambda: MoECausalLM(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    model.remat = bool(config.train.remat)
    return nnx.split(model, trainable_filter(config.train.trainable), ...)


def _state_bytes(cfg, config, mesh) -> tuple[int, int, int]:
    """(parameters, optimizer state, parameter count) per device for the full model. The parameters' bytes
    include the frozen teacher copy of the trainable ones that distillation beyond the mask routers keeps
    (`trainer.keeps_teacher_copy`); the count is the model's."""
    import jax

    from . import sharding
    from . import trainer as trainer_lib
    from .trainer import make_optimizer

    _, params, frozen = _abstract_split(cfg, config)
    teacher = trainer_lib.keeps_teacher_copy(config.beam.distill, config.train.trainable)
    total = count = 0
    for tree in (params, frozen):
        copies = 2 if teacher and tree is params else 1
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            spec = sharding.partition_spec(sharding.dotted(p), x.shape, mesh)
            total += copies * sharding.per_device_bytes(x.shape, x.dtype, spec, mesh)
            count += math.prod(x.shape)
    tx = make_optimizer(config.train)
    opt = jax.eval_shape(tx.init, params)
    o_sh = sharding.opt_state_shardings(tx, params, sharding.tree_shardings(params, mesh), mesh)
    opt_bytes = sum(sharding.per_device_bytes(x.shape, x.dtype, s.spec, mesh)
                    for x, s in zip(jax.tree.leaves(opt), jax.tree.leaves(o_sh)))
    return total, opt_bytes, count


def _subjaxprs(eqn):
    from jax.extend import core as jcore

    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, jcore.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jcore.Jaxpr):
                yield x


def liveness_peak(jaxpr, size, freeable=frozenset()) -> int:
    """Peak bytes of the values a jaxpr creates, run in order, each freed after its last use.

    size(var) -> bytes one device holds of it; inputs are not counted (they are the baseline) except that
    those in `freeable` (donated) are released after their last use. A call (pjit, remat, custom_jvp, cond,
    while) counts as its own peak while it runs.
    """
    from jax.extend import core as jcore

    n = len(jaxpr.eqns)
    last = {}
    for i, e in enumerate(jaxpr.eqns):
        for v in e.invars:
            if isinstance(v, jcore.Var):
                last[v] = i
    for v in jaxpr.outvars:
        if isinstance(v, jcore.Var):
            last[v] = n
    keep = (set(jaxpr.invars) | set(jaxpr.constvars)) - set(freeable)
    live = top = 0
    for i, e in enumerate(jaxpr.eqns):
        outs = [v for v in e.outvars if not isinstance(v, jcore.DropVar)]
        out = sum(size(v) for v in outs)
        inner = max((liveness_peak(j, size) for j in _subjaxprs(e)), default=0)
        top = max(top, live + max(inner, out))
        live += out - sum(size(v) for v in outs if v not in last)
        live -= sum(size(v) for v in {x for x in e.invars if isinstance(x, jcore.Var)}
                    if last.get(v) == i and v not in keep)
    return top


def step_memory(cfg, config, mesh, global_batch: int, impl: str) -> int:
    """Per-device peak of the values one training step creates (activations, gradients, temporaries, the
    updated state), by liveness over the step's jaxpr traced for this device's rows of the batch.

    Values shaped like a parameter (gradients, moments, dtype copies) count at that parameter's per-device
    share; other values are activations of the local rows, counted whole (the tensor axis's split of heads
    and expert widths is not subtracted: an upper bound there). With fsdp > 1, two of the largest weights,
    gathered whole, are added: XLA gathers each fsdp-sharded weight just before its matmul.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from . import sharding
    from .routing import beam_hook
    from .trainer import LossConfig, make_optimizer, train_step

    graphdef, params, frozen = _abstract_split(cfg, config)
    tx = make_optimizer(config.train)
    opt = jax.eval_shape(tx.init, params)
    share = {}  # parameter shape -> the fraction of it one device holds
    gathered = 0
    for tree in (params, frozen):
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            spec = sharding.partition_spec(sharding.dotted(p), x.shape, mesh)
            full = math.prod(x.shape) * np.dtype(x.dtype).itemsize
            frac = sharding.per_device_bytes(x.shape, x.dtype, spec, mesh) / full
            share[tuple(x.shape)] = min(share.get(tuple(x.shape), 1.0), frac)
            if mesh.shape["fsdp"] > 1 and "fsdp" in jax.tree.leaves(tuple(spec)):
                gathered = max(gathered, full * frac * mesh.shape["fsdp"])

    def size(v):
        aval = v.aval
        if not hasattr(aval, "dtype"):
            return 0
        shape = tuple(aval.shape)
        b = math.prod(shape) * np.dtype(aval.dtype).itemsize
        return int(b * share.get(shape, 1.0)) if shape else b

    lc = LossConfig(alpha=config.beam.alpha, balance=config.beam.balance,
                    distill=config.beam.distill, hook=beam_hook(config.beam, train=True),
                    impl=impl)
    step = partial(train_step, graphdef, tx, lc)  # the real step function, without materialising a model
    rows, S = global_batch // sharding.batch_shards(mesh), config.data.seq_len
    batch = {"input_ids": jax.ShapeDtypeStruct((rows, S), jnp.int32),
             "targets": jax.ShapeDtypeStruct((rows, S), jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct((rows, S), jnp.float32)}
    # distillation beyond the mask routers keeps a frozen teacher copy of the trainable weights (Trainer.teacher)
    from . import trainer as trainer_lib

    teacher = params if trainer_lib.keeps_teacher_copy(config.beam.distill, config.train.trainable) else None
    closed = jax.make_jaxpr(step)(params, opt, frozen, batch, jax.ShapeDtypeStruct((), jnp.float32), teacher)
    donated = closed.jaxpr.invars[: len(jax.tree.leaves(params)) + len(jax.tree.leaves(opt))]
    return liveness_peak(closed.jaxpr, size, frozenset(donated)) + 2 * int(gathered)


def estimate(config, mesh, *, processes: int = 1, target: str | None = None, device_memory=None) -> Plan:
    """The memory plan of `config` on `mesh` (global batch = data.batch_size x `processes`).

    target: the platform the run will use ("gpu", "cpu"...; default: the mesh's) picks the expert path
    when model.impl is "auto", as train.py does.
    """
    from . import sharding

    cfg, _ = model_config(config)
    target = target or mesh.devices.flat[0].platform
    from .experts import training_impl  # what train.py's model.impl=auto runs on `target`

    impl = config.model.impl if config.model.impl != "auto" else training_impl(target)
    global_batch = config.data.batch_size * processes
    sharding.check_batch(global_batch, mesh)
    params, opt_bytes, count = _state_bytes(cfg, config, mesh)
    step = step_memory(cfg, config, mesh, global_batch, impl)
    mem = parse_bytes(device_memory) if device_memory else None
    return Plan(dict(mesh.shape), global_batch, global_batch // sharding.batch_shards(mesh), config.data.seq_len,
                count, params, opt_bytes, step, mem, float(config.plan.headroom))


def device_memory_of(config, devices) -> int | None:
    """plan.device_memory if set, else what the device reports (`bytes_limit`, GPUs), else None (CPU)."""
    if config.plan.device_memory:
        return parse_bytes(config.plan.device_memory)
    stats = devices[0].memory_stats() or {}
    return int(stats["bytes_limit"]) if "bytes_limit" in stats else None


def check_fits(config, mesh, processes: int = 1) -> Plan | None:
    """Before training: estimate, and refuse (MemoryPlanError with the figures) a run that does not fit.
    Skipped (None) where the device memory is unknown (CPU without plan.device_memory)."""
    mem = device_memory_of(config, list(mesh.devices.flat))
    if mem is None:
        return None
    plan = estimate(config, mesh, processes=processes, device_memory=mem)
    if not plan.fits:
        raise MemoryPlanError(f"the run does not fit in device memory (plan.device_memory, "
                              f"plan.headroom):\n{plan.table()}\nreduce data.batch_size or data.seq_len, set "
                              f"train.remat=True, or shard more (mesh.fsdp, mesh.expert)")
    return plan


def default_mesh_spec(config, devices: int) -> dict:
    """The config's mesh, or (when it is the single-device default) fsdp over all devices."""
    spec = {a: int(config.mesh[a]) for a in ("data", "fsdp", "expert", "tensor")}
    if devices > 1 and all(v == 1 for v in spec.values()):
        spec["fsdp"] = devices
    return spec


def plan_run(config, workdir=None, resume=False) -> int:
    """The CLI's body (`cli.run` calls it with the parsed config): print the plan for `--devices` devices.
    Exit status 0 when it fits (or no memory was given), 1 when not."""
    import jax
    from absl import flags

    FLAGS = flags.FLAGS
    jax.config.update("jax_num_cpu_devices", max(FLAGS.devices, 1))  # simulated CPU devices to compile for
    from .sharding import make_mesh

    mesh = make_mesh(default_mesh_spec(config, FLAGS.devices), jax.devices("cpu")[: FLAGS.devices])
    plan = estimate(config, mesh, processes=FLAGS.processes, target=FLAGS.target,
                    device_memory=FLAGS.device_memory or config.plan.device_memory or None)
    cfg, source = model_config(config)
    print(f"{cfg.architecture} ({source}), {config.model.dtype}, train.trainable={config.train.trainable}, "
          f"remat={config.train.remat}, grad_accum={config.train.grad_accum}, target {FLAGS.target}")
    print(plan.table())
    return 0 if plan.fits in (None, True) else 1


def define_flags():
    from absl import flags

    flags.DEFINE_integer("devices", 1, "devices in the mesh (all processes)", lower_bound=1)
    flags.DEFINE_integer("processes", 1, "processes (hosts); data.batch_size is per process", lower_bound=1)
    flags.DEFINE_string("device_memory", "", "per-device memory, e.g. 80GB (default: plan.device_memory)")
    flags.DEFINE_string("target", "gpu", "platform the run will use: picks the expert path (gpu)")


if __name__ == "__main__":
    from .cli import run

    define_flags()
    run(plan_run, "mixtral.py")
