"""One of the two `jax.distributed` processes of tests/test_multiprocess.py (2 CPU devices each, 4 in all).

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=I \\
        python tests/multiprocess_worker.py MODEL_DIR WORKDIR

Trains the mask routers for 3 steps on a data=2 x fsdp=2 mesh (the data axis spans the two processes, each
feeding its own rows of every global batch), checkpoints from both processes, restores the checkpoint into a
fresh trainer, and resumes for one more step. Process 0 also runs the same 3 steps on one local device with
the whole global batch, as the reference. Process 0 prints one JSON line.
"""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from beam_jax import distributed, sharding  # noqa: E402


def main(model_dir: Path, workdir: Path):
    assert distributed.initialize(), "expected two processes"
    from jax.experimental import multihost_utils

    import beam_jax
    from beam_jax.configs import base
    from beam_jax.data import BatchIterator
    from beam_jax.data.packing import pack
    from beam_jax.routing import BeamHook
    from beam_jax.checkpoint import Checkpointer
    from beam_jax.trainer import LossConfig, Trainer, fit

    pid, n = jax.process_index(), jax.process_count()
    rng = np.random.RandomState(0)  # the same documents on every process
    docs = [(rng.randint(3, 160, size=int(rng.randint(20, 60))).astype(np.int32), None) for _ in range(12)]
    docs = [(t, np.ones_like(t, bool)) for t, _ in docs]
    packed = pack(docs, seq_len=16)
    tc = base.get_config().train
    tc.steps, tc.warmup_steps, tc.lr, tc.log_every, tc.ckpt_every = 3, 1, 5e-2, 1, 3
    lc = LossConfig(alpha=0.01, hook=BeamHook(0.5, train=True), impl="dense")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2})

    def trainer():
        return Trainer(beam_jax.load_pretrained(model_dir, mesh=mesh), "mask", tc, lc, mesh=mesh)

    def rows(batch_size, count, index):
        return BatchIterator(packed, batch_size, seed=1, process_index=index, process_count=count)

    t = trainer()
    it = rows(2, n, pid)  # 2 rows per process, a global batch of 4
    summary = fit(t, it, workdir, tc, beta=0.1, desc=f"process {pid}")
    trained = {k: multihost_utils.process_allgather(v, tiled=True)
               for k, v in sharding_leaves(t.state_tree()).items()}

    # restore the checkpoint both processes wrote into a fresh trainer on the same mesh
    fresh = trainer()
    ck = Checkpointer(workdir / "ckpt")
    tree, meta = ck.restore(3, fresh.state_tree())
    ck.close()
    fresh.load_state_tree(tree)
    restored = {k: multihost_utils.process_allgather(v, tiled=True)
                for k, v in sharding_leaves(fresh.state_tree()).items()}
    diff = max(float(np.max(np.abs(trained[k] - restored[k]))) for k in trained)

    # resume the run for one more step (fit restores params, optimizer state and the data position)
    tc.steps = 4
    resumed = fit(trainer(), rows(2, n, pid), workdir, tc, beta=0.1, resume=True, desc=f"process {pid}")

    out = {"processes": n, "devices": jax.device_count(), "local_devices": jax.local_device_count(),
           "losses": [r["loss"] for r in summary["log"] if r.get("split") == "train"],
           "restored_diff": diff, "meta_step": meta["step"], "data_state": meta["data"],
           "resumed_steps": [r["step"] for r in resumed["log"] if r.get("split") == "train"],
           "ckpt_steps": sorted(int(p.name) for p in (workdir / "ckpt").iterdir() if p.name.isdigit())}
    if pid == 0:  # the reference: one device, the whole global batch of 4 rows
        ref = Trainer(beam_jax.load_pretrained(model_dir), "mask", tc, lc)
        ref_it = rows(4, 1, 0)
        out["reference_losses"] = [float(ref.step(next(ref_it), 0.1)["loss"]) for _ in range(3)]
    multihost_utils.sync_global_devices("done")
    if pid == 0:
        print("RESULT " + json.dumps(out))


def sharding_leaves(tree) -> dict:
    return {sharding.dotted(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
