"""bench/serve.py's arithmetic and report, on made-up timings: the decode step from two generations, the choice of
the fastest round, the rounds' paired ratios and their median, the floors, ideal and speed-ups each row is held to,
the kept-ratio check and the markdown; and one `--quick` run of every engine on a small model (the full benchmark
takes minutes per model, outside CI)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import bench_scripts

ROOT = Path(__file__).resolve().parents[1]


sv = bench_scripts.load("serve", "bench_serve")
N = 9  # new tokens: the step is (t(N) - t(1)) / 8


def row(engine, B, policy, step_ms, kept=1.0, tau=None, kept_ratio=None, t_one=0.05):
    """A row whose decode step is `step_ms`, built through `_row` from the two generation times."""
    t_new = t_one + (N - 1) * step_ms / 1e3
    return sv._row(engine, B, policy, tau, kept, t_new=t_new, t_one=t_one,
                   kept_ratio=kept if kept_ratio is None else kept_ratio, N=N)


def test_row_step_and_rates():
    r = sv._row("jax", 8, "topk", None, 1.0, t_new=0.05 + 8 * 0.004, t_one=0.05, kept_ratio=1.0, N=N)
    assert r["step_ms"] == pytest.approx(4.0)
    assert r["decode_tokens_per_s"] == pytest.approx(8 / 0.004)
    assert r["e2e_tokens_per_s"] == pytest.approx(8 * N / 0.082)
    assert r["ttft_ms"] == pytest.approx(50.0)


def test_fastest_topk_run_keeps_the_whole_run_of_the_fastest_topk():
    slow = [row("vllm", 1, "topk", 6.0), row("vllm", 1, "beam", 2.0, kept=0.15, tau=0.7)]
    fast = [row("vllm", 1, "topk", 5.0), row("vllm", 1, "beam", 3.0, kept=0.15, tau=0.7),
            row("vllm", 8, "topk", 30.0)]
    other_b = [row("vllm", 8, "topk", 20.0)]
    got = sv.fastest_topk_run([slow, fast, other_b], 1)
    assert got == fast[:2]  # its BEAM row too, though the other run's BEAM row is faster
    assert sv.fastest_topk_run([slow, fast, other_b], 8) == other_b
    assert sv.fastest_topk_run([slow], 32) == []
    assert sv.fastest_topk_run([[row("vllm", 1, "beam", 2.0, kept=0.15)]], 1) == []


def test_paired_ratio_rounds_own_topk_and_native():
    runs = [[row("jax", 1, "topk", 6.0), row("jax", 1, "beam", 3.0, kept=0.15, tau=0.7)],
            [row("jax", 1, "topk", 5.0), row("jax", 1, "beam", 4.0, kept=0.15, tau=0.7),
             row("jax", 8, "beam", 4.0, kept=0.15, tau=0.7)]]  # no Top-K at batch 8 in that run: left out
    got = sv.paired_ratio_rounds(runs)
    assert list(got) == [(1, "topk", 1.0), (1, "beam", 0.15)]
    assert got[1, "beam", 0.15] == [pytest.approx(2.0), pytest.approx(1.25)] and got[1, "topk", 1.0] == [1.0, 1.0]
    native = [[row("vllm_native", 1, "topk", 9.0)]]  # one native process: only the first run has a pair
    got = sv.paired_ratio_rounds(runs, native)
    assert got == {(1, "topk", 1.0): [pytest.approx(1.5)], (1, "beam", 0.15): [pytest.approx(3.0)]}


def test_derive_takes_the_median_of_the_rounds_not_the_chosen_run():
    """The chosen (fastest Top-K) run's BEAM row is 2.5x its Top-K; the median of three rounds, 3.0x, is the ratio
    held; the chosen rows' ratio against the fastest native stays in `speedup_vs_native_best`."""
    rows = [row("jax", 1, "topk", 100.0, kept_ratio=1.0), row("jax", 1, "beam", 40.0, kept=0.15, tau=0.7),
            row("vllm_native", 1, "topk", 80.0), row("vllm", 1, "beam", 25.0, kept=0.15, tau=0.7)]
    rows[1].update(own_topk_ratio_rounds=[2.5, 3.0, 3.5], native_ratio_rounds=[2.0, 1.0, 3.0])
    rows[0].update(native_ratio_rounds=[0.9, 0.7, 1.2])
    rows[3].update(own_topk_ratio_rounds=[3.0, 3.3], native_ratio_rounds=[3.6, 3.0])
    sv._derive(rows, _jx(), bandwidth=40e9, read_bandwidth=50e9)
    jt, jb, nat, vb = rows
    assert jb["speedup_vs_own_topk"] == pytest.approx(3.0) and jb["fraction_of_ideal"] == pytest.approx(3.0 / 4.0)
    assert jb["speedup_vs_native"] == pytest.approx(2.0) and jb["speedup_vs_native_best"] == pytest.approx(2.0)
    assert jt["speedup_vs_native"] == pytest.approx(0.9) and jt["speedup_vs_native_best"] == pytest.approx(0.8)
    assert vb["speedup_vs_native"] == pytest.approx(3.3) and vb["fraction_of_ideal"] == pytest.approx(3.3 / 4.0)
    assert vb["speedup_vs_native_best"] == pytest.approx(80 / 25)
    assert sv.held_ratio_rounds(vb) == [3.6, 3.0] and sv.held_ratio_rounds(jb) == [2.5, 3.0, 3.5]
    assert sv.held_ratio_rounds(jt) == [0.9, 0.7, 1.2] and sv.held_ratio_rounds(nat) == []
    assert sv._per_round(jb) == "2.50 / 3.00 / 3.50" and sv._per_round(nat) == "-"


