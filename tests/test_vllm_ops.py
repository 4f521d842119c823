"""`convert.vllm_plugin.ops.register_cpu_op`: the plugin's way of registering its torch operators (a
`torch.library` fragment with a CPU kernel and a fake, as vLLM registers its own). A toy op registered through it
gets the schema of its annotations, runs its Python kernel on CPU tensors, and is opaque to torch.compile: traced
once through its fake with a dynamic row count, the compiled graph calls the real kernel at every size. The
plugin's own ops through it: tests/test_vllm_moe.py (`beam_jax::masked_experts`), tests/test_vllm_linear.py
(`beam_jax::packed_linear`)."""

import pytest

torch = pytest.importorskip("torch")
from convert.vllm_plugin.ops import register_cpu_op  # noqa: E402  (plain torch: no vLLM needed)

CALLS = []


def _test_scaled_rows(x: torch.Tensor, scale: torch.Tensor, keep: int) -> torch.Tensor:
    """x [T, d] -> x[:keep] * scale, a data-dependent output size: the fake cannot know it, the kernel does."""
    CALLS.append(x.shape[0])
    return x[:keep] * scale


def _test_scaled_rows_fake(x, scale, keep):
    return x.new_empty((keep, x.shape[1]))


OP = register_cpu_op(_test_scaled_rows, _test_scaled_rows_fake)


def test_schema_and_eager_call():
    assert OP is torch.ops.beam_jax._test_scaled_rows
    assert str(OP.default._schema) == ("beam_jax::_test_scaled_rows(Tensor x, Tensor scale, SymInt keep) -> Tensor")
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(5, 3, generator=g), torch.randn(3, generator=g)
    CALLS.clear()
    torch.testing.assert_close(OP(x, s, 4), x[:4] * s, rtol=0, atol=0)
    assert CALLS == [5]


def test_opaque_under_torch_compile():
    torch._dynamo.reset()
    step = torch.compile(lambda x, s: OP(x + 1, s, 2) * 2, dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    CALLS.clear()
    for rows in (7, 3, 11):  # traced at the first, then every size through the same graph
        x, s = torch.randn(rows, 4, generator=g), torch.randn(4, generator=g)
        torch.testing.assert_close(step(x, s), (x[:2] + 1) * s * 2)
    assert CALLS == [7, 3, 11]


def test_a_second_registration_is_refused():
    with pytest.raises(RuntimeError, match="_test_scaled_rows"):
        register_cpu_op(_test_scaled_rows, _test_scaled_rows_fake)
