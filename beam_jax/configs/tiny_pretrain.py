"""Pretraining of the project's own small base model (`python -m beam_jax.pretrain --config tiny_pretrain.py`).

A fine-grained Qwen3-MoE-layout model shaped like the models BEAM targets (Qwen3-30B-A3B: 128 experts, K 8;
DeepSeek-V2-Lite: 64, K 6): 32 experts of width 96, K 6, 4 layers of d 192, GQA 6 / 2 heads of 32, vocabulary
2048, 8.3M parameters (33 MB in float32). Per decoded token the routed experts are 62% of the weight FLOPs
(4 x 6 x 2 x 3 x 192 x 96 = 2.65 MFLOP, against 0.79 of attention projections, 0.79 of the LM head and 0.05 of
the routers): the vocabulary is 2048 rather than 4096 so that the LM head does not outweigh them.

Trained from scratch on "stdlib+tests" (`beam_jax.corpus.named_corpus`: the standard library's train split plus
its test directories, 30.5 MB; validation and test are the same files as "stdlib"), with a byte-level BPE
tokenizer trained on that train split, for 7,400 steps of 16 x 256 tokens = 30.3M tokens (about 3.5 epochs),
Switch-style load balancing applied per layer (`beam.balance="per_layer"`, alpha 0.05 on the mean over the 4
layers, i.e. 0.0125 per layer as Switch Transformer's 0.01 per layer): the pooled multi-layer loss of
transformers (alpha 0.02) left an expert of layer 2 with no load at all in an earlier run, because one layer's
starved expert was hidden by the same expert's surplus in another. Measured 4,265 tokens/s on this
shape on the 2-core AMD EPYC with the FFI kernel's backward (`model.impl="auto"`): about 2 hours. Resumable
(`--resume`); the result is shipped as `beam_jax/assets/tiny-moe` and is the base of `tiny.py`.
"""

from ml_collections import ConfigDict

from beam_jax.configs import base


def get_config() -> ConfigDict:
    c = base.get_config()
    c.model.arch = ConfigDict(dict(
        architecture="Qwen3MoeForCausalLM", vocab_size=2048, hidden_size=192, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, head_dim=32, num_experts=32, num_experts_per_tok=6,
        moe_intermediate_size=96, norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=1024, tie_word_embeddings=False))
    c.model.impl = "auto"  # the FFI kernel's forward and backward on CPU where built (K experts per token, not E)
    c.data.train = "stdlib+tests"
    c.data.seq_len = 256
    c.data.batch_size = 16
    c.data.eval_batches = 0
    c.train.trainable = "all"
    c.train.steps = 7400
    c.train.lr = 3e-3
    c.train.warmup_steps = 200
    c.train.weight_decay = 0.01
    c.train.ckpt_every = 200
    c.train.log_every = 20
    c.beam.alpha = 0.05  # Switch-style load balancing, on the mean of the layers' own losses
    c.beam.balance = "per_layer"
    c.tokenizer_vocab = 2048
    c.output = ""  # "" = WORKDIR/model; the shipped copy lives in beam_jax/assets/tiny-moe
    return c
