"""Export for serving (`convert.to_vllm`) and the PyTorch BEAM models (`convert.modeling_beam`), no vLLM needed.

A "run" here is an orbax checkpoint written exactly as the trainer writes one (trainable parameters plus the
metadata: base-model fingerprint, config), with random mask routers scaled so that a good share of the
Top-K pairs is dropped; parity with the Flax model (`restore_trainable` + `BeamHook`) is then a real test of
the mask, not of Top-K.
"""

import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import beam_jax
import convert
from beam_jax.configs import base as base_config
from beam_jax.routing import BeamHook
from beam_jax.run_data import model_fingerprint
from beam_jax.checkpoint import Checkpointer
from beam_jax.trainable import trainable_filter
from convert import to_vllm
from hf_tiny import FAMILY_CONFIGS, fuse_experts, make_tiny

transformers.logging.set_verbosity_error()
convert.register()  # `import convert` alone registers nothing (it needs no torch); the PyTorch BEAM classes


def fake_run(base, workdir, *, seed=0, scale=3.0, step=3, trainable="mask", tau=0.5, renormalize=False,
             fingerprint_of=None, shapes_from=None):
    """Write WORKDIR/ckpt/<step> as `beam_jax.train` would, with random trained parameters; returns the Flax model
    holding them. `fingerprint_of` records another directory's fingerprint; `shapes_from` takes the parameters
    from another model (both for the refusal tests)."""
    model = beam_jax.load_pretrained(shapes_from or base, dtype="float32")
    params = nnx.state(model, trainable_filter(trainable))
    rng = np.random.RandomState(seed)
    d = model.cfg.hidden_size
    leaves = []
    for path, var in nnx.to_flat_state(params):
        v = np.asarray(var.get_value())
        if "mask_router" in ".".join(map(str, path)):
            new = rng.normal(0.0, scale / np.sqrt(d), v.shape)
        else:  # a trained router: nudge it
            new = v + rng.normal(0.0, 0.05 * (np.abs(v).mean() + 1e-3), v.shape)
        leaves.append((path, var.replace(np.asarray(new, v.dtype))))
    params = nnx.from_flat_state(leaves)
    nnx.update(model, params)
    c = base_config.get_config()
    c.model.path = str(base)
    c.beam.tau = tau
    c.beam.renormalize = renormalize
    c.train.trainable = trainable
    c.train.steps = step
    meta = {"base_model": model_fingerprint(fingerprint_of or base), "config": json.loads(c.to_json()),
            "trainable": trainable}
    ckpt = Checkpointer(workdir / "ckpt")
    ckpt.save(step, {"params": nnx.to_pure_dict(params)}, meta)
    ckpt.close()
    return model


def _ids(shape, vocab, seed=0):
    return np.random.RandomState(seed).randint(3, vocab, size=shape)


def _torch_logits(model_dir, ids, **kw):
    tm = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
    tm.reset_beam_counts()
    with torch.no_grad():
        logits = tm(torch.tensor(ids)).logits.numpy()
    return tm, logits


def _assert_parity(flax_model, export_dir, ids, tau, renormalize=False):
    tm, logits = _torch_logits(export_dir, ids)
    out = flax_model(ids, mask_hook=BeamHook(tau, renormalize=renormalize))
    np.testing.assert_allclose(logits, np.asarray(out.logits), atol=1e-4, rtol=0)
    kept = sum(int(np.asarray(m.kept).sum()) for m in out.moe)
    offered = sum(int(np.asarray(m.kept).size) for m in out.moe)
    assert tm.beam_pair_counts() == {"offered": offered, "computed": kept}
    return tm, kept / offered


