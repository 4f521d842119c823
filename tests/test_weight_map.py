"""beam_jax.weight_map: the one table of weight names, checked on every family's tiny checkpoint (per-expert and
fused), in both directions, and its refusals of an ambiguous or incomplete checkpoint."""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import beam_jax
from beam_jax import CheckpointError
from beam_jax.export_hf import hf_state_dict
from beam_jax.loading import read_config
from beam_jax.model import MoECausalLM
from beam_jax.weight_map import FUSED_EXPERTS, STACK_EXPERTS, AmbiguousTensor, LayoutError, MissingTensor, resolve
from hf_tiny import FAMILY_CONFIGS, fuse_experts, make_tiny

FAMILIES = sorted(FAMILY_CONFIGS)


def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(path / "model.safetensors")


def _get(tensors):
    """A `Source.read` getter over an in-memory {name: array}."""
    return lambda name, window: tensors[name][tuple(slice(a, b) for a, b in window)]


def _params(cfg):
    model = nnx.eval_shape(lambda: MoECausalLM(cfg, rngs=nnx.Rngs(0)))
    return {".".join(map(str, p)): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(model))}


def _windows(shape, rng):
    """The whole parameter and one random sub-window (what a device of a sharded load reads)."""
    part = []
    for n in shape:
        a = int(rng.randint(0, n))
        part.append((a, int(rng.randint(a + 1, n + 1))))
    return [None, part]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (per-expert dir, fused dir)"""
    root = tmp_path_factory.mktemp("weight_map")
    out = {}
    for fam in FAMILIES:
        make_tiny(fam, root / fam)
        shutil.copytree(root / fam, root / f"{fam}-fused")
        fuse_experts(root / f"{fam}-fused")
        out[fam] = (root / fam, root / f"{fam}-fused")
    return out


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_resolves_to_one_source(tiny, family, layout):
    """Each parameter has exactly one source (the mask routers none: a base checkpoint lacks them), of the stored
    shapes; together they use every tensor once; reading them (whole, and a window) equals the loaded model."""
    d = tiny[family][layout == "fused"]
    cfg, fam, _ = read_config(d)
    tensors = _tensors(d)
    loaded = {".".join(map(str, p)): np.asarray(v.get_value())  # from the per-expert layout, for both
              for p, v in nnx.to_flat_state(nnx.state(beam_jax.load_pretrained(tiny[family][0])))}
    used, transforms = [], set()
    rng = np.random.RandomState(0)
    for path, shape in _params(cfg).items():
        src = resolve(fam, cfg, path, shape, tensors)
        if "mask_router" in path:
            assert src is None, path
            continue
        assert src is not None and src.param == path and src.shape == shape
        assert [tuple(tensors[n].shape) for n in src.names] == list(src.shapes), path
        used += src.names
        transforms.add(src.transform)
        for w in _windows(shape, rng):
            got = src.read(_get(tensors), w)
            want = loaded[path] if w is None else loaded[path][tuple(slice(a, b) for a, b in w)]
            np.testing.assert_array_equal(np.asarray(got, want.dtype), want, err_msg=f"{path} {w}")
    assert sorted(set(used)) == sorted(tensors)  # nothing left over ...
    gate_up = {n for n in used if n.endswith(".experts.gate_up_proj")}
    assert len(used) == len(tensors) + len(gate_up)  # ... and only gate_up_proj read twice (gate and up)
    assert (FUSED_EXPERTS in transforms) == (layout == "fused") and (STACK_EXPERTS in transforms) != (layout == "fused")


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_hf_state_dict(tiny, family):
    """hf_state_dict -> resolve -> read gives back every parameter (mask routers and DeepSeek-V3's / GLM's
    e_score_correction_bias included), bit for bit, in the family's own names."""
    d = tiny[family][0]
    model = beam_jax.load_pretrained(d)
    rng = np.random.RandomState(1)
    for layer in model.layers:  # mask routers off zero, so the round trip sees them
        if layer.is_moe:
            k = layer.mlp.mask_router.kernel
            k.set_value(jnp.asarray(rng.randn(*k.get_value().shape), jnp.float32))
    sd = hf_state_dict(model, include_mask_router=True)
    assert set(sd) >= set(_tensors(d))  # the base checkpoint's names, plus the mask routers
    assert all(v.dtype == np.float32 for k, v in sd.items() if "mask_router" in k)
    cfg, fam = model.cfg, beam_jax.FAMILIES[model.cfg.architecture]
    for p, var in nnx.to_flat_state(nnx.state(model)):
        path, want = ".".join(map(str, p)), np.asarray(var.get_value())
        src = resolve(fam, cfg, path, want.shape, sd)
        assert src is not None, path
        np.testing.assert_array_equal(np.asarray(src.read(_get(sd))), want, err_msg=path)


