"""Device mesh and partition rules: how parameters, optimizer state and batches are laid out over devices.

The mesh has four named axes, sized by the config's `mesh` section (`-1` = the remaining devices):

    data    batch (pure data parallelism: parameters replicated)
    fsdp    batch, and the model width d of every weight (ZeRO-3 style: each device holds a slice of each)
    expert  batch, and the expert dimension E of the routed experts (expert parallelism)
    tensor  the heads / expert-width / vocabulary dimension of the weights (Megatron style)

Parameters follow the logical-axis table below: a parameter's dotted path (as in `MoECausalLM`, e.g.
`layers.3.mlp.experts.w_gate`) matches one rule, giving a logical axis per dimension, and LOGICAL maps each
logical axis to mesh axes. BEAM's mask routers and the routers are small and replicated; every other weight
is sharded. Batches [B, S] are sharded over B by (data, fsdp, expert). A dimension that its mesh axes do not
divide is refused with the parameter, dimension and `mesh.<axis>` field named.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axes it is sharded over (the one table naming the sharding axes)
LOGICAL: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),  # tokens: every axis that does not split a weight's contraction
    "embed": ("fsdp",),  # model width d
    "vocab": ("tensor",),  # V of the embedding and LM head
    "heads": ("tensor",),  # H * head_dim of attention projections
    "mlp": ("tensor",),  # f of (shared) expert and dense MLPs
    "expert": ("expert",),  # E of the routed experts' stacked weights
}

# (regex on the dotted parameter path, logical axis per dimension; None = not sharded). First match wins.
RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"mask_router\.(kernel|bias)$", ()),  # BEAM's mask routers [d, E]: trainable, small, replicated
    (r"mlp\.gate\.(kernel|bias|e_score_correction_bias)$", ()),  # the router [d, E] (and its [E] bias): replicated
    (r"shared_expert_gate\.(kernel|bias)$", ()),
    (r"embed_tokens\.embedding$", ("vocab", "embed")),  # [V, d]
    (r"lm_head\.kernel$", ("embed", "vocab")),  # [d, V]
    (r"experts\.w_(gate|up)$", ("expert", "embed", "mlp")),  # [E, d, f]
    (r"experts\.w_down$", ("expert", "mlp", "embed")),  # [E, f, d]
    (r"(gate_proj|up_proj)\.kernel$", ("embed", "mlp")),  # [d, f]
    (r"(gate_proj|up_proj)\.bias$", ("mlp",)),
    (r"down_proj\.kernel$", ("mlp", "embed")),  # [f, d]
    (r"(q_proj|k_proj|v_proj)\.kernel$", ("embed", "heads")),  # [d, H*D]
    (r"(q_proj|k_proj|v_proj)\.bias$", ("heads",)),
    (r"o_proj\.kernel$", ("heads", "embed")),  # [H*D, d]
    (r"(q_a_proj|kv_a_proj_with_mqa)\.kernel$", ("embed", None)),  # MLA down-projections [d, r]
    (r"(q_b_proj|kv_b_proj)\.kernel$", (None, "heads")),  # MLA up-projections [r, H*D]
    (r"(norm|layernorm)\.weight$", ()),  # every RMSNorm
    (r"\.bias$", ()),  # remaining biases ([d] or [r]): replicated
)


class ShardingError(ValueError):
    """A mesh or a parameter layout is invalid; the message names the config field or parameter."""


def mesh_shape(spec: Mapping[str, Any], num_devices: int) -> dict[str, int]:
    """{data, fsdp, expert, tensor} sizes from the config's `mesh` section; at most one may be -1 (the rest)."""
    spec = dict(spec)
    unknown = sorted(set(spec) - set(AXES))
    if unknown:
        raise ShardingError(f"mesh.{unknown[0]}: unknown mesh axis; the axes are {', '.join(AXES)}")
    sizes = {a: int(spec.get(a, 1)) for a in AXES}
    for a, v in sizes.items():
        if v == 0 or v < -1:
            raise ShardingError(f"mesh.{a} must be a positive size or -1 (the remaining devices), got {v}")
    fill = [a for a, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ShardingError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + a for a in fill)}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if num_devices % fixed:
            raise ShardingError(f"mesh.{fill[0]}=-1: the other axes ({_fmt(sizes)}) use {fixed} devices, "
                                f"which does not divide the {num_devices} devices")
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ShardingError(f"mesh {_fmt(sizes)} needs {math.prod(sizes.values())} devices, but there are "
                            f"{num_devices}: set the mesh sizes so their product is {num_devices} (or one to -1)")
    return sizes


