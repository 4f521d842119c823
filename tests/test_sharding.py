"""Sharded training on a device mesh: mesh sizing and partition rules (in process), and, on 8 simulated CPU
devices in a subprocess (tests/sharded_worker.py), sharded loading, sharded loss and gradients against one
device for four mesh shapes, and a checkpoint saved on one mesh restored on another."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from beam_jax import distributed, sharding
from beam_jax.sharding import ShardingError, mesh_shape, partition_spec

HERE = Path(__file__).parent


def fake_mesh(**sizes):
    """partition_spec only reads `mesh.shape`."""
    return SimpleNamespace(shape={a: sizes.get(a, 1) for a in sharding.AXES})


def test_mesh_shape_fills_and_refuses():
    assert mesh_shape({"fsdp": -1}, 8) == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    assert mesh_shape({"data": -1, "expert": 2, "tensor": 2}, 16) == {"data": 4, "fsdp": 1, "expert": 2,
                                                                      "tensor": 2}
    with pytest.raises(ShardingError, match=r"mesh.data=-1.*does not divide the 8 devices"):
        mesh_shape({"data": -1, "expert": 3}, 8)
    with pytest.raises(ShardingError, match=r"needs 4 devices, but there are 8"):
        mesh_shape({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ShardingError, match=r"only one axis may be -1"):
        mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ShardingError, match=r"mesh.tensor must be a positive size"):
        mesh_shape({"tensor": 0}, 8)
    with pytest.raises(ShardingError, match=r"mesh.pipeline: unknown mesh axis"):
        mesh_shape({"pipeline": 2}, 8)


def test_partition_rules_by_family_layout():
    m = fake_mesh(fsdp=2, expert=4, tensor=2)
    P = sharding.P
    assert partition_spec("layers.0.mlp.experts.w_gate", (8, 64, 24), m) == P("expert", "fsdp", "tensor")
    assert partition_spec("layers.0.mlp.experts.w_down", (8, 24, 64), m) == P("expert", "tensor", "fsdp")
    assert partition_spec("layers.0.self_attn.q_proj.kernel", (64, 128), m) == P("fsdp", "tensor")
    assert partition_spec("layers.0.self_attn.o_proj.kernel", (128, 64), m) == P("tensor", "fsdp")
    assert partition_spec("layers.1.self_attn.kv_b_proj.kernel", (16, 256), m) == P(None, "tensor")
    assert partition_spec("embed_tokens.embedding", (160, 64), m) == P("tensor", "fsdp")
    assert partition_spec("layers.0.mlp.shared_experts.down_proj.kernel", (40, 64), m) == P("tensor", "fsdp")
    # mask routers, routers and norms are replicated
    for path, shape in [("layers.0.mlp.mask_router.kernel", (64, 8)), ("layers.0.mlp.gate.kernel", (64, 8)),
                        ("layers.0.input_layernorm.weight", (64,)), ("norm.weight", (64,))]:
        assert partition_spec(path, shape, m) == P(*[None] * len(shape)), path
    # axes of size 1 are left out, so a one-device mesh replicates everything
    assert partition_spec("layers.0.mlp.experts.w_gate", (8, 64, 24), fake_mesh()) == P(None, None, None)
    # batches go over data, fsdp and expert
    assert sharding.LOGICAL["batch"] == ("data", "fsdp", "expert")


def test_partition_rules_refuse_with_names():
    with pytest.raises(ShardingError, match=r"'layers.0.mlp.experts.w_gate' dimension 0 \(expert, size 7\).*"
                                            r"mesh.expert=2"):
        partition_spec("layers.0.mlp.experts.w_gate", (7, 64, 24), fake_mesh(expert=2))
    with pytest.raises(ShardingError, match=r"q_proj.kernel. dimension 0 \(embed, size 60\).*mesh.fsdp=8"):
        partition_spec("layers.0.self_attn.q_proj.kernel", (60, 128), fake_mesh(fsdp=8))
    with pytest.raises(ShardingError, match=r"no sharding rule for parameter 'layers.0.mystery.weight'"):
        partition_spec("layers.0.mystery.weight", (4, 4), fake_mesh())
    with pytest.raises(ShardingError, match=r"data.batch_size: the global batch of 6 rows.*8 batch shards"):
        sharding.check_batch(6, fake_mesh(data=2, fsdp=4))


def test_distributed_settings_from_launcher_environments():
    assert distributed.settings({}) is None
    assert distributed.settings({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                                 "JAX_PROCESS_ID": "3"}) == dict(coordinator_address="10.0.0.1:1234",
                                                                 num_processes=4, process_id=3)
    # Kubernetes indexed Job: the process id is the completion index
    k8s = distributed.settings({"JAX_COORDINATOR_ADDRESS": "job-0.svc:1234", "JAX_NUM_PROCESSES": "2",
                                "JOB_COMPLETION_INDEX": "1", "JAX_LOCAL_DEVICE_IDS": "0,1"})
    assert k8s["process_id"] == 1 and k8s["local_device_ids"] == [0, 1]
    # SLURM with several tasks: jax's own cluster detection ({} = no arguments)
    assert distributed.settings({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == {}
    assert distributed.settings({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    with pytest.raises(distributed.DistributedError, match="JAX_NUM_PROCESSES"):
        distributed.settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"})
    with pytest.raises(distributed.DistributedError, match=r"process id 2 is outside \[0, JAX_NUM_PROCESSES=2\)"):
        distributed.settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(HERE / "sharded_worker.py"), str(root)], capture_output=True,
                          text=True, env=env, timeout=900)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    return json.loads(line[len("RESULT "):])


def test_sharded_loading_reads_only_owned_slices(eight_devices):
    r = eight_devices
    assert r["devices"] == 8
    # every family, 7 of them (Mixtral in the fused expert layout), on both meshes, loads bit for bit into its sharded
    # layout
    assert len(r["load_max_diff"]) == 7 * 2 and all(v == 0.0 for v in r["load_max_diff"].values()), r["load_max_diff"]
    # expert 0's gate [f=24, d=64] on fsdp=8: eight reads, one per device, each 8 columns of d, none whole
    assert sorted(map(tuple, (tuple(map(tuple, w)) for w in r["expert0_gate_windows"]))) == \
        [((0, 24), (8 * i, 8 * i + 8)) for i in range(8)]


@pytest.mark.parametrize("mesh", ["data8", "fsdp8", "d2f2e2", "e4t2"])
def test_sharded_loss_and_gradients_equal_single_device(eight_devices, mesh):
    r = eight_devices
    single, got = r["single"], r[mesh]
    assert got["loss"] == pytest.approx(single["loss"], rel=1e-6, abs=1e-6)
    # every parameter trains here (train.trainable=all): the experts' gradients are sharded too
    assert got["grad_max_diff"] <= 1e-5 * max(1.0, single["grad_max"]), got
    assert got["mask_router_replicated"]
    want = {"data8": "P(None, None, None)", "fsdp8": "P(None, 'fsdp', None)",
            "d2f2e2": "P('expert', 'fsdp', None)", "e4t2": "P('expert', None, 'tensor')"}[mesh]
    assert got["w_gate_spec"] == want


def test_checkpoint_saved_on_one_mesh_restores_on_another(eight_devices):
    c = eight_devices["ckpt"]
    assert c["moved_from_zero"] > 1e-3  # two steps trained the mask routers away from their zero init
    assert c["restored_b_diff"] == 0.0 and c["restored_single_diff"] == 0.0
    assert c["b_opt_mesh"] == ["{'data': 1, 'fsdp': 1, 'expert': 4, 'tensor': 2}"]  # laid out on the new mesh
    la, lb = c["next_loss"]  # the next step on fsdp=8 and on expert=4 x tensor=2
    assert lb == pytest.approx(la, rel=1e-6)
    assert c["next_params_diff"] < 1e-5


def test_sharding_errors_name_the_field(eight_devices):
    e = eight_devices["errors"]
    assert "needs 3 devices, but there are 8" in e["mesh"]
    assert e["seven"] is not None and "(expert, size 7) is not divisible by mesh.expert=2" in e["seven"]


@pytest.mark.parametrize("base_lr", [0.0, 1e-3])
def test_opt_state_shardings_follow_parameters(base_lr):
    """Adam's moments are laid out like their parameters, counters replicated, also when train.base_lr splits
    the optimizer in two (optax.multi_transform: each half holds only some parameters)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from ml_collections import ConfigDict

    from beam_jax.trainer import make_optimizer

    mesh = sharding.make_mesh({}, jax.devices()[:1])
    params = {"layers": {"0": {"mlp": {"mask_router": {"kernel": jnp.zeros((4, 3))},
                                       "experts": {"w_gate": jnp.zeros((2, 4, 6)), "w_up": jnp.zeros((2, 4, 6))}}}}}
    specs = {"kernel": P(), "w_gate": P("expert", "fsdp", None), "w_up": P("expert", None, "tensor")}
    p_sh = jax.tree_util.tree_map_with_path(lambda path, _: NamedSharding(mesh, specs[path[-1].key]), params)
    tc = ConfigDict(dict(lr=0.1, base_lr=base_lr, warmup_steps=1, steps=10, final_lr_fraction=0.1, grad_clip=1.0,
                         weight_decay=0.0, grad_accum=1))
    tx = make_optimizer(tc)
    o_sh = sharding.opt_state_shardings(tx, params, p_sh, mesh)
    state = jax.eval_shape(tx.init, params)
    got = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(o_sh)):
        name = str(path[-1])
        if leaf.shape in ((2, 4, 6), (4, 3)):
            got.setdefault(name, []).append(sh.spec)
        else:
            assert sh.spec == P(), (path, sh)  # counts and scalars
    assert got["['w_gate']"] == [P("expert", "fsdp", None)] * 2  # mu and nu
    assert got["['w_up']"] == [P("expert", None, "tensor")] * 2
    assert got["['kernel']"] == [P()] * 2
