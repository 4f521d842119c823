"""bench/serve.py's arithmetic and report, on made-up timings: the decode step from two generations, the choice of
the fastest round, the floors, ideal and speed-ups each row is held to, the kept-ratio check and the markdown. The
engines themselves run in `bench/serve.py`, outside CI (minutes per model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _serve():
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


sv = _serve()
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


def _jx(bytes_topk=4e9, bytes_beam=1e9, mask_router=1e6, kept_ratio=0.15):
    return {"stats": {(1, 1.0): {"step_weight_bytes": bytes_topk, "kept_ratio": 1.0},
                      (1, 0.15): {"step_weight_bytes": bytes_beam, "kept_ratio": kept_ratio}},
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
              "vllm_compile": True, "vllm_rounds": 3, "jax_rounds": 2, "command": "python bench/serve.py x",
              "prefill_len": 512, "notes": ["a note"],
              "models": {"m": {"dir": "/tmp/m", "dtype": "bfloat16", "taus": {"0.15": 0.7},
                               "prefill": [{"engine": "jax", "kept_target": 1.0, "prefill_tokens_per_s": 1000.0}]}},
              "rows": [dict(r, model="m") for r in rows]}
    md = sv.markdown(result)
    table = [line for line in md.splitlines() if line.startswith("| 1 |")]
    assert len(table) == 3
    assert "| 1 | beam_jax.generate | beam | 0.700 | 0.150 | 25.0 | 40.00 | 25.00 | 1.60 | 2.00 | 2.00x | 2.50x | " \
           "4.00x | 62% |" in md, md
    assert "3 processes per engine" in md and "2 timing rounds" in md and "- a note" in md
    assert "| beam_jax.generate | 1.0 | 1000 |" in md