def _no_temp_dirs(parent):
    return not [p for p in parent.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


# ----------------------------------------------------------------------------- the export itself


def test_export_layout(tiny_model_dir, tmp_path):
    work = tmp_path / "run"
    flax_model = fake_run(tiny_model_dir, work, tau=0.5)
    (work / "report.json").write_text(json.dumps({"top_k": 3, "tau": 0.5, "moe_flops_reduction": 0.6,
                                                  "quality_retention": 0.97,
                                                  "experts_per_token": {"overall": 1.2, "per_layer": [1.0, 1.4]}}))
    assert to_vllm.main([str(work / "ckpt"), "--out", str(tmp_path / "serve"), "--tau", "0.6"]) == 0
    out = tmp_path / "serve"
    names = sorted(p.name for p in out.iterdir())
    for f in ("config.json", "README.md", "mask_router.safetensors", "model-00001-of-00001.safetensors",
              "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"):
        assert f in names, f
    assert "model.safetensors" not in names  # transformers would read it alone and skip the index
    # the base weights are the source file itself (hard link) where the filesystem allows
    src, dst = (tiny_model_dir / "model.safetensors").stat(), (out / "model-00001-of-00001.safetensors").stat()
    assert (src.st_ino == dst.st_ino) or (src.st_size == dst.st_size)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BeamQwen3MoeForCausalLM"] and cfg["model_type"] == "beam_qwen3_moe"
    beam = cfg["beam"]
    assert beam["tau"] == 0.6 and beam["renormalize"] is False and beam["layers"] == [0, 1]
    assert beam["step"] == 3 and beam["trainable"] == "mask" and beam["base_model"] == str(tiny_model_dir)

    from safetensors.numpy import load_file

    mask = load_file(out / "mask_router.safetensors")
    assert sorted(mask) == [f"model.layers.{i}.mlp.mask_router.weight" for i in (0, 1)]
    for i in (0, 1):  # [E, d] float32, the transpose of the Flax kernel [d, E]
        w = mask[f"model.layers.{i}.mlp.mask_router.weight"]
        assert w.shape == (7, 64) and w.dtype == np.float32
        np.testing.assert_array_equal(w, np.asarray(flax_model.layers[i].mlp.mask_router.kernel[...]).T)
    # the same orientation and names as beam_jax.export_hf.hf_state_dict
    from beam_jax.export_hf import hf_state_dict

    ref = hf_state_dict(flax_model, include_mask_router=True)
    for k, v in mask.items():
        np.testing.assert_array_equal(v, ref[k])
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    base_names = set(to_vllm.source_index(tiny_model_dir))
    assert set(index) == base_names | set(mask)
    assert {index[k] for k in mask} == {"mask_router.safetensors"}

    card = (out / "README.md").read_text()
    assert "1.200 of 3" in card and "BeamQwen3MoeForCausalLM" in card and "trainable: `mask`" in card
    assert _no_temp_dirs(tmp_path)

    # transformers loads it with no trust_remote_code, as the BEAM class, at the exported tau
    ids = _ids((2, 12), 320)
    tm, frac = _assert_parity(flax_model, out, ids, tau=0.6)
    assert type(tm).__name__ == "BeamQwen3MoeForCausalLM"
    assert tm.model.layers[0].mlp.mask_router.weight.dtype == torch.float32
    assert 0.15 < frac < 0.85, frac


def test_export_replaces_existing_output(tiny_model_dir, tmp_path):
    work = tmp_path / "run"
    fake_run(tiny_model_dir, work)
    out = tmp_path / "serve"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    to_vllm.export(work / "ckpt" / "3", out)  # one step's folder works as well
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert _no_temp_dirs(tmp_path)


def test_zero_mask_router_is_topk(tmp_path):
    """A BEAM model whose mask routers are zero (or missing) is the base model exactly, at tau 0.5."""
    tm_base = make_tiny("mixtral", tmp_path / "base")
    work = tmp_path / "run"
    fake_run(tmp_path / "base", work, scale=0.0)
    to_vllm.export(work / "ckpt", tmp_path / "serve")
    ids = _ids((2, 9), 160)
    with torch.no_grad():
        ref = tm_base(torch.tensor(ids)).logits.numpy()
    tm, logits = _torch_logits(tmp_path / "serve", ids)
    np.testing.assert_array_equal(logits, ref)
    assert tm.beam_pair_counts() == {"offered": 2 * 9 * 2 * 2, "computed": 2 * 9 * 2 * 2}
    # mask routers missing from the checkpoint start at zero, not at a random init
    index = tmp_path / "serve" / "model.safetensors.index.json"
    wm = json.loads(index.read_text())
    wm["weight_map"] = {k: v for k, v in wm["weight_map"].items() if "mask_router" not in k}
    index.write_text(json.dumps(wm))
    (tmp_path / "serve" / "mask_router.safetensors").unlink()
    _, logits = _torch_logits(tmp_path / "serve", ids)
    np.testing.assert_array_equal(logits, ref)


def test_expert_implementations_and_bfloat16(tmp_path):
    """transformers' three expert paths give the same BEAM output (dropped pairs get the id-E sentinel, which the
    eager loop and grouped_mm skip); in bfloat16 the mask router stays float32."""
    make_tiny("qwen3_moe", tmp_path / "base")
    fake_run(tmp_path / "base", tmp_path / "run", seed=6)
    out = to_vllm.export(tmp_path / "run" / "ckpt", tmp_path / "serve")
    ids = _ids((2, 10), 160)
    ref = None
    for impl in ("eager", "grouped_mm", "batched_mm"):
        tm, logits = _torch_logits(out, ids, experts_implementation=impl)
        assert tm.config._experts_implementation == impl
        if ref is None:
            ref, counts = logits, tm.beam_pair_counts()
        np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0, err_msg=impl)
        assert tm.beam_pair_counts() == counts
    tm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert tm.model.layers[0].mlp.mask_router.weight.dtype == torch.float32
    assert tm.model.layers[0].mlp.gate.weight.dtype == torch.bfloat16
    with torch.no_grad():
        np.testing.assert_allclose(tm(torch.tensor(ids)).logits.float().numpy(), ref, atol=5e-2, rtol=0)


