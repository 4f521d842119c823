"""Qwen3-30B-A3B (128 experts, K=8): BEAM mask routers on a Tulu-3-style chat SFT mixture, bf16 on GPUs.
mixtral.py's recipe on this checkpoint."""

from beam_jax.configs import mixtral


def get_config():
    # alpha: the family's router_aux_loss_coef
    return mixtral.for_checkpoint("checkpoints/Qwen3-30B-A3B", alpha=0.001)
