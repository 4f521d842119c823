"""beam-jax: BEAM (Binary Expert Activation Masking) for Mixture-of-Experts models in JAX/Flax.

    model = beam_jax.load_pretrained("path/to/hf_checkpoint", dtype="float32")
    out = model(input_ids)              # out.logits [B, S, V], out.router_logits / topk_ids per MoE layer
    tokens = beam_jax.generate(model, input_ids, max_new_tokens=32)
"""

from .config import ConfigError, ModelConfig
from .families import FAMILIES
from .generate import generate
from .loading import CheckpointError, load_pretrained, read_config
from .kernel import masked_moe
from .model import CausalLMOutput, MoECausalLM

__all__ = ["load_pretrained", "read_config", "generate", "masked_moe", "MoECausalLM", "ModelConfig", "CausalLMOutput",
           "ConfigError", "CheckpointError", "FAMILIES"]
__version__ = "0.1.0"
