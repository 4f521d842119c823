"""beam_jax.decode_attention (the CPU decode-attention target) against `attention.attend`, its reference, on random
inputs: every CPU build (bfloat16 under AVX512-BF16 takes the vdpbf16ps loops, the rest the float32 ones), the three
float dtypes, grouped / multi-head / MLA-shaped heads, dims with tails, one or several chunks of slots, padding, causal
and sliding-window masks, a sequence with no slot allowed; its errors; and when `attend` uses it (`beam_jax.generate`:
tests/test_generate.py)."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from beam_jax import attention, decode_attention as da, kernel  # noqa: E402
from beam_jax.attention import AttentionContext, allowed_slots, attend  # noqa: E402

pytestmark = pytest.mark.skipif(not da.decode_attention_available(), reason="beam_jax._ffi has no decode target")

TOL = {"float32": dict(rtol=1e-5, atol=1e-6), "bfloat16": dict(rtol=2e-2, atol=2e-2),
       "float16": dict(rtol=2e-3, atol=2e-3)}

# (H, Hkv, Dk, Dv): Qwen3-like groups of 8, Mixtral's 4, a group of 6 (4 + a tail head), multi-head (OLMoE),
# MLA's expanded heads (Dk 192, Dv 128), dims that are no multiple of 8 or 16
SHAPES = [(32, 4, 128, 128), (8, 2, 64, 64), (12, 2, 32, 32), (4, 4, 64, 64), (4, 4, 192, 128), (6, 3, 40, 24),
          (2, 1, 16, 72)]


@pytest.fixture(params=kernel.CPU_ISAS)
def any_isa(request):
    """Every CPU build this processor runs, the portable one included (beam_jax._ffi.set_cpu_isa)."""
    from beam_jax import _ffi

    if kernel.CPU_ISAS.index(_ffi.best_cpu_isa()) < kernel.CPU_ISAS.index(request.param):
        pytest.skip(f"this processor has no {request.param} build to run (best: {_ffi.best_cpu_isa()})")
    before = _ffi.cpu_isa()
    assert _ffi.set_cpu_isa(request.param) == request.param
    yield request.param
    _ffi.set_cpu_isa(before)


def _case(rs, B, L, H, Hkv, Dk, Dv, dtype, index, window=None, valid_p=0.8):
    q = jnp.asarray(rs.normal(0, 1, (B, 1, H, Dk)), dtype)
    k = jnp.asarray(rs.normal(0, 1, (B, L, Hkv, Dk)), dtype)
    v = jnp.asarray(rs.normal(0, 1, (B, L, Hkv, Dv)), dtype)
    valid = rs.random_sample((B, L)) < valid_p
    valid[:, index] = True  # the query's own slot, as in a decode step
    ctx = AttentionContext(cos=None, sin=None, kv_valid=jnp.asarray(valid), q_slot=jnp.asarray([index], jnp.int32),
                           index=jnp.int32(index))
    return q, k, v, ctx


def _compare(q, k, v, ctx, scale, window, dtype):
    L = k.shape[1]
    ref = attend(q, k, v, ctx, scale, window)  # outside decode_kernels: the reference path
    allowed = allowed_slots(ctx, L, window)[:, 0]
    got = da.decode_attention(q[:, 0], k, v, allowed, scale)
    assert got.shape == ref[:, 0].shape and got.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref[:, 0], np.float32), **TOL[dtype])
    return got


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "h{}-kv{}-dk{}-dv{}".format(*s))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_matches_attend(any_isa, shape, dtype):
    H, Hkv, Dk, Dv = shape
    rs = np.random.RandomState(hash((shape, dtype)) % 2**31)
    # slots: one chunk of 64 or less, several (the parts summed in order), a sliding window inside the chunks
    for B, L, index, window in [(3, 37, 30, None), (2, 64, 63, None), (1, 9, 4, None), (2, 50, 41, 16),
                                (2, 150, 140, None), (1, 200, 170, 100)]:
        q, k, v, ctx = _case(rs, B, L, H, Hkv, Dk, Dv, dtype, index, window)
        _compare(q, k, v, ctx, 1.0 / np.sqrt(Dk), window, dtype)


def test_no_slot_allowed_is_the_mean_of_every_slot(any_isa):
    """A sequence whose mask allows nothing gets the reference's answer (every slot at the lowest score: uniform),
    next to a sequence that attends normally."""
    rs = np.random.RandomState(3)
    q, k, v, ctx = _case(rs, 2, 21, 8, 2, 32, 32, "float32", 20)
    valid = np.asarray(ctx.kv_valid).copy()
    valid[1] = False
    ctx = AttentionContext(cos=None, sin=None, kv_valid=jnp.asarray(valid), q_slot=ctx.q_slot, index=ctx.index)
    got = _compare(q, k, v, ctx, 0.2, None, "float32")
    mean = np.asarray(v[1], np.float64).mean(0)  # [Hkv, Dv]
    np.testing.assert_allclose(np.asarray(got[1]).reshape(2, 4, 32), np.repeat(mean[:, None], 4, 1), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_spans_with_empty_chunks(any_isa, dtype):
    """The kernel works inside each sequence's span of allowed slots (first to last) and the chunks of 64 that hold
    it: allowed runs with whole empty chunks before, between and after them, a span inside one chunk, a sequence
    that allows every slot and one that allows a single slot at the end."""
    rs = np.random.RandomState(5)
    L = 300
    q, k, v, ctx = _case(rs, 5, L, 8, 2, 64, 48, dtype, L - 1)
    valid = np.zeros((5, L), bool)
    valid[0, 3:10] = valid[0, 200:211] = True  # two runs, chunks 1 and 2 empty between them, 4 after
    valid[1, 130:140] = True                  # inside chunk 2
    valid[2] = True
    valid[3, L - 1] = True
    valid[4, 70:260:7] = True                  # spread over chunks 1-4
    ctx = AttentionContext(cos=None, sin=None, kv_valid=jnp.asarray(valid), q_slot=ctx.q_slot, index=ctx.index)
    _compare(q, k, v, ctx, 1.0 / np.sqrt(64), None, dtype)


def test_large_scores_are_stable():
    """Scores in the thousands (no overflow: the softmax subtracts the maximum), a one-hot result."""
    rs = np.random.RandomState(4)
    q, k, v, ctx = _case(rs, 2, 16, 4, 4, 16, 16, "float32", 15, valid_p=1.0)
    got = _compare(q * 300, k, v, ctx, 1.0, None, "float32")
    assert np.isfinite(np.asarray(got)).all()


def test_errors_name_the_operand():
    f32 = jnp.float32
    q, k, v = jnp.ones((2, 8, 16), f32), jnp.ones((2, 5, 2, 16), f32), jnp.ones((2, 5, 2, 8), f32)
    ok = jnp.ones((2, 5), bool)
    assert da.decode_attention(q, k, v, ok, 1.0).shape == (2, 8, 8)
    with pytest.raises(ValueError, match="q must be"):
        da.decode_attention(q[0], k, v, ok, 1.0)
    with pytest.raises(ValueError, match="k must be"):
        da.decode_attention(q, jnp.ones((2, 5, 3, 16), f32), v, ok, 1.0)  # 3 heads do not divide 8
    with pytest.raises(ValueError, match="k must be"):
        da.decode_attention(q, k[..., :8], v, ok, 1.0)
    with pytest.raises(ValueError, match="allowed must be"):
        da.decode_attention(q, k, v, ok.astype(jnp.int32), 1.0)
    with pytest.raises(ValueError, match="allowed must be"):
        da.decode_attention(q, k, v, ok[:, :4], 1.0)
    with pytest.raises(TypeError, match="share one dtype"):
        da.decode_attention(q.astype(jnp.bfloat16), k, v, ok, 1.0)
    with pytest.raises(TypeError, match="share one dtype"):
        da.decode_attention(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32), ok, 1.0)


def test_use_follows_backend_dtype_and_switch(monkeypatch):
    assert da.use_decode_attention(jnp.bfloat16) == (jax.default_backend() == "cpu")
    assert not da.use_decode_attention(jnp.int8)
    monkeypatch.setenv("BEAM_JAX_DECODE_ATTENTION", "0")
    assert not da.use_decode_attention(jnp.bfloat16)


def test_attend_uses_the_kernel_only_inside_decode_kernels(monkeypatch):
    """`attend` sends one query to the kernel inside `attention.decode_kernels` (generate's tracing), never more
    queries, never outside it, and not when switched off."""
    if jax.default_backend() != "cpu":
        pytest.skip("the decode-attention target is CPU-only")
    calls = []
    real = attention.decode_attention

    def counting(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(attention, "decode_attention", counting)
    rs = np.random.RandomState(5)
    q, k, v, ctx = _case(rs, 2, 12, 4, 2, 16, 16, "bfloat16", 11)
    ref = attend(q, k, v, ctx, 0.25)
    assert calls == []
    with attention.decode_kernels():
        got = attend(q, k, v, ctx, 0.25)
        assert calls == [(2, 4, 16)]
        ctx2 = AttentionContext(cos=None, sin=None, kv_valid=ctx.kv_valid, q_slot=jnp.asarray([10, 11], jnp.int32),
                                index=jnp.int32(10))
        attend(jnp.concatenate([q, q], 1), k, v, ctx2, 0.25)  # two queries: the reference path
        assert len(calls) == 1
        monkeypatch.setenv("BEAM_JAX_DECODE_ATTENTION", "0")
        attend(q, k, v, ctx, 0.25)
        assert len(calls) == 1
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), **TOL["bfloat16"])
