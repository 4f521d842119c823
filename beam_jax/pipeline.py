"""One BEAM training run as a library function: `train_and_evaluate(config, workdir)` loads the Hugging Face
checkpoint, trains the mask routers (or more, `train.trainable`), benchmarks Top-K against BEAM and the
comparison policies (`evaluate.run_benchmark`) and writes the report. `python -m beam_jax.train` runs it once,
`python -m beam_jax.curve` once per target ratio; neither entry point imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp

from . import beam as beam_lib
from . import evaluate
from .data import BatchIterator
from .experts import eval_impl, expert_impl
from .loading import load_pretrained
from .routing import beam_hook
from .run_data import load_splits, model_fingerprint, split_examples_of
from .trainer import LossConfig, Trainer, fit


def run_mesh(config):
    """Join the multi-process runtime if the launcher describes one (`beam_jax.distributed`), then build the
    config's mesh. None (one device, no sharding) for the default all-ones mesh in a single process."""
    from . import distributed, sharding

    distributed.initialize()
    spec = {a: int(config.mesh[a]) for a in sharding.AXES}
    if all(v == 1 for v in spec.values()) and jax.process_count() == 1:
        return None
    return sharding.make_mesh(spec)


def check_memory(config, mesh):
    """Refuse, before any weight is read, a run whose planned per-device memory does not fit
    (`beam_jax.plan`); skipped where the device memory is unknown (CPU without plan.device_memory)."""
    from . import plan, sharding

    mesh = mesh if mesh is not None else sharding.make_mesh({}, jax.devices()[:1])
    found = plan.check_fits(config, mesh, processes=jax.process_count())
    if found is not None:
        print(found.table())


def train_and_evaluate(config, workdir: Path, resume: bool = False) -> dict:
    """Train BEAM as `config` says (model.path, data, train, beam, mesh), benchmark it (eval), write WORKDIR's
    checkpoints, metrics, report.json, sweep.md and plots; `resume` continues from WORKDIR/ckpt. -> the report."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    import transformers

    mesh = run_mesh(config)
    check_memory(config, mesh)
    # the frozen base stays in the compute dtype; whatever trains beyond the (float32) mask routers gets
    # float32 master weights, computed in config.model.dtype
    param_dtype = None if config.train.trainable == "mask" else "float32"
    model = load_pretrained(config.model.path, dtype=config.model.dtype, param_dtype=param_dtype, mesh=mesh)
    tokenizer = transformers.AutoTokenizer.from_pretrained(config.model.path)
    cfg = model.cfg
    examples = split_examples_of(config.data)
    splits = load_splits(config.data, tokenizer, examples)
    impl = expert_impl(config.model.impl)
    tc = config.train
    hook = beam_hook(config.beam, train=True)
    lc = LossConfig(alpha=config.beam.alpha, balance=config.beam.balance,
                    distill=config.beam.distill, hook=hook, impl=impl)
    trainer = Trainer(model, tc.trainable, tc, lc, mesh=mesh)
    # what training changes beyond the mask routers (mask+router, all) is kept as loaded for the baselines
    # (the distillation teacher, when there is one, is that copy already)
    initial = None
    if tc.trainable != "mask":
        initial = trainer.teacher if trainer.teacher is not None else jax.tree.map(jnp.copy, trainer.params)
    print(f"{cfg.architecture} from {config.model.path}: training {trainer.num_trainable:,} parameters "
          f"({tc.trainable}); {len(splits['train'])} training sequences of {config.data.seq_len} tokens")

    meta = {"base_model": model_fingerprint(config.model.path), "config": json.loads(config.to_json()),
            "trainable": tc.trainable}
    it = BatchIterator(splits["train"], config.data.batch_size, seed=config.seed,
                       process_index=jax.process_index(), process_count=jax.process_count())
    controller = beam_lib.BetaController() if config.beam.target_ratio > 0 else None
    summary = fit(trainer, it, workdir, tc, beta=config.beam.beta, controller=controller,
                  target=config.beam.target_ratio, controller_rate=config.beam.controller_rate,
                  per_layer_beta=config.beam.controller == "per_layer", resume=resume,
                  meta=meta, desc="beam")

    from .report import write_report

    trained = trainer.model()
    # Top-K and the training-free baselines run on the base model as loaded; BEAM on the trained one
    original = trainer.model(initial) if tc.trainable != "mask" else trained
    bench = evaluate.run_benchmark(original, trained, tokenizer, examples, splits["validation"],
                                   eval_cfg=config.eval, data_cfg=config.data, beam_cfg=config.beam,
                                   impl=eval_impl(config.model.impl), seed=config.seed)
    report = write_report(workdir, config, cfg, bench, summary, trainer.num_trainable)
    return report
