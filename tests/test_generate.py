"""KV-cache generation: greedy tokens equal transformers' `generate`; sampling is seeded and valid."""

import numpy as np
import pytest
import torch

import beam_jax
from hf_tiny import make_tiny


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2"])
def test_greedy_equals_transformers(tmp_path, family):
    tm = make_tiny(family, tmp_path)
    prompt = np.random.RandomState(5).randint(3, 160, size=(1, 6))
    with torch.no_grad():
        ref = tm.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0).numpy()
    model = beam_jax.load_pretrained(tmp_path)
    ours = np.asarray(beam_jax.generate(model, prompt, max_new_tokens=12, eos_token_id=()))
    np.testing.assert_array_equal(ours, ref)


def test_left_padded_batch_greedy(tmp_path):
    tm = make_tiny("qwen3_moe", tmp_path)
    rs = np.random.RandomState(6)
    ids = rs.randint(3, 160, size=(2, 7))
    mask = np.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # row 0 is left-padded
    with torch.no_grad():
        ref = tm.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0).numpy()
    model = beam_jax.load_pretrained(tmp_path)
    ours = np.asarray(beam_jax.generate(model, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=()))
    np.testing.assert_array_equal(ours, ref)


def test_cached_decode_equals_full_forward(tmp_path):
    """Logits of each decoded step equal a full forward over the whole prefix (cache correctness, MLA too)."""
    make_tiny("deepseek_v2", tmp_path)
    model = beam_jax.load_pretrained(tmp_path)
    ids = np.random.RandomState(7).randint(3, 160, size=(2, 9))
    full = np.asarray(model(ids).logits)
    cache = model.init_cache(2, 12)
    out = model(ids[:, :5], cache=cache)
    np.testing.assert_allclose(np.asarray(out.logits), full[:, :5], atol=1e-5, rtol=0)
    cache = out.cache
    for t in range(5, 9):
        out = model(ids[:, t:t + 1], cache=cache)
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), full[:, t], atol=1e-5, rtol=0, err_msg=f"step {t}")


def test_sampling_is_seeded_and_respects_top_k(tmp_path):
    make_tiny("mixtral", tmp_path)
    model = beam_jax.load_pretrained(tmp_path)
    prompt = np.random.RandomState(8).randint(3, 160, size=(3, 4))
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.5, top_k=3, eos_token_id=())
    a = np.asarray(beam_jax.generate(model, prompt, seed=1, **kw))
    b = np.asarray(beam_jax.generate(model, prompt, seed=1, **kw))
    c = np.asarray(beam_jax.generate(model, prompt, seed=2, **kw))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # with top_k=1 sampling is greedy
    g = np.asarray(beam_jax.generate(model, prompt, max_new_tokens=6, eos_token_id=()))
    s = np.asarray(beam_jax.generate(model, prompt, max_new_tokens=6, do_sample=True, top_k=1, seed=3,
                                     eos_token_id=()))
    np.testing.assert_array_equal(g, s)
    # top_p tiny keeps only the most likely token, so it is greedy too
    p = np.asarray(beam_jax.generate(model, prompt, max_new_tokens=6, do_sample=True, top_p=1e-6, seed=4,
                                     eos_token_id=()))
    np.testing.assert_array_equal(g, p)


def test_stops_at_eos_and_pads(tmp_path):
    make_tiny("mixtral", tmp_path)
    model = beam_jax.load_pretrained(tmp_path)
    prompt = np.random.RandomState(9).randint(3, 160, size=(1, 5))
    free = np.asarray(beam_jax.generate(model, prompt, max_new_tokens=6, eos_token_id=()))
    eos = int(free[0, 7])  # pretend the third generated token is the end-of-sequence token
    out = np.asarray(beam_jax.generate(model, prompt, max_new_tokens=6, eos_token_id=eos))
    np.testing.assert_array_equal(out[0], free[0, :8])


# ---- the compiled generation (one jitted prefill + while_loop) against the step-by-step reference

from beam_jax.generate import cache_bucket, compiled_cache_size, generate_reference  # noqa: E402
from beam_jax.routing import BeamHook, TopKHook  # noqa: E402


def _model(tmp_path, family="qwen3_moe", dtype=None, **overrides):
    make_tiny(family, tmp_path, **overrides)
    return beam_jax.load_pretrained(tmp_path, dtype=dtype)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
