"""BEAM inside vLLM's fused MoE layer: routing with the mask, and expert compute that skips dropped pairs.

Three pieces, all installed while a BEAM model is being built (`beam_moe_factory`):

- `BeamRouting`, the layer's `custom_routing_function`: the family's own Top-K (softmax in float32, optional
  group-limited selection, renormalisation, routed scaling), then `m_hat = sigmoid(x @ W_m^T)` at the K
  candidates and `keep = m_hat >= tau`. Kept pairs get `g` (or the renormalised `g`), dropped pairs weight 0
  and the id `E` (one past the last expert). A custom routing function also makes vLLM pick a modular
  kernel that takes ids from the router, never a monolithic one that routes from the logits itself.
- `BeamMoERunner`, the layer's runner: removes dropped pairs before any GEMM.
  CPU: the kept pairs become the rows of a top_k=1 call (`x[token]`, `id`, `weight`) and the result is
  `index_add_`-ed back per token; the CPU kernel computes every row it is given, so this is what makes MoE
  time follow the kept fraction. CUDA (written from vLLM 0.32's source, not run here): the ids stay [T, K]
  and an expert map sends id E to -1, so `moe_align_block_size` (ignore_invalid_experts) gives those pairs
  no rows and the pad-aware sum skips them; raw -1 ids are unguarded in the small-batch kernel.
- Counters of offered and computed (token, expert) pairs, per layer and per process (`pair_counts()`).

The runner's forward goes through vLLM's opaque `moe_forward` custom op on every platform, so
torch.compile never traces the data-dependent compaction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref

import torch
from torch import nn

from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
from vllm.platforms import current_platform

_RUNNERS: "weakref.WeakSet[BeamMoERunner]" = weakref.WeakSet()


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
    tau: float = 0.5
    beam_renormalize: bool = False
    mask_router: nn.Linear | None = None  # bound after the block is built

    def topk(self, gating_output: torch.Tensor):
        """Softmax Top-K exactly as the families do it: -> (weights [T, K] f32, ids [T, K] int64)."""
        scores = torch.softmax(gating_output.float(), dim=-1)
        if self.use_grouped_topk and (self.num_expert_group or 1) > 1:
            T, E = scores.shape
            groups = scores.view(T, self.num_expert_group, E // self.num_expert_group).max(dim=-1).values
            top_groups = torch.topk(groups, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(groups).scatter_(1, top_groups, 1.0)
            expert_mask = group_mask.repeat_interleave(E // self.num_expert_group, dim=1)
            scores = scores.masked_fill(expert_mask == 0, 0.0)
        weights, ids = torch.topk(scores, k=self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.routed_scaling_factor, ids

    def __call__(self, hidden_states, gating_output, topk, renormalize):
        if self.mask_router is None:
            raise RuntimeError("BEAM routing called before its mask router was bound")
        weights, ids = self.topk(gating_output)
        x = hidden_states[..., : self.mask_router.in_features].float()
        m_hat = torch.sigmoid(torch.gather(self.mask_router(x), 1, ids))
        keep = m_hat >= self.tau
        g = weights * keep
        if self.beam_renormalize:
            kept, total = g.sum(-1, keepdim=True), weights.sum(-1, keepdim=True)
            g = torch.where(kept > 1e-9, g * (total / kept.clamp_min(1e-9)), torch.zeros_like(g))
        return g, torch.where(keep, ids, torch.full_like(ids, self.num_experts))


class BeamMoERunner(MoERunner):
    """vLLM's MoE runner with dropped (token, expert) pairs (id == num_experts) removed before the experts."""

    def __init__(self, *args, beam: BeamRouting, **kwargs):
        super().__init__(*args, **kwargs)
        self.beam = beam
        self.offered = None  # int64 device tensors, made on first use (graph capture replays the add_)
        self.computed = None
        self._beam_expert_map = None
        _RUNNERS.add(self)

    def _select_forward(self):
        # always the opaque custom op (vLLM calls the Python function directly on CPU, which lets Dynamo
        # trace into the forward; the compaction below is data-dependent)
        return torch.ops.vllm.moe_forward if self._shared_experts is None else torch.ops.vllm.moe_forward_shared

    def _count(self, keep: torch.Tensor):
        if self.offered is None:
            self.offered = torch.zeros((), dtype=torch.int64, device=keep.device)
            self.computed = torch.zeros((), dtype=torch.int64, device=keep.device)
        self.offered.add_(keep.numel())
        self.computed.add_(keep.sum())

    def reset_counts(self):
        if self.offered is not None:
            with torch.inference_mode():  # the counters were made inside vLLM's inference mode
                self.offered.zero_()
                self.computed.zero_()

    def _apply_quant_method(self, hidden_states, router_logits, shared_experts_input, input_ids=None,
                            shared_experts_overlapping=False):
        re = self.routed_experts
        if re.quant_method.is_monolithic:
            raise RuntimeError(f"{self.layer_name}: vLLM chose a monolithic MoE kernel, which routes from the logits "
                               f"and would ignore BEAM's mask; BEAM needs a modular kernel")
        self._maybe_apply_shared_experts(shared_experts_input, _no_overlap())
        weights, ids = self.router.select_experts(hidden_states=hidden_states, router_logits=router_logits,
                                                  topk_indices_dtype=self._quant_method.topk_indices_dtype,
                                                  input_ids=input_ids)
        keep = ids < self.beam.num_experts
        self._count(keep)
        if current_platform.is_cuda_alike():
            fused_out = self._experts_cuda(hidden_states, weights, ids, shared_experts_input)
        else:
            fused_out = self._experts_compacted(hidden_states, weights, ids, keep, shared_experts_input)
        if shared_experts_overlapping:
            self._shared_experts.wait()
        return (self._shared_experts.output if self._shared_experts is not None else None, fused_out)

    def _experts_compacted(self, x, weights, ids, keep, shared_experts_input):
        """CPU (and any other non-CUDA backend): kept pairs as rows of a top_k=1 call, summed back per token."""
        token, slot = keep.nonzero(as_tuple=True)
        out = torch.zeros_like(x)
        mk_shared = (self._shared_experts is not None
                     and self._shared_experts._determine_shared_experts_order(shared_experts_input)
                     == _mk_internal())
        if token.numel() == 0 and not mk_shared:
            return out  # every pair dropped: no expert GEMM at all
        if token.numel() == 0:  # the kernel must still run the shared experts it owns: one zero-weight row
            token, slot = torch.zeros(1, dtype=torch.long, device=x.device), torch.zeros_like(token[:1])
            rows_w = torch.zeros((1, 1), dtype=weights.dtype, device=x.device)
            rows_id = torch.zeros((1, 1), dtype=ids.dtype, device=x.device)
        else:
            rows_w = weights[token, slot].unsqueeze(1).contiguous()
            rows_id = ids[token, slot].unsqueeze(1).contiguous()
        rows = self.routed_experts.forward_modular(
            x=x[token].contiguous(), topk_weights=rows_w, topk_ids=rows_id,
            shared_experts=self._shared_experts, shared_experts_input=shared_experts_input)
        if not isinstance(rows, torch.Tensor):
            raise RuntimeError(f"{self.layer_name}: deferred MoE outputs are not supported with BEAM")
        return out.index_add_(0, token, rows.to(out.dtype))

    def _experts_cuda(self, x, weights, ids, shared_experts_input):
        """CUDA: keep [T, K] ids; an expert map sends the BEAM id E to -1 so alignment gives it no rows.
        Written against vLLM 0.32's Triton path (ignore_invalid_experts, pad-aware moe_sum); not run here."""
        re = self.routed_experts
        kernel = getattr(re.quant_method, "moe_kernel", None)
        if kernel is None:
            raise RuntimeError(f"{self.layer_name}: BEAM on CUDA needs a modular fused-MoE kernel")
        if self._beam_expert_map is None:
            base = re.expert_map
            if base is None:
                base = torch.arange(re.global_num_experts, dtype=torch.int32, device=x.device)
            sentinel = torch.full((1,), -1, dtype=base.dtype, device=base.device)
            self._beam_expert_map = torch.cat([base, sentinel])
        return kernel.apply(hidden_states=x, w1=re.w13_weight, w2=re.w2_weight, topk_weights=weights,
                            topk_ids=ids, activation=re.activation,
                            apply_router_weight_on_input=re.apply_router_weight_on_input,
                            global_num_experts=re.global_num_experts + 1, expert_map=self._beam_expert_map,
                            shared_experts=self._shared_experts, shared_experts_input=shared_experts_input)


