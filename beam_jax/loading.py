"""Load a Hugging Face MoE checkpoint (config.json + safetensors, sharded or not) into `MoECausalLM`.

Tensors are read one at a time with `safetensors` (framework "flax", so bfloat16 works without
PyTorch), transposed / stacked into this package's layout, cast to the requested dtype and placed into an
abstract (shape-only) model: at no point are two full copies of the weights alive. Every checkpoint tensor
must be consumed and every parameter filled, or loading fails with the tensor's name and file.

Expert weights come in two layouts, both read: one tensor per expert
(`...experts.{e}.gate_proj.weight` [f, d], or Mixtral's `w1`/`w3`/`w2`) and fused
(`...experts.gate_up_proj` [E, 2f, d] and `...experts.down_proj` [E, d, f]).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open

from .config import ConfigError, ModelConfig
from .families import Family, family_for, hf_name
from .model import MoECausalLM

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint tensor is missing, unexpected, of the wrong shape, or a file is unreadable."""


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, Family, object]:
    """`path`/config.json -> (ModelConfig, Family, transformers config). Errors name the file and field."""
    import transformers
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{cfg_file}: not found (a Hugging Face model directory needs config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from None
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or len(archs) != 1:
        raise ConfigError(f"{cfg_file}: field 'architectures' must list exactly one class, got {archs!r}")
    beam = raw.get("beam")
    if isinstance(beam, dict) and beam.get("base_architecture"):
        # a directory written by `convert.to_vllm` (Beam<Family>ForCausalLM): the base family's layout plus
        # mask-router tensors; read as the base family, so neither torch nor `convert` is needed
        family = family_for(beam["base_architecture"], f"{cfg_file} (beam.base_architecture)")
    else:
        family = family_for(archs[0], str(cfg_file))
    try:
        if isinstance(beam, dict) and str(raw.get("model_type", "")).startswith("beam_"):
            rest = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "beam",
                                                                "transformers_version")}
            hf = transformers.AutoConfig.for_model(raw["model_type"].removeprefix("beam_"), **rest)
        else:
            hf = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except StrictDataclassFieldValidationError as e:
        msg = " ".join(str(e).split())  # "Validation error for field 'hidden_size': TypeError: ..."
        field = msg.split("'")[1] if "'" in msg else "?"
        raise ConfigError(f"{cfg_file}: field '{field}' has the wrong type ({msg.split(': ', 1)[-1]})") from None
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{cfg_file}: {e}") from None
    try:
        cfg = family.build(hf)
    except ConfigError as e:
        raise ConfigError(f"{cfg_file}: {e}") from None
    except (TypeError, AttributeError) as e:
        raise ConfigError(f"{cfg_file}: {e}") from None
    return cfg, family, hf


class TensorIndex:
    """name -> file over one or many safetensors files; opens each file lazily, reads one tensor at a time."""

    def __init__(self, path: Path):
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: path / f for name, f in weight_map.items()}
            for f in set(self.files.values()):
                if not f.is_file():
                    raise CheckpointError(f"{index}: shard {f.name} is listed but missing")
        else:
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{path}: no model.safetensors, no model.safetensors.index.json")
            self.files = {}
            for f in shards:
                for name in self._open(f).keys():
                    self.files[name] = f
        self._handles = {}
        self.used: set[str] = set()

    def _open(self, f: Path):
        if f not in getattr(self, "_handles", {}):
            try:
                h = safe_open(str(f), framework="flax")
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
                raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
            if hasattr(self, "_handles"):
                self._handles[f] = h
            return h
        return self._handles[f]

    def __contains__(self, name):
        return name in self.files

    def get(self, name: str, shape=None) -> jax.Array:
        if name not in self.files:
            raise CheckpointError(f"{self.path}: tensor '{name}' is missing from the checkpoint")
        f = self.files[name]
        handle = self._open(f)
        try:
            t = handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{f}: tensor '{name}' could not be read ({e})") from None
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{f}: tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
        self.used.add(name)
        return t