def _fmt(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{a}={v}" for a, v in sizes.items())


def make_mesh(spec: Mapping[str, Any] | None = None, devices=None) -> Mesh:
    """A `Mesh` with axes (data, fsdp, expert, tensor) over `devices` (default: all, across processes).

    Devices are laid out in `jax.devices()` order, process-major, so the outer axes (data first) span hosts
    and the inner ones (tensor last) stay inside a host, where the interconnect is fastest.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(spec or {}, len(devices))
    return Mesh(np.array(devices, dtype=object).reshape([sizes[a] for a in AXES]), AXES)


def logical_axes(path: str) -> tuple[str | None, ...]:
    """The logical axis of each dimension of the parameter at dotted `path` (RULES, first match)."""
    for pattern, axes in RULES:
        if re.search(pattern, path):
            return axes
    raise ShardingError(f"no sharding rule for parameter '{path}': add one to beam_jax.sharding.RULES")


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec of parameter `path` [shape] on `mesh`; refuses a dimension its mesh axes do not divide."""
    axes = logical_axes(path)
    if axes and len(axes) != len(shape):
        raise ShardingError(f"parameter '{path}' has shape {tuple(shape)}, its sharding rule names {len(axes)} "
                            f"dimensions {axes}")
    spec = []
    for dim, (n, logical) in enumerate(zip(shape, axes or (None,) * len(shape))):
        mesh_axes = tuple(a for a in LOGICAL.get(logical, ()) if mesh.shape[a] > 1) if logical else ()
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if n % size:
            raise ShardingError(f"parameter '{path}' dimension {dim} ({logical}, size {n}) is not divisible by "
                                f"{' x '.join(f'mesh.{a}={mesh.shape[a]}' for a in mesh_axes)}")
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*spec)


def param_sharding(path: str, shape, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(path, tuple(shape), mesh))


def dotted(key_path) -> str:
    """A jax key path of an `nnx.State` leaf -> the dotted parameter path (`layers.0.mlp.gate.kernel`)."""
    return jax.tree_util.keystr(key_path, simple=True, separator=".").removesuffix(".value")


def tree_shardings(tree, mesh: Mesh):
    """Shardings for every leaf of an `nnx.State` (or pure dict) of parameters, by their paths."""
    return jax.tree.map_with_path(lambda p, x: param_sharding(dotted(p), x.shape, mesh), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in LOGICAL["batch"] if mesh.shape[a] > 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [B, S] batch: B over (data, fsdp, expert)."""
    axes = batch_axes(mesh)
    return NamedSharding(mesh, P(axes or None, None))


def batch_shards(mesh: Mesh) -> int:
    """How many slices a global batch is cut into (each device holds B / this rows)."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def check_batch(global_batch: int, mesh: Mesh, field: str = "data.batch_size") -> None:
    n = batch_shards(mesh)
    if global_batch % n:
        raise ShardingError(f"{field}: the global batch of {global_batch} rows is not divisible by the "
                            f"{n} batch shards ({' x '.join(f'mesh.{a}={mesh.shape[a]}' for a in batch_axes(mesh))})")


def opt_state_shardings(tx, params, param_shardings, mesh: Mesh):
    """Shardings of `tx.init(params)`: moments like their parameters, counters and scalars replicated.

    A moment is recognised by its key path ending in a parameter's path with that parameter's shape, so states
    that hold only some parameters (optax.multi_transform: `train.base_lr`) are laid out too."""
    abstract = jax.eval_shape(tx.init, params)
    rep = replicated(mesh)
    key = lambda path: tuple(str(k) for k in path)  # noqa: E731
    by_path = {key(p): (v.shape, sh) for (p, v), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                                           jax.tree.leaves(param_shardings))}
    depth = max((len(k) for k in by_path), default=0)

    def one(path, leaf):
        k = key(path)
        for n in range(min(depth, len(k)), 0, -1):
            hit = by_path.get(k[-n:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(one, abstract)


def put_batch(x, sharding: NamedSharding) -> jax.Array:
    """This process's rows [B_local, S] -> the global [B_local * processes, S] array on the mesh."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def per_device_bytes(shape, dtype, spec: P, mesh: Mesh) -> int:
    """Bytes one device holds of an array [shape] laid out by `spec` on `mesh`."""
    n = math.prod(shape) * np.dtype(dtype).itemsize
    for entry in spec:
        for a in (entry if isinstance(entry, tuple) else (entry,) if entry else ()):
            n //= mesh.shape[a]
    return n