def _jx(bytes_topk=4e9, bytes_beam=1e9, mask_router=1e6, kept_ratio=0.15):
    """JAX phase stats: 3.5 GB of the Top-K step's bytes are experts, 0.5 GB of the BEAM step's (a seventh)."""
    return {"stats": {(1, 1.0): {"step_weight_bytes": bytes_topk, "expert_bytes": bytes_topk - 0.5e9,
                                 "kept_ratio": 1.0},
                      (1, 0.15): {"step_weight_bytes": bytes_beam, "expert_bytes": bytes_beam - 0.5e9,
                                  "kept_ratio": kept_ratio}},
            "mask_router_bytes": mask_router}


def test_derive_floors_ideal_and_speedups():
    rows = [row("jax", 1, "topk", 100.0), row("jax", 1, "beam", 40.0, kept=0.15, tau=0.7),
            row("vllm_native", 1, "topk", 80.0), row("vllm", 1, "topk", 82.0, tau=0.0),
            row("vllm", 1, "beam", 25.0, kept=0.15, tau=0.7)]
    sv._derive(rows, _jx(), bandwidth=40e9, read_bandwidth=50e9)
    jt, jb, nat, vt, vb = rows
    assert jt["floor_ms"] == pytest.approx(100.0) and jt["read_floor_ms"] == pytest.approx(80.0)
    assert jt["step_over_floor"] == pytest.approx(1.0) and jt["step_over_read_floor"] == pytest.approx(1.25)
    assert jb["ideal_speedup"] == pytest.approx(4.0)
    assert jb["speedup_vs_own_topk"] == pytest.approx(2.5)
    assert jb["fraction_of_ideal"] == pytest.approx(2.5 / 4.0)  # JAX: against its own Top-K
    assert jb["speedup_vs_native"] == pytest.approx(2.0)
    assert vb["fraction_of_ideal"] == pytest.approx(80 / 25 / 4.0)  # the plugin: against vLLM native
    assert vt["step_weight_bytes"] == 4e9 + 1e6  # tau 0 through the BEAM classes still reads the mask routers
    assert vt["ideal_speedup"] == pytest.approx(4e9 / (4e9 + 1e6))
    assert vt["fraction_of_ideal"] is None and jt["fraction_of_ideal"] is None  # Top-K rows are not held to it
    assert nat["speedup_vs_native"] == pytest.approx(1.0)


