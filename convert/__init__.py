"""Export a BEAM training run for serving: a Hugging Face directory that transformers (`convert.modeling_beam`)
and vLLM (`convert.vllm_plugin`) load as a BEAM model.

Importing `convert` needs neither torch nor transformers' model code (the export, `python -m convert.to_vllm`,
writes no torch tensors). The PyTorch BEAM classes are registered with transformers' Auto classes by
`convert.register()`, which imports `convert.modeling_beam` (torch); after it,
`AutoModelForCausalLM.from_pretrained(exported_dir)` works without `trust_remote_code`. vLLM's plugin calls it
itself.
"""

from __future__ import annotations

from beam_jax.families import FAMILIES as _FAMILIES  # the one family list (imports neither jax nor torch)

# base architecture -> base model_type of every family; the BEAM names add "Beam" / "beam_"
BASE_ARCHITECTURES = {f.architecture: f.model_type for f in _FAMILIES.values()}
BEAM_ARCHITECTURES = tuple("Beam" + a for a in BASE_ARCHITECTURES)
BEAM_MODEL_TYPES = tuple("beam_" + t for t in BASE_ARCHITECTURES.values())


def beam_architecture(base_architecture: str) -> str:
    """`MixtralForCausalLM` -> `BeamMixtralForCausalLM` (ValueError for an unsupported one)."""
    if base_architecture not in BASE_ARCHITECTURES:
        raise ValueError(f"no BEAM variant of {base_architecture}; supported: {', '.join(sorted(BASE_ARCHITECTURES))}")
    return "Beam" + base_architecture


def beam_model_type(base_model_type: str) -> str:
    """`mixtral` -> `beam_mixtral` (ValueError for an unsupported one)."""
    if base_model_type not in BASE_ARCHITECTURES.values():
        raise ValueError(f"no BEAM variant of model_type {base_model_type!r}")
    return "beam_" + base_model_type


def register():
    """Register the PyTorch BEAM configs and models with transformers' Auto classes. Re-entrant. Imports torch:
    without it, `beam_jax.extras.MissingExtraError` (an ImportError) names the extra that installs it."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        from beam_jax.extras import require

        require("torch", "torch", "convert.register() (the PyTorch BEAM classes, convert.modeling_beam)")
    from .modeling_beam import register as _register

    _register()


__all__ = ["BASE_ARCHITECTURES", "BEAM_ARCHITECTURES", "BEAM_MODEL_TYPES", "beam_architecture", "beam_model_type",
           "register"]
