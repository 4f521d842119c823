"""A short real BEAM training run for the fault-injection tests (tests/test_faults.py).

    python tests/fault_driver.py MODEL_DIR DATA_DIR WORKDIR [--steps N] [--ckpt-every C] [--resume]
                                 [--fault full_disk@STEP | read_only@STEP]

The same path as `python -m beam_jax.train` up to the end of training (load_pretrained, load_splits,
Trainer, fit with the base-model fingerprint in the checkpoint metadata), without the evaluation sweep,
and behind the same one-line error handling (`beam_jax.cli.expected_errors`).

--fault applies a real OS-level fault just before the checkpoint save of STEP:
- full_disk: RLIMIT_FSIZE is lowered so every file write past 512 bytes fails with EFBIG (SIGXFSZ ignored),
  as a full disk fails writes (ENOSPC) in the middle of a save;
- read_only: WORKDIR/ckpt is made read-only (mode 0555; run this process as a non-root user, root ignores it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
from pathlib import Path


def config(model_dir, data_dir, steps, ckpt_every):
    from beam_jax.configs import tiny

    c = tiny.get_config()
    c.model.path = str(model_dir)
    c.data.train = str(data_dir)
    c.data.seq_len = 32
    c.data.batch_size = 4
    c.train.steps = steps
    c.train.warmup_steps = 1
    c.train.lr = 0.05
    c.train.log_every = 1
    c.train.ckpt_every = ckpt_every
    c.train.keep_ckpts = 2
    c.beam.beta = 0.5
    c.beam.target_ratio = 0.2  # the beta controller runs: its state must survive a kill too
    return c


def install_fault(fault: str):
    """Wrap Checkpointer.save so that the save of the fault's step meets the fault."""
    from beam_jax import checkpoint

    kind, step = fault.split("@")
    step = int(step)
    real_save = checkpoint.Checkpointer.save

    def save(self, s, tree, meta):
        if s == step:
            print(f"injecting {kind} at the save of step {s}", file=sys.stderr, flush=True)
            if kind == "full_disk":
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (512, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            elif kind == "read_only":
                os.chmod(self.directory, 0o555)
            else:
                raise SystemExit(f"unknown fault {kind!r}")
        return real_save(self, s, tree, meta)

    checkpoint.Checkpointer.save = save


def run(args):
    import transformers

    from beam_jax import beam as beam_lib
    from beam_jax.data import BatchIterator
    from beam_jax.loading import load_pretrained
    from beam_jax.routing import BeamHook
    from beam_jax.run_data import load_splits, model_fingerprint
    from beam_jax.trainer import LossConfig, Trainer, fit

    c = config(args.model, args.data, args.steps, args.ckpt_every)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.fault:
        install_fault(args.fault)
    model = load_pretrained(c.model.path)
    tok = transformers.AutoTokenizer.from_pretrained(c.model.path)
    splits = load_splits(c.data, tok)
    trainer = Trainer(model, c.train.trainable, c.train,
                      LossConfig(alpha=c.beam.alpha, hook=BeamHook(c.beam.tau, train=True), impl="dense"))
    meta = {"base_model": model_fingerprint(c.model.path), "config": json.loads(c.to_json()),
            "trainable": c.train.trainable}
    it = BatchIterator(splits["train"], c.data.batch_size, seed=c.seed)
    fit(trainer, it, workdir, c.train, beta=c.beam.beta, controller=beam_lib.BetaController(),
        target=c.beam.target_ratio, controller_rate=c.beam.controller_rate, resume=args.resume, meta=meta,
        desc="train")
    print("finished", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("workdir")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ckpt-every", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fault", default="")
    args = p.parse_args()
    from beam_jax.cli import report_errors

    with report_errors(hard_exit=True):
        run(args)


if __name__ == "__main__":
    main()
