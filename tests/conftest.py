"""Shared fixtures: a tiny BEAM-ready model directory (random Qwen3-MoE weights plus a BPE tokenizer trained on
a few standard-library files) and a small text data directory, made once per test session."""

import shutil

import pytest

from hf_tiny import make_tiny


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


# ---- reliability summary: tests/test_faults.py and tests/test_kernel_properties.py add their counts here

RELIABILITY = {}  # name -> count, e.g. "kill -9 trials", "faults survived", "bad inputs refused"


@pytest.fixture(scope="session")
def reliability():
    """The session's reliability counters (printed at the end of the run by pytest_terminal_summary)."""
    return RELIABILITY


def pytest_terminal_summary(terminalreporter):
    if RELIABILITY:
        terminalreporter.section("reliability")
        terminalreporter.write_line("; ".join(f"{k}: {v}" for k, v in RELIABILITY.items()))