@pytest.mark.parametrize("hook", [TopKHook(), BeamHook(0.5)], ids=["topk", "beam"])
def test_compiled_equals_uncached_reference(tmp_path, family, hook):
    """Greedy tokens of the compiled path equal a reference that runs a full forward over the whole prefix at every
    step (no KV cache), on random left-padded prompts; BEAM with random mask routers drops real pairs."""
    model = _model(tmp_path, family)
    rs = np.random.RandomState(11)
    for block in (layer.mlp for layer in model.layers if layer.is_moe):
        k = block.mask_router.kernel
        k[...] = rs.normal(0, 2.0, k[...].shape).astype(np.float32)
    ids = rs.randint(3, 160, size=(3, 7))
    mask = np.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    ids[2, :5], mask[2, :5] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=9, eos_token_id=(), mask_hook=hook)
    ours = np.asarray(beam_jax.generate(model, ids, **kw))
    ref = np.asarray(generate_reference(model, ids, use_cache=False, **kw))
    np.testing.assert_array_equal(ours, ref)
    if isinstance(hook, BeamHook):  # the mask really dropped pairs, and the kernel path equals the reference path
        kept = np.mean([np.asarray(m.kept).mean() for m in model(ours, mask_hook=hook).moe])
        assert 0.05 < kept < 0.95
        np.testing.assert_array_equal(ours, np.asarray(beam_jax.generate(model, ids, impl="reference", **kw)))


def test_compiled_equals_cached_reference_bfloat16_and_sampling(tmp_path):
    """bfloat16 weights (the `attention.matmul` fast path) and seeded sampling: same tokens as the step loop."""
    model = _model(tmp_path, dtype="bfloat16")
    prompt = np.random.RandomState(12).randint(3, 160, size=(2, 5))
    for kw in (dict(), dict(do_sample=True, temperature=1.3, top_k=5, seed=7),
               dict(do_sample=True, top_p=0.8, seed=3)):
        kw = dict(max_new_tokens=7, eos_token_id=(), **kw)
        np.testing.assert_array_equal(np.asarray(beam_jax.generate(model, prompt, **kw)),
                                      np.asarray(generate_reference(model, prompt, **kw)), err_msg=str(kw))


def test_eos_early_stop_per_row_and_all(tmp_path):
    """A row that ends continues with the pad token; generation stops when every row has ended."""
    model = _model(tmp_path)
    prompt = np.random.RandomState(13).randint(3, 160, size=(2, 5))
    free = np.asarray(beam_jax.generate(model, prompt, max_new_tokens=8, eos_token_id=()))
    eos = int(free[0, 5 + 2])  # row 0's third token
    kw = dict(max_new_tokens=8, eos_token_id=[eos, 159], pad_token_id=3)
    ours = np.asarray(beam_jax.generate(model, prompt, **kw))
    np.testing.assert_array_equal(ours, np.asarray(generate_reference(model, prompt, **kw)))
    row0 = ours[0, 5:]
    assert row0[2] == eos and (row0[3:] == 3).all()
    if eos not in free[1, 5:]:
        assert ours.shape[1] == 13  # row 1 never ends: all 8 tokens
    # a single row that ends stops the whole generation right there
    one = np.asarray(beam_jax.generate(model, prompt[:1], max_new_tokens=8, eos_token_id=eos))
    np.testing.assert_array_equal(one, free[:1, :8])


def test_no_recompile_within_a_bucket(tmp_path):
    """max_new_tokens, tau and the pad token are traced: changing them within a cache bucket compiles nothing new;
    a longer generation past the bucket compiles once more."""
    model = _model(tmp_path)
    prompt = np.random.RandomState(14).randint(3, 160, size=(1, 6))
    assert cache_bucket(6 + 5) == cache_bucket(6 + 40) == 64 and cache_bucket(6 + 70) == 128
    beam_jax.generate(model, prompt, max_new_tokens=5, eos_token_id=(), mask_hook=BeamHook(0.5))
    n0 = compiled_cache_size()
    for n, tau, pad in ((12, 0.6, None), (40, 0.45, 5), (1, 0.5, None)):
        out = beam_jax.generate(model, prompt, max_new_tokens=n, eos_token_id=(), mask_hook=BeamHook(tau),
                                pad_token_id=pad)
        assert out.shape == (1, 6 + n)
    assert compiled_cache_size() == n0
    beam_jax.generate(model, prompt, max_new_tokens=70, eos_token_id=(), mask_hook=BeamHook(0.5))
    assert compiled_cache_size() == n0 + 1
    # Top-K (a hook without leaves): the default `routing.TOPK` and a fresh `TopKHook()` share one compile
    beam_jax.generate(model, prompt, max_new_tokens=5, eos_token_id=())
    n1 = compiled_cache_size()
    for n in (12, 40):
        beam_jax.generate(model, prompt, max_new_tokens=n, eos_token_id=(), mask_hook=TopKHook())
    assert compiled_cache_size() == n1


