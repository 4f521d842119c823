"""Export a BEAM training run for serving: a Hugging Face directory that transformers (`convert.modeling_beam`)
and vLLM (`convert.vllm_plugin`) load as a BEAM model.

Importing `convert` registers the BEAM architectures with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(exported_dir)` works without `trust_remote_code`.
"""

from .modeling_beam import beam_architecture, beam_model_type, register

register()

__all__ = ["beam_architecture", "beam_model_type", "register"]
