"""Bad checkpoints and configs are refused with errors that name the file, field or tensor."""

import json

import numpy as np
import pytest

import beam_jax
from beam_jax import CheckpointError, ConfigError
from hf_tiny import make_tiny


def _edit_config(path, **changes):
    f = path / "config.json"
    c = json.loads(f.read_text())
    c.update(changes)
    f.write_text(json.dumps(c))


def _rewrite_tensors(path, fn):
    from safetensors.numpy import load_file, save_file

    t = load_file(path / "model.safetensors")
    save_file(fn(t), path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def tiny(tmp_path):
    make_tiny("mixtral", tmp_path)
    return tmp_path


def test_unknown_architecture(tiny):
    _edit_config(tiny, architectures=["LlamaForCausalLM"])
    with pytest.raises(ConfigError, match=r"config\.json.*'architectures'.*LlamaForCausalLM.*supported"):
        beam_jax.load_pretrained(tiny)


def test_field_of_wrong_type(tiny):
    _edit_config(tiny, hidden_size="64")
    with pytest.raises(ConfigError, match=r"config\.json: field 'hidden_size'"):
        beam_jax.load_pretrained(tiny)


def test_invalid_field_value(tiny):
    _edit_config(tiny, num_experts_per_tok=9)
    with pytest.raises(ConfigError, match=r"config\.json.*'num_experts_per_tok'"):
        beam_jax.load_pretrained(tiny)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        beam_jax.load_pretrained(tmp_path)


def test_missing_tensor(tiny):
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    _rewrite_tensors(tiny, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is missing"):
        beam_jax.load_pretrained(tiny)


def test_wrong_shape(tiny):
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite_tensors(tiny, lambda t: {**t, name: t[name][:, :-1].copy()})
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' has shape \(128, 63\), "
                                              r"expected \(128, 64\)"):
        beam_jax.load_pretrained(tiny)


def test_unexpected_tensor(tiny):
    _rewrite_tensors(tiny, lambda t: {**t, "model.layers.0.extra.weight": np.ones(3, np.float32)})
    with pytest.raises(CheckpointError, match="'model.layers.0.extra.weight' in model.safetensors"):
        beam_jax.load_pretrained(tiny)


def test_truncated_file(tiny):
    f = tiny / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        beam_jax.load_pretrained(tiny)


def test_missing_shard(tmp_path):
    tm = make_tiny("qwen3_moe", tmp_path / "a")
    tm.save_pretrained(tmp_path / "s", max_shard_size="100KB")
    shard = sorted((tmp_path / "s").glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} is listed but missing"):
        beam_jax.load_pretrained(tmp_path / "s")


@pytest.mark.parametrize("family,ignored", [("deepseek_v3", True), ("glm4_moe", True), ("deepseek_v2", False)])
def test_multi_token_prediction_layers(tmp_path, family, ignored):
    """DeepSeek-V3 and GLM-4.5 checkpoints carry MTP layers after the last decoder layer: left unread, as
    transformers does; in another family the same tensor is an unused tensor, refused by name."""
    make_tiny(family, tmp_path)
    L = json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"]
    extra = f"model.layers.{L}.eh_proj.weight"
    _rewrite_tensors(tmp_path, lambda t: {**t, extra: np.ones((4, 4), np.float32)})
    if ignored:
        assert beam_jax.load_pretrained(tmp_path).cfg.num_hidden_layers == L
    else:
        with pytest.raises(CheckpointError, match=rf"not used by DeepseekV2ForCausalLM, e\.g\. '{extra}'"):
            beam_jax.load_pretrained(tmp_path)
