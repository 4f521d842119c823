"""The plugin's torch operators (`beam_jax::masked_experts`, `beam_jax::packed_linear`), registered the way vLLM
registers its own (`vllm.utils.torch_utils.direct_register_custom_op`): a schema and a CPU kernel in a
`torch.library.Library` fragment, plus a fake implementation for torch.compile. `torch.library.custom_op` adds its
own dispatch layers around the kernel: measured in one vLLM process on the tiny model's MoE layer (2-core Xeon),
29.5 us per call through `custom_op` against 26.5 us through the fragment and 24.9 us for the Python function called
directly, so a few microseconds per layer call, at every decode step, in every layer."""

from __future__ import annotations

import torch

_LIB = torch.library.Library("beam_jax", "FRAGMENT")  # the ops live as long as this module


def register_cpu_op(fn, fake):
    """Register `fn` (annotated: the schema is inferred from it, nothing mutated) as `beam_jax::<fn.__name__>` with
    a CPU kernel and `fake` for torch.compile. -> the op (`torch.ops.beam_jax.<name>`)."""
    name = fn.__name__
    _LIB.define(name + torch.library.infer_schema(fn, mutates_args=()))
    _LIB.impl(name, fn, "CPU")
    torch.library.register_fake(f"beam_jax::{name}", fake, lib=_LIB)
    return getattr(torch.ops.beam_jax, name)