def _load_param(idx: TensorIndex, family: Family, cfg: ModelConfig, path: tuple, shape, dtype):
    """One parameter of `MoECausalLM` (dotted `path`) from the checkpoint, in our layout."""
    keys = [str(p) for p in path]
    leaf, module = keys[-1], ".".join(keys[:-1])
    layer = int(keys[1]) if keys[0] == "layers" else None
    is_moe = layer is not None and cfg.moe_layers[layer]
    if module == "embed_tokens":
        return idx.get("model.embed_tokens.weight", shape)
    if module.endswith("mlp.experts"):
        return _load_experts(idx, family, cfg, module, leaf, shape)
    name = hf_name(family, module, is_moe)
    if is_moe and name not in idx and f"{name}.weight" not in idx and f"{name}.{leaf}" not in idx:
        name = "model." + module  # fused-era checkpoints keep the in-memory name `mlp`
    if leaf == "kernel":
        return idx.get(f"{name}.weight", shape[::-1]).T
    return idx.get(f"{name}.{leaf}", shape)


def _load_experts(idx: TensorIndex, family: Family, cfg: ModelConfig, module: str, leaf: str, shape):
    E, f, d = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    layer = int(module.split(".")[1])
    prefixes = [hf_name(family, module, True), "model." + module]
    which = {"w_gate": 0, "w_up": 1, "w_down": 2}[leaf]
    for p in prefixes:
        fused = f"{p}.gate_up_proj" if leaf != "w_down" else f"{p}.down_proj"
        if fused in idx:
            if leaf == "w_down":
                return idx.get(fused, (E, d, f)).transpose(0, 2, 1)
            gu = idx.get(fused, (E, 2 * f, d))
            part = gu[:, :f] if leaf == "w_gate" else gu[:, f:]
            return part.transpose(0, 2, 1)
        first = f"{p}.0.{family.expert_names[which]}.weight"
        if first in idx:
            want = (d, f) if leaf == "w_down" else (f, d)
            return jnp.stack([idx.get(f"{p}.{e}.{family.expert_names[which]}.weight", want).T for e in range(E)])
    raise CheckpointError(f"{idx.path}: no expert tensors for layer {layer} ({leaf}): looked for "
                          f"'{prefixes[0]}.0.{family.expert_names[which]}.weight' and '{prefixes[0]}.gate_up_proj'")


