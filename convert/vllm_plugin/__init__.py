"""vLLM plugin serving BEAM models exported by `python -m convert.to_vllm`.

Registered through the `vllm.general_plugins` entry point (`beam = "convert.vllm_plugin:register"` in
pyproject.toml), so `vllm serve DIR` and `vllm.LLM(model=DIR)` find the BEAM architectures with no flag.
`register()` is re-entrant (vLLM calls it in every process): it adds the BEAM config classes to transformers'
AutoConfig, tells vLLM that the BEAM DeepSeek-V2 variant uses MLA like its base, and registers the models
with lazy "module:Class" strings (nothing of vLLM's model code is imported until a model is built).
"""

from __future__ import annotations

ARCHITECTURES = ("BeamMixtralForCausalLM", "BeamQwen2MoeForCausalLM", "BeamQwen3MoeForCausalLM",
                 "BeamOlmoeForCausalLM", "BeamDeepseekV2ForCausalLM")
# BEAM model types whose base vLLM recognises by model_type (DeepSeek-V2's MLA detection)
_MLA_MODEL_TYPES = ("beam_deepseek_v2",)


def register():
    from vllm import ModelRegistry

    import convert  # noqa: F401  (registers the BEAM configs with transformers' AutoConfig)

    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, f"convert.vllm_plugin.models:{arch}")
    _register_mla_model_types()


def _register_mla_model_types():
    """vLLM decides "DeepSeek MLA" from the config's model_type; give the BEAM type the same answer."""
    from vllm.transformers_utils import model_arch_config_convertor as conv

    class BeamDeepseekMLAConvertor(conv.ModelArchConfigConvertorBase):
        def is_deepseek_mla(self) -> bool:
            return getattr(self.hf_text_config, "kv_lora_rank", None) is not None

    for model_type in _MLA_MODEL_TYPES:
        if model_type not in conv.MODEL_ARCH_CONFIG_CONVERTORS:
            conv.MODEL_ARCH_CONFIG_CONVERTORS[model_type] = BeamDeepseekMLAConvertor


def pair_counts() -> dict:
    """Offered and computed (token, expert) pairs over every BEAM MoE layer in this process (see `moe.pair_counts`)."""
    from .moe import pair_counts as _counts

    return _counts()


def reset_pair_counts():
    from .moe import reset_pair_counts as _reset

    _reset()
