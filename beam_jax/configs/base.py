"""Defaults shared by every config. Each knob is documented where it is defined."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0

    c.model = ConfigDict()
    c.model.path = ""  # Hugging Face checkpoint directory (config.json + safetensors)
    c.model.dtype = "float32"  # compute/parameter dtype of the frozen base model: float32 | bfloat16
    c.model.impl = "auto"  # expert path in training: auto (dense on CPU, grouped elsewhere) | dense | grouped | reference

    c.data = ConfigDict()
    c.data.train = ""  # file or directory of training data; "stdlib" = the Python standard library corpus
    c.data.eval = ""  # held-out data; with "stdlib" the corpus's validation/test splits are used
    c.data.format = ""  # "" = by extension; text | jsonl | parquet | hf_disk
    c.data.seq_len = 256
    c.data.batch_size = 16  # sequences per optimizer micro-step (per process)
    c.data.pack = "concat"  # concat (plain text streams) | fit (whole documents, SFT)
    c.data.eval_batches = 16  # batches of the held-out split used by evaluation (0 = all)

    c.train = ConfigDict()
    c.train.trainable = "mask"  # mask (only the BEAM mask routers) | mask+router | all
    c.train.steps = 1000
    c.train.lr = 1e-3
    c.train.warmup_steps = 50
    c.train.final_lr_fraction = 0.1  # cosine decays to lr * this
    c.train.weight_decay = 0.0
    c.train.grad_clip = 1.0
    c.train.grad_accum = 1  # micro-steps per optimizer step
    c.train.remat = False  # rematerialise each decoder layer in the backward pass (memory for compute)
    c.train.log_every = 10
    c.train.ckpt_every = 100
    c.train.keep_ckpts = 3
    c.train.max_bad_steps = 5  # refused (NaN/Inf) steps in a row before the run stops

    c.beam = ConfigDict()
    c.beam.tau = 0.5  # binarisation threshold m = 1[sigmoid(W_m x) >= tau]; also a serving-time knob
    c.beam.alpha = 0.0  # load-balancing loss coefficient (the family's router_aux_loss_coef when training the router)
    c.beam.beta = 0.05  # sparsity regulariser coefficient (L_reg = mean m_hat over Top-K candidates)
    c.beam.renormalize = False  # renormalise kept weights (off: the paper's g * m)
    c.beam.target_ratio = 0.0  # > 0: a controller adapts beta so the kept fraction of Top-K tends to this
    c.beam.controller_rate = 0.05

    c.mesh = ConfigDict()  # device mesh (beam_jax/sharding.py): all 1 = one device (the default); else the
    # sizes must multiply to the device count of all processes
    c.mesh.data = 1  # batch split, parameters replicated; -1 = the devices the other axes leave
    c.mesh.fsdp = 1  # batch split and every weight's width d split (ZeRO-3 style); -1 = the rest
    c.mesh.expert = 1  # batch split and the routed experts split by expert (expert parallelism); -1 = the rest
    c.mesh.tensor = 1  # heads / expert width / vocabulary split (Megatron style); -1 = the rest

    c.plan = ConfigDict()  # the memory check before training (python -m beam_jax.plan prints the same)
    c.plan.device_memory = ""  # per-device memory, e.g. "80GB"; "" = as the device reports it (GPU), unchecked on CPU
    c.plan.headroom = 0.9  # refuse a run whose estimated peak exceeds this fraction of device_memory

    c.eval = ConfigDict()
    c.eval.taus = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # BEAM's serving-time sweep
    c.eval.policies = ("top_p", "dynamic_skip", "static_topk", "entropy")  # baselines swept on the same split
    c.eval.multiple_choice = ""  # optional local JSONL of {context, choices, label} items
    return c