def load_pretrained(path: str | os.PathLike, dtype=None, *, param_dtype=None,
                    optional=("mask_router",), mesh=None) -> MoECausalLM:
    """Load a Hugging Face MoE checkpoint directory into a `MoECausalLM`.

    dtype: the compute dtype; None keeps the checkpoint's (of its embedding).
    param_dtype: the dtype parameters are stored in (default: dtype), e.g. float32 master weights for
    training with bfloat16 compute. BEAM's mask routers are always float32.
    optional: parameter-name fragments that are not in a base checkpoint and start at zero (BEAM's
    zero-initialised mask routers). Where the directory holds them (`model.layers.N.<mlp>.mask_router.weight`
    [E, d], as `convert.to_vllm` writes them) they are read instead; its `beam` section (tau, renormalize)
    is then `model.beam_config`, else that is None.
    mesh: a `jax.sharding.Mesh`: load each parameter straight into its sharded layout (`load_sharded`).
    """
    if mesh is not None:
        return load_sharded(path, mesh, dtype, param_dtype=param_dtype, optional=optional)
    path = Path(path)
    cfg, family, hf = read_config(path)
    idx = TensorIndex(path)
    if dtype is None:
        dtype = idx.get("model.embed_tokens.weight").dtype
    dtype = jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype or dtype)
    abstract = nnx.eval_shape(lambda: MoECausalLM(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    leaves = []
    for p, var in flat:
        dotted = ".".join(map(str, p))
        if any(o in dotted for o in optional):
            value = _load_optional(idx, family, cfg, p, var.get_value().shape)
            if value is None:
                value = jnp.zeros(var.get_value().shape, var.get_value().dtype)
            leaves.append((p, var.replace(jnp.asarray(value, dtype=var.get_value().dtype))))
            continue
        arr = _load_param(idx, family, cfg, p, var.get_value().shape, var.get_value().dtype)
        leaves.append((p, var.replace(jnp.asarray(arr, dtype=var.get_value().dtype))))
    return _assemble(path, idx, cfg, family, graphdef, leaves)


def _layer_index(name: str) -> int:
    """`model.layers.12.mlp...` -> 12; -1 for a tensor outside the decoder layers."""
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() else -1


def _assemble(path: Path, idx: TensorIndex, cfg: ModelConfig, family: Family, graphdef, leaves) -> MoECausalLM:
    """Check every checkpoint tensor was used, then build the model from its loaded leaves; records the source
    path and the directory's `beam` section (None for a base checkpoint) as `model.beam_config`."""
    unused = [k for k in idx.files if k not in idx.used and not k.endswith(IGNORED_SUFFIXES)
              and not (family.mtp_layers and _layer_index(k) >= cfg.num_hidden_layers)]
    if unused:
        raise CheckpointError(f"{path}: {len(unused)} checkpoint tensor(s) not used by {cfg.architecture}, "
                              f"e.g. '{unused[0]}' in {idx.files[unused[0]].name}")
    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    model.source_path = str(path)
    beam = json.loads((path / "config.json").read_text()).get("beam")
    model.beam_config = beam if isinstance(beam, dict) else None
    return model


def _load_optional(idx: TensorIndex, family: Family, cfg: ModelConfig, path: tuple, shape):
    """A parameter a base checkpoint lacks (a mask router's `kernel` [d, E] / `bias` [E]) from an exported BEAM
    directory, or None when the checkpoint does not hold it."""
    keys = [str(k) for k in path]
    layer = int(keys[1]) if keys[0] == "layers" else None
    name = hf_name(family, ".".join(keys[:-1]), layer is not None and cfg.moe_layers[layer])
    if keys[-1] == "kernel":
        return idx.get(f"{name}.weight", shape[::-1]).T if f"{name}.weight" in idx else None
    return idx.get(f"{name}.{keys[-1]}", shape) if f"{name}.{keys[-1]}" in idx else None


# ---- sharded loading: every host reads only the slices its devices own

_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


class _SliceReader:
    """Reads [start:stop] windows of checkpoint tensors (safetensors `get_slice`, numpy), never a whole tensor
    unless a device owns all of it. Shares the name -> file map (and the `used` set) of a `TensorIndex`."""

    def __init__(self, idx: TensorIndex):
        self.idx = idx
        self._handles = {}

    def _slice(self, name: str):
        if name not in self.idx.files:
            raise CheckpointError(f"{self.idx.path}: tensor '{name}' is missing from the checkpoint")
        f = self.idx.files[name]
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="numpy")
            except Exception as e:
                raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
        return self._handles[f].get_slice(name)

    def check(self, name: str, shape) -> None:
        """Refuse a tensor of the wrong shape (as the single-device loader does) and mark it used."""
        got = tuple(self._slice(name).get_shape())
        if got != tuple(shape):
            raise CheckpointError(f"{self.idx.files[name]}: tensor '{name}' has shape {got}, expected {tuple(shape)}")
        self.idx.used.add(name)

    def dtype(self, name: str):
        return jnp.dtype(_ST_DTYPES.get(self._slice(name).get_dtype(), "float32"))

    def read(self, name: str, window):
        """window: one (start, stop) per dimension of the stored tensor."""
        try:
            return self._slice(name)[tuple(slice(a, b) for a, b in window)]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.idx.files[name]}: tensor '{name}' could not be read ({e})") from None


def _window(index, shape) -> list[tuple[int, int]]:
    """A device's index (tuple of slices, as `make_array_from_callback` passes it) -> (start, stop) per dim."""
    return [s.indices(n)[:2] for s, n in zip(index, shape)]


