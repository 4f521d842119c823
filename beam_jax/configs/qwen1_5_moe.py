"""Qwen1.5-MoE-A2.7B (60 experts, K=4, shared experts): BEAM mask routers on a Tulu-3-style chat SFT mixture, bf16
on GPUs. mixtral.py's recipe on this checkpoint."""

from beam_jax.configs import mixtral


def get_config():
    # alpha: the family's router_aux_loss_coef
    return mixtral.for_checkpoint("checkpoints/Qwen1.5-MoE-A2.7B", alpha=0.001)
