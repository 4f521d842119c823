"""PyTorch BEAM variants of the transformers MoE models, one per family.

Two ways to load an exported directory (`python -m convert.to_vllm`):

- with beam-jax installed: `import convert; convert.register()` registers these classes with `AutoConfig` and
  `AutoModelForCausalLM`, then `AutoModelForCausalLM.from_pretrained(DIR)`;
- with plain transformers and torch only: this file is self-contained (it imports torch, transformers and the
  standard library, nothing of beam-jax), the export writes it into DIR with an `auto_map` in config.json, and
  `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads it from there.

Each `Beam<Family>ForCausalLM` is the transformers class with three changes in every MoE block:

- a mask router `mlp.mask_router` (`nn.Linear(d, E, bias=False)`, kept in float32 whatever the model dtype);
- the block's Top-K router returns masked routing: `m_hat = sigmoid(mask_router(x))` at the Top-K
  candidates, kept where `m_hat >= tau`, weights `g * m` (optionally renormalised), and the ids of dropped
  pairs set to `num_experts`;
- the block's experts receive only the kept pairs: before any expert GEMM the [T, K] routing is compacted into
  N = (number of kept pairs) rows of a K = 1 call (`x[token]`, the kept id, its weight), whose result is summed
  back per token. No GEMM runs for a dropped pair, whichever `experts_implementation` transformers uses
  (`eager`, `grouped_mm`, `batched_mm`: the last one would otherwise multiply a clamped id's output by 0).

The base weights load through the base family's checkpoint conversion (per-expert tensors into the fused
`gate_up_proj` / `down_proj`, Mixtral's `block_sparse_moe` into `mlp`), registered under the BEAM model type
when this module is imported. `config.beam` holds `tau` and `renormalize`; `model.set_beam_tau(t)` changes tau
after loading, and `model.beam_pair_counts()` reports how many (token, expert) pairs Top-K offered and how many
rows were handed to the expert GEMMs (the kept pairs) since `model.reset_beam_counts()`.
"""

from __future__ import annotations

import dataclasses

try:
    import torch
except ModuleNotFoundError as _missing:
    if _missing.name != "torch":
        raise
    try:  # inside beam-jax: the ImportError its entry points print as one `error:` line
        from beam_jax.extras import MissingExtraError as _MissingError
    except ImportError:  # copied into an exported directory, loaded with trust_remote_code: plain ImportError
        _MissingError = ImportError
    raise _MissingError("the PyTorch BEAM classes (modeling_beam) need the Python package 'torch', which is not "
                        "installed: pip install torch (in a beam-jax checkout: pip install -e \".[torch]\", the "
                        "'torch' extra)", name="torch") from None

import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

# base model_type -> (transformers config class, causal-LM class); the BEAM names add "Beam" / "beam_". Derived
# from `beam_jax.families.FAMILIES`, the one list of families; `convert.remote_code` writes this table in as a
# literal when it copies the file into an exported directory (which must load without beam-jax).
from beam_jax.families import FAMILIES as _FAMILIES  # noqa: E402

FAMILIES = {f.model_type: (f.config_class, f.architecture) for f in _FAMILIES.values()}
BEAM_DEFAULTS = {"tau": 0.5, "renormalize": False}


def beam_settings(config) -> dict:
    """`config.beam` with defaults filled in: {"tau": float, "renormalize": bool, ...}."""
    return {**BEAM_DEFAULTS, **(getattr(config, "beam", None) or {})}


MASK_EPS = 1e-9  # renormalisation: a token whose kept weights sum to this or less gets weight 0 everywhere


def beam_mask(x, weights, ids, mask_weight, tau: float, renormalize: bool, num_experts: int, eps: float = MASK_EPS):
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


def kept_pairs(ids, num_experts: int):
    """The kept (token, slot) pairs of masked routing ids [T, K] (dropped pairs carry id `num_experts`):
    -> (token [N] int64, slot [N] int64), N = the number of kept pairs, in row-major order."""
    return (ids < num_experts).nonzero(as_tuple=True)


