"""Plan's estimate against the peak memory measured on CPU for one training step of a config (default tiny.py).

    python tests/plan_measure.py [CONFIG]        # prints one JSON line: estimate, measured, ratio

Measured: this process's resident memory (/proc/self/statm), sampled every 0.2 ms by a thread while the
first execution of the already compiled step runs, minus the resident memory just before it, plus the
bytes of every live jax array at that moment (parameters, optimizer state, batch). XLA:CPU allocates a
step's buffers in that first execution, so the difference is the step's working memory. Run it in a fresh
process: nothing else may allocate meanwhile.
"""

import json
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main(config_name: str = "tiny.py"):
    import importlib.util

    import beam_jax
    from beam_jax import plan, sharding
    from beam_jax.configs import resolve
    from beam_jax.routing import BeamHook
    from beam_jax.experts import expert_impl
    from beam_jax.trainer import LossConfig, Trainer

    spec = importlib.util.spec_from_file_location("_cfg", resolve(config_name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    est = plan.estimate(c, sharding.make_mesh({}, jax.devices()[:1]))

    param_dtype = None if c.train.trainable == "mask" else "float32"
    model = beam_jax.load_pretrained(c.model.path, dtype=c.model.dtype, param_dtype=param_dtype)
    hook = BeamHook(c.beam.tau, train=True, renormalize=c.beam.renormalize)
    tr = Trainer(model, c.train.trainable, c.train, LossConfig(alpha=c.beam.alpha, hook=hook, distill=c.beam.distill,
                                                               impl=expert_impl(c.model.impl)))
    B, S = c.data.batch_size, c.data.seq_len
    ids = np.random.RandomState(0).randint(3, model.cfg.vocab_size, size=(B, S)).astype(np.int32)
    batch = tr._put({"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": np.ones((B, S), np.float32)})
    beta = jnp.float32(c.beam.beta)
    compiled = tr._step.lower(tr.params, tr.opt_state, tr.frozen, batch, beta, tr.teacher).compile()
    xla = compiled.memory_analysis()
    jax.block_until_ready((tr.params, tr.opt_state, tr.frozen, batch, tr.teacher))
    live = sum(x.nbytes for x in jax.live_arrays())
    before = rss()
    peak, running = [before], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.0002)

    t = threading.Thread(target=sample)
    t.start()
    jax.block_until_ready(compiled(tr.params, tr.opt_state, tr.frozen, batch, beta, tr.teacher))
    running[0] = False
    t.join()
    measured = live + peak[0] - before
    print(json.dumps({"config": config_name, "estimate": est.total, "estimate_params": est.params,
                      "estimate_opt": est.opt_state, "estimate_step": est.step, "measured": measured,
                      "measured_live_arrays": live, "measured_rss_delta": peak[0] - before,
                      "xla_temp": xla.temp_size_in_bytes, "ratio": est.total / measured}))


if __name__ == "__main__":
    main(*sys.argv[1:])