def _no_overlap():
    from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExpertsOrder

    return SharedExpertsOrder.NO_OVERLAP


def _mk_internal():
    from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExpertsOrder

    return SharedExpertsOrder.MK_INTERNAL_OVERLAPPED


def _beam_factory(original, **kw):
    """`FusedMoEFactory` with BEAM's routing and runner; the family's routing settings become BEAM's Top-K."""
    if kw.get("e_score_correction_bias") is not None or kw.get("scoring_func", "softmax") != "softmax":
        raise NotImplementedError("BEAM supports softmax routing without a score-correction bias")
    if kw.get("fuse_shared_experts"):
        raise NotImplementedError("BEAM does not support shared experts fused into the routed kernel")
    scale = 1.0 if kw.get("apply_routed_scale_to_output") else float(kw.get("routed_scaling_factor", 1.0))
    routing = BeamRouting(num_experts=kw["num_experts"], top_k=kw["top_k"], renormalize=kw.get("renormalize", True),
                          use_grouped_topk=kw.get("use_grouped_topk", False),
                          num_expert_group=kw.get("num_expert_group"), topk_group=kw.get("topk_group"),
                          routed_scaling_factor=scale)
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


def pair_counts() -> dict:
    """{"offered": Top-K pairs routed, "computed": pairs given to the experts} over every BEAM MoE layer of
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