# ----------------------------------------------------------------------------- PyTorch parity, every family

PARITY = [("mixtral", {}), ("qwen2_moe", {"renormalize": True}), ("qwen3_moe", {}), ("olmoe", {}),
          ("deepseek_v2", {}), ("deepseek_v3", {}), ("glm4_moe", {})]


@pytest.mark.parametrize("family,opts", PARITY, ids=[f for f, _ in PARITY])
def test_pytorch_parity(tmp_path, family, opts):
    make_tiny(family, tmp_path / "base")
    work = tmp_path / "run"
    renormalize = opts.get("renormalize", False)
    flax_model = fake_run(tmp_path / "base", work, seed=1, renormalize=renormalize)
    out = to_vllm.export(work / "ckpt", tmp_path / "serve")
    cfg = json.loads((out / "config.json").read_text())
    base_arch = FAMILY_CONFIGS[family][0].replace("Config", "ForCausalLM")
    assert cfg["architectures"] == ["Beam" + base_arch] and cfg["beam"]["renormalize"] is renormalize
    mask_names = [k for k in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
                  if "mask_router" in k]
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    assert mask_names and all(f".{moe}.mask_router.weight" in k for k in mask_names)
    ids = _ids((2, 13), 160, seed=2)
    tm, frac = _assert_parity(flax_model, out, ids, tau=0.5, renormalize=renormalize)
    assert 0.15 < frac < 0.85, f"{family}: kept fraction {frac} (the test would not exercise the mask)"
    # tau is a serving-time knob: raising it drops more, and parity holds there too
    tm.set_beam_tau(0.8)
    tm.reset_beam_counts()
    with torch.no_grad():
        logits = tm(torch.tensor(ids)).logits.numpy()
    ref = flax_model(ids, mask_hook=BeamHook(0.8, renormalize=renormalize))
    np.testing.assert_allclose(logits, np.asarray(ref.logits), atol=1e-4, rtol=0)
    assert tm.beam_pair_counts()["computed"] < frac * tm.beam_pair_counts()["offered"]
    # and beam_jax reads the exported directory back: same mask routers, same logits, tau from config.json
    back = beam_jax.load_pretrained(out, dtype="float32")
    assert back.beam_config["tau"] == 0.5 and back.beam_config["base_architecture"] == base_arch
    for layer_back, layer in zip(back.layers, flax_model.layers):
        if layer.is_moe:
            np.testing.assert_array_equal(np.asarray(layer_back.mlp.mask_router.kernel[...]),
                                          np.asarray(layer.mlp.mask_router.kernel[...]))
    hook = BeamHook(back.beam_config["tau"], renormalize=renormalize)
    np.testing.assert_allclose(np.asarray(back(ids, mask_hook=hook).logits),
                               np.asarray(flax_model(ids, mask_hook=hook).logits), atol=1e-6, rtol=0)


