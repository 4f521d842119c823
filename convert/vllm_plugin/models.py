"""vLLM BEAM models: each is vLLM's own model class for the family, built with BEAM MoE layers
(`moe.beam_moe_factory`) and a float32 `mask_router` (`nn.Linear(d, E, bias=False)`) in every MoE block, loaded
from the checkpoint's `<moe block>.mask_router.weight` by the family's weight loader. On CPU their bfloat16 dense
layers multiply decode-sized batches by packed weights (`linear.use_packed_linears`), and their experts are packed
for the extension's kernel, which then runs their expert calls, in place of vLLM's copy (`moe.pack_runners`).

tau comes from the config's `beam.tau`, overridable at load time:
`LLM(model=DIR, hf_overrides={"beam_tau": 0.9})` (or `{"beam": {"tau": 0.9}}`).
"""

from __future__ import annotations

import importlib
import sys

import torch
from torch import nn

from vllm.model_executor.models.registry import _VLLM_MODELS

from convert import BASE_ARCHITECTURES
from convert.modeling_beam import BEAM_DEFAULTS

from .linear import use_packed_linears
from .moe import BeamMoERunner, beam_moe_factory, pack_runners


def beam_settings(hf_config) -> dict:
    """tau and renormalize from `config.beam`, a flat `beam_tau` / `beam_renormalize` (hf_overrides) winning."""
    beam = {**BEAM_DEFAULTS, **(getattr(hf_config, "beam", None) or {})}
    for key in ("tau", "renormalize"):
        flat = getattr(hf_config, f"beam_{key}", None)
        if flat is not None:
            beam[key] = flat
    return {"tau": float(beam["tau"]), "renormalize": bool(beam["renormalize"])}


class BeamModelMixin:
    """Put before a vLLM `*ForCausalLM` class."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        base = next(c for c in type(self).__mro__[1:] if c.__module__.startswith("vllm.model_executor.models."))
        with beam_moe_factory(sys.modules[base.__module__]):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        hf = vllm_config.model_config.hf_config
        settings = beam_settings(hf)
        self.beam_tau = settings["tau"]
        for block in self.modules():
            runner = getattr(block, "experts", None)
            if isinstance(runner, BeamMoERunner):
                routing = runner.beam
                block.mask_router = nn.Linear(hf.hidden_size, routing.num_experts, bias=False, dtype=torch.float32)
                routing.mask_router = block.mask_router
                routing.tau = settings["tau"]
                routing.beam_renormalize = settings["renormalize"]
        # CPU, bfloat16, AVX512-BF16: decode-sized products of the dense layers through packed weights (linear.py)
        self.beam_packed_linears = use_packed_linears(self, vllm_config.model_config.dtype)

    def load_weights(self, weights):
        """The family's loader, then (CPU, bfloat16, `moe.packed_experts_available`) each MoE layer armed to pack
        its experts for the extension's kernel when vLLM post-processes it, after this returns, and to drop vLLM's
        copy (`moe.pack_runners`)."""
        loaded = super().load_weights(weights)
        self.beam_packed_runners = pack_runners(self._beam_runners())
        return loaded

    def _beam_runners(self) -> list[BeamMoERunner]:
        return [m for m in self.modules() if isinstance(m, BeamMoERunner)]

    def set_beam_tau(self, tau: float):
        for r in self._beam_runners():
            r.beam.tau = float(tau)
        self.beam_tau = float(tau)

    def beam_pair_counts(self) -> dict:
        """{"offered", "computed"} (token, expert) pairs over this model's MoE layers since the last reset."""
        rs = [r for r in self._beam_runners() if r.offered is not None]
        return {"offered": sum(int(r.offered) for r in rs), "computed": sum(int(r.computed) for r in rs)}

    def reset_beam_pair_counts(self):
        for r in self._beam_runners():
            r.reset_counts()


def vllm_model_class(architecture: str) -> type:
    """vLLM's own model class for a base architecture (`MixtralForCausalLM` ->
    `vllm.model_executor.models.mixtral.MixtralForCausalLM`), through vLLM's model table
    (`registry._VLLM_MODELS`: architecture -> (module, class)), as vLLM itself resolves it."""
    module, name = _VLLM_MODELS[architecture]
    return getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name)


def _beam_class(base_architecture: str) -> type:
    name = "Beam" + base_architecture
    return type(name, (BeamModelMixin, vllm_model_class(base_architecture)), {
        "__module__": __name__, "__qualname__": name,
        "__doc__": f"vLLM's {base_architecture} with BEAM MoE layers and a mask router in every MoE block."})


# Beam<Architecture> for every family of `beam_jax.families.FAMILIES` (through `convert.BASE_ARCHITECTURES`),
# module attributes so that vLLM's lazy "convert.vllm_plugin.models:<name>" strings and pickling find them.
MODELS: dict[str, type] = {"Beam" + a: _beam_class(a) for a in BASE_ARCHITECTURES}
globals().update(MODELS)
__all__ = ["BeamModelMixin", "MODELS", "beam_settings", "vllm_model_class", *MODELS]
