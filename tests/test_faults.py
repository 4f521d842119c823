"""Fault injection on real training runs, and bad input at the entry points.

Faults: each trial is a subprocess running tests/fault_driver.py, a real short BEAM training run through
`beam_jax.trainer.fit` (8 steps, a checkpoint every step). It is killed with SIGKILL at random moments (during
start-up, inside a checkpoint save while orbax's `<step>.orbax-checkpoint-tmp` directory exists, just after a
save, during the deletion of an old checkpoint), or meets a full disk (RLIMIT_FSIZE: writes fail with EFBIG) or
a read-only checkpoint directory in the middle of a save, or finds a file of its last checkpoint truncated; then
`--resume` runs again. Every chain of trials must end with exactly the losses (and beta, experts per token) of
one uninterrupted run, step for step, with no step logged twice and no torn checkpoint left, and every failure
must leave one `error: ...` line naming the directory and the OS error. A run whose loss turns non-finite
mid-way stops after `train.max_bad_steps` refused steps and keeps its last good checkpoint.

Bad input: a config with an unknown or mistyped key, a model directory with a missing shard, a truncated
safetensors file or a wrong shape, a data file that is empty, not UTF-8 or lacks the field, a chat without a chat
template, an export against another base model, kernel calls of the wrong shape or dtype: each refused with one
`error: ...` line naming the file, field or tensor, at the command line with no traceback.

Counts go to the session's reliability summary (tests/conftest.py). BEAM_FAULT_SEED=N replays a trial sequence.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).with_name("fault_driver.py")
STEPS = 8  # fault_driver's run: a checkpoint every step, the last two kept
TMP = ".orbax-checkpoint-tmp"
SEED = int(os.environ.get("BEAM_FAULT_SEED", random.SystemRandom().randrange(10**6)))


# ----------------------------------------------------------------------------- running the driver


@pytest.fixture(scope="module")
def root(tiny_model_dir, text_data_dir):
    """A world-readable work area: the tiny model, its data, a shared JAX compilation cache."""
    r = Path(tempfile.mkdtemp(prefix="beam-faults-"))
    shutil.copytree(tiny_model_dir, r / "model")
    shutil.copytree(text_data_dir, r / "data")
    (r / "jax-cache").mkdir()
    yield r
    for p in r.rglob("*"):  # the read-only trial may leave a mode-0555 directory behind
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(r, ignore_errors=True)


def _child_env(root: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1",
               JAX_COMPILATION_CACHE_DIR=str(root / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.3")
    env.pop("BEAM_TRACEBACK", None)
    return env


_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _drop_permission_override():  # preexec_fn where setpriv is missing: only a bound C call after the fork
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if _prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os._exit(97)


def popen(cmd, **kw):
    """As root, the child loses CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (bounding set), so that it obeys file
    modes like any user (still uid 0): a mode-0555 directory is really read-only to it."""
    if os.geteuid() == 0:
        if shutil.which("setpriv"):
            cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *cmd]
        else:  # pragma: no cover - depends on the machine
            kw["preexec_fn"] = _drop_permission_override
    return subprocess.Popen(cmd, **kw)


def launch(root, workdir, *args, log=None, pipe=False, model="model"):
    cmd = [sys.executable, str(DRIVER), str(root / model), str(root / "data"), str(workdir), "--steps", str(STEPS),
           *args]
    out = subprocess.PIPE if pipe else (log or subprocess.DEVNULL)
    return popen(cmd, cwd=REPO, env=_child_env(root), stdout=out,
                 stderr=subprocess.PIPE if pipe else subprocess.STDOUT, text=True)


def run_to_end(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out or "", err or ""


def records(workdir) -> list[tuple]:
    """(step, loss, beta, experts per token) of every training record in metrics.jsonl, in file order."""
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines if line.strip()]
    return [(r["step"], r["loss"], r["beta"], r["experts_per_token"]) for r in recs if r["split"] == "train"]


def ckpt_state(workdir) -> tuple[list[int], list[str]]:
    """(complete checkpoint steps, torn temporary directories) under workdir/ckpt."""
    d = Path(workdir) / "ckpt"
    names = os.listdir(d) if d.is_dir() else []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if TMP in n)


def assert_checkpoints_readable(workdir, complete):
    """orbax lists exactly the complete steps (never a temporary one), and each one's metadata reads back."""
    import orbax.checkpoint as ocp

    if not complete:
        return
    mgr = ocp.CheckpointManager(Path(workdir).absolute() / "ckpt",
                                options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        assert sorted(mgr.all_steps()) == complete
        for step in complete:
            meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            assert meta["step"] == step and "data" in meta and "beta" in meta
    finally:
        mgr.close()


def one_error_line(rc, err, *fragments):
    """The process failed with a single `error: ...` line naming what is given, and no traceback."""
    assert rc not in (0, -signal.SIGKILL), (rc, err[-2000:])
    assert "Traceback" not in err, err[-4000:]
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    """The uninterrupted run's records, from `reference()`: the run starts here and is waited for at first use,
    so it runs alongside the first trials."""
    w = tmp_path_factory.mktemp("reference")
    proc = launch(root, w, pipe=True)
    done = []

    def get():
        if not done:
            rc, out, err = run_to_end(proc)
            assert rc == 0 and "finished" in out, err[-3000:]
            ref = records(w)
            assert [r[0] for r in ref] == list(range(1, STEPS + 1))
            assert ref[-1][1] < ref[0][1]  # it trains
            complete, torn = ckpt_state(w)
            assert complete == [STEPS - 1, STEPS] and torn == []
            done.append(ref)
        return done[0]

    yield get
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- kill -9


def _wait_for(proc, cond, timeout=180.0):
    t_end = time.monotonic() + timeout
    while proc.poll() is None:
        if cond():
            return True
        if time.monotonic() > t_end:
            proc.kill()
            raise AssertionError("a trial hung")
        time.sleep(0.001)
    return False


def kill_trial(root, workdir, mode: str, rng: random.Random, resume: bool, log: Path, target=None) -> dict:
    """Start the driver (--resume after the first launch) and SIGKILL it at a moment chosen by `mode`."""
    with open(log, "w") as fh:
        return _kill_trial(root, workdir, mode, rng, resume, fh, target)


def _kill_trial(root, workdir, mode, rng, resume, log, target):
    complete, _ = ckpt_state(workdir)
    last = complete[-1] if complete else 0
    if mode == "after_save" and last + 1 > STEPS - 2:  # keep two steps to go, so the kill lands before the end
        mode = "save"
    ckpt = Path(workdir) / "ckpt"
    proc = launch(root, workdir, *(["--resume"] if resume else []), log=log)
    t0 = time.monotonic()
    if mode == "startup":  # anywhere in start-up (imports, model load, compile), at the latest at the first save
        target, delay = None, rng.uniform(0.2, 7.0)
        before = set(os.listdir(ckpt)) if ckpt.is_dir() else set()

        def started_saving():  # a step directory (temporary or complete) that was not there at launch
            return bool(set(os.listdir(ckpt) if ckpt.is_dir() else ()) - before)

        _wait_for(proc, lambda: time.monotonic() - t0 > delay or started_saving())
    elif mode == "save":  # while orbax writes the checkpoint of step `target` (one of the next three)
        target, delay = target or rng.randint(last + 1, min(last + 3, STEPS)), rng.uniform(0.0, 0.01)
        def tmp_exists():  # `<step>.orbax-checkpoint-tmp`, with a timestamp suffix in some orbax versions
            return any(ckpt.glob(f"{target}{TMP}*"))

        seen_gone = [not tmp_exists()]  # a torn one from the previous kill: wait for its clean-up first

        def writing():
            exists = tmp_exists()
            seen_gone[0] = seen_gone[0] or not exists
            return seen_gone[0] and exists

        _wait_for(proc, writing)
        time.sleep(delay)
    else:  # just after the checkpoint of `target` completed: old-checkpoint deletion, logging, the next step
        target, delay = rng.randint(last + 1, min(last + 3, STEPS - 2)), rng.uniform(0.0, 0.03)
        _wait_for(proc, lambda: (ckpt / str(target)).exists())
        time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    rc = proc.wait()
    after, torn_after = ckpt_state(workdir)
    return {"mode": mode, "target": target, "seconds": round(time.monotonic() - t0, 3), "rc": rc,
            "killed": rc == -signal.SIGKILL, "restored_from": last, "complete": after, "torn": torn_after}


KILLS_PER_CHAIN = 5
CHAINS = 2


def test_kill_9_at_random_moments_then_resume(root, reference, tmp_path, reliability):
    """CHAINS x KILLS_PER_CHAIN SIGKILLs, each followed by `--resume`; each chain then runs to the end and must
    log exactly the uninterrupted run's records (losses, beta, experts per token), step by step, once each."""
    def chain(c):
        rng = random.Random(SEED * 100 + c)
        w = tmp_path / f"chain{c}"
        modes = ["startup", "save", "save", "save", "after_save"]
        rng.shuffle(modes)
        out = []
        for i, mode in enumerate(modes):
            # chain 0 starts inside the first save: step 1 is logged, no checkpoint is complete yet
            first = 1 if c == 0 and i == 0 else None
            mode = "save" if first else mode
            t = kill_trial(root, w, mode, rng, resume=i > 0, log=tmp_path / f"chain{c}-{i}.log", target=first)
            out.append(t)
            ctx = f"seed {SEED}, chain {c}, trial {t}\n{(tmp_path / f'chain{c}-{i}.log').read_text()[-3000:]}"
            assert t["killed"], ctx  # neither finished nor failed before the kill
            assert not t["complete"] or t["complete"][-1] >= t["restored_from"], ctx
            assert_checkpoints_readable(w, t["complete"])
        rc, stdout, err = run_to_end(launch(root, w, "--resume", pipe=True))
        assert rc == 0 and "finished" in stdout, f"seed {SEED}, chain {c}: {err[-3000:]}"
        got = records(w)
        assert [r[0] for r in got] == list(range(1, STEPS + 1)), (SEED, c, got)
        assert got == reference(), f"seed {SEED}, chain {c}: resumed {got} != uninterrupted {reference()}"
        # temporary and deleted checkpoints are all cleaned up: only the last two remain
        assert sorted(os.listdir(w / "ckpt")) == [str(STEPS - 1), str(STEPS)], (SEED, c, os.listdir(w / "ckpt"))
        return out

    with ThreadPoolExecutor(CHAINS) as pool:  # the chains run side by side, each in its own workdir
        trials = [t for chain_trials in pool.map(chain, range(CHAINS)) for t in chain_trials]
    in_save = [t for t in trials if t["mode"] == "save" and any(x.startswith(f"{t['target']}{TMP}")
                                                                for x in t["torn"])]
    print(f"\nkill -9 trials (seed {SEED}):")
    for t in trials:
        print(f"  {t['mode']:>10} target={t['target']} after {t['seconds']:.2f}s: complete {t['complete']}, "
              f"torn {t['torn']}")
    assert len(trials) == CHAINS * KILLS_PER_CHAIN and all(t["killed"] for t in trials)
    assert len(in_save) >= 4, f"only {len(in_save)} kills landed inside a save (seed {SEED}): {trials}"
    reliability["kill -9 trials"] = len(trials)
    reliability["kills inside a checkpoint save"] = len(in_save)
    reliability["faults survived"] = reliability.get("faults survived", 0) + len(trials)


def test_full_disk_and_read_only_dir_during_save(root, reference, tmp_path, reliability):
    """A full disk at the save of step 4 and a read-only checkpoint directory at the save of step 6: each stops the
    run with one error line naming the directory and the OS error, the previous checkpoint stays complete and
    readable, and `--resume` afterwards ends with the uninterrupted run's records. Then a truncated file in the
    last checkpoint, and the export of the run against a base model that was replaced since, are refused."""
    shutil.copytree(root / "model", root / "model_fd")  # same weights: same losses; replaced at the end
    w = tmp_path / "run"
    rc, out, err = run_to_end(launch(root, w, "--fault", "full_disk@4", pipe=True, model="model_fd"))
    one_error_line(rc, err, f"{w / 'ckpt'}: saving the checkpoint of step 4 failed", "File too large",
                   "the last complete checkpoint is step 3")
    complete, torn = ckpt_state(w)
    assert complete == [2, 3] and torn == [f"4{TMP}"], (complete, torn)
    assert_checkpoints_readable(w, complete)

    rc, out, err = run_to_end(launch(root, w, "--resume", "--fault", "read_only@6", pipe=True, model="model_fd"))
    one_error_line(rc, err, f"{w / 'ckpt'}: saving the checkpoint of step 6 failed", "Permission denied",
                   "the last complete checkpoint is step 5")
    complete, torn = ckpt_state(w)
    assert complete == [4, 5] and torn == [], (complete, torn)  # the earlier tmp dir was cleaned up on resume
    assert_checkpoints_readable(w, complete)
    (w / "ckpt").chmod(0o755)

    rc, out, err = run_to_end(launch(root, w, "--resume", pipe=True, model="model_fd"))
    assert rc == 0 and "finished" in out, err[-3000:]
    assert records(w) == reference()

    # a file of the last checkpoint truncated afterwards: `--resume` names the step and what to do; done, the
    # run resumes from the step before and ends as the uninterrupted run did
    files = [p for p in (w / "ckpt" / str(STEPS) / "state").rglob("*") if p.is_file()]
    data = max(files, key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    rc, out, err = run_to_end(launch(root, w, "--resume", pipe=True, model="model_fd"))
    one_error_line(rc, err, f"{w / 'ckpt' / str(STEPS)}: checkpoint unreadable",
                   f"delete it to resume from step {STEPS - 1}")
    shutil.rmtree(w / "ckpt" / str(STEPS))
    rc, out, err = run_to_end(launch(root, w, "--resume", pipe=True, model="model_fd"))
    assert rc == 0 and "finished" in out, err[-3000:]
    assert records(w) == reference()
    reliability["full-disk, read-only and truncated checkpoints"] = 3
    reliability["faults survived"] = reliability.get("faults survived", 0) + 3

    # the base model at the recorded path is replaced by another one: the export is refused, nothing written
    from hf_tiny import make_tiny

    shutil.rmtree(root / "model_fd")
    make_tiny("mixtral", root / "model_fd")
    proc = subprocess.run([sys.executable, "-m", "convert.to_vllm", str(w / "ckpt"), "--out", str(tmp_path / "x")],
                          cwd=REPO, env=_child_env(root), capture_output=True, text=True, timeout=300)
    one_error_line(proc.returncode, proc.stderr, "model_fd", "differs from the one", "config.json differs")
    assert not (tmp_path / "x").exists()
    reliability["bad inputs refused"] = reliability.get("bad inputs refused", 0) + 1


# ----------------------------------------------------------------------------- bad input at the command line


def _cli(module, *args, root, timeout=300):
    proc = popen([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=_child_env(root),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return run_to_end(proc, timeout)


def _config_file(path, model, data, **extra):
    lines = ["from beam_jax.configs import tiny", "", "def get_config():", "    c = tiny.get_config()",
             f"    c.model.path = {str(model)!r}", f"    c.data.train = {str(data)!r}", "    c.data.seq_len = 32",
             "    c.data.batch_size = 4", "    c.train.steps = 2"]
    lines += [f"    c.{k} = {v}" for k, v in extra.items()]
    Path(path).write_text("\n".join(lines + ["    return c", ""]))
    return path


def test_entry_points_refuse_bad_input_in_one_line(root, tmp_path, reliability):
    """`python -m beam_jax.train / pretrain / eval` on bad input: exit status 1 and one `error: ...` line naming
    the file, key or directory; no traceback."""
    bad_data = tmp_path / "latin1.txt"
    bad_data.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    cases = [
        ("beam_jax.train", ["--config", _config_file(tmp_path / "a.py", root / "model", root / "data",
                                                      **{"train.stepz": 3})],
         ["unknown config key 'train.stepz'", "a.py", "did you mean 'train.steps'"]),
        ("beam_jax.train", ["--config", _config_file(tmp_path / "b.py", root / "model", root / "data",
                                                      **{"train.lr": "'fast'"})],
         ["b.py", "'lr'"]),
        ("beam_jax.pretrain", ["--config", "tiny_pretrain.py", "--config.train.steps=ten"],
         ["config key 'train.steps' must be int", "'ten'"]),
        ("beam_jax.train", ["--config", _config_file(tmp_path / "c.py", root / "model", bad_data),
                            "--workdir", tmp_path / "w_c"],
         [str(bad_data), "byte 3", "not valid UTF-8"]),
        ("beam_jax.train", ["--config", _config_file(tmp_path / "d.py", root / "model", root / "data"),
                            "--workdir", readonly / "run"],
         [str(readonly / "run"), "Permission denied"]),
        ("beam_jax.eval", ["--config", _config_file(tmp_path / "e.py", root / "model", root / "data"),
                           "--workdir", tmp_path / "never_trained"],
         [str(tmp_path / "never_trained"), "no checkpoint"]),
    ]
    if os.geteuid() != 0 and os.access(readonly, os.W_OK):  # pragma: no cover - a filesystem ignoring modes
        cases = [c for c in cases if c[1][-1] != readonly / "run"]
    with ThreadPoolExecutor(2) as pool:  # two at a time
        results = list(pool.map(lambda case: _cli(case[0], *case[1], root=root), cases))
    for (module, args, fragments), (rc, out, err) in zip(cases, results):
        assert rc == 1, (module, args, rc, err[-3000:])
        one_error_line(rc, err, *fragments)
    reliability["bad inputs refused"] = reliability.get("bad inputs refused", 0) + len(cases)


# ----------------------------------------------------------------------------- bad input, in process


def _refused(fn, *fragments):
    """fn() under the entry points' error handling: one `error: ...` line naming every fragment."""
    from beam_jax.cli import report_errors

    with pytest.raises(SystemExit) as e:
        with report_errors():
            fn()
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    for f in fragments:
        assert str(f) in msg, (f, msg)
    return msg


def _model_copy(root, tmp_path, name):
    d = tmp_path / name
    shutil.copytree(root / "model", d)
    return d


def _train(model, data, tmp_path, **extra):
    from beam_jax.configs import tiny
    from beam_jax.pipeline import train_and_evaluate

    c = tiny.get_config()
    c.model.path, c.data.train = str(model), str(data)
    c.data.seq_len, c.data.batch_size, c.train.steps = 32, 4, 1
    for k, v in extra.items():
        section, key = k.split("__")
        c[section][key] = v
    return lambda: train_and_evaluate(c, tmp_path / "w")


def test_bad_models_data_and_kernel_calls_are_refused(root, tmp_path, reliability):
    from safetensors.numpy import load_file, save_file

    import jax.numpy as jnp
    from beam_jax.kernel import masked_moe

    n = 0
    # a model directory: a truncated safetensors file, a wrong shape, a missing shard
    trunc = _model_copy(root, tmp_path, "trunc")
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _refused(_train(trunc, root / "data", tmp_path), str(f), "safetensors")
    shape = _model_copy(root, tmp_path, "shape")
    t = load_file(shape / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    t[name] = t[name][:, :-1].copy()
    save_file(t, shape / "model.safetensors", metadata={"format": "pt"})
    _refused(_train(shape, root / "data", tmp_path), f"tensor '{name}' has shape")
    sharded = tmp_path / "sharded"
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(root / "model").save_pretrained(sharded, max_shard_size="60KB")
    for g in (root / "model").glob("tokenizer*"):
        shutil.copy(g, sharded / g.name)
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    _refused(_train(sharded, root / "data", tmp_path), f"shard {shard.name} is listed but missing")
    n += 3

    # a data file: empty, not UTF-8, without the field, a chat where the tokenizer has no chat template
    cases = {"empty.txt": (b"", ["empty.txt", "empty file"]),
             "bad.jsonl": ('{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1"), ["bad.jsonl", "line 2",
                                                                                      "not valid UTF-8"]),
             "nofield.jsonl": (b'{"body": "x"}\n', ["nofield.jsonl", "line 1", "field 'text'"])}
    for fname, (data, fragments) in cases.items():
        d = tmp_path / f"data_{fname}"
        d.mkdir()
        (d / fname).write_bytes(data)
        _refused(_train(root / "model", d / fname, tmp_path), *fragments)
        n += 1
    notemplate = _model_copy(root, tmp_path, "notemplate")
    (notemplate / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((notemplate / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (notemplate / "tokenizer_config.json").write_text(json.dumps(tc))
    chat = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chat.write_text("".join(json.dumps({"messages": msgs}) + "\n" for _ in range(40)))
    _refused(_train(notemplate, chat, tmp_path, data__pack="fit"), "chat.jsonl", "messages", "chat template")
    n += 1

    # the kernel: wrong shapes and dtypes name the tensor
    T, d, f, E, K = 4, 8, 16, 3, 2
    x = jnp.ones((T, d), jnp.float32)
    wg = jnp.ones((E, d, f), jnp.float32)
    wd = jnp.ones((E, f, d), jnp.float32)
    ids = jnp.zeros((T, K), jnp.int32)
    w = jnp.ones((T, K), jnp.float32)
    bad_calls = [(lambda: masked_moe(x, wg, wg, wd[:, :, :-1], ids, w), "w_down"),
                 (lambda: masked_moe(x, wg, wg, wd, ids.astype(jnp.int16), w), "expert_ids"),
                 (lambda: masked_moe(x, wg, wg.astype(jnp.bfloat16), wd, ids, w), "w_up"),
                 (lambda: masked_moe(x, wg, wg, wd, ids, w[:, :1]), "weights"),
                 (lambda: masked_moe(x, wg, wg, wd, ids, w, keep=jnp.ones((T, K), jnp.int32)), "keep")]
    for call, tensor in bad_calls:
        _refused(call, "masked_moe", tensor)
        n += 1
    reliability["bad inputs refused"] = reliability.get("bad inputs refused", 0) + n


# ----------------------------------------------------------------------------- NaN/Inf mid-run


def test_nonfinite_mid_run_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, text_data_dir, tmp_path,
                                                                     reliability):
    """Training goes well for 3 steps (a checkpoint each), then a frozen weight of layer 1 turns Inf: every step is
    refused with the layer named, after train.max_bad_steps in a row the run stops, and the checkpoint of step 3
    is the latest, complete, and holds exactly the parameters of step 3."""
    import jax
    import numpy as np
    import transformers

    import beam_jax
    from beam_jax.configs import tiny
    from beam_jax.data import BatchIterator
    from beam_jax.routing import BeamHook
    from beam_jax.run_data import load_splits
    from beam_jax.checkpoint import Checkpointer
    from beam_jax.trainer import LossConfig, Trainer, fit

    c = tiny.get_config()
    c.model.path, c.data.train, c.data.seq_len, c.data.batch_size = str(tiny_model_dir), str(text_data_dir), 32, 4
    c.train.steps, c.train.warmup_steps, c.train.lr, c.train.log_every = 8, 1, 0.05, 1
    c.train.ckpt_every, c.train.max_bad_steps = 1, 2
    model = beam_jax.load_pretrained(tiny_model_dir)
    splits = load_splits(c.data, transformers.AutoTokenizer.from_pretrained(tiny_model_dir))
    tr = Trainer(model, "mask", c.train, LossConfig(hook=BeamHook(0.5, train=True), impl="dense"))
    good = {}

    def poison_after_step_3(step, metrics):
        if step == 3:
            good["params"] = [np.array(x) for x in jax.tree.leaves(tr.params)]
            kernel = tr.frozen["layers"][1]["self_attn"]["o_proj"]["kernel"]
            kernel.set_value(kernel.get_value().at[0, 0].set(np.inf))

    with pytest.raises(FloatingPointError) as e:
        fit(tr, BatchIterator(splits["train"], 4, seed=0), tmp_path, c.train, beta=0.1, on_log=poison_after_step_3)
    msg = str(e.value)
    assert "step 4" in msg and "MoE layer 1" in msg and "stopping after 2 refused steps" in msg, msg
    assert f"last good checkpoint is step 3 in {tmp_path / 'ckpt'}" in msg, msg
    # both refusals are of step 4 (a refused step is retried with the next batch), nothing after 3 was saved
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in log] == [(1, "train"), (2, "train"), (3, "train"), (4, "refused"),
                                                       (4, "refused")]
    for a, b in zip(jax.tree.leaves(tr.params), good["params"]):  # the refused steps changed nothing
        np.testing.assert_array_equal(np.asarray(a), b)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=3)
    assert ckpt.latest_step() == 3
    tree, meta = ckpt.restore(3, tr.state_tree())
    saved = jax.tree.leaves(tree["params"])
    assert len(saved) == len(good["params"])
    for a, b in zip(saved, good["params"]):
        np.testing.assert_array_equal(np.asarray(a), b)
    ckpt.close()
    reliability["faults survived"] = reliability.get("faults survived", 0) + 1
