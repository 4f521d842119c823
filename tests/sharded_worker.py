"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS must be set before
jax starts, so not inside pytest's process). Prints one JSON object of measurements; the test asserts on it.

    python tests/sharded_worker.py WORKDIR
"""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # SPMD partitioner warnings
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from hf_tiny import fuse_experts, make_tiny  # noqa: E402

import beam_jax  # noqa: E402
from beam_jax import loading, sharding  # noqa: E402
from beam_jax.configs import base  # noqa: E402
from beam_jax.routing import BeamHook  # noqa: E402
from beam_jax.checkpoint import Checkpointer  # noqa: E402
from beam_jax.trainer import LossConfig, Trainer  # noqa: E402

MESHES = {"data8": {"data": 8}, "fsdp8": {"fsdp": 8}, "d2f2e2": {"data": 2, "fsdp": 2, "expert": 2},
          "e4t2": {"expert": 4, "tensor": 2}}


def leaves(tree) -> dict:
    return {sharding.dotted(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))[:3]
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def main(root: Path):
    import time

    t0 = time.perf_counter()
    out = {"devices": jax.device_count(), "seconds": {}}
    tc = base.get_config().train
    tc.warmup_steps, tc.steps, tc.lr = 1, 10, 1e-2
    lc = LossConfig(alpha=0.01, hook=BeamHook(0.5, train=True), impl="dense")
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 160, size=(8, 16)).astype(np.int32)
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1),
             "loss_mask": (rng.rand(8, 16) > 0.2).astype(np.float32)}

    # 1) sharded loading equals single-device loading, for every family (and the fused expert layout)
    load = {}
    for fam, kw in [("qwen3_moe", dict(num_experts=8)), ("mixtral", dict(num_local_experts=8)),
                    ("deepseek_v2", dict(n_routed_experts=8, n_group=2, topk_group=1)),
                    ("qwen2_moe", dict(num_experts=8)), ("olmoe", dict(num_experts=8)),
                    ("deepseek_v3", {}), ("glm4_moe", {})]:
        d = root / fam
        make_tiny(fam, d, **kw)
        if fam == "mixtral":
            fuse_experts(d)
        ref = leaves(beam_jax.load_pretrained(d))
        for name in ("fsdp8", "e4t2"):
            load[f"{fam}/{name}"] = max_diff(ref, leaves(beam_jax.load_pretrained(d, mesh=sharding.make_mesh(
                MESHES[name]))))
    out["load_max_diff"] = load
    out["seconds"]["load"] = time.perf_counter() - t0

    # each host reads only its slices: record the windows read for one expert tensor on fsdp=8
    windows = []
    real_read = loading._SliceReader.read
    loading._SliceReader.read = lambda self, name, w: (windows.append((name, [tuple(x) for x in w])),
                                                       real_read(self, name, w))[1]
    beam_jax.load_pretrained(root / "qwen3_moe", mesh=sharding.make_mesh(MESHES["fsdp8"]))
    loading._SliceReader.read = real_read
    gate0 = [w for n, w in windows if n == "model.layers.0.mlp.experts.0.gate_proj.weight"]
    out["expert0_gate_windows"] = gate0  # stored [f=24, d=64]; fsdp splits d into 8 windows of 8

    # 2) loss and gradients of sharded steps equal the single-device ones (one decoder layer: compile time)
    model_dir = root / "qwen3_one_layer"
    make_tiny("qwen3_moe", model_dir, num_experts=8, num_hidden_layers=1)

    def loss_and_grads(mesh):
        tr = Trainer(beam_jax.load_pretrained(model_dir, mesh=mesh), "all", tc, lc, mesh=mesh)
        fn = jax.jit(jax.value_and_grad(lambda p, f, b: tr.loss(p, f, b, 0.1)[0]))
        loss, grads = fn(tr.params, tr.frozen, tr._put(batch))
        return float(loss), leaves(grads), tr

    loss0, grads0, _ = loss_and_grads(None)
    scale = max(float(np.max(np.abs(g))) for g in grads0.values())
    out["single"] = {"loss": loss0, "grad_max": scale}
    for name, spec in MESHES.items():
        loss, grads, tr = loss_and_grads(sharding.make_mesh(spec))
        arrays = {sharding.dotted(p): x for p, x in jax.tree_util.tree_flatten_with_path(tr.params)[0]}
        out[name] = {"loss": loss, "grad_max_diff": max_diff(grads0, grads),
                     "w_gate_spec": str(arrays["layers.0.mlp.experts.w_gate"].sharding.spec),
                     "mask_router_replicated": arrays["layers.0.mlp.mask_router.kernel"].sharding.is_fully_replicated}

    out["seconds"]["grads"] = time.perf_counter() - t0
    # 3) a checkpoint saved on one mesh restores on another (and on one device), and training goes on alike
    tc.trainable = "mask"
    mesh_a, mesh_b = sharding.make_mesh(MESHES["fsdp8"]), sharding.make_mesh(MESHES["e4t2"])
    a = Trainer(beam_jax.load_pretrained(model_dir, mesh=mesh_a), "mask", tc, lc, mesh=mesh_a)
    a.step(batch, 0.1)
    a.step(batch, 0.1)
    ck = Checkpointer(root / "ckpt")
    ck.save(2, a.state_tree(), {"step": 2})
    ck.close()
    b = Trainer(beam_jax.load_pretrained(model_dir, mesh=mesh_b), "mask", tc, lc, mesh=mesh_b)
    c = Trainer(beam_jax.load_pretrained(model_dir), "mask", tc, lc)
    ck = Checkpointer(root / "ckpt")
    for t in (b, c):
        tree, meta = ck.restore(2, t.state_tree())
        t.load_state_tree(tree)
    ck.close()
    sa, sb, sc = (leaves(t.state_tree()) for t in (a, b, c))
    opt_b = [x for x in jax.tree.leaves(b.opt_state) if getattr(x, "ndim", 0) == 2]
    out["ckpt"] = {"restored_b_diff": max_diff(sa, sb), "restored_single_diff": max_diff(sa, sc),
                   "moved_from_zero": float(max(np.abs(v).max() for k, v in sa.items() if "params" in k)),
                   "b_opt_mesh": [str(dict(x.sharding.mesh.shape)) for x in opt_b][:1]}
    la, lb = (float(t.step(batch, 0.1)["loss"]) for t in (a, b))
    out["ckpt"].update(next_loss=[la, lb], next_params_diff=max_diff(leaves(a.state_tree()),
                                                                     leaves(b.state_tree())))

    out["seconds"]["ckpt"] = time.perf_counter() - t0
    # 4) refusals name the field
    errs = {}
    try:
        sharding.make_mesh({"data": 3})
        errs["mesh"] = None
    except sharding.ShardingError as e:
        errs["mesh"] = str(e)
    make_tiny("qwen3_moe", root / "seven", num_experts=7)
    try:
        beam_jax.load_pretrained(root / "seven", mesh=sharding.make_mesh({"expert": 2, "fsdp": 4}))
        errs["seven"] = None
    except sharding.ShardingError as e:
        errs["seven"] = str(e)
    out["errors"] = errs
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
