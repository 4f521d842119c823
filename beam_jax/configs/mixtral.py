"""Mixtral-8x7B (8 experts, K=2): BEAM mask routers on a Tulu-3-style chat SFT mixture, bf16 on GPUs.

Point model.path at a local copy of mistralai/Mixtral-8x7B-v0.1 (or -Instruct) and data.train at the SFT
data (JSONL with `messages`, parquet, or a `datasets.save_to_disk` directory)."""

from beam_jax.configs import base


def get_config():
    c = base.get_config()
    c.model.path = "checkpoints/Mixtral-8x7B-v0.1"
    c.model.dtype = "bfloat16"
    c.data.train = "data/tulu-3-sft-mixture"
    c.data.pack = "fit"
    c.data.seq_len = 4096
    c.data.batch_size = 8
    c.train.steps = 2000
    c.train.lr = 1e-3
    c.train.grad_accum = 4
    c.train.remat = True
    c.train.ckpt_every = 200
    c.beam.beta = 0.05
    c.beam.alpha = 0.02  # Mixtral's router_aux_loss_coef (only matters when the router trains)
    return c


def for_checkpoint(path: str, alpha: float):
    """This recipe on another family's checkpoint: model.path = `path`, beam.alpha = `alpha` (the family's
    router_aux_loss_coef; 0 where the family balances with a correction bias instead). The other family configs
    are this call."""
    c = get_config()
    c.model.path = path
    c.beam.alpha = alpha
    return c
