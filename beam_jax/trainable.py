"""Which parameters train: `train.trainable` names an `nnx` filter over the model (the mask routers, the mask
plus the routers, or every parameter). The trainer differentiates, and the checkpoints hold, only these."""

from __future__ import annotations

from flax import nnx

from .moe import MaskRouterParam

TRAINABLE = {
    "mask": nnx.OfType(MaskRouterParam),
    "mask+router": nnx.Any(nnx.OfType(MaskRouterParam), nnx.PathContains("gate")),
    "all": nnx.Param,
}


def trainable_filter(name: str):
    if name not in TRAINABLE:
        raise ValueError(f"train.trainable must be one of {sorted(TRAINABLE)}, got {name!r}")
    return TRAINABLE[name]
