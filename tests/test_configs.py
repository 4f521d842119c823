"""beam_jax/configs: every shipped config passes its own checks; out-of-range values are refused naming the key,
in the library (`base.check`) and on the command line (one `error:` line, exit 1, nothing trained)."""

import importlib.util
import subprocess
import sys

import pytest

from beam_jax.config import ConfigError
from beam_jax.configs import CONFIG_DIR, base


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__"))
def test_shipped_configs_pass(name):
    spec = importlib.util.spec_from_file_location(name, CONFIG_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base.check(mod.get_config())


BAD = [
    ("train.steps", -5, "an integer >= 1"), ("train.steps", 0, "an integer >= 1"),
    ("train.lr", 0.0, "> 0"), ("train.lr", float("nan"), "> 0"), ("train.lr", -1e-3, "> 0"),
    ("data.batch_size", 0, ">= 1"), ("data.seq_len", 1, ">= 2"),
    ("beam.tau", 1.5, "in [0, 1]"), ("beam.tau", -0.1, "in [0, 1]"),
    ("beam.target_ratio", 1.0, "in [0, 1)"), ("beam.beta", -1.0, ">= 0"),
    ("mesh.fsdp", 0, "-1 or an integer >= 1"), ("mesh.tensor", -2, "-1 or an integer >= 1"),
    ("train.grad_accum", 0, ">= 1"), ("train.trainable", "everything", "mask, mask+router or all"),
    ("eval.taus", (0.5, 2.0), "numbers in [0, 1]"), ("plan.headroom", 0.0, "(0, 1]"),
]


@pytest.mark.parametrize("key,value,want", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_out_of_range_refused(key, value, want):
    c = base.get_config()
    section, field = key.split(".")
    with c.unlocked():
        c[section][field] = value
    with pytest.raises(ConfigError, match=rf"config key '{key}' must be .*{__import__('re').escape(want)}"):
        base.check(c)


def test_in_range_accepted():
    c = base.get_config()
    c.beam.tau, c.beam.target_ratio, c.mesh.data, c.train.warmup_steps = 0.0, 0.15, -1, 0
    base.check(c)
    c.beam.tau = 1.0
    base.check(c)


def test_two_inferred_mesh_axes_refused():
    c = base.get_config()
    c.mesh.data, c.mesh.fsdp = -1, -1
    with pytest.raises(ConfigError, match="at most one may be -1"):
        base.check(c)


def test_cli_refuses_negative_steps(tmp_path):
    """Before the check, `--config.train.steps=-5` trained nothing and reported 100% retained with exit 0."""
    r = subprocess.run([sys.executable, "-m", "beam_jax.train", "--config", "tiny.py", "--config.train.steps=-5",
                        "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == "error: config key 'train.steps' must be an integer >= 1, got -5", r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists()  # refused before anything was written
