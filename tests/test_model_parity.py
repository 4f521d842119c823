"""Parity of the Flax models with transformers (PyTorch, CPU) on tiny random checkpoints.

float32: logits within 1e-4, router logits within 1e-5, identical selected experts, layer by layer.
bfloat16: our error against the float32 truth must stay within 2x transformers' own bfloat16 error
(plus 1e-2 absolute): both round every matmul input to 8 mantissa bits, so they should be equally far
from float32, not necessarily close to each other bit for bit.
"""

import numpy as np
import pytest
import torch

import beam_jax
from beam_jax import attention
from hf_tiny import FAMILY_CONFIGS, capture_routing, fuse_experts, legacy_rope_theta, make_tiny

CASES = [
    ("mixtral", {}),
    ("mixtral", {"num_experts_per_tok": 1, "num_key_value_heads": 1}),  # K = 1, multi-query
    ("qwen2_moe", {}),
    ("qwen2_moe", {"norm_topk_prob": True, "mlp_only_layers": [0], "num_experts_per_tok": 6}),  # K = E, dense layer
    ("qwen3_moe", {}),
    ("qwen3_moe", {"num_experts_per_tok": 1, "num_experts": 3}),
    ("olmoe", {}),
    ("olmoe", {"num_experts_per_tok": 5, "norm_topk_prob": True}),  # K = E
    ("deepseek_v2", {}),  # group-limited routing, MLA without q LoRA, one dense layer
    ("deepseek_v2", {"topk_method": "greedy", "n_group": None, "topk_group": None, "q_lora_rank": 24,
                     "num_experts_per_tok": 1}),
    ("deepseek_v3", {}),  # sigmoid scores, noaux_tc group Top-K with e_score_correction_bias, q LoRA
    ("deepseek_v3", {"rope_interleave": False, "q_lora_rank": None, "n_group": 1, "topk_group": 1,
                     "norm_topk_prob": False}),
    ("glm4_moe", {}),  # GQA with partial rotary (0.5), qkv bias, per-head q/k norm, noaux_tc
    ("glm4_moe", {"use_qk_norm": False, "attention_bias": False, "n_group": 4, "topk_group": 3,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.25}}),
]


def _ids(n, seed=0, vocab=160):
    return np.random.RandomState(seed).randint(3, vocab, size=n)


def _torch_forward(tm, ids):
    records = capture_routing(tm)
    with torch.no_grad():
        out = tm(torch.tensor(ids))
    return out.logits.float().numpy(), records