def test_derive_without_native_leaves_the_plugin_ratio_empty():
    rows = [row("vllm", 1, "topk", 82.0, tau=0.0), row("vllm", 1, "beam", 25.0, kept=0.15, tau=0.7)]
    sv._derive(rows, _jx(), bandwidth=40e9, read_bandwidth=50e9)
    assert rows[1]["speedup_vs_native"] is None and rows[1]["fraction_of_ideal"] is None
    assert rows[1]["speedup_vs_own_topk"] == pytest.approx(82 / 25)


def test_check_kept_notes_an_engine_far_from_the_jax_routing():
    notes = []
    rows = [row("vllm", 1, "beam", 25.0, kept=0.15, tau=0.7, kept_ratio=0.16),
            row("torch", 1, "beam", 25.0, kept=0.15, tau=0.7, kept_ratio=0.40),
            row("jax", 1, "beam", 25.0, kept=0.15, tau=0.7, kept_ratio=0.90)]  # JAX is the reference itself
    sv._check_kept(rows, _jx(), notes, "m")
    assert len(notes) == 1 and "m / torch B=1" in notes[0] and "kept 0.400" in notes[0], notes


def test_markdown_has_every_row_and_the_notes():
    rows = [row("jax", 1, "topk", 100.0), row("jax", 1, "beam", 40.0, kept=0.15, tau=0.7),
            row("vllm_native", 1, "topk", 80.0)]
    sv._derive(rows, _jx(), bandwidth=40e9, read_bandwidth=50e9)
    result = {"machine": "cpu:test", "date": "2026-12-06", "copy_bandwidth_GBps": [40.0, 41.0],
              "read_bandwidth_GBps": [50.0, 51.0], "prompt_len": 16, "new_tokens": N, "threads": 2,
              "vllm_compile": True, "vllm_rounds": 3, "vllm_processes": "native and plugin in one", "jax_rounds": 2,
              "command": "python bench/serve.py x",
              "prefill_len": 512, "notes": ["a note"],
              "models": {"m": {"dir": "/tmp/m", "dtype": "bfloat16", "taus": {"0.15": 0.7},
                               "prefill": [{"engine": "jax", "kept_target": 1.0, "prefill_tokens_per_s": 1000.0}]}},
              "rows": [dict(r, model="m") for r in rows]}
    md = sv.markdown(result)
    table = [line for line in md.splitlines() if line.startswith("| 1 |")]
    assert len(table) == 3
    assert "| 1 | beam_jax.generate | beam | 0.700 | 0.150 | 25.0 | 40.00 | 25.00 | 1.60 | 2.00 | 2.00x | 2.50x | " \
           "4.00x | 62% | - |" in md, md
    assert "3 rounds" in md and "2 timing rounds" in md and "- a note" in md
    assert "native and the plugin in one process, runs interleaved" in md
    md = sv.markdown(dict(result, vllm_processes="one per engine"))
    assert "native and the plugin in processes of their own, alternating" in md
    md = sv.markdown(dict(result, vllm_processes=None))  # a run without both vLLM engines
    assert "vLLM: native and the plugin" not in md
    assert "| beam_jax.generate | 1.0 | 1000 |" in md
    assert "experts packed" not in md  # an older result without the key
    md = sv.markdown(dict(result, jax_packed_projections=True, jax_packed_experts=False))
    assert "dense projections packed on, experts packed off" in md


