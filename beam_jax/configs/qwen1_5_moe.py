"""Qwen1.5-MoE-A2.7B (60 experts, K=4, shared experts): BEAM mask routers on a Tulu-3-style chat SFT mixture, bf16 on GPUs. Only what differs from
mixtral.py (the project's first config) is set here."""

from beam_jax.configs import mixtral


def get_config():
    c = mixtral.get_config()
    c.model.path = "checkpoints/Qwen1.5-MoE-A2.7B"
    c.beam.alpha = 0.001  # the family's router_aux_loss_coef (only matters when the router trains)
    return c