def test_edge_cases(tmp_path):
    model = _model(tmp_path)
    prompt = np.random.RandomState(15).randint(3, 160, size=(2, 4))
    np.testing.assert_array_equal(np.asarray(beam_jax.generate(model, prompt, max_new_tokens=0)), prompt)
    with pytest.raises(ValueError, match="max_new_tokens"):
        beam_jax.generate(model, prompt, max_new_tokens=-1)
    with pytest.raises(ValueError, match="attention_mask"):
        beam_jax.generate(model, prompt, attention_mask=np.ones((2, 3)))
    # a plain function hook (static) works as well as the pytree hooks
    import jax.numpy as jnp

    from beam_jax.routing import MaskResult

    def plain_topk(ctx, x, router_logits, weights, ids):
        return MaskResult(None, weights, jnp.ones(ids.shape, bool))

    np.testing.assert_array_equal(
        np.asarray(beam_jax.generate(model, prompt, max_new_tokens=3, eos_token_id=(), mask_hook=plain_topk)),
        np.asarray(beam_jax.generate(model, prompt, max_new_tokens=3, eos_token_id=(), mask_hook=TopKHook())))


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("transpose_w", [False, True])
def test_matmul_fast_path_equals_float32_product(rows, transpose_w):
    """attention.matmul in bfloat16 (padded single row, float32 accumulation) is the float32 product rounded once."""
    import jax.numpy as jnp
    from beam_jax.attention import matmul

    rs = np.random.RandomState(rows)
    x = jnp.asarray(rs.normal(size=(rows, 1, 96)), jnp.bfloat16)
    w = jnp.asarray(rs.normal(size=(40, 96) if transpose_w else (96, 40)), jnp.bfloat16)
    y = matmul(x, w, transpose_w=transpose_w)
    assert y.shape == (rows, 1, 40) and y.dtype == jnp.bfloat16
    w32 = np.asarray(w, np.float32)
    ref = np.asarray(x, np.float32) @ (w32.T if transpose_w else w32)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.asarray(ref, jnp.float32).astype(jnp.bfloat16)))
    x32 = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(np.asarray(matmul(x32, jnp.asarray(w32), transpose_w=transpose_w)), ref, rtol=1e-5,
                               atol=1e-4)


def test_decode_packs_cover_the_dense_bf16_layers_once(tmp_path):
    """`generate` packs every bfloat16 dense projection and the experts (every mask router transposed) once per
    model, again when a kernel changes; its decode steps (and its prefill's experts, and on the AMX build its prefill's
    projections) multiply through the packed targets, with the tokens of the unpacked step loop."""
    from beam_jax import attention, packed_experts as pk, rows_matmul as rm
    from beam_jax.generate import decode_packs

    if not rm.packing_available():
        pytest.skip("packing is off here (needs the AVX2, AVX512-BF16 or AMX build of beam_jax._ffi on the CPU "
                    "backend)")
    model = _model(tmp_path, dtype="bfloat16")
    packs = decode_packs(model)
    L = model.cfg.num_hidden_layers
    for i in range(L):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = f"layers/{i}/self_attn/{proj}"
            assert key in packs, sorted(packs)
            w = getattr(model.layers[i].self_attn, proj).kernel[...]
            assert packs[key].shape == w.shape
    assert "lm_head" in packs
    for i, layer in enumerate(model.layers):  # BEAM's mask routers: their kernels transposed (`MaskRouter.at`)
        if layer.is_moe:
            np.testing.assert_array_equal(np.asarray(packs[f"layers/{i}/mlp/mask_router"]),
                                          np.asarray(layer.mlp.mask_router.kernel[...]).T)
    experts = sorted(k for k in packs if "expert" in k)
    assert experts == ([f"layers/{i}/mlp/experts" for i in range(L)] if pk.packing_available() else []), experts
    assert decode_packs(model) is packs  # cached
    new = model.lm_head.kernel[...] * 2
    model.lm_head.kernel.set_value(new)
    again = decode_packs(model)
    assert again is not packs
    np.testing.assert_array_equal(np.asarray(again["lm_head"].packed), np.asarray(rm.pack_weight(new).packed))

    calls, expert_calls = [], []
    real, real_experts = attention.packed_rows_matmul, pk.masked_moe_packed

    def counting(x, pw):
        calls.append(x.shape[0])
        return real(x, pw)

    def counting_experts(x, pe, *a):
        expert_calls.append(x.shape[0])
        return real_experts(x, pe, *a)

    prompt = np.random.RandomState(21).randint(3, 160, size=(3, 12))  # a shape no other test compiles
    kw = dict(max_new_tokens=6, eos_token_id=())
    try:
        attention.packed_rows_matmul = counting
        pk.masked_moe_packed = counting_experts
        ours = np.asarray(beam_jax.generate(model, prompt, **kw))
    finally:
        attention.packed_rows_matmul = real
        pk.masked_moe_packed = real_experts
    assert 3 in calls  # the decode step's rows
    assert (36 in calls) == (rm.packed_rows_max() >= 36)  # the prefill's 3 x 12 rows: on the AMX build's tiles only
    # the experts of prefill (36 tokens) and decode steps (3) run packed in every layer
    want = sorted([36] * L + [3] * L) if pk.packing_available() else []
    assert sorted(expert_calls) == want, expert_calls
    np.testing.assert_array_equal(ours, np.asarray(generate_reference(model, prompt, **kw)))