def test_moe_share_and_expert_scaled_steps():
    """The plugin's no-expert policy leaves the rows and gives its MoE share; JAX's comes from its own timing; each
    BEAM row gets the step it would take if only its expert compute shrank with its expert bytes."""
    jx = _jx()
    jx["moe_share"] = {1: {"step_ms_topk": 101.0, "step_ms_no_experts": 30.0, "moe_share": 1 - 30 / 101}}
    rows = [row("jax", 1, "topk", 100.0), row("jax", 1, "beam", 40.0, kept=0.15, tau=0.7),
            row("vllm_native", 1, "topk", 80.0), row("vllm", 1, "topk", 82.0, tau=0.0),
            row("vllm", 1, "beam", 25.0, kept=0.15, tau=0.7),
            row("vllm", 1, "no_experts", 12.0, kept=0.0, tau=2.0, kept_ratio=0.0)]
    rows, share = sv.split_moe_share(rows, jx)
    assert [r["policy"] for r in rows] == ["topk", "beam", "topk", "topk", "beam"]
    assert share == [{"engine": "jax", "batch": 1, "step_ms_topk": pytest.approx(100.0), "step_ms_no_experts": 30.0,
                      "moe_share": pytest.approx(0.7)},
                     {"engine": "vllm", "batch": 1, "step_ms_topk": pytest.approx(82.0),
                      "step_ms_no_experts": pytest.approx(12.0), "moe_share": pytest.approx(1 - 12 / 82)}]
    sv._derive(rows, jx, bandwidth=40e9, read_bandwidth=50e9)
    jb, vb = rows[1], rows[4]
    assert jb["expert_scaled_step_ms"] == pytest.approx(30 + 70 / 7)  # 0.5 GB of 3.5 GB of expert bytes
    assert jb["of_expert_scaled"] == pytest.approx(40 / 40)
    assert vb["expert_scaled_step_ms"] == pytest.approx(12 + 70 / 7)
    assert vb["of_expert_scaled"] == pytest.approx(22 / 25)
    assert "expert_scaled_step_ms" not in rows[0] and "expert_scaled_step_ms" not in rows[2]  # no BEAM / no s0
    result = {"machine": "cpu:test", "date": "2026-12-06", "copy_bandwidth_GBps": [40.0, 41.0], "prompt_len": 16,
              "new_tokens": N, "threads": 2, "vllm_compile": True, "command": "c", "prefill_len": 512, "notes": [],
              "models": {"m": {"dir": "/tmp/m", "dtype": "bfloat16", "taus": {"0.15": 0.7}, "prefill": [],
                               "moe_share": share}},
              "rows": [dict(r, model="m") for r in rows]}
    md = sv.markdown(result)
    assert "| 1 | beam_jax.generate | 100.00 | 30.00 | 70% | 40.00 / 40.00 (100%) |" in md, md
    assert "| 1 | vLLM + plugin | 82.00 | 12.00 | 85% | 22.00 / 25.00 (88%) |" in md, md


