"""Load a Hugging Face MoE checkpoint (config.json + safetensors, sharded or not) into `MoECausalLM`.

Which checkpoint tensors make which parameter, and how (transposed, stacked per expert, split from fused
experts), is `beam_jax.weight_map`'s table. Tensors are read one at a time with `safetensors` (numpy; bfloat16
through ml_dtypes, no PyTorch), cast to the requested dtype and placed into an abstract (shape-only) model: at no
point are two full copies of the weights alive. Every checkpoint tensor must be consumed and every parameter
filled, or loading fails with the tensor's name and file. The single-device loader reads each parameter whole,
the sharded one (`load_sharded`) each device's window of it.
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
from .families import Family, family_for
from .model import MoECausalLM
from .weight_map import CheckpointError, Source, resolve

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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


def _open(f: Path):
    try:
        return safe_open(str(f), framework="numpy")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None


class TensorIndex:
    """name -> file over one or many safetensors files (read from the index or the files' headers); `used`
    collects the names the loader consumed."""

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
                for name in _open(f).keys():
                    self.files[name] = f
        self.used: set[str] = set()

    def __contains__(self, name):
        return name in self.files


_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


class _SliceReader:
    """Reads [start:stop] windows of checkpoint tensors (safetensors `get_slice`, numpy): the sharded loader only
    the windows a device owns, the single-device loader whole tensors. Shares the name -> file map (and the
    `used` set) of a `TensorIndex`."""

    def __init__(self, idx: TensorIndex):
        self.idx = idx
        self._handles = {}

    def _slice(self, name: str):
        if name not in self.idx.files:
            raise CheckpointError(f"{self.idx.path}: tensor '{name}' is missing from the checkpoint")
        f = self.idx.files[name]
        if f not in self._handles:
            self._handles[f] = _open(f)
        return self._handles[f].get_slice(name)

    def check(self, name: str, shape) -> None:
        """Refuse a tensor of the wrong shape and mark it used."""
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


def _source(rd: _SliceReader, family: Family, cfg: ModelConfig, dotted: str, shape, optional) -> Source | None:
    """The parameter's `Source` in this checkpoint (`weight_map.resolve`), its tensors' shapes checked and marked
    used; None for an optional parameter (a mask router) the checkpoint lacks."""
    src = resolve(family, cfg, dotted, shape, rd.idx.files, optional=any(o in dotted for o in optional),
                  where=str(rd.idx.path))
    if src is not None:
        for name, stored in zip(src.names, src.shapes):
            rd.check(name, stored)
    return src


def _load(path, dtype, param_dtype, optional, place) -> MoECausalLM:
    """Both loaders: resolve every parameter of the abstract model and `place(rd, source or None, dotted path,
    shape, dtype)` it; then `_assemble`."""
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
        src = _source(rd, family, cfg, dotted, shape, optional)
        leaves.append((p, var.replace(place(rd, src, dotted, shape, want))))
    return _assemble(path, idx, cfg, family, graphdef, leaves)


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

    def place(rd, src, dotted, shape, want):
        return jnp.zeros(shape, want) if src is None else jnp.asarray(src.read(rd.read), dtype=want)

    return _load(path, dtype, param_dtype, optional, place)


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


# ---- sharded loading: every host reads only the slices its devices own


def _window(index, shape) -> list[tuple[int, int]]:
    """A device's index (tuple of slices, as `make_array_from_callback` passes it) -> (start, stop) per dim."""
    return [s.indices(n)[:2] for s, n in zip(index, shape)]


def load_sharded(path: str | os.PathLike, mesh, dtype=None, *, param_dtype=None,
                 optional=("mask_router",)) -> MoECausalLM:
    """`load_pretrained` straight into the layout of `beam_jax.sharding.RULES` on `mesh`.

    Each parameter is a `jax.make_array_from_callback` whose callback reads, for each of this process's
    devices, only the window of the checkpoint tensor(s) that device owns (`Source.read` with the window,
    safetensors `get_slice`): no host ever holds a whole sharded tensor, and no device more than its shard.
    Replicated parameters (norms, routers) are read whole. Every checkpoint tensor must be used and every
    parameter filled, as in `load_pretrained`, with the same errors.
    """
    from .sharding import param_sharding

    def place(rd, src, dotted, shape, want):
        sharding = param_sharding(dotted, shape, mesh)
        if src is None:
            return jax.device_put(jnp.zeros(shape, want), sharding)
        return jax.make_array_from_callback(
            shape, sharding, lambda index: src.read(rd.read, _window(index, shape)).astype(want))

    return _load(path, dtype, param_dtype, optional, place)