def test_mask_router_sits_next_to_the_router(tiny):
    """Mixtral names its MoE block `block_sparse_moe`, fused-era checkpoints `mlp`: the mask router follows the
    router's name, whichever it is; float32 [E, d]."""
    for d, block in zip(tiny["mixtral"], ("block_sparse_moe", "mlp")):
        cfg, fam, _ = read_config(d)
        names = set(_tensors(d))
        src = resolve(fam, cfg, "layers.1.mlp.mask_router.kernel", (64, 5), names, writing=True)
        assert src.names == (f"model.layers.1.{block}.mask_router.weight",) and src.shapes == ((5, 64),)
        written = src.write(np.ones((64, 5), np.float64))
        assert written[src.names[0]].dtype == np.float32 and written[src.names[0]].shape == (5, 64)
        # present (an exported BEAM directory): read, not optional any more
        assert resolve(fam, cfg, "layers.1.mlp.mask_router.kernel", (64, 5), names | set(src.names)) == src


def test_ambiguous_checkpoint_is_refused(tiny, tmp_path):
    """Both `block_sparse_moe.gate.weight` and `mlp.gate.weight`: no silent choice, the error names both."""
    from safetensors.numpy import save_file

    cfg, fam, _ = read_config(tiny["mixtral"][0])
    t = _tensors(tiny["mixtral"][0])
    both = ("model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.mlp.gate.weight")
    t[both[1]] = t[both[0]].copy()
    with pytest.raises(AmbiguousTensor, match=rf"layers\.0\.mlp\.gate\.kernel matches 2.*'{both[0]}' and "
                                              rf"'{both[1]}'") as e:
        resolve(fam, cfg, "layers.0.mlp.gate.kernel", (64, 5), t)
    assert e.value.tensors == both
    # through the loader, with the checkpoint's path
    d = tmp_path / "both"
    shutil.copytree(tiny["mixtral"][0], d)
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{d}: .*'{both[0]}' and '{both[1]}'"):
        beam_jax.load_pretrained(d)
    # experts in both layouts at once
    fused = _tensors(tiny["mixtral"][1])
    t = {**_tensors(tiny["mixtral"][0]), "model.layers.0.mlp.experts.down_proj":
         fused["model.layers.0.mlp.experts.down_proj"]}
    with pytest.raises(AmbiguousTensor, match=r"'model\.layers\.0\.block_sparse_moe\.experts\.0\.w2\.weight' and "
                                              r"'model\.layers\.0\.mlp\.experts\.down_proj'"):
        resolve(fam, cfg, "layers.0.mlp.experts.w_down", (5, 48, 64), t)


def test_missing_tensor_is_named(tiny, tmp_path):
    from safetensors.numpy import save_file

    cfg, fam, _ = read_config(tiny["mixtral"][0])
    t = _tensors(tiny["mixtral"][0])
    gate = "model.layers.1.block_sparse_moe.gate.weight"
    del t[gate]
    with pytest.raises(MissingTensor, match=rf"tensor '{gate}' is missing .*layers\.1\.mlp\.gate\.kernel.*"
                                            r"'model\.layers\.1\.mlp\.gate\.weight'"):
        resolve(fam, cfg, "layers.1.mlp.gate.kernel", (64, 5), t)
    d = tmp_path / "missing"
    shutil.copytree(tiny["mixtral"][0], d)
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor '{gate}' is missing"):
        beam_jax.load_pretrained(d)
    # no expert tensors in either layout: both looked for
    t = {k: v for k, v in _tensors(tiny["mixtral"][0]).items() if ".experts." not in k}
    with pytest.raises(MissingTensor, match=r"no expert tensors for layer 0 \(w_gate\): looked for "
                                            r"'model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight'.*"
                                            r"'model\.layers\.0\.mlp\.experts\.gate_up_proj'"):
        resolve(fam, cfg, "layers.0.mlp.experts.w_gate", (5, 64, 48), t)


def test_fused_layout_is_not_written_back(tiny):
    """`convert.to_vllm` replaces base tensors by name; one parameter cannot be written into a fused tensor."""
    from convert import to_vllm

    d = tiny["qwen3_moe"][1]
    cfg, fam, _ = read_config(d)
    names = to_vllm.source_index(d)
    with pytest.raises(LayoutError):
        resolve(fam, cfg, "layers.0.mlp.experts.w_up", (7, 64, 24), names, writing=True).write(np.zeros((7, 64, 24)))
    with pytest.raises(to_vllm.ExportError, match=r"'model\.layers\.0\.mlp\.experts\.gate_up_proj' holds every "
                                                  r"expert's projections fused.*trainable=mask only"):
        to_vllm.hf_tensors(cfg, fam, {("layers", 0, "mlp", "experts", "w_up"): np.zeros((7, 64, 24), np.float32)},
                           names)
    # the mask routers and the router itself are written under the base's names
    out = to_vllm.hf_tensors(cfg, fam, {("layers", 0, "mlp", "mask_router", "kernel"): np.ones((64, 7), np.float32),
                                        ("layers", 0, "mlp", "gate", "kernel"): np.ones((64, 7), np.float32)}, names)
    assert sorted(out) == ["model.layers.0.mlp.gate.weight", "model.layers.0.mlp.mask_router.weight"]
    with pytest.raises(to_vllm.ExportError, match=r"no tensor 'model\.layers\.0\.mlp\.nope\.weight' to replace"):
        to_vllm.hf_tensors(cfg, fam, {("layers", 0, "mlp", "nope", "kernel"): np.ones((4, 4), np.float32)}, names)
