"""Defaults shared by every config. Each knob is documented where it is defined."""

from ml_collections import ConfigDict

from beam_jax.beam import DEFAULT_TAU


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0

    c.model = ConfigDict()
    c.model.path = ""  # Hugging Face checkpoint directory (config.json + safetensors)
    c.model.dtype = "float32"  # compute/parameter dtype of the frozen base model: float32 | bfloat16
    # expert path: auto (experts.training_impl / eval_impl) | kernel | dense | grouped | reference
    c.model.impl = "auto"

    c.data = ConfigDict()
    c.data.train = ""  # file or directory of training data; "stdlib" = the Python standard library corpus,
    # "stdlib+tests" = the same with its test directories added to train only (corpus.named_corpus)
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
    c.train.base_lr = 0.0  # > 0: peak rate of what trains besides the mask routers (mask+router, all); 0 = lr
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
    c.beam.tau = DEFAULT_TAU  # binarisation threshold m = 1[sigmoid(W_m x) >= tau]; also a serving-time knob
    c.beam.alpha = 0.0  # load-balancing loss coefficient (the family's router_aux_loss_coef when training the router)
    c.beam.balance = "pooled"  # "pooled" (transformers' multi-layer loss) or "per_layer" (mean of each layer's)
    c.beam.beta = 0.05  # sparsity regulariser coefficient (L_reg = mean m_hat over Top-K candidates)
    c.beam.renormalize = False  # renormalise kept weights (off: the paper's g * m)
    c.beam.target_ratio = 0.0  # > 0: a controller adapts beta so the kept fraction of Top-K tends to this
    c.beam.controller_rate = 0.05
    c.beam.controller = "global"  # "global": one beta for the model; "per_layer": one beta per MoE layer, each
    # steering its layer's kept fraction to target_ratio (a uniform budget across layers, as the baselines spend)
    # > 0: task loss (1 - distill) * L_lm + distill * KL(Top-K teacher || BEAM), not in the paper; the teacher is
    # the model as loaded (a frozen copy of what trains, when more than the mask routers do)
    c.beam.distill = 0.0

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
    c.eval.selection_batches = 6  # batches of the validation split the selection sweep scores (0 = all)
    c.eval.selection_mc_items = 300  # multiple-choice items of the selection sweep (beam_jax.tasks)
    c.eval.mc_items = 2000  # multiple-choice items on the test split (its size: data.eval_batches)
    c.eval.test_savings = (0.5, 0.75, 0.85)  # per policy, the validation-best point saving >= each goes to test
    c.eval.resamples = 1000  # bootstrap resamples of documents for the 95% CIs
    return c


# Allowed values of the knobs above, checked by `check(config)` on the final config (file plus overrides) before a
# run starts: key -> (test, what the value must be). A key a config does not have is not checked.
def _num(lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
    def test(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            return False
        if v != v or v in (float("inf"), float("-inf")):
            return False
        return ((lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi)))
    return test


def _mesh_size(v):
    return isinstance(v, int) and not isinstance(v, bool) and (v == -1 or v >= 1)


def _one_of(*choices):
    return lambda v: v in choices


CHECKS = {
    "seed": (_num(0, integer=True), "an integer >= 0"),
    "model.dtype": (_one_of("float32", "bfloat16"), "float32 or bfloat16"),
    "data.seq_len": (_num(2, integer=True), "an integer >= 2"),
    "data.batch_size": (_num(1, integer=True), "an integer >= 1"),
    "data.pack": (_one_of("concat", "fit"), "concat or fit"),
    "data.eval_batches": (_num(0, integer=True), "an integer >= 0 (0 = all)"),
    "train.trainable": (_one_of("mask", "mask+router", "all"), "mask, mask+router or all"),
    "train.steps": (_num(1, integer=True), "an integer >= 1"),
    "train.lr": (_num(0, lo_open=True), "a finite number > 0"),
    "train.base_lr": (_num(0), "a finite number >= 0 (0 = train.lr)"),
    "train.warmup_steps": (_num(0, integer=True), "an integer >= 0"),
    "train.final_lr_fraction": (_num(0, 1), "a number in [0, 1]"),
    "train.weight_decay": (_num(0), "a number >= 0"),
    "train.grad_clip": (_num(0), "a number >= 0 (0 = no clipping)"),
    "train.grad_accum": (_num(1, integer=True), "an integer >= 1"),
    "train.log_every": (_num(1, integer=True), "an integer >= 1"),
    "train.ckpt_every": (_num(1, integer=True), "an integer >= 1"),
    "train.keep_ckpts": (_num(1, integer=True), "an integer >= 1"),
    "train.max_bad_steps": (_num(1, integer=True), "an integer >= 1"),
    "beam.tau": (_num(0, 1), "a number in [0, 1]"),
    "beam.alpha": (_num(0), "a number >= 0"),
    "beam.balance": (_one_of("pooled", "per_layer"), "pooled or per_layer"),
    "beam.beta": (_num(0), "a number >= 0"),
    "beam.target_ratio": (_num(0, 1, hi_open=True), "a number in [0, 1) (0 = no controller)"),
    "beam.controller_rate": (_num(0, lo_open=True), "a number > 0"),
    "beam.controller": (_one_of("global", "per_layer"), "global or per_layer"),
    "beam.distill": (_num(0, 1), "a number in [0, 1]"),
    "mesh.data": (_mesh_size, "-1 or an integer >= 1"),
    "mesh.fsdp": (_mesh_size, "-1 or an integer >= 1"),
    "mesh.expert": (_mesh_size, "-1 or an integer >= 1"),
    "mesh.tensor": (_mesh_size, "-1 or an integer >= 1"),
    "plan.headroom": (_num(0, 1, lo_open=True), "a number in (0, 1]"),
    "eval.taus": (lambda v: isinstance(v, (tuple, list)) and all(_num(0, 1)(t) for t in v),
                  "a list of numbers in [0, 1]"),
    "eval.selection_batches": (_num(0, integer=True), "an integer >= 0 (0 = all)"),
    "eval.selection_mc_items": (_num(0, integer=True), "an integer >= 0"),
    "eval.mc_items": (_num(0, integer=True), "an integer >= 0"),
    "eval.test_savings": (lambda v: isinstance(v, (tuple, list)) and all(_num(0, 1)(t) for t in v),
                          "a list of numbers in [0, 1]"),
    "eval.resamples": (_num(10, integer=True), "an integer >= 10"),
}


def check(config) -> None:
    """Refuse a value outside its range, naming the key: raises beam_jax.config.ConfigError."""
    from beam_jax.config import ConfigError

    def get(key):
        node = config
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node.keys():
                return _MISSING
            node = node[part]
        return node

    for key, (test, want) in CHECKS.items():
        value = get(key)
        if value is not _MISSING and not test(value):
            raise ConfigError(f"config key '{key}' must be {want}, got {value!r}")
    mesh = [get(f"mesh.{a}") for a in ("data", "fsdp", "expert", "tensor")]
    if sum(1 for v in mesh if v == -1) > 1:
        raise ConfigError(f"config keys mesh.data/fsdp/expert/tensor: at most one may be -1, got {mesh}")


_MISSING = object()