@dataclasses.dataclass(eq=False)
class BeamState:
    """What a BEAM MoE block needs besides its own weights, shared by its router and its experts. A plain object
    (not an `nn.Module`), so the mask router it points to stays registered once, under the MoE block."""

    mask_router: MaskRouter
    num_experts: int
    tau: float = 0.5
    renormalize: bool = False
    offered: int = 0  # Top-K pairs seen since the last reset
    computed: int = 0  # rows handed to the expert GEMMs (= kept pairs) since the last reset

    def __call__(self, x, weights, ids):
        weights, ids, keep = beam_mask(x, weights, ids, self.mask_router.weight, self.tau, self.renormalize,
                                       self.num_experts)
        self.offered += keep.numel()
        return weights, ids


class BeamRouterMixin:
    """Put before a transformers Top-K router class: its forward returns BEAM-masked weights and ids."""

    def forward(self, hidden_states):
        logits, weights, ids = super().forward(hidden_states)
        weights, ids = self.beam(hidden_states.reshape(-1, hidden_states.shape[-1]), weights, ids)
        return logits, weights, ids


class BeamExpertsMixin:
    """Put before a transformers experts class (`@use_experts_implementation`): the experts see only the kept
    pairs, as the N rows of a K = 1 call, whatever `config._experts_implementation` is."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """hidden_states [T, d]; top_k_index [T, K] (dropped pairs = `num_experts`); top_k_weights [T, K] (0 at
        dropped pairs) -> [T, d] in hidden_states' dtype, summed in float32 (or wider)."""
        state = self.beam
        if hidden_states.dim() != 2 or top_k_index.shape != top_k_weights.shape \
                or top_k_index.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"BEAM experts expect hidden_states [T, d] and routing [T, K], got "
                             f"{tuple(hidden_states.shape)}, ids {tuple(top_k_index.shape)}, weights "
                             f"{tuple(top_k_weights.shape)}")
        token, slot = kept_pairs(top_k_index, state.num_experts)
        state.computed += int(token.numel())
        out = torch.zeros(hidden_states.shape, dtype=torch.promote_types(hidden_states.dtype, torch.float32),
                          device=hidden_states.device)
        if token.numel():
            rows = super().forward(hidden_states[token], top_k_index[token, slot].unsqueeze(1),
                                   top_k_weights[token, slot].unsqueeze(1))
            out.index_add_(0, token, rows.to(out.dtype))
        return out.to(hidden_states.dtype)


_WRAPPED: dict[tuple[type, type], type] = {}


def _beam_class(mixin: type, base: type) -> type:
    """`Beam<base>` = (mixin, base), made once per base class."""
    if (mixin, base) not in _WRAPPED:
        _WRAPPED[mixin, base] = type(f"Beam{base.__name__}", (mixin, base), {"__module__": __name__})
    return _WRAPPED[mixin, base]


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
            state = BeamState(block.mask_router, experts.num_experts, float(settings["tau"]),
                              bool(settings["renormalize"]))
            block.gate.__class__ = _beam_class(BeamRouterMixin, type(block.gate))
            experts.__class__ = _beam_class(BeamExpertsMixin, type(experts))
            # plain attributes: the state points at the block's mask router without registering it again
            object.__setattr__(block.gate, "beam", state)
            object.__setattr__(experts, "beam", state)

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
        """{"offered": Top-K pairs routed, "computed": rows handed to the expert GEMMs, i.e. the kept pairs} since
        the last reset, summed over the MoE layers."""
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


def register_conversion_mappings():
    """Load BEAM checkpoints through the base family's checkpoint conversion (per-expert tensors -> fused experts):
    transformers looks the conversion up by model_type. Re-entrant; run when this module is imported, so a
    directory loaded with `trust_remote_code` (which never calls `register`) converts the same way."""
    from transformers import conversion_mapping as cm

    for model_type in CONFIGS:
        mapping = cm.get_checkpoint_conversion_mapping(model_type[len("beam_"):])
        if mapping is not None:
            cm.register_checkpoint_conversion_mapping(model_type, mapping, overwrite=True)


def register():
    """Register every BEAM config / model with transformers' Auto classes (after which
    `AutoModelForCausalLM.from_pretrained(DIR)` needs no `trust_remote_code`) and the checkpoint conversion.
    Re-entrant."""
    register_conversion_mappings()
    for model_type, config_cls in CONFIGS.items():
        transformers.AutoConfig.register(model_type, config_cls, exist_ok=True)
    for name, model_cls in MODELS.items():
        transformers.AutoModelForCausalLM.register(model_cls.config_class, model_cls, exist_ok=True)


register_conversion_mappings()