def test_quick_run_of_every_engine(tmp_path):
    """`bench/serve.py --quick` end to end on a small Qwen3-MoE (about a minute): every engine, every policy, the tau
    reaching vLLM's and transformers' layers, kept ratios that agree with the JAX routing, each engine's step without
    expert compute, a second JAX round, and the three output files. No timing is asserted, only that each figure
    exists."""
    import json
    import subprocess
    import sys

    pytest.importorskip("vllm", reason="the vLLM engines need the `serve` extra")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "bench" / "serve.py"), "--quick", "--models", "qwen3", "--batches", "1",
           "--repeat", "1", "--vllm-eager", "--jax-rounds", "2", "--out-dir", str(out), "--work-dir",
           str(tmp_path / "work")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((out / "serve_cpu.json").read_text())
    assert result["notes"] == [], result["notes"]  # no failed engine, tau held, kept ratios within 0.1 of JAX's
    rows = result["rows"]
    policies = {(r["engine"], r["policy"], r["kept_target"]) for r in rows}
    for engine in ("jax", "vllm", "torch"):
        assert {(engine, "topk", 1.0), (engine, "beam", 0.5), (engine, "beam", 0.15)} <= policies, policies
    assert ("vllm_native", "topk", 1.0) in policies
    assert not any(r["policy"] == "no_experts" for r in rows)
    for engine in ("jax", "vllm", "torch"):
        kept = {r["kept_target"]: r["kept_ratio"] for r in rows if r["engine"] == engine}
        assert kept[1.0] == 1.0 and 0 < kept[0.15] < kept[0.5] < 1, (engine, kept)
        for r in rows:
            if r["engine"] == engine and r["policy"] == "beam":
                # a figure, not a timing: on --quick's small model a step is (t(8 new) - t(1 new)) / 7 of
                # sub-millisecond runs, and the noise can make the no-expert step, and so this, negative
                assert math.isfinite(r["expert_scaled_step_ms"]) and r["fraction_of_ideal"] is not None, r
    info = result["models"]["qwen3"]
    assert len(info["jax_rounds"]) == 2
    # native vLLM and the plugin in one process (the default): one worker, rows and prefill for both engines
    assert result["vllm_processes"] == "native and plugin in one" and "vllm_pair" in info["workers"], info["workers"]
    assert len(info["workers"]["vllm_pair"]["engine_start_s"]) == 2
    assert {p["engine"] for p in info["prefill"]} >= {"vllm", "vllm_native"}, info["prefill"]
    assert sorted(v["engine"] for v in info["vllm_rounds"]) == ["vllm", "vllm_native"]
    assert len({v["process"] for v in info["vllm_rounds"]}) == 1
    for r in rows:  # JAX: two rounds, each paired with its own Top-K, the first also with native's one process
        if r["engine"] == "jax":
            assert len(r["own_topk_ratio_rounds"]) == 2 and len(r["native_ratio_rounds"]) == 1, r
            assert r["speedup_vs_own_topk"] == pytest.approx(sorted(r["own_topk_ratio_rounds"])[0] / 2
                                                             + sorted(r["own_topk_ratio_rounds"])[1] / 2)
    shares = info["moe_share"]
    assert {s["engine"] for s in shares} == {"jax", "vllm", "torch"}
    # figures, not timings: sub-millisecond steps of --quick's small model can come out at or below zero
    assert all(math.isfinite(s["step_ms_no_experts"]) and math.isfinite(s["step_ms_topk"]) for s in shares), shares
    md = (out / "serve_cpu.md").read_text()
    assert "| 1 | vLLM + plugin | beam |" in md and "MoE share of the Top-K decode step" in md
    from beam_jax import packed_experts

    assert result["jax_packed_experts"] == packed_experts.packing_available()
    assert (out / "serve_cpu.png").stat().st_size > 0
    # provenance: the revision measured (here a checkout: the test command runs in one) and the CPU's family
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert result["revision"].split("+")[0] == head.stdout.strip(), result["revision"]
        assert f"(at {result['revision']})" in md
    if "cpu family" in Path("/proc/cpuinfo").read_text():
        assert " (family " in result["machine"], result["machine"]


def test_pair_fits_counts_five_copies_of_the_weights(tmp_path):
    (tmp_path / "model-00001.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "model-00002.safetensors").write_bytes(b"x" * 500)
    (tmp_path / "config.json").write_text("{}" * 10_000)  # not weights
    assert sv.pair_fits(tmp_path, available=7500)
    assert not sv.pair_fits(tmp_path, available=7499)
    assert sv.pair_fits(tmp_path)  # 6 kB within this machine's MemAvailable


def test_quick_run_with_the_engines_in_processes_of_their_own(tmp_path):
    """`--vllm-separate`: native vLLM and the plugin each in a worker of its own (the pairing before 2026-12-07,
    and the fallback for a model too large to hold twice): both engines' rows, one worker each."""
    import json
    import subprocess
    import sys

    pytest.importorskip("vllm", reason="the vLLM engines need the `serve` extra")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "bench" / "serve.py"), "--quick", "--models", "qwen3", "--batches", "1",
           "--engines", "vllm,vllm_native", "--kept", "0.15", "--repeat", "1", "--vllm-eager", "--vllm-separate",
           "--no-moe-share", "--out-dir", str(out), "--work-dir", str(tmp_path / "work")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((out / "serve_cpu.json").read_text())
    assert result["notes"] == [] and result["vllm_processes"] == "one per engine", result["notes"]
    info = result["models"]["qwen3"]
    assert set(info["workers"]) == {"vllm", "vllm_native"}, info["workers"]
    assert sorted(v["process"] for v in info["vllm_rounds"]) == [0, 1]
    rows = {(r["engine"], r["policy"]) for r in result["rows"]}
    assert rows == {("vllm", "topk"), ("vllm", "beam"), ("vllm_native", "topk")}, rows
    assert all(r["speedup_vs_native"] for r in result["rows"] if r["engine"] == "vllm"), result["rows"]


