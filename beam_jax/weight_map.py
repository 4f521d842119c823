"""The one table of weight names: this package's parameter paths <-> Hugging Face checkpoint tensors.

Each entry of `TABLE` is (parameter path pattern, its layouts); a layout is (HF name template, transform):

- `as_stored`: the tensor is the parameter (norm weights, biases, the embedding, DeepSeek-V3's / GLM-4.5's
  `gate.e_score_correction_bias` [E] float32);
- `transpose`: a Linear kernel, ours [in, out] = the stored weight [out, in] transposed;
- `stack_experts`: one tensor per expert (`...experts.{e}.{gate_proj|up_proj|down_proj}.weight` [out, in], Mixtral's
  `w1|w3|w2`: `Family.expert_names`), each transposed, stacked into ours [E, in, out];
- `fused_experts`: `...experts.gate_up_proj` [E, 2f, d] (gate rows, then up rows) or `...experts.down_proj`
  [E, d, f], the projection's rows taken and the last two dimensions swapped.

`{hf}` in a template is the layer's HF module name (`families.hf_name`); in an MoE layer a second candidate is the
in-memory name (`model.` + our path: fused-era checkpoints keep `mlp` where the family says `block_sparse_moe`).
BEAM's mask router (`mask_router.weight` [E, d], float32) sits next to whichever name the layer's router has, and is
optional: a base checkpoint has none.

`resolve` looks one parameter up in a checkpoint's set of tensor names and returns a frozen `Source`; a lookup that
matches no candidate, or two (both `...block_sparse_moe.gate.weight` and `...mlp.gate.weight`), is a
`CheckpointError` naming the tensors. `Source.read(get, window)` builds the parameter (or a [start, stop) window
of it, in our layout) from `get(name, stored window)`, so the single-device loader (whole) and the sharded loader
(each device's window) share it; `Source.write(value)` is the way back, {HF name: array}.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Container

import numpy as np

from .config import ModelConfig
from .families import Family, hf_name

AS_STORED, TRANSPOSE, STACK_EXPERTS, FUSED_EXPERTS = "as_stored", "transpose", "stack_experts", "fused_experts"


class CheckpointError(ValueError):
    """A checkpoint tensor is missing, unexpected, ambiguous, of the wrong shape, or a file is unreadable.
    `tensors`: the checkpoint names the error is about (those looked for, or those that clash)."""

    def __init__(self, message: str, tensors: tuple[str, ...] = ()):
        super().__init__(message)
        self.tensors = tuple(tensors)


class MissingTensor(CheckpointError):
    """No tensor of the checkpoint is the parameter (`tensors`: the names looked for, the family's first)."""


class AmbiguousTensor(CheckpointError):
    """Two or more tensors of the checkpoint could each be the parameter (`tensors`: those)."""


class LayoutError(CheckpointError):
    """A parameter cannot be written back into the layout its checkpoint stores it in (fused experts)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    template: str  # {hf}: HF module; {moe}: the MoE block as its router names it; {e}: expert; {gate|up|down}; {leaf}
    transform: str
    part: int = 0  # fused_experts: which block of rows of stored dimension 1 is ours (gate_up_proj: 0 gate, 1 up)
    parts: int = 1  # fused_experts: how many such blocks it holds (gate_up_proj: 2)


@dataclasses.dataclass(frozen=True)
class Entry:
    pattern: str  # over our dotted path; group `module` is the module whose HF name fills {hf}
    layouts: tuple[Layout, ...]
    optional: bool = False  # absent from a base checkpoint: the parameter starts at zero
    dtype: str | None = None  # the dtype the table fixes for it (written so; loaded into the model's own)


_EXPERTS = r"(?P<module>layers\.\d+\.mlp\.experts)"
TABLE: tuple[Entry, ...] = (
    Entry(r"embed_tokens\.embedding", (Layout("model.embed_tokens.weight", AS_STORED),)),
    Entry(r"(?P<module>layers\.\d+\.mlp)\.mask_router\.kernel",
          (Layout("{moe}.mask_router.weight", TRANSPOSE),), optional=True, dtype="float32"),
    Entry(r"(?P<module>layers\.\d+\.mlp)\.mask_router\.bias",
          (Layout("{moe}.mask_router.bias", AS_STORED),), optional=True, dtype="float32"),
    Entry(_EXPERTS + r"\.w_gate", (Layout("{hf}.{e}.{gate}.weight", STACK_EXPERTS),
                                   Layout("{hf}.gate_up_proj", FUSED_EXPERTS, 0, 2))),
    Entry(_EXPERTS + r"\.w_up", (Layout("{hf}.{e}.{up}.weight", STACK_EXPERTS),
                                 Layout("{hf}.gate_up_proj", FUSED_EXPERTS, 1, 2))),
    Entry(_EXPERTS + r"\.w_down", (Layout("{hf}.{e}.{down}.weight", STACK_EXPERTS),
                                   Layout("{hf}.down_proj", FUSED_EXPERTS))),
    Entry(r"(?P<module>layers\.\d+\.mlp\.gate)\.e_score_correction_bias",
          (Layout("{hf}.e_score_correction_bias", AS_STORED),), dtype="float32"),
    Entry(r"(?P<module>.+)\.kernel", (Layout("{hf}.weight", TRANSPOSE),)),
    Entry(r"(?P<module>.+)\.(?P<leaf>[^.]+)", (Layout("{hf}.{leaf}", AS_STORED),)),
)
_COMPILED = tuple((re.compile(e.pattern), e) for e in TABLE)


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one parameter lives in a checkpoint: its tensor(s), their stored shapes, and the transform."""

    param: str  # our dotted parameter path
    shape: tuple[int, ...]  # the parameter's shape (our layout)
    transform: str
    names: tuple[str, ...]  # checkpoint tensors: one, or one per expert (stack_experts)
    shapes: tuple[tuple[int, ...], ...]  # their stored shapes
    offset: int = 0  # fused_experts: first row of this projection in stored dimension 1
    dtype: str | None = None  # written in this dtype where the table fixes one (mask routers: float32)

    def read(self, get: Callable, window=None):
        """The parameter, or its [window] (one (start, stop) per dimension of ours), from `get(name, stored
        window)` -> array; whole when `window` is None. Reads only the stored bytes the window needs."""
        w = [tuple(x) for x in window] if window is not None else [(0, n) for n in self.shape]
        return _READ[self.transform](self, get, w)

    def write(self, value) -> dict[str, np.ndarray]:
        """The way back: our array -> {checkpoint name: array} in the stored layout."""
        if self.transform == FUSED_EXPERTS:
            raise LayoutError(f"'{self.names[0]}' holds every expert's projections fused: {self.param} cannot be "
                              f"written back into it alone", self.names)
        v = np.asarray(value)
        if self.dtype is not None:
            v = v.astype(self.dtype)
        if self.transform == AS_STORED:
            return {self.names[0]: v}
        if self.transform == TRANSPOSE:
            return {self.names[0]: np.ascontiguousarray(v.T)}
        return {n: np.ascontiguousarray(v[e].T) for e, n in enumerate(self.names)}  # stack_experts


def _read_as_stored(s: Source, get, w):
    return get(s.names[0], w)


def _read_transpose(s: Source, get, w):  # ours [in, out] = stored [out, in].T
    return get(s.names[0], w[::-1]).T


def _read_stacked(s: Source, get, w):  # ours [E, in, out] = stack of stored [out, in].T, experts w[0]
    return np.stack([get(s.names[e], [w[2], w[1]]).T for e in range(*w[0])])


def _read_fused(s: Source, get, w):  # ours [E, in, out] = stored [E, rows offset.., in] with the last two swapped
    return get(s.names[0], [w[0], (w[2][0] + s.offset, w[2][1] + s.offset), w[1]]).transpose(0, 2, 1)


_READ = {AS_STORED: _read_as_stored, TRANSPOSE: _read_transpose, STACK_EXPERTS: _read_stacked,
         FUSED_EXPERTS: _read_fused}


def _stored_shapes(layout: Layout, shape: tuple[int, ...], n: int) -> tuple[tuple[int, ...], ...]:
    if layout.transform == AS_STORED:
        return (shape,)
    if layout.transform == TRANSPOSE:
        return (shape[::-1],)
    if layout.transform == STACK_EXPERTS:  # ours [E, in, out]: each expert stored [out, in]
        return ((shape[2], shape[1]),) * n
    return ((shape[0], shape[2] * layout.parts, shape[1]),)  # gate_up_proj [E, 2f, d], down_proj [E, d, f]


def modules(family: Family, cfg: ModelConfig, module: str) -> tuple[str, ...]:
    """The HF names one of our modules may have: the family's; in an MoE layer also the in-memory one."""
    keys = module.split(".")
    is_moe = keys[0] == "layers" and len(keys) > 1 and cfg.moe_layers[int(keys[1])]
    out = [hf_name(family, module, is_moe)]
    if is_moe and "model." + module not in out:
        out.append("model." + module)  # fused-era checkpoints keep the name `mlp`
    return tuple(out)


def entry_for(path: str) -> tuple[Entry, re.Match]:
    for rx, entry in _COMPILED:
        m = rx.fullmatch(path)
        if m:
            return entry, m
    raise KeyError(path)  # unreachable: the last entry matches every dotted path


def resolve(family: Family, cfg: ModelConfig, path, shape, names: Container[str] | None = None, *,
            optional: bool | None = None, writing: bool = False, where: str = "checkpoint") -> Source | None:
    """Our parameter `path` (dotted, or a tuple of keys) of `shape` -> its `Source` among the checkpoint's tensor
    `names` (None: the family's own names and the per-expert layout, as `export_hf` writes them).

    optional (default: the table's): a parameter none of whose names is present resolves to None instead of an
    error. writing: name an optional parameter next to its anchor (the router) even though the checkpoint lacks it
    (`convert.to_vllm` adds the mask routers to a base checkpoint). `where` starts the error messages."""
    path = path if isinstance(path, str) else ".".join(map(str, path))
    shape = tuple(int(n) for n in shape)
    entry, m = entry_for(path)
    optional = entry.optional if optional is None else optional
    groups = m.groupdict()
    module = groups.get("module")
    fill = {"leaf": groups.get("leaf"), **dict(zip(("gate", "up", "down"), family.expert_names))}
    if "{moe}" in entry.layouts[0].template:  # next to whichever name the layer's router has
        hfs = (_moe_block(family, cfg, module, names, where),)
    else:
        hfs = modules(family, cfg, module) if module is not None else ("",)
    n_experts = shape[0] if entry.layouts[0].transform == STACK_EXPERTS else 1
    options, seen = [], set()
    for layout in entry.layouts:
        for hf in hfs:
            first = layout.template.format(hf=hf, moe=hf, e=0, **fill)
            if first not in seen:
                seen.add(first)
                options.append((first, layout, hf))
    matched = options[:1] if names is None else [o for o in options if o[0] in names]
    if not matched and writing and optional:
        matched = options[:1]
    if not matched:
        if optional:
            return None
        looked = tuple(o[0] for o in options)
        if len(entry.layouts) > 1:  # experts: no layout at all
            keys = path.split(".")
            raise MissingTensor(f"{where}: no expert tensors for layer {keys[1]} ({keys[-1]}): looked for "
                                f"{_listed(looked)}", looked)
        also = f" (for {path}; also looked for {_listed(looked[1:])})" if len(looked) > 1 else f" (for {path})"
        raise MissingTensor(f"{where}: tensor '{looked[0]}' is missing from the checkpoint{also}", looked)
    if len(matched) > 1:
        clash = tuple(o[0] for o in matched)
        raise AmbiguousTensor(f"{where}: {path} matches {len(clash)} checkpoint tensors, {_listed(clash)}: refusing "
                              f"to choose (a checkpoint holds each weight under one name)", clash)
    _, layout, hf = matched[0]
    if layout.transform == STACK_EXPERTS:
        tensor_names = tuple(layout.template.format(hf=hf, e=e, **fill) for e in range(n_experts))
        for e, n in enumerate(tensor_names):
            if names is not None and n not in names:
                raise MissingTensor(f"{where}: tensor '{n}' is missing from the checkpoint (expert {e} of "
                                    f"{n_experts} for {path})", (n,))
    else:
        tensor_names = (layout.template.format(hf=hf, moe=hf, e=0, **fill),)
    offset = layout.part * shape[2] if layout.transform == FUSED_EXPERTS else 0
    return Source(path, shape, layout.transform, tensor_names, _stored_shapes(layout, shape, n_experts), offset,
                  entry.dtype)


def _moe_block(family: Family, cfg: ModelConfig, module: str, names, where: str) -> str:
    """The HF name of our MoE block `module` as the checkpoint's router (`<block>.gate.weight`) has it."""
    src = resolve(family, cfg, module + ".gate.kernel", (0, 0), names, optional=False, where=where)
    return src.names[0].removesuffix(".gate.weight")


def _listed(names) -> str:
    q = [f"'{n}'" for n in names]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + " and " + q[-1]


def hf_arrays(family: Family, cfg: ModelConfig, path, value, names: Container[str] | None = None,
              where: str = "checkpoint") -> dict[str, np.ndarray]:
    """Our array for parameter `path` -> {checkpoint name: array}, named as in `names` (a base checkpoint's tensor
    names) or, with None, as the family names them. Raises CheckpointError where `names` lacks the tensor, and
    LayoutError where it stores the parameter fused."""
    return resolve(family, cfg, path, np.shape(value), names, writing=True, where=where).write(value)
