"""`python -m convert.to_vllm CKPT [--out DIR] [--tau T] [--dtype D]`: a BEAM training run -> a Hugging Face
directory that transformers (after `convert.register()`) and vLLM (the `convert.vllm_plugin` entry point) serve
as a BEAM model. Needs no torch: tensors are read and written with safetensors' numpy API (bfloat16 through
`ml_dtypes`, which jax brings).

CKPT is a run's WORKDIR/ckpt (its latest step) or one step's folder. The base model is the one the run recorded
(`meta["config"]["model"]["path"]`); export is refused, with one line naming what differs and nothing written,
when it is missing, its fingerprint (config.json, weight file names and sizes) changed, or the trained tensors do
not fit its shapes.

Written (to a temporary sibling, renamed into place at the end):
- the base weights, sharded as the source was, hard-linked where the filesystem allows (else copied); a single
  `model.safetensors` is linked as `model-00001-of-00001.safetensors`, because transformers reads a lone
  `model.safetensors` and ignores the index. With `--dtype D` (float32, bfloat16, float16; default: the base
  checkpoint's, `config.json` `dtype`) every floating-point tensor not already in D is cast to D and its shard
  rewritten; `config.json` `dtype` then says D. vLLM-CPU on a processor with AMX serves DeepSeek-V2's MLA only in
  bfloat16 (README "Serving"), so an export meant for such a server is written with `--dtype bfloat16`;
- `mask_router.safetensors`: `model.layers.N.<moe>.mask_router.weight` [E, d] float32 (<moe> as the source names
  the MoE block's router: `block_sparse_moe` for per-expert Mixtral checkpoints, `mlp` otherwise), listed with
  the base tensors in `model.safetensors.index.json`;
  runs that also trained the routers or everything (`train.trainable`) get the shards that hold those tensors
  rewritten with the trained values;
- `config.json`: the source config with `architectures` = the BEAM class, `model_type` = `beam_<type>`, `dtype`
  the weights' dtype, and a `beam` section (tau, renormalize, MoE layers, `dtype` and `source_dtype`, provenance);
- tokenizer and generation files, and a README.md model card (which says the dtype written);
- `modeling_beam.py` and config.json's `auto_map` (`convert.remote_code`), so plain transformers loads the
  directory with `trust_remote_code=True`, without beam-jax.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from convert import remote_code

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
INDEX = "model.safetensors.index.json"
MASK_FILE = "mask_router.safetensors"
DTYPES = ("float32", "bfloat16", "float16")  # what --dtype writes
# safetensors' names of the floating-point dtypes --dtype casts (others, e.g. integer or fp8 tensors, are kept)
_SAFETENSORS_FLOATS = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "bf16": "bfloat16", "half": "float16", "fp16": "float16"}


class ExportError(ValueError):
    """The export is refused; the message says why in one line."""


# ----------------------------------------------------------------------------- reading the run


def resolve_ckpt(ckpt) -> tuple[Path, int]:
    """WORKDIR/ckpt or WORKDIR/ckpt/<step> -> (manager directory, step)."""
    import orbax.checkpoint as ocp

    ckpt = Path(ckpt).absolute()
    if not ckpt.is_dir():
        raise ExportError(f"{ckpt}: no such checkpoint directory")
    if ckpt.name.isdigit() and (ckpt / "state").exists():
        return ckpt.parent, int(ckpt.name)
    step = ocp.CheckpointManager(ckpt).latest_step()
    if step is None:
        raise ExportError(f"{ckpt}: no checkpoint steps found (expected WORKDIR/ckpt or WORKDIR/ckpt/<step>)")
    return ckpt, step


def read_meta(ckpt_dir: Path, step: int) -> dict:
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(ckpt_dir)
    try:
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises several types for a missing/corrupt item
        raise ExportError(f"{ckpt_dir / str(step)}: checkpoint metadata unreadable ({type(e).__name__}: {e})") from None
    finally:
        mgr.close()
    for key in ("base_model", "config"):
        if key not in meta:
            raise ExportError(f"{ckpt_dir / str(step)}: checkpoint metadata has no '{key}' (not a BEAM training run)")
    return meta


def check_base(meta: dict, ckpt_dir: Path, step: int) -> Path:
    """The base model the run trained on, refused if missing or changed since."""
    from beam_jax.run_data import fingerprint_diff, model_fingerprint

    path = Path(meta["config"]["model"]["path"])
    where = f"{ckpt_dir / str(step)}"
    recorded = Path(meta["base_model"].get("path", path))  # absolute; the config's may be relative to the run's cwd
    if not (path / "config.json").is_file() and not path.is_absolute() and (recorded / "config.json").is_file():
        path = recorded
    if not (path / "config.json").is_file():
        raise ExportError(f"base model {path} (recorded by {where}) is missing: no config.json there")
    diffs = fingerprint_diff(meta["base_model"], model_fingerprint(path))
    if diffs:
        raise ExportError(f"base model {path} differs from the one {where} was trained on: {'; '.join(diffs)}")
    return path


def restore_trained(ckpt_dir: Path, step: int, base: Path, meta: dict):
    """-> (ModelConfig, Family, {param path: np.ndarray}) for the run's trained parameters, checked against the base
    model's shapes. The base weights are not loaded: the model is abstract except for what is restored."""
    from flax import nnx

    from beam_jax.loading import read_config
    from beam_jax.model import MoECausalLM
    from beam_jax.checkpoint import restore_trainable
    from beam_jax.trainable import trainable_filter

    cfg, family, _ = read_config(base)
    model = nnx.eval_shape(lambda: MoECausalLM(cfg, rngs=nnx.Rngs(0)))
    want = {p: tuple(v.get_value().shape)
            for p, v in nnx.to_flat_state(nnx.state(model, trainable_filter(meta.get("trainable", "mask"))))}
    saved = _saved_shapes(ckpt_dir / str(step) / "state")
    for p, shape in want.items():
        name = ".".join(map(str, p))
        if saved is not None and name in saved and saved[name] != shape:
            raise ExportError(f"trained parameter {name} in {ckpt_dir / str(step)} has shape {saved[name]}, "
                              f"base model {base} needs {shape}")
    try:
        restore_trainable(ckpt_dir, model, step)
    except (ValueError, KeyError) as e:
        raise ExportError(f"trained parameters in {ckpt_dir / str(step)} do not fit base model {base}: "
                          f"{' '.join(str(e).split())}") from None
    got = {p: v.get_value()
           for p, v in nnx.to_flat_state(nnx.state(model, trainable_filter(meta.get("trainable", "mask"))))}
    for p, shape in want.items():
        value = got.get(p)
        if value is None or not hasattr(value, "dtype") or type(value).__name__ == "ShapeDtypeStruct":
            raise ExportError(f"{ckpt_dir / str(step)}: trained parameter {'.'.join(map(str, p))} is missing")
        if tuple(value.shape) != shape:
            raise ExportError(f"trained parameter {'.'.join(map(str, p))} in {ckpt_dir / str(step)} has shape "
                              f"{tuple(value.shape)}, base model {base} needs {shape}")
    return cfg, family, {p: np.asarray(v) for p, v in got.items()}


