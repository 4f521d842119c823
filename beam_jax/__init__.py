"""beam-jax: BEAM (Binary Expert Activation Masking) for Mixture-of-Experts models in JAX/Flax.

    model = beam_jax.load_pretrained("path/to/hf_checkpoint", dtype="float32")
    out = model(input_ids)              # out.logits [B, S, V], out.router_logits / topk_ids per MoE layer
    tokens = beam_jax.generate(model, input_ids, max_new_tokens=32)

The names below are imported on first use (PEP 562), so `import beam_jax.families` (the family table, which
`convert` and the vLLM plugin read) costs neither jax nor flax.
"""

from __future__ import annotations

import importlib
import sys
import types

_EXPORTS = {
    "ConfigError": "config", "ModelConfig": "config", "FAMILIES": "families", "generate": "generate",
    "CheckpointError": "loading", "load_pretrained": "loading", "read_config": "loading", "masked_moe": "kernel",
    "CausalLMOutput": "model", "MoECausalLM": "model",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'beam_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """`beam_jax.generate` stays the function when the submodule `beam_jax.generate` is imported first (the
    import system then sets the package attribute to the submodule, which the eager `from .generate import
    generate` used to override)."""

    def __setattr__(self, name, value):
        if name == "generate" and isinstance(value, types.ModuleType):
            value = value.generate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
