"""Two `jax.distributed` processes on 127.0.0.1 (2 CPU devices each) train on a data=2 x fsdp=2 mesh with the
data pipeline split by process, checkpoint from both, restore and resume (tests/multiprocess_worker.py)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hf_tiny import make_tiny

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    make_tiny("qwen3_moe", root / "model", num_experts=8, num_hidden_layers=1)
    (root / "work").mkdir()
    port = free_port()
    procs = []
    for pid in range(2):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                   PYTHONPATH=os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "multiprocess_worker.py"), str(root / "model"),
                                       str(root / "work")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    line = next((x for x in outs[0][0].splitlines() if x.startswith("RESULT ")), None)
    assert all(p.returncode == 0 for p in procs) and line, "\n".join(e[-3000:] for _, e in outs)
    return json.loads(line[len("RESULT "):]), root / "work"


def test_two_processes_train_like_one_device(two_processes):
    r, _ = two_processes
    assert (r["processes"], r["devices"], r["local_devices"]) == (2, 4, 2)
    # each process fed its own 2 rows of every global batch of 4; the losses are those of one device fed all 4
    assert len(r["losses"]) == 3
    assert r["losses"] == pytest.approx(r["reference_losses"], rel=1e-5)
    assert len(set(round(x, 4) for x in r["losses"])) > 1  # the routers trained: the loss moved


def test_two_processes_checkpoint_round_trip(two_processes):
    r, work = two_processes
    assert r["restored_diff"] == 0.0  # both processes' shards came back into a fresh sharded trainer
    assert r["meta_step"] == 3 and r["data_state"]["step"] == 3 and r["data_state"]["global_batch_size"] == 4
    assert r["resumed_steps"][-1] == 4 and r["ckpt_steps"] == [3, 4]  # resumed from step 3, saved step 4
    # one writer of the metrics: process 0 (no duplicated records from process 1)
    steps = [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