def _saved_shapes(state_dir: Path) -> dict[str, tuple] | None:
    """{dotted parameter path: shape} of a checkpoint's saved trainable parameters (None if unreadable)."""
    import jax
    import orbax.checkpoint as ocp

    try:
        tree = ocp.PyTreeCheckpointHandler().metadata(state_dir)
        tree = getattr(tree, "tree", tree)["params"]
    except Exception:  # an older or foreign layout: the restore below still checks
        return None
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
            for path, leaf in flat}


# ----------------------------------------------------------------------------- naming


def source_index(base: Path) -> dict[str, str]:
    """tensor name -> shard file name of the base checkpoint (index if present, else every *.safetensors)."""
    from safetensors import safe_open

    index = base / INDEX
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise ExportError(f"base model {base} has no safetensors weights")
    out = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as h:
            out.update(dict.fromkeys(h.keys(), f.name))
    return out


def hf_tensors(cfg, family, trained: dict, names: dict[str, str]) -> dict[str, np.ndarray]:
    """Trained Flax parameters -> {checkpoint name: array} in the source checkpoint's naming and layout
    (`beam_jax.weight_map`: PyTorch [out, in], one tensor per expert). Mask routers (float32) take the name of their
    layer's router with `gate` -> `mask_router`; every other tensor must be one the base checkpoint holds."""
    from beam_jax.weight_map import CheckpointError, LayoutError, MissingTensor, hf_arrays

    out = {}
    for path, value in trained.items():
        try:
            out.update(hf_arrays(family, cfg, path, value, names, where="base checkpoint"))
        except MissingTensor as e:
            raise ExportError(f"base checkpoint has no tensor '{e.tensors[0]}' to replace with the trained one "
                              f"(export of this layout is supported for trainable=mask only)") from None
        except LayoutError as e:  # fused experts: one stored tensor holds several parameters
            raise ExportError(f"base checkpoint: {e} (export of this layout is supported for trainable=mask "
                              f"only)") from None
        except CheckpointError as e:  # two names for one tensor
            raise ExportError(str(e)) from None
    return out


