"""beam_jax.rows_matmul (the decode-time projections' FFI target) against a float64 product, its gradients against
XLA's, where attention.matmul uses it, and its errors."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beam_jax import attention, rows_matmul as rm

from procs import run_generic_isa

pytestmark = pytest.mark.skipif(not rm.rows_matmul_available(), reason="beam_jax._ffi has no beam_rows_matmul target")

# relative to the largest |y|: one rounding of the output plus float32 accumulation
TOL = {jnp.float32: 2e-6, jnp.bfloat16: 8e-3, jnp.float16: 1e-3}
SHAPES = [(1, 2048, 512), (1, 5, 3), (2, 130, 77), (3, 64, 16), (4, 257, 1000), (8, 300, 129), (9, 33, 40),
          (17, 1, 40), (32, 128, 256)]


def _inputs(rng, M, K, N, dtype):
    x = jnp.asarray(rng.standard_normal((M, K), np.float32), dtype)
    w = jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.1, dtype)
    return x, w


def _ref(x, w):
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_equals_the_float64_product(M, K, N, dtype):
    rng = np.random.default_rng(M * 1000 + K + N)
    x, w = _inputs(rng, M, K, N, dtype)
    got = jax.jit(rm.rows_matmul)(x, w)
    assert got.shape == (M, N) and got.dtype == jnp.dtype(dtype)
    want = _ref(x, w)
    err = np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))
    assert err < TOL[dtype], err


def test_is_deterministic_and_matches_xla_closely():
    rng = np.random.default_rng(1)
    x, w = _inputs(rng, 3, 1024, 384, jnp.float32)
    a, b = rm.rows_matmul(x, w), rm.rows_matmul(x, w)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(a), np.asarray(x @ w), rtol=1e-5, atol=1e-5)


def test_zero_rows_and_under_vmap():
    rng = np.random.default_rng(2)
    x, w = _inputs(rng, 0, 16, 8, jnp.bfloat16)
    assert rm.rows_matmul(x, w).shape == (0, 8)
    xs = jnp.asarray(rng.standard_normal((3, 2, 16), np.float32))
    w = jnp.asarray(rng.standard_normal((16, 8), np.float32))
    got = jax.vmap(rm.rows_matmul, in_axes=(0, None))(xs, w)
    np.testing.assert_allclose(np.asarray(got), np.einsum("bmk,kn->bmn", np.asarray(xs), np.asarray(w)), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_equal_xlas(dtype):
    rng = np.random.default_rng(3)
    x, w = _inputs(rng, 3, 40, 24, dtype)
    dy = jnp.asarray(rng.standard_normal((3, 24), np.float32), dtype)

    def loss(f):
        return lambda x, w: jnp.sum((f(x, w) * dy).astype(jnp.float32))

    xla = lambda x, w: jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())),  # noqa: E731
                                           preferred_element_type=jnp.float32).astype(x.dtype)
    got = jax.grad(loss(rm.rows_matmul), argnums=(0, 1))(x, w)
    want = jax.grad(loss(xla), argnums=(0, 1))(x, w)
    for g, h in zip(got, want):
        assert g.dtype == h.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32), rtol=TOL[dtype] * 2,
                                   atol=TOL[dtype] * 2)


def test_bad_input_is_named():
    x = jnp.ones((2, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"x must be \[M, K\] and w \[K, N\], got x \(2, 8\) and w \(4, 3\)"):
        rm.rows_matmul(x, jnp.ones((4, 3), jnp.bfloat16))
    with pytest.raises(TypeError, match="share one dtype"):
        rm.rows_matmul(x, jnp.ones((8, 3), jnp.float32))
    with pytest.raises(TypeError, match="share one dtype"):
        rm.rows_matmul(x.astype(jnp.int32), jnp.ones((8, 3), jnp.int32))


def _targets(fn, *args):
    """The lowered program of a fresh trace of fn (a new function each time: jit caches traces by function)."""
    return str(jax.jit(lambda *a: fn(*a)).lower(*args).as_text())


def test_attention_matmul_uses_it_for_a_few_bf16_rows_only(monkeypatch):
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((64, 32), np.float32), jnp.bfloat16)
    few = jnp.asarray(rng.standard_normal((1, rm.rows_max(jnp.bfloat16), 64), np.float32), jnp.bfloat16)
    many = jnp.asarray(rng.standard_normal((1, rm.rows_max(jnp.bfloat16) + 1, 64), np.float32), jnp.bfloat16)
    assert "beam_rows_matmul" in _targets(attention.matmul, few, w)
    assert "beam_rows_matmul" not in _targets(attention.matmul, many, w)
    assert "beam_rows_matmul" not in _targets(attention.matmul, few.astype(jnp.float32), w.astype(jnp.float32))
    assert "beam_rows_matmul" not in _targets(lambda x, w: attention.matmul(x, w, transpose_w=True), few, w.T)
    # same numbers either way, to one bfloat16 rounding
    fast = attention.matmul(few, w)
    monkeypatch.setenv("BEAM_JAX_ROWS_MATMUL", "0")
    assert "beam_rows_matmul" not in _targets(attention.matmul, few, w)
    slow = attention.matmul(few, w)
    np.testing.assert_allclose(np.asarray(fast, np.float32), np.asarray(slow, np.float32), rtol=1e-2, atol=1e-2)


def test_generic_isa():
    # The non-AVX2 build of the loop, forced through BEAM_JAX_CPU_ISA=generic.
    code = (
        "import numpy as np, jax.numpy as jnp\n"
        "from beam_jax import _ffi\n"
        "from beam_jax.rows_matmul import rows_matmul\n"
        "assert _ffi.cpu_isa() == 'generic', _ffi.cpu_isa()\n"
        "rng = np.random.default_rng(0)\n"
        "for dt, tol in ((jnp.float32, 2e-6), (jnp.bfloat16, 8e-3), (jnp.float16, 1e-3)):\n"
        "    for M, K, N in ((1, 130, 77), (9, 64, 40)):\n"
        "        x = jnp.asarray(rng.standard_normal((M, K), np.float32), dt)\n"
        "        w = jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.1, dt)\n"
        "        want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)\n"
        "        got = np.asarray(rows_matmul(x, w), np.float64)\n"
        "        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < tol, (dt, M, K, N)\n"
        "print('ok')\n")
    run_generic_isa(code)


# Every row count of a group (1..8: the AVX512-BF16 loop is unrolled per count), columns with tails of the 32-column
# blocks (none, under 16, over 16), reductions with tails of the 8-row passes, several row groups (of 8 rows in the
# AVX2 loop, of up to 64 in the AVX512-BF16 one), and each chunk length of the AVX512-BF16 loop (8, 16 and 32 rows of
# w, by the width of w's rows) with reductions long enough to prefetch and with tails of the chunk.
ISA_SHAPES = [(1, 2048, 512), (2, 24, 40), (3, 37, 70), (4, 130, 33), (5, 9, 64), (6, 64, 17), (7, 300, 129),
              (8, 257, 96), (8, 1, 48), (11, 40, 50), (24, 16, 32), (32, 70, 45), (33, 19, 64), (70, 24, 33),
              (65, 30, 40), (1, 611, 1100), (3, 333, 700), (8, 203, 2100), (5, 150, 1024)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_each_simd_build_equals_the_float64_product(cpu_isa, dtype):
    rng = np.random.default_rng(7)
    f = jax.jit(rm.rows_matmul)
    for M, K, N in ISA_SHAPES:
        x, w = _inputs(rng, M, K, N, dtype)
        want = _ref(x, w)
        err = np.max(np.abs(np.asarray(f(x, w), np.float64) - want)) / np.max(np.abs(want))
        assert err < TOL[dtype], (cpu_isa, M, K, N, err)


def _under_builds(isas, f, *args):
    """f(*args) as float32 numpy under each CPU kernel build in `isas` (beam_jax._ffi.set_cpu_isa), in order; the best
    build is selected again afterwards."""
    from beam_jax import _ffi

    outs = []
    try:
        for isa in isas:
            _ffi.set_cpu_isa(isa)
            outs.append(np.asarray(f(*args), np.float32))
    finally:
        _ffi.set_cpu_isa(_ffi.best_cpu_isa())
    return outs


def test_simd_builds_agree_in_bfloat16():
    # The AVX512-BF16 loop (vdpbf16ps) against the AVX2 one (f32 FMAs) on the same bf16 operands: both accumulate
    # exact products in f32, so they differ by summation order and the output's rounding only.
    from beam_jax import _ffi

    if _ffi.best_cpu_isa() not in rm.DP_ISAS:
        pytest.skip(f"this processor has no avx512bf16 build to compare (best: {_ffi.best_cpu_isa()})")
    rng = np.random.default_rng(8)
    x, w = _inputs(rng, 8, 1000, 300, jnp.bfloat16)
    a, b = _under_builds(("avx2", "avx512bf16"), jax.jit(rm.rows_matmul), x, w)
    np.testing.assert_allclose(b, a, rtol=0, atol=8e-3 * np.max(np.abs(a)))


def test_rows_max_follows_the_selected_build(cpu_isa):
    # Past 32 bf16 rows (AVX512-BF16) or 8 (float16) XLA's product is as fast (bench/decode_proj.py); the AVX2 loop
    # leads XLA's bf16 dot up to 32 rows; the packed product on AMX tiles is faster at any row count.
    want = {"avx2": rm.ROWS_MAX_BF16_AVX2, "avx512bf16": rm.ROWS_MAX_BF16_DP, "amx": rm.ROWS_MAX_BF16_DP}.get(
        cpu_isa, rm.ROWS_MAX)
    assert rm.rows_max(jnp.bfloat16) == want
    assert rm.rows_max(jnp.float16) == rm.ROWS_MAX
    packed = {"amx": rm.PACKED_ROWS_MAX_AMX, "avx2": rm.PACKED_ROWS_MAX_AVX2}.get(cpu_isa, want)
    assert rm.packed_rows_max() == packed
    if jax.default_backend() == "cpu":
        assert rm.use_rows_matmul(want, jnp.bfloat16) and not rm.use_rows_matmul(want + 1, jnp.bfloat16)
        assert rm.use_packed_rows_matmul(packed) and not rm.use_packed_rows_matmul(packed + 1)
        assert rm.use_packed_rows_matmul(512) == (cpu_isa == "amx")


def test_set_cpu_isa_names_the_builds():
    from beam_jax import _ffi

    best = _ffi.best_cpu_isa()
    assert best in ("generic", "avx2", "avx512bf16", "amx")
    try:
        assert _ffi.set_cpu_isa("generic") == "generic" and _ffi.cpu_isa() == "generic"
        assert _ffi.set_cpu_isa("amx") == best  # capped at what the processor has
        with pytest.raises(ValueError, match="cpu isa must be 'generic', 'avx2', 'avx512bf16' or 'amx', got 'sse4'"):
            _ffi.set_cpu_isa("sse4")
    finally:
        _ffi.set_cpu_isa(best)


def test_env_switch_is_read_at_trace_time(monkeypatch):
    monkeypatch.setenv("BEAM_JAX_ROWS_MATMUL", "0")
    assert not rm.use_rows_matmul(1, jnp.bfloat16)
    monkeypatch.delenv("BEAM_JAX_ROWS_MATMUL")
    assert rm.use_rows_matmul(1, jnp.bfloat16) == (jax.default_backend() == "cpu")
    assert not rm.use_rows_matmul(rm.rows_max(jnp.bfloat16) + 1, jnp.bfloat16)
    assert not rm.use_rows_matmul(1, jnp.float32)
    assert "BEAM_JAX_ROWS_MATMUL" not in os.environ


# ---- packed weights (rows_matmul.pack_weight / packed_rows_matmul: generate's decode projections) -------------------

# ... and for the AMX build's tiles: one and two row tiles (up to 16 and 32 rows, each size at the edges), more than
# 32 rows (passes), reductions with and without a tail of pairs past the last whole tile of 16 pairs.
PACKED_SHAPES = [(M, K + K % 2, N) for M, K, N in ISA_SHAPES] + [
    (9, 2, 1), (16, 4096, 64), (15, 32, 40), (17, 96, 50), (31, 100, 33), (48, 64, 70), (100, 66, 129), (33, 34, 32)]
needs_packed = pytest.mark.skipif(
    rm.kernel._ffi is None or "beam_packed_rows_matmul" not in rm.kernel._ffi.registrations(),
    reason="beam_jax._ffi has no beam_packed_rows_matmul target")


def test_pack_weight_layout():
    # packed[b, p, c] = (w[2p, 32b + c], w[2p + 1, 32b + c]), zeros past column N
    w = jnp.asarray(np.random.default_rng(3).standard_normal((6, 40)), jnp.bfloat16)
    pw = rm.pack_weight(w)
    assert pw.packed.shape == (2, 3, rm.PACK_COLS, 2) and pw.packed.dtype == jnp.bfloat16 and pw.shape == (6, 40)
    wn, pk = np.asarray(w, np.float32), np.asarray(pw.packed, np.float32)
    for b, p, c, j in [(0, 0, 0, 0), (0, 2, 5, 1), (1, 1, 7, 0), (1, 2, 7, 1)]:
        assert pk[b, p, c, j] == wn[2 * p + j, 32 * b + c]
    assert (pk[1, :, 8:] == 0).all()


@needs_packed
def test_each_build_of_the_packed_product_equals_the_float64_product(cpu_isa):
    # The AVX512-BF16 build's vdpbf16ps loop and the other builds' reference loop, on every row-group size (1..8),
    # several groups, column tails of a block and K from 2 up.
    rng = np.random.default_rng(9)
    f = jax.jit(rm.packed_rows_matmul)
    for M, K, N in PACKED_SHAPES:
        x, w = _inputs(rng, M, K, N, jnp.bfloat16)
        got = f(x, rm.pack_weight(w))
        assert got.shape == (M, N) and got.dtype == jnp.bfloat16
        want = _ref(x, w)
        err = np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))
        assert err < TOL[jnp.bfloat16], (cpu_isa, M, K, N, err)


@needs_packed
def test_amx_tiles_agree_with_the_vdpbf16ps_loop():
    # The same packed operands through AMX tiles and through vdpbf16ps: both sum exact bf16 products in f32, so they
    # differ by summation order and the output's rounding only (and the tiles do run: some outputs differ).
    from beam_jax import _ffi

    if _ffi.best_cpu_isa() != "amx":
        pytest.skip(f"this processor has no amx build to compare (best: {_ffi.best_cpu_isa()})")
    rng = np.random.default_rng(11)
    x, w = _inputs(rng, 40, 2048, 300, jnp.bfloat16)
    a, b = _under_builds(("avx512bf16", "amx"), jax.jit(rm.packed_rows_matmul), x, rm.pack_weight(w))
    np.testing.assert_allclose(b, a, rtol=0, atol=8e-3 * np.max(np.abs(a)))
    assert (a != b).any()


@needs_packed
def test_packed_agrees_with_rows_matmul():
    # Same bf16 operands, both f32 accumulation: they differ by summation order and the output's rounding only.
    rng = np.random.default_rng(10)
    x, w = _inputs(rng, 8, 2048, 300, jnp.bfloat16)
    a = np.asarray(rm.rows_matmul(x, w), np.float32)
    b = np.asarray(rm.packed_rows_matmul(x, rm.pack_weight(w)), np.float32)
    np.testing.assert_allclose(b, a, rtol=0, atol=8e-3 * np.max(np.abs(a)))
    assert rm.packed_rows_matmul(x[:0], rm.pack_weight(w)).shape == (0, 300)


@needs_packed
def test_packed_bad_input_is_named():
    w = jnp.ones((5, 8), jnp.bfloat16)
    with pytest.raises(ValueError,
                       match=r"pack_weight: w must be \[K, N\] bfloat16 with K even, got bfloat16 \(5, 8\)"):
        rm.pack_weight(w)
    with pytest.raises(ValueError, match="pack_weight: .* got float32"):
        rm.pack_weight(jnp.ones((4, 8), jnp.float32))
    pw = rm.pack_weight(jnp.ones((4, 8), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"packed_rows_matmul: x must be \[M, 4\] bfloat16, got bfloat16 \(2, 6\)"):
        rm.packed_rows_matmul(jnp.ones((2, 6), jnp.bfloat16), pw)
    bad = rm.PackedWeight(pw.packed[:, :1], 4, 8)  # a packed array that does not match K: the target says so
    want = r"wp must be \[ceil\(N / 32\), K / 2, 32, 2\] = \[1, 2, 32, 2\], got \[1, 1, 32, 2\]"
    with pytest.raises(Exception, match=want):
        jax.block_until_ready(rm.packed_rows_matmul(jnp.ones((2, 4), jnp.bfloat16), bad))


def test_packing_follows_the_build_and_the_env_switch(monkeypatch, cpu_isa):
    from beam_jax import _ffi

    on = jax.default_backend() == "cpu" and "beam_packed_rows_matmul" in _ffi.registrations()
    assert rm.packing_available() == (on and cpu_isa in rm.PACKED_ISAS)  # not the portable build
    monkeypatch.setenv("BEAM_JAX_PACKED", "0")
    assert not rm.packing_available()
