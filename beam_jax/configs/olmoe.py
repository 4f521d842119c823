"""OLMoE-1B-7B (64 experts, K=8): BEAM mask routers on a Tulu-3-style chat SFT mixture, bf16 on GPUs. mixtral.py's
recipe on this checkpoint."""

from beam_jax.configs import mixtral


def get_config():
    # alpha: the family's router_aux_loss_coef
    return mixtral.for_checkpoint("checkpoints/OLMoE-1B-7B-0924", alpha=0.01)
