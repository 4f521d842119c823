"""Timing helpers shared by the benchmarks: median of repeated runs after warm-up, the machine's name."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax


def timeit(fn, *args, repeat: int = 5, warmup: int = 1, budget_s: float | None = None) -> float:
    """Median seconds of fn(*args) (blocking on the result) over `repeat` runs after `warmup` runs; with
    `budget_s`, fewer runs once their total passes it (at least one)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
        if budget_s is not None and sum(times) > budget_s:
            break
    times.sort()
    return times[len(times) // 2]


def register_no_expert_path() -> str:
    """Register expert path "none" (`beam_jax.experts.EXPERT_PATHS`): the experts replaced by x * sum(weights),
    differentiable in x and weights, with no expert GEMMs. A step's time on it is the step without expert
    compute, so dense / none bounds what any expert path can gain (bench/train_step.py), and 1 - none / Top-K
    is the experts' share of a decode step (bench/serve.py). -> "none"."""
    import jax.numpy as jnp
    from beam_jax import experts

    experts.EXPERT_PATHS.setdefault(
        "none", lambda x, wg, wu, wd, ids, w, keep=None: x * jnp.sum(w, -1, keepdims=True).astype(x.dtype))
    return "none"


def machine() -> str:
    """The device and host, e.g. `cpu:cpu | host AMD EPYC (family 26 model 2), 2 cores | jax 0.10.2`: the CPU's
    family and model from /proc/cpuinfo where it has them (a VM's model name alone may not tell Zen 4 from Zen 5)."""
    d = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "cpu family", "model") and key.strip() not in info:
                info[key.strip()] = value.strip()
            if not line.strip() and info:  # the first processor's block is enough
                break
    except OSError:
        pass
    cpu = info.get("model name", cpu)
    if "cpu family" in info and "model" in info:
        cpu += f" (family {info['cpu family']} model {info['model']})"
    return f"{d.platform}:{d.device_kind} | host {cpu}, {os.cpu_count()} cores | jax {jax.__version__}"


def git_revision() -> str | None:
    """The repository's short HEAD, with "+changes" where tracked files differ from it; None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        if rev.returncode:
            return None
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=root, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() + ("+changes" if dirty else "")


def write_result(name: str, payload: dict, out: Path | str | None = None) -> Path:
    """Write `payload` (with machine and date) as JSON to `out`, default bench/results/<name>_<platform>.json; through
    a temporary file and a rename, so an interrupted write leaves the previous result whole."""
    out = Path(out) if out else Path(__file__).parent / "results" / f"{name}_{jax.devices()[0].platform}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), **payload}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out)
    return out
