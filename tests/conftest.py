"""Shared fixtures: a tiny BEAM-ready model directory (random Qwen3-MoE weights plus a BPE tokenizer trained on
a few standard-library files) and a small text data directory, made once per test session."""

import json
import os
import shutil

import pytest

from hf_tiny import make_tiny

if "PYTEST_XDIST_WORKER" in os.environ:  # workers share one GPU where there is one: no worker takes 75% of it
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from beam_jax import corpus

    root = tmp_path_factory.mktemp("tiny_model")
    c = corpus.stdlib_corpus()
    tok = corpus.train_tokenizer(c.paths("train")[:20], 320, root / "tok")
    make_tiny("qwen3_moe", root / "model", vocab_size=320, pad_token_id=tok.pad_token_id,
              eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    for f in (root / "tok").iterdir():
        shutil.copy(f, root / "model" / f.name)
    return root / "model"


@pytest.fixture(scope="session")
def text_data_dir(tmp_path_factory):
    from beam_jax import corpus

    d = tmp_path_factory.mktemp("text_data")
    for f in corpus.stdlib_corpus().paths("validation")[:12]:
        shutil.copy(f, d / f"{f.name}.txt")
    return d


# ---- CPU kernel builds: run a test under each SIMD build this processor has (skipped, with the reason, where it
# lacks one)

from beam_jax.kernel import CPU_ISAS  # noqa: E402  (the builds of ffi/masked_moe_cpu_kernel.h, lowest first)


@pytest.fixture(params=CPU_ISAS[1:])
def cpu_isa(request):
    """Select a SIMD build of the CPU kernels for the test (beam_jax._ffi.set_cpu_isa), restoring the default after."""
    try:
        from beam_jax import _ffi
    except ImportError as e:
        pytest.skip(f"beam_jax._ffi not built ({e})")
    best = _ffi.best_cpu_isa()
    if CPU_ISAS.index(best) < CPU_ISAS.index(request.param):
        pytest.skip(f"this processor has no {request.param} build to run (best: {best})")
    before = _ffi.cpu_isa()
    assert _ffi.set_cpu_isa(request.param) == request.param
    yield request.param
    _ffi.set_cpu_isa(before)


# ---- order: the longest files first, so that pytest-xdist's workers (`-n 2 --dist loadfile`, pyproject.toml) end
# together; within a file the order is unchanged. Seconds each took in one process on a 2-core CPU (2026-12-08):
# 289 290 203 178 177 152 124 118 107 106 76 75.
LONGEST_FIRST = ("test_vllm.py", "test_generate.py", "test_faults.py", "test_bench_serve.py", "test_train.py",
                 "test_model_parity.py", "test_kernel_vjp.py", "test_decode_attention.py", "test_tiny_e2e.py",
                 "test_kernel.py", "test_serve_load.py", "test_plan.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: a file's order stays


# ---- reliability summary: tests/test_faults.py and tests/test_kernel_properties.py add their counts here

RELIABILITY = {}  # name -> count, e.g. "kill -9 trials", "faults survived", "bad inputs refused"


@pytest.fixture(scope="session")
def reliability():
    """The session's reliability counters (printed at the end of the run by pytest_terminal_summary)."""
    return RELIABILITY


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: its counters go to the controller (pytest_testnodedown)
        workeroutput["reliability"] = json.dumps(RELIABILITY)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    for k, v in json.loads(getattr(node, "workeroutput", {}).get("reliability", "{}")).items():
        RELIABILITY[k] = RELIABILITY.get(k, 0) + v


def pytest_terminal_summary(terminalreporter):
    if RELIABILITY:
        terminalreporter.section("reliability")
        terminalreporter.write_line("; ".join(f"{k}: {v}" for k, v in RELIABILITY.items()))