# ----------------------------------------------------------------------------- writing


def link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        shutil.copy2(src, dst)
        return "copied"


def numpy_dtype(name: str) -> np.dtype:
    """"float32" / "bfloat16" / "float16" -> the numpy dtype (bfloat16 is `ml_dtypes.bfloat16`, no torch)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def normalize_dtype(name: str, what: str) -> str:
    """A dtype name as given (`--dtype bf16`, config.json `"torch_dtype": "float32"`) -> one of DTYPES."""
    d = _DTYPE_ALIASES.get(str(name).lower().removeprefix("torch."), str(name).lower().removeprefix("torch."))
    if d not in DTYPES:
        raise ExportError(f"{what}: dtype {name!r} is not one of {', '.join(DTYPES)}")
    return d


def base_dtype(base: Path, raw_config: dict, names: dict[str, str]) -> str:
    """The base checkpoint's dtype: config.json `dtype` (transformers 5) or `torch_dtype`, else the dtype most of
    its floating-point weights have."""
    for key in ("dtype", "torch_dtype"):
        if raw_config.get(key):  # recorded as it is (a float64 base exports as float64 unless --dtype says otherwise)
            name = str(raw_config[key]).lower().removeprefix("torch.")
            return _DTYPE_ALIASES.get(name, name)
    counts: dict[str, int] = {}
    for shard in sorted(set(names.values())):
        for d in shard_dtypes(base / shard).values():
            if d in _SAFETENSORS_FLOATS:
                counts[_SAFETENSORS_FLOATS[d]] = counts.get(_SAFETENSORS_FLOATS[d], 0) + 1
    if not counts:
        raise ExportError(f"base model {base}: no dtype in config.json and no floating-point weights")
    return max(counts, key=counts.get)


def shard_dtypes(path: Path) -> dict[str, str]:
    """{tensor name: safetensors dtype ("F32", "BF16", ...)} of one shard, from its header (no data read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as h:
        return {k: h.get_slice(k).get_dtype() for k in h.keys()}


def _needs_cast(path: Path, dtype: str | None) -> bool:
    return dtype is not None and any(_SAFETENSORS_FLOATS.get(d, dtype) != dtype for d in shard_dtypes(path).values())


def _rewrite_shard(src: Path, dst: Path, replace: dict[str, np.ndarray], dtype: str | None = None):
    """Copy a safetensors shard tensor by tensor, replacing some values. Replacements take the source tensor's
    dtype; with `dtype` (one of DTYPES) every floating-point tensor is then cast to it."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    target = numpy_dtype(dtype) if dtype is not None else None
    with safe_open(str(src), framework="numpy") as h:
        meta = h.metadata() or {"format": "pt"}
        tensors = {}
        for k in h.keys():
            old = h.get_tensor(k)
            if k in replace:
                new = np.asarray(replace[k])
                if new.shape != old.shape:
                    raise ExportError(f"trained tensor {k} has shape {new.shape}, {src.name} holds {old.shape}")
                value = new.astype(old.dtype)
            else:
                value = old
            if target is not None and h.get_slice(k).get_dtype() in _SAFETENSORS_FLOATS:
                value = value.astype(target)
            tensors[k] = value
    save_file(tensors, str(dst), metadata=meta)


def beam_config(base: Path, cfg, tau: float, renormalize: bool, provenance: dict, dtype: str,
                source_dtype: str) -> dict:
    """The exported config.json: the base's with the BEAM architecture / model_type, `dtype` = the weights written,
    and the `beam` section."""
    from convert import beam_architecture, beam_model_type

    raw = json.loads((base / "config.json").read_text())
    source_arch = raw["architectures"][0]
    for key in [k for k in ("dtype", "torch_dtype") if k in raw] or ["dtype"]:
        raw[key] = dtype
    try:
        raw["architectures"] = [beam_architecture(source_arch)]
        raw["model_type"] = beam_model_type(raw["model_type"])
    except ValueError as e:
        raise ExportError(f"{base / 'config.json'}: {e}") from None
    if cfg.topk_method == "noaux_tc":
        # DeepSeek-V3's routing as its hub config.json names it: transformers 5 implies it (and save_pretrained
        # drops the fields), vLLM reads them and would otherwise route with a plain softmax
        raw.setdefault("topk_method", "noaux_tc")
        raw.setdefault("scoring_func", "sigmoid")
    raw["beam"] = {"tau": float(tau), "renormalize": bool(renormalize),
                   "layers": [i for i, m in enumerate(cfg.moe_layers) if m],
                   "num_experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok,
                   "mask_router": {"file": MASK_FILE, "dtype": "float32", "bias": False},
                   "dtype": dtype, "source_dtype": source_dtype,
                   "base_architecture": source_arch, **provenance}
    return raw


def model_card(out_name: str, config: dict, meta: dict, step: int, report: dict | None, base: Path) -> str:
    c, b = meta["config"], config["beam"]
    train, data, beam = c.get("train", {}), c.get("data", {}), c.get("beam", {})
    lines = [
        f"# {Path(out_name).name}: BEAM on {base.name}", "",
        f"`{config['architectures'][0]}`: {b['base_architecture']} with BEAM (Binary Expert Activation Masking, "
        "arXiv 2605.14438) mask routers. In every MoE layer a mask router W_m [E, d] reads the router's input, "
        f"and a Top-{b['top_k']} candidate e is kept only when sigmoid(W_m x)[e] >= tau; kept experts use the "
        "original routing weight" + (" (renormalised)" if b["renormalize"] else " (no renormalisation)") +
        ", dropped (token, expert) pairs are not computed.", "",
        "## Training", "",
        f"- base model: `{base}` (fingerprint {meta['base_model'].get('fingerprint', '?')[:16]})",
        f"- steps: {step} of {train.get('steps', '?')}; "
        f"trainable: `{meta.get('trainable', train.get('trainable', 'mask'))}`"
        f"; lr {train.get('lr', '?')}, batch {data.get('batch_size', '?')} x {data.get('seq_len', '?')} tokens",
        f"- data: `{data.get('train', '?')}`" + (f" (held out: `{data['eval']}`)" if data.get("eval") else ""),
        f"- sparsity: beta {beam.get('beta', '?')}, target kept ratio {beam.get('target_ratio', 0) or 'none'}, "
        f"alpha {beam.get('alpha', '?')}",
        f"- serving threshold tau = {b['tau']} (trained at {beam.get('tau', '?')})", "",
        "## Weights", "",
        f"- {b['dtype']}" + (", as the base checkpoint" if b["dtype"] == b["source_dtype"] else
                             f", cast from the base checkpoint's {b['source_dtype']} (`--dtype {b['dtype']}`)")
        + f"; mask routers float32 (`{MASK_FILE}`); base shards {' / '.join(b.get('weights', []))}",
        "- vLLM on a CPU with AMX serves DeepSeek-V2's MLA attention in bfloat16 only: export such a model with "
        "`python -m convert.to_vllm CKPT --dtype bfloat16`, or serve with `--dtype bfloat16`", "",
    ]
    def pct(x):
        return f"{100 * x:.1f}%" if isinstance(x, (int, float)) and np.isfinite(x) else "n/a"

    if report:
        ept = report.get("experts_per_token", {})
        lines += ["## Measured (held-out split of the run, `report.json`)", "",
                  f"- experts per token: {ept.get('overall', float('nan')):.3f} of {report.get('top_k', b['top_k'])} "
                  f"(per MoE layer: {', '.join(f'{v:.2f}' for v in ept.get('per_layer', []))}) at tau "
                  f"{report.get('tau', '?')}",
                  f"- routed-expert FLOPs saved: {pct(report.get('moe_flops_reduction'))}",
                  f"- quality retained (accuracy vs Top-K): {pct(report.get('quality_retention'))}",
                  ""]
    lines += remote_code.usage_lines(out_name)
    return "\n".join(lines)


def export(ckpt, out=None, tau: float | None = None, dtype: str | None = None) -> Path:
    """Export a BEAM run's checkpoint for serving; returns the output directory. `dtype` (one of DTYPES, or None
    for the base checkpoint's) is the dtype of the weights written; the mask routers stay float32."""
    from beam_jax.config import ConfigError
    from beam_jax.export_hf import atomic_dir
    from beam_jax.loading import CheckpointError
    from safetensors.numpy import save_file

    if dtype is not None:
        dtype = normalize_dtype(dtype, "--dtype")
    ckpt_dir, step = resolve_ckpt(ckpt)
    meta = read_meta(ckpt_dir, step)
    base = check_base(meta, ckpt_dir, step)
    try:
        cfg, family, trained = restore_trained(ckpt_dir, step, base, meta)
        names = source_index(base)
    except (ConfigError, CheckpointError) as e:
        raise ExportError(str(e)) from None
    tensors = hf_tensors(cfg, family, trained, names)
    mask = {k: v for k, v in tensors.items() if ".mask_router." in k}
    replaced = {k: v for k, v in tensors.items() if k not in mask}
    beam = meta["config"].get("beam", {})
    tau = float(beam.get("tau", 0.5) if tau is None else tau)
    workdir = ckpt_dir.parent
    report_file = workdir / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    provenance = {"run": str(ckpt_dir / str(step)), "step": step, "trainable": meta.get("trainable", "mask"),
                  "base_model": str(base), "base_fingerprint": meta["base_model"].get("fingerprint"),
                  "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    source_dtype = base_dtype(base, json.loads((base / "config.json").read_text()), names)
    written = dtype or source_dtype
    config = beam_config(base, cfg, tau, bool(beam.get("renormalize", False)), provenance, written, source_dtype)
    config["auto_map"] = remote_code.auto_map(config["architectures"][0])  # trust_remote_code without beam-jax
    out = Path(out) if out is not None else workdir / "export"
    if out.absolute() == base.absolute():
        raise ExportError(f"--out {out} is the base model directory")

    with atomic_dir(out.absolute()) as tmp:
        shard_names = sorted(set(names.values()))
        rename = {"model.safetensors": "model-00001-of-00001.safetensors"} if shard_names == ["model.safetensors"] \
            else {}
        methods = set()
        for shard in shard_names:
            dst = tmp / rename.get(shard, shard)
            mine = {k: v for k, v in replaced.items() if names[k] == shard}
            cast = _needs_cast(base / shard, dtype)
            if mine or cast:
                _rewrite_shard(base / shard, dst, mine, dtype)
                methods.add("cast" if cast and not mine else "rewritten")
            else:
                methods.add(link_or_copy(base / shard, dst))
        save_file(mask, str(tmp / MASK_FILE), metadata={"format": "pt"})
        weight_map = {k: rename.get(f, f) for k, f in names.items()}
        weight_map.update(dict.fromkeys(mask, MASK_FILE))
        index_meta = {}
        if (base / INDEX).is_file():
            index_meta = json.loads((base / INDEX).read_text()).get("metadata", {})
        files = set(weight_map.values())
        index_meta["total_size"] = sum((tmp / f).stat().st_size for f in files)
        (tmp / INDEX).write_text(json.dumps({"metadata": index_meta, "weight_map": dict(sorted(weight_map.items()))},
                                            indent=2) + "\n")
        config["beam"]["weights"] = sorted(methods)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in sorted(base.iterdir()):
            if (f.is_file() and not f.name.startswith(".") and f.name not in ("config.json", "README.md", INDEX)
                    and not f.name.endswith(WEIGHT_SUFFIXES)):
                shutil.copy2(f, tmp / f.name)
        for name, text in remote_code.remote_code_files().items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "README.md").write_text(model_card(str(out.absolute()), config, meta, step, report, base))
        for f in (tmp / MASK_FILE, tmp / INDEX, tmp / "config.json", tmp / "README.md"):
            os.chmod(f, 0o644)
    return out


def _flags():
    """This command's absl flags, in their own FlagValues: `main` can run more than once in a process (tests),
    and importing this module defines nothing in absl's global FLAGS."""
    from absl import flags

    fv = flags.FlagValues()
    flags.DEFINE_string("out", None, "output directory (default: WORKDIR/export)", flag_values=fv)
    flags.DEFINE_float("tau", None, "serving threshold written to config.json (default: the run's beam.tau)",
                       lower_bound=0.0, upper_bound=1.0, flag_values=fv)
    flags.DEFINE_string("dtype", None, f"dtype of the weights written, one of {', '.join(DTYPES)} (default: the base "
                        "checkpoint's; vLLM-CPU with AMX serves DeepSeek-V2 MLA in bfloat16 only)", flag_values=fv)
    flags.DEFINE_bool("help", False, "show this help", short_name="h", flag_values=fv)
    return fv


def main(argv=None) -> int:
    """`python -m convert.to_vllm CKPT [--out DIR] [--tau T] [--dtype D]`: 0 on success, 2 on bad input (one
    `error: ...` line on stderr, nothing written)."""
    from absl import flags

    from beam_jax.cli import expected_errors, one_line

    fv = _flags()
    prog = "python -m convert.to_vllm"
    try:
        positional = fv([prog, *(sys.argv[1:] if argv is None else argv)])[1:]
    except flags.Error as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    if fv.help:
        print(f"{__doc__.split(chr(10) * 2)[0]}\n\nCKPT: a BEAM run's WORKDIR/ckpt (latest step) or one step's folder\n"
              f"{fv.get_help()}")
        return 0
    if len(positional) != 1:
        print(f"error: {prog} takes one checkpoint directory (a run's WORKDIR/ckpt), got {positional or 'none'}",
              file=sys.stderr)
        return 2
    try:
        out = export(positional[0], fv.out, fv.tau, fv.dtype)
    except expected_errors() as e:  # ExportError, a corrupt checkpoint, an unwritable --out, a full disk
        if os.environ.get("BEAM_TRACEBACK"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
