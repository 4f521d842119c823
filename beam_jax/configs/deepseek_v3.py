"""DeepSeek-V3 / R1 (671B: MLA, 256 routed experts K=8 + 1 shared, sigmoid noaux_tc routing, first 3 layers dense):
BEAM mask routers on a Tulu-3-style chat SFT mixture, bf16 on a GPU pod. mixtral.py's recipe on this checkpoint;
`python -m beam_jax.plan --config deepseek_v3.py --devices 64 --device_memory 141GB` sizes the pod."""

from beam_jax.configs import mixtral


def get_config():
    # alpha: balanced by e_score_correction_bias, not an auxiliary loss
    return mixtral.for_checkpoint("checkpoints/DeepSeek-V3", alpha=0.0)
