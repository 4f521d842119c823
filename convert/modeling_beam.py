"""PyTorch BEAM variants of the transformers MoE models, one per family, registered with `AutoConfig` and
`AutoModelForCausalLM` when `convert` is imported (no `trust_remote_code`).

Each `Beam<Family>ForCausalLM` is the transformers class with two changes in every MoE block:

- a mask router `mlp.mask_router` (`nn.Linear(d, E, bias=False)`, kept in float32 whatever the model dtype);
- the block's Top-K router returns masked routing: `m_hat = sigmoid(mask_router(x))` at the Top-K
  candidates, kept where `m_hat >= tau`, weights `g * m` (optionally renormalised), and the ids of dropped
  pairs set to `num_experts`, the id transformers' experts loop skips. No GEMM runs for a dropped pair.

The base weights load through the base family's checkpoint conversion (per-expert tensors into the fused
`gate_up_proj` / `down_proj`, Mixtral's `block_sparse_moe` into `mlp`), registered under the BEAM model type.
`config.beam` holds `tau` and `renormalize`; `model.set_beam_tau(t)` changes tau after loading, and
`model.beam_pair_counts()` reports how many (token, expert) pairs were computed out of how many Top-K offered.
"""

from __future__ import annotations

import dataclasses

import transformers

from beam_jax.extras import require

torch = require("torch", "torch", "the PyTorch BEAM classes (convert.modeling_beam)")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

# family key -> (transformers config class, causal-LM class, base model_type); the BEAM names add "Beam"/"beam_"
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
}
BEAM_DEFAULTS = {"tau": 0.5, "renormalize": False}


def beam_settings(config) -> dict:
    """`config.beam` with defaults filled in: {"tau": float, "renormalize": bool, ...}."""
    return {**BEAM_DEFAULTS, **(getattr(config, "beam", None) or {})}


def beam_mask(x, weights, ids, mask_weight, tau: float, renormalize: bool, num_experts: int, eps: float = 1e-9):
    """BEAM on one MoE layer's Top-K routing (the arithmetic of `beam_jax.beam`, in PyTorch).

    x [T, d] the router's input; weights [T, K] the Top-K weights g; ids [T, K] expert ids;
    mask_weight [E, d] the mask router. Returns (weights [T, K] in weights' dtype, ids [T, K] with dropped pairs
    set to `num_experts`, keep [T, K] bool).
    """
    logits = F.linear(x.float(), mask_weight.float())
    m_hat = torch.sigmoid(torch.gather(logits, -1, ids.long()))
    keep = m_hat >= tau
    g = weights.float() * keep
    if renormalize:
        kept, total = g.sum(-1, keepdim=True), weights.float().sum(-1, keepdim=True)
        g = torch.where(kept > eps, g * (total / kept.clamp_min(eps)), torch.zeros_like(g))
    return g.to(weights.dtype), torch.where(keep, ids, torch.full_like(ids, num_experts)), keep