def test_sharded_source_keeps_its_shards(tmp_path):
    tm = make_tiny("mixtral", tmp_path / "single")
    tm.save_pretrained(tmp_path / "base", max_shard_size="150KB")
    shards = sorted(p.name for p in (tmp_path / "base").glob("*.safetensors"))
    assert len(shards) > 1
    work = tmp_path / "run"
    flax_model = fake_run(tmp_path / "base", work, seed=3)
    out = to_vllm.export(work / "ckpt", tmp_path / "serve")
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == shards
    for s in shards:
        assert (out / s).stat().st_size == (tmp_path / "base" / s).stat().st_size
    index = json.loads((out / "model.safetensors.index.json").read_text())
    source = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k: v for k, v in index["weight_map"].items() if "mask_router" not in k} == source
    assert index["metadata"]["total_size"] > 0
    _assert_parity(flax_model, out, _ids((1, 10), 160), tau=0.5)


def test_fused_source_names_mask_router_like_its_gate(tmp_path):
    make_tiny("mixtral", tmp_path / "base")
    fuse_experts(tmp_path / "base")  # fused-era checkpoints name the MoE block `mlp`, also for Mixtral
    work = tmp_path / "run"
    flax_model = fake_run(tmp_path / "base", work, seed=4)
    out = to_vllm.export(work / "ckpt", tmp_path / "serve")
    from safetensors.numpy import load_file

    assert sorted(load_file(out / "mask_router.safetensors")) == [
        f"model.layers.{i}.mlp.mask_router.weight" for i in (0, 1)]
    _assert_parity(flax_model, out, _ids((2, 8), 160), tau=0.5)


def test_trained_router_rewrites_its_shard(tmp_path):
    """trainable=mask+router: the shard holding the routers is rewritten with the trained values (not linked)."""
    make_tiny("qwen3_moe", tmp_path / "base")
    work = tmp_path / "run"
    flax_model = fake_run(tmp_path / "base", work, seed=5, trainable="mask+router")
    out = to_vllm.export(work / "ckpt", tmp_path / "serve")
    assert json.loads((out / "config.json").read_text())["beam"]["weights"] == ["rewritten"]
    assert (out / "model-00001-of-00001.safetensors").stat().st_ino != \
        (tmp_path / "base" / "model.safetensors").stat().st_ino
    _assert_parity(flax_model, out, _ids((2, 8), 160), tau=0.5)


# ----------------------------------------------------------------------------- refusals


