"""What a run records: metrics.jsonl and TensorBoard events (process 0 only), training throughput, peak
memory."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path

import jax
import numpy as np


def peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it (GPU), else the process's peak RSS (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def to_host(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        out[k] = a.tolist() if a.ndim else float(a)
    return out


class MetricsLog:
    """metrics.jsonl + TensorBoard event files in the workdir."""

    def __init__(self, workdir: Path, resume: bool):
        from tensorboardX import SummaryWriter

        self.path = Path(workdir) / "metrics.jsonl"
        if not resume and self.path.exists():
            self.path.unlink()
        self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "train"):
        rec = {"step": step, "split": prefix, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        self.tb.flush()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int):
        """On resume: drop records written after the restored checkpoint (they will be written again)."""
        recs = [r for r in self.read() if r["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
        os.replace(tmp, self.path)


class Throughput:
    def __init__(self):
        self.tokens, self.seconds, self._t = 0, 0.0, None

    def start(self):
        self._t = time.perf_counter()

    def stop(self, tokens: int):
        self.seconds += time.perf_counter() - self._t
        self.tokens += tokens

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class NoLog:
    """MetricsLog's interface, writing nothing (processes other than 0)."""

    def write(self, *args, **kw):
        pass

    def read(self) -> list[dict]:
        return []

    def truncate_after(self, step: int):
        pass