def _sharded_source(rd: _SliceReader, family: Family, cfg: ModelConfig, path: tuple, shape):
    """-> read(window) giving the parameter's [window] in our layout, from only those checkpoint bytes.
    Mirrors `_load_param` / `_load_experts` name for name."""
    import numpy as np

    keys = [str(p) for p in path]
    leaf, module = keys[-1], ".".join(keys[:-1])
    layer = int(keys[1]) if keys[0] == "layers" else None
    is_moe = layer is not None and cfg.moe_layers[layer]
    if module == "embed_tokens":
        rd.check("model.embed_tokens.weight", shape)
        return lambda w: rd.read("model.embed_tokens.weight", w)
    if module.endswith("mlp.experts"):
        E, f, d = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        which = {"w_gate": 0, "w_up": 1, "w_down": 2}[leaf]
        prefixes = [hf_name(family, module, True), "model." + module]
        for p in prefixes:
            fused = f"{p}.gate_up_proj" if leaf != "w_down" else f"{p}.down_proj"
            if fused in rd.idx:
                if leaf == "w_down":  # stored [E, d, f], ours [E, f, d]
                    rd.check(fused, (E, d, f))
                    return lambda w: rd.read(fused, [w[0], w[2], w[1]]).transpose(0, 2, 1)
                rd.check(fused, (E, 2 * f, d))  # stored [E, 2f, d]: gate rows then up rows
                off = 0 if leaf == "w_gate" else f
                return lambda w: rd.read(fused, [w[0], (w[2][0] + off, w[2][1] + off), w[1]]).transpose(0, 2, 1)
            first = f"{p}.0.{family.expert_names[which]}.weight"
            if first in rd.idx:
                names = [f"{p}.{e}.{family.expert_names[which]}.weight" for e in range(E)]
                for n in names:  # stored per expert as [out, in], ours [E, in, out]
                    rd.check(n, (d, f) if leaf == "w_down" else (f, d))
                return lambda w: np.stack([rd.read(names[e], [w[2], w[1]]).T for e in range(*w[0])])
        raise CheckpointError(f"{rd.idx.path}: no expert tensors for layer {layer} ({leaf}): looked for "
                              f"'{prefixes[0]}.0.{family.expert_names[which]}.weight' and '{prefixes[0]}.gate_up_proj'")
    name = hf_name(family, module, is_moe)
    if is_moe and name not in rd.idx and f"{name}.weight" not in rd.idx and f"{name}.{leaf}" not in rd.idx:
        name = "model." + module
    if leaf == "kernel":  # ours [in, out] = stored weight [out, in] transposed
        rd.check(f"{name}.weight", tuple(shape)[::-1])
        return lambda w: rd.read(f"{name}.weight", w[::-1]).T
    rd.check(f"{name}.{leaf}", shape)
    return lambda w: rd.read(f"{name}.{leaf}", w)


def load_sharded(path: str | os.PathLike, mesh, dtype=None, *, param_dtype=None,
                 optional=("mask_router",)) -> MoECausalLM:
    """`load_pretrained` straight into the layout of `beam_jax.sharding.RULES` on `mesh`.

    Each parameter is a `jax.make_array_from_callback` whose callback reads, for each of this process's
    devices, only the window of the checkpoint tensor that device owns (safetensors `get_slice`): no host
    ever holds a whole sharded tensor, and no device more than its shard. Replicated parameters (norms,
    routers) are read whole. Every checkpoint tensor must be used and every parameter filled, as in
    `load_pretrained`, with the same errors.
    """
    from .sharding import param_sharding

    path = Path(path)
    cfg, family, hf = read_config(path)
    idx = TensorIndex(path)
    rd = _SliceReader(idx)
    dtype = jnp.dtype(dtype) if dtype is not None else rd.dtype("model.embed_tokens.weight")
    param_dtype = jnp.dtype(param_dtype or dtype)
    abstract = nnx.eval_shape(lambda: MoECausalLM(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    leaves = []
    for p, var in nnx.to_flat_state(state):
        dotted = ".".join(map(str, p))
        shape, want = var.get_value().shape, var.get_value().dtype
        sharding = param_sharding(dotted, shape, mesh)
        if any(o in dotted for o in optional):  # small and replicated: read whole where the directory has it
            value = _load_optional(idx, family, cfg, p, shape)
            value = jnp.zeros(shape, want) if value is None else jnp.asarray(value, want)
            arr = jax.device_put(value, sharding)
        else:
            read = _sharded_source(rd, family, cfg, p, shape)
            arr = jax.make_array_from_callback(
                shape, sharding, lambda index, read=read, shape=shape, want=want:
                read(_window(index, shape)).astype(want))
        leaves.append((p, var.replace(arr)))
    return _assemble(path, idx, cfg, family, graphdef, leaves)
