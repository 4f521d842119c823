"""vLLM plugin serving BEAM models exported by `python -m convert.to_vllm`.

Registered through the `vllm.general_plugins` entry point (`beam = "convert.vllm_plugin:register"` in
pyproject.toml), so `vllm serve DIR` and `vllm.LLM(model=DIR)` find the BEAM architectures with no flag.
`register()` is re-entrant (vLLM calls it in every process): it adds the BEAM config classes to transformers'
AutoConfig, tells vLLM that the BEAM DeepSeek-V2 variant uses MLA like its base, registers the models with
lazy "module:Class" strings (nothing of vLLM's model code is imported until a model is built), and adds a
config check (`check_attention_dtype`) that vLLM runs while it builds its config, before any weight is read.

The check exists because vLLM-CPU's attention selector does not check the dtype: on an x86 processor with AMX
tiles (Intel Sapphire Rapids and later) it serves MLA with its AMX backend (`AMX_MLA`, bfloat16 only), which
otherwise fails deep inside weight loading (`amx_mla.py` `process_weights_after_loading`: "expect weight to be
bfloat16, float16, int8, fp8_e4m3 or uint8") when asked for float32; processors without AMX (AMD EPYC) get
the reference `CPU_MLA` backend, which takes float32.
"""

from __future__ import annotations

from convert import BEAM_ARCHITECTURES, BEAM_MODEL_TYPES

ARCHITECTURES = BEAM_ARCHITECTURES  # every family of `beam_jax.families.FAMILIES`


class BeamServingError(RuntimeError):
    """vLLM's config is refused before any weight is loaded; the message says why and the fix, in one line.

    A RuntimeError, not a ValueError: vLLM's config classes are pydantic dataclasses, which would re-wrap a
    ValueError raised while they validate into a multi-line ValidationError."""


def register():
    from vllm import ModelRegistry

    import convert

    convert.register()  # the BEAM configs with transformers' AutoConfig (vLLM reads config.json through it)
    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, f"convert.vllm_plugin.models:{arch}")
    _register_mla_model_types()
    _register_config_check()


def _register_mla_model_types():
    """vLLM decides "DeepSeek MLA" from the config's model_type (a list of base types); BEAM types answer from
    the config itself (an MLA config has `kv_lora_rank`), so the BEAM DeepSeek variants get MLA and the others
    the default convertor's answer (no MLA)."""
    from vllm.transformers_utils import model_arch_config_convertor as conv

    class BeamDeepseekMLAConvertor(conv.ModelArchConfigConvertorBase):
        def is_deepseek_mla(self) -> bool:
            return getattr(self.hf_text_config, "kv_lora_rank", None) is not None

    for model_type in BEAM_MODEL_TYPES:
        if model_type not in conv.MODEL_ARCH_CONFIG_CONVERTORS:
            conv.MODEL_ARCH_CONFIG_CONVERTORS[model_type] = BeamDeepseekMLAConvertor


def _register_config_check():
    """vLLM runs `MODELS_CONFIG_MAP[architecture].verify_and_update_config(vllm_config)` while it builds its
    config (`VllmConfig.try_verify_and_update_config`), in the process that parses the arguments."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    class BeamConfigCheck(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            check_attention_dtype(vllm_config)

    for arch in ARCHITECTURES:
        MODELS_CONFIG_MAP.setdefault(arch, BeamConfigCheck)


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def attention_backend(vllm_config):
    """(backend enum name, class path, backend class) vLLM will build this model's attention with: asks the
    platform's own selector (`current_platform.get_attn_backend_cls`, which on CPU reads
    `torch.cpu._is_amx_tile_supported()`), with the requested backend (`--attention-backend`, or
    `attention_config.backend_per_kind` for this kind of layer) as vLLM passes it."""
    from vllm.platforms import current_platform
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.selector import AttentionSelectorConfig, get_attn_spec_kind

    model_config = vllm_config.model_config
    use_mla = bool(model_config.use_mla)
    selector = AttentionSelectorConfig(head_size=model_config.get_head_size(), dtype=model_config.dtype,
                                       kv_cache_dtype=vllm_config.cache_config.cache_dtype, block_size=None,
                                       use_mla=use_mla)
    attention = vllm_config.attention_config
    backend = attention.backend
    if attention.backend_per_kind:
        kind = get_attn_spec_kind(use_mla=use_mla, has_sliding_window=False, attn_type=selector.attn_type)
        backend = attention.backend_per_kind.get(kind.value, backend)
    path = current_platform.get_attn_backend_cls(backend, attn_selector_config=selector)
    cls = resolve_obj_by_qualname(path)
    return cls.get_name(), path, cls


def check_attention_dtype(vllm_config):
    """Refuse (BeamServingError, one line) a model dtype that the attention backend vLLM-CPU will pick does not
    declare in its `supported_dtypes` (vLLM's CPU selector does not check it; other platforms' selectors do).
    Raised while vLLM builds its config: before the engine starts and before any weight is read."""
    from vllm.platforms import current_platform

    model_config = vllm_config.model_config
    if model_config is None or not current_platform.is_cpu():
        return
    name, path, cls = attention_backend(vllm_config)
    supported = list(getattr(cls, "supported_dtypes", None) or [])
    dtype = model_config.dtype
    if not supported or dtype in supported:
        return
    want = _dtype_name(supported[0])
    arch = model_config.architecture
    why = ("which vLLM-CPU picks for MLA on a processor with AMX tiles (torch.cpu._is_amx_tile_supported())"
           if name == "AMX_MLA" else "which vLLM-CPU picks for this model on this processor")
    keep = (f", or keep {_dtype_name(dtype)} on vLLM's reference MLA backend with --attention-backend CPU_MLA "
            f"(slower)" if name == "AMX_MLA" else "")
    raise BeamServingError(
        f"{arch} ({model_config.model}): dtype {_dtype_name(dtype)} is not supported by vLLM's {name} attention "
        f"backend ({path}), {why}; it takes {', '.join(map(_dtype_name, supported))}. Fix: serve with --dtype "
        f"{want} (vllm.LLM(dtype=\"{want}\")), or export with `python -m convert.to_vllm CKPT --dtype {want}` and "
        f"serve with --dtype auto{keep}")


def pair_counts() -> dict:
    """Offered and computed (token, expert) pairs over every BEAM MoE layer in this process (see `moe.pair_counts`)."""
    from .moe import pair_counts as _counts

    return _counts()


def reset_pair_counts():
    from .moe import reset_pair_counts as _reset

    _reset()
