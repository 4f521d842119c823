"""The embedded default: BEAM on the project's own small MoE (beam_jax/assets/tiny-moe, a Qwen3-MoE layout
with 16 experts, K=4, pretrained by `python -m beam_jax.pretrain --config tiny_pretrain.py`) and the Python
standard library corpus. Runs offline on a 2-core CPU in about four minutes (README has the results)."""

from pathlib import Path

from beam_jax.configs import base

TINY_MODEL = str(Path(__file__).resolve().parent.parent / "assets" / "tiny-moe")


def get_config():
    c = base.get_config()
    c.model.path = TINY_MODEL
    c.data.train = "stdlib"
    c.data.seq_len = 256
    c.data.batch_size = 12
    c.data.eval_batches = 6
    c.train.steps = 150
    c.train.lr = 1e-2
    c.train.warmup_steps = 20
    c.train.log_every = 5
    c.train.ckpt_every = 50
    c.beam.beta = 0.1
    c.beam.target_ratio = 0.15  # the paper's headline: 85% of routed-expert FLOPs saved
    c.beam.controller_rate = 0.05
    return c
