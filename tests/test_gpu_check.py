"""bench/gpu_check.sh and bench/gpu_train.py on a CPU: the HLO check for E-fold expert dots, and the dry run of
the one-command GPU check (everything up to the first GPU call), so the script cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bench_scripts

ROOT = Path(__file__).resolve().parents[1]


gt = bench_scripts.load("gpu_train")


def test_hlo_check_flags_the_dense_path_and_not_the_reference():
    res = gt.selftest(verbose=False)
    assert res["paths"]["dense"]["e_fold_dense_dot"] is True
    assert res["paths"]["dense"]["max_fold"] == pytest.approx(16 / 2)  # every expert on every token: E / K
    assert res["paths"]["reference"]["e_fold_dense_dot"] is False
    assert res["ok"]


# A GPU-style module: a Triton GEMM fusion holding a dense [T, E, f] dot, a cuBLAS GEMM in a while loop over the
# E experts (each over all rows), a real ragged-dot, and an lm_head-like dot with no expert dimension.
# T 256, d 96, f 64, E 16, K 2: one projection's routed work is 2 * 256 * 2 * 96 * 64 FLOP.
GPU_HLO = r"""HloModule jit_step, is_scheduled=true

%gemm_fusion_dot.1_computation (parameter_0: bf16[256,96], parameter_1: bf16[16,96,64]) -> bf16[256,16,64] {
  %parameter_0 = bf16[256,96]{1,0} parameter(0)
  %parameter_1 = bf16[16,96,64]{2,1,0} parameter(1)
  ROOT %dot.1 = bf16[256,16,64]{2,1,0} dot(bf16[256,96]{1,0} %parameter_0, bf16[16,96,64]{2,1,0} %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}

%body.7 (p.1: (s32[], bf16[512,96])) -> (s32[], bf16[512,96]) {
  %p.1 = (s32[], bf16[512,96]{1,0}) parameter(0)
  %gte.2 = bf16[512,96]{1,0} get-tuple-element(%p.1), index=1
  %i.3 = s32[] get-tuple-element(%p.1), index=0
  %wslice.4 = bf16[96,64]{1,0} constant({...})
  %cublas-gemm.2 = (bf16[512,64]{1,0}, s8[4194304]{0}) custom-call(%gte.2, %wslice.4), custom_call_target="__cublas$gemm", backend_config={"operation_queue_id":"0","gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}}
  ROOT %t.5 = (s32[], bf16[512,96]{1,0}) tuple(%i.3, %gte.2)
}

%cond.8 (p.2: (s32[], bf16[512,96])) -> pred[] {
  %p.2 = (s32[], bf16[512,96]{1,0}) parameter(0)
  %i.6 = s32[] get-tuple-element(%p.2), index=0
  %c.7 = s32[] constant(16)
  ROOT %lt.8 = pred[] compare(%i.6, %c.7), direction=LT
}

ENTRY %main.9 (x: bf16[256,96], w: bf16[16,96,64], xs: bf16[512,96], gs: s32[16], head: bf16[96,500]) -> bf16[256,16,64] {
  %x = bf16[256,96]{1,0} parameter(0)
  %w = bf16[16,96,64]{2,1,0} parameter(1)
  %xs = bf16[512,96]{1,0} parameter(2)
  %gs = s32[16]{0} parameter(3)
  %head = bf16[96,500]{1,0} parameter(4)
  %logits = bf16[256,500]{1,0} dot(%x, %head), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %rd = bf16[512,64]{1,0} ragged-dot(%xs, %w, %gs), lhs_contracting_dims={1}, rhs_contracting_dims={1}, lhs_ragged_dims={0}, rhs_group_dims={0}
  %zero = s32[] constant(0)
  %init = (s32[], bf16[512,96]{1,0}) tuple(%zero, %xs)
  %while.10 = (s32[], bf16[512,96]{1,0}) while(%init), condition=%cond.8, body=%body.7, backend_config={"known_trip_count":{"n":"16"}}
  ROOT %fusion = bf16[256,16,64]{2,1,0} fusion(%x, %w), kind=kCustom, calls=%gemm_fusion_dot.1_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
}
"""


def test_hlo_parser_reads_gpu_gemms_loops_and_ragged_dots():
    dots = {d["name"]: d for d in gt.parse_hlo_dots(GPU_HLO)}
    assert set(dots) == {"dot.1", "cublas-gemm.2", "logits", "rd"}
    assert dots["dot.1"]["out"] == [256, 16, 64] and dots["dot.1"]["lhs"] == [256, 96]
    assert dots["dot.1"]["flops"] == 2 * 256 * 16 * 64 * 96
    assert dots["cublas-gemm.2"]["kind"] == "__cublas$gemm"
    assert dots["cublas-gemm.2"]["lhs"] == [512, 96] and dots["cublas-gemm.2"]["executions"] == 16
    assert dots["rd"]["kind"] == "ragged-dot" and dots["rd"]["rhs"] == [16, 96, 64]

    rep = gt.expert_dot_report(GPU_HLO, num_experts=16, top_k=2, d_model=96, d_ff=64, tokens=256)
    folds = {r["name"]: r["fold"] for r in rep["flagged"]}
    assert folds == {"cublas-gemm.2": pytest.approx(16.0), "dot.1": pytest.approx(8.0)}  # E per loop, E / K
    assert rep["e_fold_dense_dot"] and rep["has_ragged_dot"] and rep["num_expert_dots"] == 3  # + the ragged-dot
    assert "__cublas$gemm" in rep["custom_call_targets"]

    # the same module with only the real grouped GEMM left: nothing flagged
    only_ragged = GPU_HLO[GPU_HLO.index("ENTRY"):]
    only_ragged = "\n".join(line for line in only_ragged.splitlines() if "%fusion =" not in line
                            and "%while.10" not in line)
    rep = gt.expert_dot_report(only_ragged, num_experts=16, top_k=2, d_model=96, d_ff=64, tokens=256)
    assert not rep["e_fold_dense_dot"] and rep["max_fold"] == pytest.approx(1.0)


def test_every_expert_path_is_benchmarked():
    from beam_jax.experts import EXPERT_PATHS

    paths = gt.discover_paths()
    assert set(EXPERT_PATHS) <= set(paths) and "kernel" in paths


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]

    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "dry-run" and s["ok"] is True
    assert s["jax"] and s["date"] and s["python"]
    steps = {st["name"]: st for st in s["steps"]}
    assert list(steps) == ["env", "build", "cuda_tests", "memcheck", "racecheck", "moe_layer", "train"]
    assert all(st["status"] == "pass" for st in steps.values()), steps
    assert all(st["seconds"] >= 0 and st["limit_s"] > 0 for st in steps.values())
    if shutil.which("nvidia-smi") is None:
        assert "nvidia-smi" in s["tools_absent"] and s["device"].startswith("none")
    if shutil.which("nvcc") is not None:
        assert "nvcc" not in s["tools_absent"]
    assert "CUDA tests collected" in steps["cuda_tests"]["note"]

    # the training bench ran every path on the tiny model and the HLO check agrees with itself
    train = {r["path"]: r for r in s["train"]}
    assert set(train) == set(gt.discover_paths())
    assert train["dense"]["e_fold_dense_dot"] is True and train["reference"]["e_fold_dense_dot"] is False
    assert all(r["status"] in ("ok", "unsupported") for r in train.values()), train
    assert s["hlo_selftest"]["ok"]
    assert (out / "moe_layer.json").exists() and (out / "gpu_train.json").exists()
    assert (out / "summary.md").read_text().startswith("# gpu_check dry-run")
    # what the device tool brings back: at most 8 files, two folders down
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
