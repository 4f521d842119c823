"""GLM-4.5-Air (106B: GQA 96/8 heads with partial rotary, 128 routed experts K=8 + 1 shared, sigmoid noaux_tc
routing, first layer dense): BEAM mask routers on a Tulu-3-style chat SFT mixture, bf16 on GPUs. mixtral.py's
recipe on this checkpoint."""

from beam_jax.configs import mixtral


def get_config():
    # alpha: balanced by e_score_correction_bias, not an auxiliary loss
    return mixtral.for_checkpoint("checkpoints/GLM-4.5-Air", alpha=0.0)
