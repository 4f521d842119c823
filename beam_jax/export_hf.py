"""Write a `MoECausalLM` as a Hugging Face checkpoint directory (config.json + safetensors), the inverse of
`beam_jax.loading`: one tensor per expert, PyTorch `[out, in]` weights, the family's module names.

The directory is written to a temporary sibling and renamed into place, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ModelConfig
from .families import FAMILIES
from .moe import RouterBias
from .weight_map import hf_arrays


def hf_state_dict(model, *, include_mask_router: bool = False) -> dict[str, np.ndarray]:
    """{checkpoint name: array} in the model's dtype (numpy; bfloat16 through ml_dtypes), named and laid out by
    `weight_map`'s table (the family's own names, one tensor per expert); mask routers float32."""
    cfg: ModelConfig = model.cfg
    family = FAMILIES[cfg.architecture]
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, RouterBias))):
        if "mask_router" in map(str, path) and not include_mask_router:
            continue
        out.update(hf_arrays(family, cfg, path, np.asarray(var.get_value())))
    return out


def hf_config_dict(cfg: ModelConfig, dtype) -> dict:
    """config.json for the two layouts the project writes from scratch (Mixtral, Qwen3-MoE)."""
    import transformers

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                  num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                  head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
                  max_position_embeddings=cfg.max_position_embeddings, num_experts_per_tok=cfg.num_experts_per_tok,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                  bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id,
                  eos_token_id=cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else list(cfg.eos_token_id))
    if cfg.architecture == "Qwen3MoeForCausalLM":
        hf = transformers.Qwen3MoeConfig(**common, intermediate_size=cfg.intermediate_size or cfg.moe_intermediate_size,
                                         moe_intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.num_experts,
                                         norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
                                         mlp_only_layers=[i for i, m in enumerate(cfg.moe_layers) if not m])
    elif cfg.architecture == "MixtralForCausalLM":
        hf = transformers.MixtralConfig(**common, intermediate_size=cfg.moe_intermediate_size,
                                        num_local_experts=cfg.num_experts, sliding_window=cfg.sliding_window)
    else:
        raise ValueError(f"writing a config from scratch is only supported for Mixtral and Qwen3-MoE, not "
                         f"{cfg.architecture}; export a loaded checkpoint by copying its config.json instead")
    hf.architectures = [cfg.architecture]
    d = hf.to_dict()
    d["dtype"] = str(jnp.dtype(dtype))
    return d


def atomic_dir(final: Path):
    """Context manager: yields a temporary directory next to `final`, renamed onto it on success."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            yield tmp
            os.chmod(tmp, 0o755)
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return cm()


def save_pretrained(model, out_dir, *, config: dict | None = None, tokenizer_dir=None, extra_files: dict | None = None,
                    include_mask_router: bool = False) -> Path:
    """Write `model` to `out_dir` in Hugging Face format. `config` overrides the generated config.json;
    tokenizer files are copied from `tokenizer_dir`; `extra_files` maps names to text contents."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    tensors = hf_state_dict(model, include_mask_router=include_mask_router)
    config = config if config is not None else hf_config_dict(model.cfg, model.dtype)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file() and f.name not in ("config.json", "model.safetensors") and not f.name.startswith("."):
                    shutil.copy2(f, tmp / f.name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir
