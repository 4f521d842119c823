"""DeepSeek-V2-Lite (MLA, 64 routed experts K=6 + 2 shared, first layer dense): BEAM mask routers on a Tulu-3-style
chat SFT mixture, bf16 on GPUs. mixtral.py's recipe on this checkpoint."""

from beam_jax.configs import mixtral


def get_config():
    # alpha: the family's router_aux_loss_coef
    return mixtral.for_checkpoint("checkpoints/DeepSeek-V2-Lite", alpha=0.001)
