"""Pretraining of the project's own small base model (`python -m beam_jax.pretrain --config tiny_pretrain.py`).

A fine-grained Qwen3-MoE-layout model (16 experts, K=4, head_dim 32) trained from scratch on the
Python standard library's source, with a byte-level BPE tokenizer trained on the same split. About an
hour on a 2-core CPU; the result is shipped as `beam_jax/assets/tiny-moe` and is the base of `tiny.py`.
"""

from ml_collections import ConfigDict

from beam_jax.configs import base


def get_config() -> ConfigDict:
    c = base.get_config()
    c.model.arch = ConfigDict(dict(
        architecture="Qwen3MoeForCausalLM", vocab_size=4096, hidden_size=192, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=96, norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=1024, tie_word_embeddings=False))
    c.model.impl = "dense"
    c.data.train = "stdlib"
    c.data.seq_len = 256
    c.data.batch_size = 16
    c.data.eval_batches = 0
    c.train.trainable = "all"
    c.train.steps = 800
    c.train.lr = 3e-3
    c.train.warmup_steps = 60
    c.train.weight_decay = 0.01
    c.train.ckpt_every = 100
    c.train.log_every = 10
    c.beam.alpha = 0.01  # Switch-style load balancing, as Qwen3-MoE's router_aux_loss_coef
    c.tokenizer_vocab = 4096
    c.output = ""  # "" = WORKDIR/model; the shipped copy lives in beam_jax/assets/tiny-moe
    return c
