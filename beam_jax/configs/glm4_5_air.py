"""GLM-4.5-Air (106B: GQA 96/8 heads with partial rotary, 128 routed experts K=8 + 1 shared, sigmoid noaux_tc
routing, first layer dense): BEAM mask routers on a Tulu-3-style chat SFT mixture, bf16 on GPUs. Only what
differs from mixtral.py (the project's first config) is set here."""

from beam_jax.configs import mixtral


def get_config():
    c = mixtral.get_config()
    c.model.path = "checkpoints/GLM-4.5-Air"
    c.beam.alpha = 0.0  # balanced by e_score_correction_bias, not an auxiliary loss
    return c