def test_deepseek_v2_lite_shaped_model_is_a_beam_export(tmp_path):
    """`serve_jax.make_deepseek_v2_lite_shaped` (shapes scaled down here) writes a BEAM export with routed and shared
    experts: the beam section names every layer, E and K of the routed experts, one float32 mask router [E, d] per
    layer, and beam_jax loads it with those mask routers."""
    import json

    import numpy as np
    from safetensors.numpy import load_file

    import beam_jax

    sj = bench_scripts.load("serve_jax", "bench_serve_jax")
    path = sj.make_deepseek_v2_lite_shaped(
        tmp_path / "ds", vocab_size=128, hidden_size=64, moe_intermediate_size=32, n_routed_experts=6,
        num_experts_per_tok=2, n_shared_experts=1, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, intermediate_size=64)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["BeamDeepseekV2ForCausalLM"] and cfg["n_shared_experts"] == 1
    assert (cfg["beam"]["layers"], cfg["beam"]["num_experts"], cfg["beam"]["top_k"]) == ([0, 1], 6, 2)
    mask = load_file(str(path / "mask_router.safetensors"))
    assert sorted(mask) == [f"model.layers.{i}.mlp.mask_router.weight" for i in (0, 1)]
    assert all(m.shape == (6, 64) and m.dtype == np.float32 and m.std() > 0 for m in mask.values())
    model = beam_jax.load_pretrained(path)
    for i in (0, 1):  # the Flax kernel is W_m^T
        got = np.asarray(model.layers[i].mlp.mask_router.kernel.get_value(), np.float32)
        np.testing.assert_array_equal(got.T, mask[f"model.layers.{i}.mlp.mask_router.weight"])


def test_serving_taus_do_not_depend_on_the_batch_list(tmp_path):
    """`jax_phase` calibrates the serving taus on prompts of their own (`CALIB_BATCH`), so `--batches 1` and
    `--batches 1,4` serve the same taus, and they keep about the targeted share of the calibration generation's
    pairs; the per-batch routing statistics are still reported for each listed batch."""
    import argparse

    import numpy as np

    import beam_jax
    from beam_jax.routing import TopKHook

    sj = bench_scripts.load("serve_jax", "bench_serve_jax")
    path = sj.make_qwen3_shaped(tmp_path / "q", num_layers=1, vocab_size=256, hidden_size=64, num_experts=8,
                                num_experts_per_tok=2, moe_intermediate_size=32, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=32, intermediate_size=64)
    model = beam_jax.load_pretrained(path)
    args = argparse.Namespace(prompt_len=6, new_tokens=5, repeat=1)
    calib = sv.prompt_tokens(256, sv.CALIB_BATCH, args.prompt_len, seed=1)
    taus = {}
    for batches in ((1,), (1, 4)):
        prompts = {B: sv.prompt_tokens(256, B, args.prompt_len) for B in batches}
        out = sv.jax_phase(model, prompts, calib, sv.prompt_tokens(256, 1, 8)[0], [0.5], args, timed=False)
        taus[batches] = out["taus"]
        assert {B for B, _ in out["stats"]} == set(batches)
    assert taus[(1,)] == taus[(1, 4)] and 0 < taus[(1,)][0.5] < 1
    seqs = np.asarray(beam_jax.generate(model, np.asarray(calib, np.int32), max_new_tokens=args.new_tokens,
                                        eos_token_id=(), mask_hook=TopKHook()))
    m = sj.beam_scores(model, seqs)[:, :, args.prompt_len:-1]
    assert abs(float((m >= taus[(1,)][0.5]).mean()) - 0.5) < 0.05