def test_experts_packed_only_where_the_copy_fits(tmp_path, monkeypatch):
    """The experts' packed copy (as large as the experts) is made only where it leaves half of the available memory;
    once made it stays (the check would otherwise count the copy against itself and drop it on the next call)."""
    from beam_jax import packed_experts as pk
    from beam_jax.generate import decode_packs

    if not pk.packing_available():
        pytest.skip("the experts are packed on the AVX2, AVX512-BF16 and AMX builds of beam_jax._ffi only (this "
                    "processor runs another)")
    model = _model(tmp_path, dtype="bfloat16")
    fits = {"now": False}
    monkeypatch.setattr(pk, "fits_in_memory", lambda nbytes: fits["now"])
    packs = decode_packs(model)
    assert packs and not any("expert" in k for k in packs)  # the dense layers are packed all the same
    fits["now"] = True
    model.lm_head.kernel.set_value(model.lm_head.kernel[...] * 2)  # any change packs again
    packs = decode_packs(model)
    assert sum("expert" in k for k in packs) == model.cfg.num_hidden_layers
    fits["now"] = False
    assert decode_packs(model) is packs


def test_greedy_is_argmax_with_ties_nans_and_infs():
    import jax.numpy as jnp

    from beam_jax.generate import greedy

    rs = np.random.RandomState(22)
    logits = rs.normal(size=(6, 300)).astype(np.float32)
    logits[1, [7, 90, 200]] = 9.0  # ties: the first
    logits[2, [5, 40]] = np.nan  # the first NaN, as argmax
    logits[3] = -np.inf
    logits[4, 150] = np.inf
    logits[5, -1] = 50.0  # the last position
    for dtype in (jnp.float32, jnp.bfloat16):  # bfloat16: what `generate`'s greedy steps take from the LM head
        got = np.asarray(greedy(jnp.asarray(logits, dtype)))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(logits, dtype), axis=-1)))
        assert got[1] == 7 and got[2] == 5 and got[3] == 0 and got[4] == 150 and got[5] == 299


def test_float32_logits_off_keeps_the_heads_dtype(tmp_path):
    """`float32_logits=False` (generate's greedy steps) returns the LM head's bfloat16 logits, which are the float32
    ones before their conversion, so their argmax is the same."""
    import jax.numpy as jnp

    model = _model(tmp_path, dtype="bfloat16")
    ids = np.random.RandomState(23).randint(3, 160, size=(2, 6))
    f32, raw = model(ids).logits, model(ids, float32_logits=False).logits
    assert f32.dtype == np.float32 and raw.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(raw.astype(np.float32)), np.asarray(f32))


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_decode_steps_attend_through_the_decode_kernel(tmp_path, family):
    """On the CPU, `generate`'s decode steps (not its prefill) run attention on the decode-attention target (GQA and
    MLA), with the tokens of the step loop, which attends through XLA."""
    from beam_jax import attention, decode_attention as da

    if not da.use_decode_attention("float32"):
        pytest.skip("the decode-attention target runs on the CPU backend only")
    model = _model(tmp_path, family)
    calls = []
    real = attention.decode_attention

    def counting(q, k, v, allowed, scale):
        calls.append((q.shape, k.shape))
        return real(q, k, v, allowed, scale)

    prompt = np.random.RandomState(23).randint(3, 160, size=(2, 5))  # a shape no other test compiles
    kw = dict(max_new_tokens=5, eos_token_id=())
    try:
        attention.decode_attention = counting
        ours = np.asarray(beam_jax.generate(model, prompt, **kw))
    finally:
        attention.decode_attention = real
    assert calls and all(q[0] == 2 for q, _ in calls)  # traced once per layer, one query per sequence
    assert len(calls) == model.cfg.num_hidden_layers
    np.testing.assert_array_equal(ours, np.asarray(generate_reference(model, prompt, **kw)))