@pytest.mark.parametrize("family,overrides", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_float32_parity(tmp_path, family, overrides):
    tm = make_tiny(family, tmp_path, **overrides)
    ids = _ids((2, 11))
    ref_logits, records = _torch_forward(tm, ids)
    model = beam_jax.load_pretrained(tmp_path)
    assert model.dtype == np.float32
    for impl in ("reference", "grouped", "dense"):
        out = model(ids, impl=impl)
        np.testing.assert_allclose(np.asarray(out.logits), ref_logits, atol=1e-4, rtol=0, err_msg=f"logits ({impl})")
    assert len(out.moe) == len(records)
    for layer, (rec, (hf_logits, hf_ids)) in enumerate(zip(out.moe, records)):
        ours = np.asarray(rec.router_logits).reshape(hf_logits.shape)
        np.testing.assert_allclose(ours, hf_logits, atol=1e-5, rtol=0, err_msg=f"router logits, MoE layer {layer}")
        ours_ids = np.sort(np.asarray(rec.topk_ids).reshape(hf_ids.shape), -1)
        np.testing.assert_array_equal(ours_ids, np.sort(hf_ids, -1), err_msg=f"selected experts, MoE layer {layer}")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v2", "glm4_moe"])
def test_bfloat16_parity(tmp_path, family):
    tm32 = make_tiny(family, tmp_path / "f32")
    make_tiny(family, tmp_path / "bf16", dtype="bfloat16")
    ids = _ids((2, 11), seed=1)
    truth, _ = _torch_forward(tm32, ids)
    import transformers

    tm16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    hf16, _ = _torch_forward(tm16, ids)
    model = beam_jax.load_pretrained(tmp_path / "bf16")
    assert model.dtype == np.dtype("bfloat16")  # the checkpoint's dtype is kept
    ours = np.asarray(model(ids).logits)
    hf_err = np.abs(hf16 - truth).max()
    our_err = np.abs(ours - truth).max()
    assert hf_err > 0  # bf16 really differs from float32, so the bound below is meaningful
    assert our_err <= 2 * hf_err + 1e-2, (our_err, hf_err)
    # a requested dtype overrides the checkpoint's: float32 from the bf16 files equals transformers' upcast
    m32 = beam_jax.load_pretrained(tmp_path / "bf16", dtype="float32")
    tm16_32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    ref, _ = _torch_forward(tm16_32, ids)
    np.testing.assert_allclose(np.asarray(m32(ids).logits), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_checkpoint_layouts(tmp_path, family):
    """Fused experts on disk, `rope_theta` instead of `rope_parameters`, and a sharded index all load."""
    tm = make_tiny(family, tmp_path / "per_expert")
    ids = _ids((1, 9), seed=2)
    ref, _ = _torch_forward(tm, ids)

    fused = tmp_path / "fused"
    tm.save_pretrained(fused)
    fuse_experts(fused)
    legacy_rope_theta(fused)
    np.testing.assert_allclose(np.asarray(beam_jax.load_pretrained(fused)(ids).logits), ref, atol=1e-4, rtol=0)

    sharded = tmp_path / "sharded"
    tm.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    np.testing.assert_allclose(np.asarray(beam_jax.load_pretrained(sharded)(ids).logits), ref, atol=1e-4, rtol=0)


def test_rope_theta_is_read(tmp_path):
    """A non-default theta in the legacy field changes the model exactly as in transformers."""
    tm = make_tiny("mixtral", tmp_path, rope_theta=123.0)
    legacy_rope_theta(tmp_path)
    model = beam_jax.load_pretrained(tmp_path)
    assert model.cfg.rope_theta == 123.0
    ids = _ids((1, 12), seed=3)
    ref, _ = _torch_forward(tm, ids)
    np.testing.assert_allclose(np.asarray(model(ids).logits), ref, atol=1e-4, rtol=0)


def test_left_padding_matches_unpadded(tmp_path):
    """A left-padded row gives the same logits at its real positions as the same tokens unpadded."""
    make_tiny("qwen3_moe", tmp_path)
    model = beam_jax.load_pretrained(tmp_path)
    ids = _ids((1, 7), seed=4)
    plain = np.asarray(model(ids).logits)
    padded = np.concatenate([np.zeros((1, 3), int), ids], 1)
    mask = np.concatenate([np.zeros((1, 3), int), np.ones((1, 7), int)], 1)
    out = np.asarray(model(padded, attention_mask=mask).logits)[:, 3:]
    np.testing.assert_allclose(out, plain, atol=1e-5, rtol=0)


def test_logits_to_keep_is_the_last_positions(tmp_path):
    """logits_to_keep=n (transformers' argument) gives the last n positions' logits of the full forward, for the tied
    and the untied head; routing records are unchanged."""
    for tied in (False, True):
        make_tiny("qwen3_moe", tmp_path / str(tied), tie_word_embeddings=tied)
        model = beam_jax.load_pretrained(tmp_path / str(tied))
        ids = _ids((2, 9), seed=5)
        full = model(ids)
        for n in (1, 3):
            out = model(ids, logits_to_keep=n)
            assert out.logits.shape == (2, n, full.logits.shape[-1])
            np.testing.assert_allclose(np.asarray(out.logits), np.asarray(full.logits)[:, -n:], atol=1e-6, rtol=0)
            np.testing.assert_array_equal(np.asarray(out.moe[0].topk_ids), np.asarray(full.moe[0].topk_ids))


def test_model_fresh_cache_prefill_equals_the_whole_cache(tmp_path):
    """The model's prefill with `fresh_cache` (generate's) against the same prefill reading the whole cache: the
    logits at real positions, the routing and the cache it writes; a prompt of several causal blocks, left padding."""
    make_tiny("qwen3_moe", tmp_path)
    model = beam_jax.load_pretrained(tmp_path)
    S = attention.CAUSAL_BLOCK + 41
    ids = np.random.RandomState(0).randint(3, 160, (2, S))
    mask = np.ones((2, S), np.int32)
    mask[1, :23] = 0
    cache = model.init_cache(2, 2 * S)
    whole = model(ids, attention_mask=mask, cache=cache)
    fresh = model(ids, attention_mask=mask, cache=cache, fresh_cache=True)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(fresh.logits)[real], np.asarray(whole.logits)[real], atol=2e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(fresh.moe[0].topk_ids)[real], np.asarray(whole.moe[0].topk_ids)[real])
    assert int(fresh.cache["index"]) == int(whole.cache["index"]) == S
    np.testing.assert_array_equal(np.asarray(fresh.cache["valid"]), np.asarray(whole.cache["valid"]))
    for a, b in zip(fresh.cache["layers"], whole.cache["layers"]):  # written at the same slots, real ones alike
        for key in ("k", "v"):
            np.testing.assert_allclose(np.asarray(a[key])[:, :S][real], np.asarray(b[key])[:, :S][real], atol=2e-5)
            assert not np.asarray(a[key])[:, S:].any()


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_param_dtype_reaches_every_weight(tmp_path, family):
    """bfloat16 compute with float32 master weights (train.trainable=all): every parameter is stored in float32."""
    import jax.numpy as jnp
    from flax import nnx

    from beam_jax.loading import read_config
    from beam_jax.model import MoECausalLM

    make_tiny(family, tmp_path)
    cfg, _, _ = read_config(tmp_path)
    abstract = nnx.eval_shape(lambda: MoECausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                                  rngs=nnx.Rngs(0)))
    wrong = [".".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
             if v.get_value().dtype != jnp.float32]
    assert not wrong, wrong


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_score_correction_bias_is_loaded_and_chooses(tmp_path, family):
    """noaux_tc families: `mlp.gate.e_score_correction_bias` is read from the checkpoint (not left at zero), is not
    a trainable Param, and changes which experts are chosen (so the parity cases above test it)."""
    import jax.numpy as jnp
    from flax import nnx

    from beam_jax.moe import RouterBias
    from beam_jax.routing import route

    tm = make_tiny(family, tmp_path)
    model = beam_jax.load_pretrained(tmp_path)
    block = model.layers[1].mlp
    hf_bias = tm.model.layers[1].mlp.gate.e_score_correction_bias.numpy()
    assert np.abs(hf_bias).max() > 0
    np.testing.assert_array_equal(np.asarray(block.gate.e_score_correction_bias[...]), hf_bias)
    assert isinstance(block.gate.e_score_correction_bias, RouterBias)
    assert not any("e_score_correction_bias" in ".".join(map(str, p))
                   for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    logits = jnp.asarray(np.random.RandomState(0).randn(64, model.cfg.num_experts), jnp.float32)
    _, with_bias, _ = route(logits, block.spec, 20 * jnp.asarray(hf_bias))
    _, without, _ = route(logits, block.spec, None)
    assert (np.sort(np.asarray(with_bias), -1) != np.sort(np.asarray(without), -1)).any()
