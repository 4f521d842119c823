"""beam_jax.packed_experts: the packed layout, and the expert kernel on it against the row-major kernel and the
plain reference, on random inputs, under each CPU kernel build this processor has."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beam_jax import kernel, packed_experts as pk
from beam_jax.experts import experts_reference

pytestmark = pytest.mark.skipif(
    kernel._ffi is None or "beam_masked_moe_packed" not in kernel._ffi.registrations()
    or jax.default_backend() != "cpu",
    reason="needs the CPU build of beam_jax._ffi with the beam_masked_moe_packed target")


def _problem(seed, E, d, f, T, K, drop=0.3):
    rng = np.random.default_rng(seed)
    wg, wu = (jnp.asarray(rng.standard_normal((E, d, f)) * 0.1, jnp.bfloat16) for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((E, f, d)) * 0.1, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((T, d)), jnp.bfloat16)
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    ids[rng.random((T, K)) < 0.05] = -1  # out-of-range ids are dropped pairs, as in masked_moe
    w = jnp.asarray(rng.random((T, K)) + 0.1, jnp.float32)
    keep = jnp.asarray(rng.random((T, K)) >= drop)
    return x, (wg, wu, wd), jnp.asarray(ids), w, keep


def test_layout_is_pack_weight_per_expert():
    """packed[e, b, p, c, i] = w[e, 2p + i, 32b + c], zeros past the last column."""
    rng = np.random.default_rng(0)
    E, d, f = 3, 6, 40
    ws = [np.asarray(jnp.asarray(rng.standard_normal(s), jnp.bfloat16).astype(jnp.float32)) for s in
          ((E, d, f), (E, d, f), (E, f, d))]
    pe = pk.pack_experts(*(jnp.asarray(w, jnp.bfloat16) for w in ws))
    assert (pe.d, pe.f, pe.num_experts) == (d, f, E)
    assert pe.w_gate.shape == (E, 2, d // 2, 32, 2) and pe.w_down.shape == (E, 1, f // 2, 32, 2)
    for w, packed in ((ws[0], pe.w_gate), (ws[2], pe.w_down)):
        K, N = w.shape[1:]
        want = np.zeros((E, -(-N // 32), K // 2, 32, 2), np.float32)
        for e in range(E):
            for k in range(K):
                for n in range(N):
                    want[e, n // 32, k // 2, n % 32, k % 2] = w[e, k, n]
        np.testing.assert_array_equal(np.asarray(packed, np.float32), want)
    assert pe.nbytes == 2 * (2 * E * (2 * 32) * d + E * (1 * 32) * f)  # bf16; f padded to 2 blocks, d to 1


# (E, d, f, T, K): column blocks cut short (f 70, d 100), reduction tails past whole AMX steps (d 100: 50 pairs, f 70),
# a single token, segments of more than 32 rows (two passes of the tiles), Qwen3-30B-A3B's expert shapes at decode size.
# Many experts and few tokens: segments of one row (the AVX2 build's several-runs-at-once pass) with tails in d and f.
SHAPES = [(8, 96, 80, 5, 2), (4, 100, 70, 40, 2), (3, 64, 64, 90, 3), (16, 256, 128, 300, 4), (16, 2048, 768, 3, 8),
          (32, 100, 230, 3, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_the_row_major_kernel_and_the_reference(cpu_isa, shape):
    x, ws, ids, w, keep = _problem(1, *shape)
    pe = pk.pack_experts(*ws)
    y = np.asarray(jax.jit(pk.masked_moe_packed)(x, pe, ids, w, keep), np.float32)
    row_major = np.asarray(kernel.masked_moe(x, *ws, ids, w, keep, backend="ffi"), np.float32)
    # the reference knows no out-of-range ids: those pairs go to it dropped, with a valid id
    ref = np.asarray(experts_reference(x.astype(jnp.float32), *(a.astype(jnp.float32) for a in ws),
                                       jnp.maximum(ids, 0), w, keep & (ids >= 0)))
    scale = np.abs(ref).max()
    assert scale > 0 and np.abs(y).max() > 0
    # the row-major kernel rounds h to bf16 as this one does: they differ by summation order and rounding only
    np.testing.assert_allclose(y, row_major, rtol=0, atol=1e-2 * scale)
    np.testing.assert_allclose(y, ref, rtol=0, atol=3e-2 * scale)  # against f32 h: bf16's error on h and y


@pytest.mark.parametrize("E,d,f", [(32, 100, 230), (64, 2048, 768)])
def test_a_token_alone_equals_the_same_token_in_a_segment_of_many_rows(cpu_isa, E, d, f):
    # alone, each of its experts is a one-row segment; repeated 5 times, a 5-row one: each output keeps one chain
    # of additions either way, so the rows agree bitwise (generate's decode of one sequence equals its batch rows)
    x, ws, _, w, keep = _problem(4, E, d, f, 1, 8, drop=0.0)
    ids = jnp.asarray(np.random.default_rng(5).choice(E, (1, 8), replace=False), jnp.int32)  # eight experts
    pe = pk.pack_experts(*ws)
    alone = np.asarray(pk.masked_moe_packed(x, pe, ids, w, keep), np.float32)
    x5, ids5, w5, keep5 = (jnp.repeat(a, 5, axis=0) for a in (x, ids, w, keep))
    many = np.asarray(pk.masked_moe_packed(x5, pe, ids5, w5, keep5), np.float32)
    assert np.abs(alone).max() > 0
    for r in range(5):
        np.testing.assert_array_equal(many[r], alone[0])


def test_dropped_pairs_cost_nothing_and_leave_zeros(cpu_isa):
    x, ws, ids, w, keep = _problem(2, 8, 64, 96, 6, 2)
    pe = pk.pack_experts(*ws)
    keep = keep.at[0].set(False).at[1].set(True)
    y = np.asarray(pk.masked_moe_packed(x, pe, ids, w, keep), np.float32)
    assert np.all(y[0] == 0)  # a token without kept pairs
    # a dropped pair's expert does not enter: changing a dropped pair's weight changes nothing
    w2 = w.at[0, 0].set(123.0)
    np.testing.assert_array_equal(np.asarray(pk.masked_moe_packed(x, pe, ids, w2, keep), np.float32), y)
    y_all = np.asarray(pk.masked_moe_packed(x, pe, ids, w, None), np.float32)
    np.testing.assert_allclose(y_all[1], y[1], rtol=0, atol=0)  # token 1 keeps both either way
    assert np.abs(y_all[0]).max() > 0


def test_bad_input_is_named():
    x, ws, ids, w, keep = _problem(3, 4, 32, 64, 2, 2)
    pe = pk.pack_experts(*ws)
    with pytest.raises(ValueError, match="x must be"):
        pk.masked_moe_packed(x.astype(jnp.float32), pe, ids, w, keep)
    with pytest.raises(ValueError, match="weights must be"):
        pk.masked_moe_packed(x, pe, ids, w[:, :1], keep)
    with pytest.raises(ValueError, match="keep must be"):
        pk.masked_moe_packed(x, pe, ids, w, keep[:1])
    with pytest.raises(ValueError, match="d and f must be even"):
        pk.pack_experts(*(jnp.zeros((2, 5, 8), jnp.bfloat16),) * 2, jnp.zeros((2, 8, 5), jnp.bfloat16))
    with pytest.raises(ValueError, match="w_up must be .* and w_down"):
        pk.pack_experts(ws[0], ws[1], ws[1])
    with pytest.raises(ValueError, match="w_gate must be a bfloat16"):
        pk.pack_experts(ws[0].astype(jnp.float32), ws[1], ws[2])


def test_packing_follows_the_build_and_the_switch(cpu_isa, monkeypatch):
    # generate packs the experts on the builds with a fast path for the layout (AVX2, vdpbf16ps, AMX tiles)
    from beam_jax import rows_matmul as rm

    assert pk.packing_available() == (cpu_isa in rm.PACKED_ISAS and rm.packing_available())
    monkeypatch.setenv("BEAM_JAX_PACKED_EXPERTS", "0")
    assert not pk.packing_available()


def test_fits_in_memory_leaves_half_free(monkeypatch):
    monkeypatch.setattr(pk, "_available_memory_bytes", lambda: 1000)
    assert pk.fits_in_memory(500) and not pk.fits_in_memory(501)
    monkeypatch.setattr(pk, "_available_memory_bytes", lambda: None)
    assert pk.fits_in_memory(1 << 60)
