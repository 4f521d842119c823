"""beam_jax.moe: `MaskRouter.at` (BEAM's mask logits at the candidates) against its reference,
`take_along_axis(mask_router(x), ids)`, on random inputs: the whole-kernel product outside `beam_jax.generate`, the
gather of a transposed copy's rows inside `attention.packed_weights` where T * K < E, the product again where not;
with and without a bias, float32 and bfloat16 activations."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from beam_jax import attention  # noqa: E402
from beam_jax.moe import MaskRouter  # noqa: E402


def _router(rs, d, E, bias):
    mr = MaskRouter(d, E, bias=bias)
    mr.kernel.set_value(jnp.asarray(rs.normal(0, 0.5, (d, E)).astype(np.float32)))
    if bias:
        mr.bias.set_value(jnp.asarray(rs.normal(0, 0.5, (E,)).astype(np.float32)))
    return mr


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("T", [1, 3, 16])
def test_mask_router_at_equals_the_gathered_logits(bias, dtype, T):
    d, E, K = 96, 32, 4
    rs = np.random.RandomState(T + 10 * bias)
    mr = _router(rs, d, E, bias)
    x = jnp.asarray(rs.standard_normal((T, d)).astype(np.float32), dtype)
    ids = jnp.asarray(np.stack([rs.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32))
    want = np.asarray(jnp.take_along_axis(mr(x), ids, axis=-1))
    np.testing.assert_array_equal(np.asarray(mr.at(x, ids)), want)  # outside generate: the same product
    kernel_t = jnp.transpose(mr.kernel[...])
    gathers = []
    real = jnp.einsum

    def counting(spec, *a, **kw):
        gathers.append(spec)
        return real(spec, *a, **kw)

    with attention.packed_weights({id(mr): kernel_t}):
        jnp.einsum = counting
        try:
            got = np.asarray(jax.jit(mr.at)(x, ids))
        finally:
            jnp.einsum = real
    assert bool(gathers) == (T * K < E)  # the rows of the transposed copy where they are fewer than E
    assert got.shape == (T, K) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