class MaskRouter(nn.Linear):
    """BEAM's W_m [E, d]: float32, no bias, zero-initialised (sigmoid(0) = 0.5 keeps every candidate at tau 0.5)."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__(hidden_size, num_experts, bias=False, dtype=torch.float32)
        nn.init.zeros_(self.weight)


@dataclasses.dataclass(eq=False)
class BeamState:
    """What a BEAM router needs besides its own weights. A plain object (not an `nn.Module`), so the mask router
    it points to stays registered once, under the MoE block."""

    mask_router: MaskRouter
    num_experts: int
    tau: float = 0.5
    renormalize: bool = False
    offered: int = 0  # Top-K pairs seen since the last reset
    computed: int = 0  # pairs kept (and computed by the experts)

    def __call__(self, x, weights, ids):
        weights, ids, keep = beam_mask(x, weights, ids, self.mask_router.weight, self.tau, self.renormalize,
                                       self.num_experts)
        self.offered += keep.numel()
        self.computed += int(keep.sum())
        return weights, ids


class BeamRouterMixin:
    """Put before a transformers Top-K router class: its forward returns BEAM-masked weights and ids."""

    def forward(self, hidden_states):
        logits, weights, ids = super().forward(hidden_states)
        weights, ids = self.beam(hidden_states.reshape(-1, hidden_states.shape[-1]), weights, ids)
        return logits, weights, ids


_ROUTER_CLASSES: dict[type, type] = {}


def _beam_router_class(base: type) -> type:
    if base not in _ROUTER_CLASSES:
        _ROUTER_CLASSES[base] = type(f"Beam{base.__name__}", (BeamRouterMixin, base), {"__module__": __name__})
    return _ROUTER_CLASSES[base]


def moe_blocks(model) -> dict[int, nn.Module]:
    """{layer index: MoE block} of a transformers causal LM (a block has a `gate` router and `experts`)."""
    return {i: layer.mlp for i, layer in enumerate(model.model.layers)
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")}


class BeamCausalLMMixin:
    """Put before a transformers `*ForCausalLM`: adds a mask router to every MoE block and masks its routing."""

    _keep_in_fp32_modules_strict = ["mask_router"]

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        settings = beam_settings(config)
        for block in moe_blocks(self).values():
            experts = block.experts
            block.mask_router = MaskRouter(config.hidden_size, experts.num_experts)
            block.gate.__class__ = _beam_router_class(type(block.gate))
            # plain attribute: the state points at the block's mask router without registering it twice
            object.__setattr__(block.gate, "beam", BeamState(block.mask_router, experts.num_experts,
                                                             float(settings["tau"]), bool(settings["renormalize"])))
            # transformers' batched_mm / grouped_mm expert paths honour the id-E sentinel only in this mode (the
            # eager loop always skips it); grouped_mm then gives dropped pairs no rows, batched_mm zero weights
            experts._is_expert_parallel = True

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers decides this from the defining module's source; the experts are the base family's
        base = next(c for c in cls.__mro__ if c.__module__.startswith("transformers.models."))
        return base._can_set_experts_implementation()

    @torch.no_grad()
    def initialize_weights(self):
        # a mask router missing from the checkpoint starts at zero (= Top-K), not at the family's random init:
        # the inner decoder model is a PreTrainedModel with its own `_init_weights`, so zero them here first
        for block in moe_blocks(self).values():
            if not isinstance(getattr(block, "mask_router", None), MaskRouter):
                continue  # called from the base class's __init__, before the mask routers exist
            w = block.mask_router.weight
            if not getattr(w, "_is_hf_initialized", False) and w.device.type != "meta":
                w.zero_()
                w._is_hf_initialized = True
        super().initialize_weights()

    def _beam_states(self) -> list[BeamState]:
        return [b.gate.beam for b in moe_blocks(self).values()]

    def set_beam_tau(self, tau: float):
        """Change the binarisation threshold of every MoE layer (a serving-time knob; no retraining)."""
        for s in self._beam_states():
            s.tau = float(tau)
        self.config.beam = {**beam_settings(self.config), "tau": float(tau)}

    def beam_pair_counts(self) -> dict:
        """{"offered": Top-K pairs routed, "computed": pairs kept and computed} since the last reset, all layers."""
        states = self._beam_states()
        return {"offered": sum(s.offered for s in states), "computed": sum(s.computed for s in states)}

    def reset_beam_counts(self):
        for s in self._beam_states():
            s.offered = s.computed = 0


def _make_family(key: str, config_name: str, model_name: str):
    base_config = getattr(transformers, config_name)
    base_model = getattr(transformers, model_name)
    config_cls = type(f"Beam{config_name}", (base_config,), {
        "model_type": f"beam_{key}", "__module__": __name__,
        "__doc__": f"{config_name} plus `beam` (tau, renormalize, layers) for Beam{model_name}."})
    model_cls = type(f"Beam{model_name}", (BeamCausalLMMixin, base_model), {
        "config_class": config_cls, "__module__": __name__,
        "__doc__": f"{model_name} with BEAM's mask router in every MoE block."})
    return config_cls, model_cls


CONFIGS: dict[str, type] = {}  # BEAM model_type -> config class
MODELS: dict[str, type] = {}  # BEAM architecture name -> model class
BASE_ARCHITECTURE: dict[str, str] = {}  # BEAM architecture -> base architecture
for _key, (_cfg, _model) in FAMILIES.items():
    _c, _m = _make_family(_key, _cfg, _model)
    CONFIGS[_c.model_type] = _c
    MODELS[_m.__name__] = _m
    BASE_ARCHITECTURE[_m.__name__] = _model
    globals()[_c.__name__], globals()[_m.__name__] = _c, _m


def beam_architecture(base_architecture: str) -> str:
    """`MixtralForCausalLM` -> `BeamMixtralForCausalLM` (ValueError for an unsupported one)."""
    name = "Beam" + base_architecture
    if name not in MODELS:
        raise ValueError(f"no BEAM variant of {base_architecture}; supported: {', '.join(sorted(BASE_ARCHITECTURE.values()))}")
    return name


def beam_model_type(base_model_type: str) -> str:
    name = "beam_" + base_model_type
    if name not in CONFIGS:
        raise ValueError(f"no BEAM variant of model_type {base_model_type!r}")
    return name


def register():
    """Register every BEAM config / model with transformers' Auto classes and the base family's checkpoint
    conversion (per-expert -> fused experts). Re-entrant."""
    from transformers import conversion_mapping as cm

    for model_type, config_cls in CONFIGS.items():
        transformers.AutoConfig.register(model_type, config_cls, exist_ok=True)
        base_type = model_type[len("beam_"):]
        mapping = cm.get_checkpoint_conversion_mapping(base_type)
        if mapping is not None:
            cm.register_checkpoint_conversion_mapping(model_type, mapping, overwrite=True)
    for name, model_cls in MODELS.items():
        transformers.AutoModelForCausalLM.register(model_cls.config_class, model_cls, exist_ok=True)
