"""Export a BEAM training run for serving: a Hugging Face directory that transformers (`convert.modeling_beam`)
and vLLM (`convert.vllm_plugin`) load as a BEAM model.

Importing `convert` needs neither torch nor transformers' model code (the export, `python -m convert.to_vllm`,
writes no torch tensors). The PyTorch BEAM classes are registered with transformers' Auto classes by
`convert.register()`, which imports `convert.modeling_beam` (torch); after it,
`AutoModelForCausalLM.from_pretrained(exported_dir)` works without `trust_remote_code`. vLLM's plugin calls it
itself.
"""

from __future__ import annotations

# base architecture -> base model_type of every family with a BEAM variant; the BEAM names add "Beam" / "beam_".
# The same families as `convert.modeling_beam.FAMILIES` (a test checks that the two agree).
BASE_ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Glm4MoeForCausalLM": "glm4_moe",
}
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
        from beam_jax.extras import require  # only here: beam_jax imports jax, which vLLM's processes need not

        require("torch", "torch", "convert.register() (the PyTorch BEAM classes, convert.modeling_beam)")
    from .modeling_beam import register as _register

    _register()


__all__ = ["BASE_ARCHITECTURES", "BEAM_ARCHITECTURES", "BEAM_MODEL_TYPES", "beam_architecture", "beam_model_type",
           "register"]
