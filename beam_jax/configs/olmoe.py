"""OLMoE-1B-7B (64 experts, K=8): BEAM mask routers on a Tulu-3-style chat SFT mixture, bf16 on GPUs. Only what differs from
mixtral.py (the project's first config) is set here."""

from beam_jax.configs import mixtral


def get_config():
    c = mixtral.get_config()
    c.model.path = "checkpoints/OLMoE-1B-7B-0924"
    c.beam.alpha = 0.01  # the family's router_aux_loss_coef (only matters when the router trains)
    return c