def _refused(capsys, args, out, *fragments):
    capsys.readouterr()  # drop what setting up wrote (progress bars)
    code = to_vllm.main([*map(str, args), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, (f, err)
    assert not out.exists()
    assert _no_temp_dirs(out.parent)
    return err


def test_refuses_missing_base(tmp_path, capsys):
    make_tiny("qwen3_moe", tmp_path / "base")
    fake_run(tmp_path / "base", tmp_path / "run")
    os.rename(tmp_path / "base", tmp_path / "moved")
    _refused(capsys, [tmp_path / "run" / "ckpt"], tmp_path / "serve", str(tmp_path / "base"), "missing")


def test_refuses_changed_base(tmp_path, capsys):
    make_tiny("qwen3_moe", tmp_path / "base")
    fake_run(tmp_path / "base", tmp_path / "run")
    cfg = tmp_path / "base" / "config.json"
    cfg.write_text(cfg.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    _refused(capsys, [tmp_path / "run" / "ckpt"], tmp_path / "serve", "differs", "config.json differs")


def test_refuses_changed_weights(tmp_path, capsys):
    make_tiny("qwen3_moe", tmp_path / "base")
    fake_run(tmp_path / "base", tmp_path / "run")
    with open(tmp_path / "base" / "model.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    _refused(capsys, [tmp_path / "run" / "ckpt"], tmp_path / "serve", "model.safetensors has size")


def test_refuses_shape_mismatch(tmp_path, capsys):
    """A run whose trained tensors do not fit the base (here: recorded against this base, trained on another
    with more experts) is refused before anything is written."""
    make_tiny("qwen3_moe", tmp_path / "base")
    make_tiny("qwen3_moe", tmp_path / "other", num_experts=9)
    fake_run(tmp_path / "base", tmp_path / "run", shapes_from=tmp_path / "other")
    _refused(capsys, [tmp_path / "run" / "ckpt"], tmp_path / "serve", "mask_router", "(64, 9)", "(64, 7)")


def test_refuses_non_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _refused(capsys, [tmp_path / "empty"], tmp_path / "serve", "no checkpoint")
    _refused(capsys, [tmp_path / "nowhere"], tmp_path / "serve", "no such checkpoint")


def test_registration_is_reentrant():
    convert.register()
    convert.register()
    cfg = transformers.AutoConfig.for_model("beam_olmoe", hidden_size=64)
    assert type(cfg).__name__ == "BeamOlmoeConfig"
    assert transformers.AutoModelForCausalLM._model_mapping[type(cfg)].__name__ == "BeamOlmoeForCausalLM"
    assert convert.beam_architecture("DeepseekV2ForCausalLM") == "BeamDeepseekV2ForCausalLM"
    with pytest.raises(ValueError, match="no BEAM variant"):
        convert.beam_architecture("LlamaForCausalLM")
    with pytest.raises(ValueError, match="no BEAM variant"):
        convert.beam_model_type("llama")
    # the torch-free names in `convert` are the classes `convert.modeling_beam` defines
    from convert import modeling_beam

    assert set(convert.BEAM_ARCHITECTURES) == set(modeling_beam.MODELS)
    assert set(convert.BEAM_MODEL_TYPES) == set(modeling_beam.CONFIGS)
    assert {convert.beam_architecture(b): convert.beam_model_type(t) for b, t in convert.BASE_ARCHITECTURES.items()} \
        == {name: m.config_class.model_type for name, m in modeling_beam.MODELS.items()}


# ----------------------------------------------------------------------------- dtype, and no torch


def _safetensors_dtypes(path):
    return to_vllm.shard_dtypes(path)


def test_export_dtype_bfloat16_and_default(tmp_path, capsys):
    """--dtype bfloat16 casts every base tensor (the shard is rewritten, not linked), keeps the mask routers in
    float32 and says so in config.json and the model card; the default and --dtype float32 of a float32 base keep
    the linked shard. transformers' BEAM class in bfloat16 reads the bf16 export as it reads the float32 one."""
    make_tiny("qwen3_moe", tmp_path / "base")
    work = tmp_path / "run"
    fake_run(tmp_path / "base", work, seed=7)
    assert to_vllm.main([str(work / "ckpt"), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    f32 = to_vllm.export(work / "ckpt", tmp_path / "f32")
    same = to_vllm.export(work / "ckpt", tmp_path / "same", dtype="float32")
    bf16 = tmp_path / "bf16"

    cfg = json.loads((bf16 / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert cfg["beam"]["dtype"] == "bfloat16" and cfg["beam"]["source_dtype"] == "float32"
    assert cfg["beam"]["weights"] == ["cast"]
    assert set(_safetensors_dtypes(bf16 / "model-00001-of-00001.safetensors").values()) == {"BF16"}
    assert set(_safetensors_dtypes(bf16 / "mask_router.safetensors").values()) == {"F32"}
    card = (bf16 / "README.md").read_text()
    assert "bfloat16, cast from the base checkpoint's float32 (`--dtype bfloat16`)" in card
    src = (tmp_path / "base" / "model.safetensors").stat()
    assert (bf16 / "model-00001-of-00001.safetensors").stat().st_ino != src.st_ino
    for d in (f32, same):
        c = json.loads((d / "config.json").read_text())
        assert c["dtype"] == "float32" and c["beam"]["dtype"] == c["beam"]["source_dtype"] == "float32"
        assert c["beam"]["weights"] in (["linked"], ["copied"])
        assert set(_safetensors_dtypes(d / "model-00001-of-00001.safetensors").values()) == {"F32"}
        assert "float32, as the base checkpoint" in (d / "README.md").read_text()

    # the cast values are the float32 ones rounded to bfloat16, and the models agree to bf16 precision
    from safetensors.numpy import load_file

    a, b = load_file(f32 / "model-00001-of-00001.safetensors"), load_file(bf16 / "model-00001-of-00001.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(b[k], a[k].astype(to_vllm.numpy_dtype("bfloat16")), err_msg=k)
    ids = _ids((2, 10), 160, seed=3)
    ref = transformers.AutoModelForCausalLM.from_pretrained(f32, dtype=torch.float32).eval()
    tm = transformers.AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16).eval()
    assert tm.model.layers[0].mlp.mask_router.weight.dtype == torch.float32
    with torch.no_grad():
        np.testing.assert_allclose(tm(torch.tensor(ids)).logits.float().numpy(),
                                   ref(torch.tensor(ids)).logits.numpy(), atol=5e-2, rtol=0)

    _refused(capsys, [work / "ckpt", "--dtype", "int8"], tmp_path / "bad", "--dtype", "'int8'", "bfloat16")
    # the base's dtype: config.json's `dtype` / `torch_dtype` as recorded, else what its weights are
    names = to_vllm.source_index(bf16)
    assert to_vllm.base_dtype(bf16, {"torch_dtype": "torch.float16"}, names) == "float16"
    assert to_vllm.base_dtype(bf16, {}, {k: v for k, v in names.items() if "mask_router" not in k}) == "bfloat16"


def _site_without_torch(tmp_path):
    """A site directory holding this environment's packages except torch (symlinks): `python -S` plus
    `site.addsitedir` of it is this environment as README's core install (`pip install -e .`) leaves it."""
    farm = tmp_path / "site-without-torch"
    farm.mkdir()
    hidden = ("torch", "functorch", "torchgen")
    for sp in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        for entry in os.scandir(sp):
            name = entry.name
            if name in hidden or name.startswith("torch-") or (farm / name).exists():
                continue
            (farm / name).symlink_to(entry.path)
    return farm


def test_export_without_torch(tmp_path):
    """`python -m convert.to_vllm` where torch is not installed: the export, bfloat16 included, needs no torch."""
    make_tiny("deepseek_v2", tmp_path / "base")
    fake_run(tmp_path / "base", tmp_path / "run", seed=8)
    farm = _site_without_torch(tmp_path)
    code = (
        "import runpy, site, sys\n"
        f"site.addsitedir({str(farm)!r})\n"
        "try:\n"
        "    import torch\n"
        "    sys.exit('torch is still importable')\n"
        "except ModuleNotFoundError:\n"
        "    pass\n"
        "import convert\n"
        "try:\n"
        "    convert.register()\n"
        "    sys.exit('convert.register() worked without torch')\n"
        "except ImportError as e:\n"
        "    assert \"'torch'\" in str(e) and '.[torch]' in str(e), e\n"
        "sys.argv = ['to_vllm', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_module('convert.to_vllm', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules\n"
        "print('exported without torch')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    res = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path / "run" / "ckpt"), "--out",
                          str(tmp_path / "serve"), "--dtype", "bfloat16"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert res.returncode == 0 and "exported without torch" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
    out = tmp_path / "serve"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BeamDeepseekV2ForCausalLM"] and cfg["dtype"] == "bfloat16"
    assert set(_safetensors_dtypes(out / "model-00001-of-00001.safetensors").values()) == {"BF16"}
    # ... and it is the same export as one written with torch present
    ref = to_vllm.export(tmp_path / "run" / "ckpt", tmp_path / "ref", dtype="bfloat16")
    from safetensors.numpy import load_file

    for f in ("model-00001-of-00001.safetensors", "mask_router.safetensors"):
        a, b = load_file(out / f), load_file(ref / f)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_serve_without_vllm_says_so(monkeypatch, capsys):
    import importlib.util

    from convert.vllm_plugin import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert serve.main(["exported/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: serving needs vLLM") and "\n" not in err and '.[serve]' in err, err
