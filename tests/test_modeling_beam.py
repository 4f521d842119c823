"""The PyTorch BEAM classes (`convert.modeling_beam`) on their own: the expert GEMMs receive only the kept
(token, expert) pairs under every transformers `experts_implementation`, the pair counter counts those rows
and equals the mask's kept count, and an exported directory loads in plain transformers
(`trust_remote_code=True`, the modelling file and `auto_map` written by `convert.remote_code`) in a process
where `convert` and `beam_jax` cannot be imported, with the same logits as the `import convert` path.
"""

import ast
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from transformers.integrations import moe as hf_moe

from convert import modeling_beam, remote_code
from hf_tiny import hf_config

transformers.logging.set_verbosity_error()
IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def _beam_model(family="qwen3_moe", seed=0, mask_scale=3.0, tau=0.5, **overrides):
    """A random tiny BEAM model (float32, eval) whose mask routers drop a good share of the Top-K pairs."""
    torch.manual_seed(seed)
    base = hf_config(family, **overrides)
    cfg = modeling_beam.CONFIGS[f"beam_{family}"](**base.to_dict())
    cfg.beam = {"tau": tau, "renormalize": False}
    model = modeling_beam.MODELS["Beam" + type(base).__name__.replace("Config", "ForCausalLM")](cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(8.0)
            if name.endswith("mask_router.weight"):
                p.normal_(0.0, mask_scale / np.sqrt(p.shape[1]))
    return model


def _dense_reference(experts, hidden, ids, weights):
    """The MoE sum computed densely from the experts' fused weights, every (token, slot) in a Python loop:
    hidden [T, d], ids [T, K] (E = dropped), weights [T, K] -> [T, d] float64."""
    E = experts.num_experts
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e >= E:
                assert float(weights[t, k]) == 0.0, "a dropped pair must carry weight 0"
                continue
            gate, up = (experts.gate_up_proj[e].double() @ hidden[t].double()).chunk(2)
            h = experts.act_fn(gate) * up
            out[t] += float(weights[t, k]) * (experts.down_proj[e].double() @ h)
    return out.detach()


class _Recorder:
    """Per forward: the routing each MoE block's experts received, the rows their inner implementation got,
    the rows handed to transformers' batched / grouped GEMM helpers, and each block's output."""

    def __init__(self, model, monkeypatch):
        self.calls, self.gemm_rows, self.inner_rows = [], [], []
        for block in modeling_beam.moe_blocks(model).values():
            block.experts.register_forward_hook(self._hook)
            base = next(c for c in type(block.experts).__mro__ if c.__module__.startswith("transformers.models."))
            self._wrap_inner(monkeypatch, base)
        for name in ("_batched_linear", "_grouped_linear"):
            original = getattr(hf_moe, name)

            def wrapped(input, *a, _original=original, **kw):
                self.gemm_rows.append(int(input.shape[0]))
                return _original(input, *a, **kw)

            monkeypatch.setattr(hf_moe, name, wrapped)

    def _wrap_inner(self, monkeypatch, base):
        forward = base.forward
        if getattr(forward, "_beam_test_wrapped", False):
            return

        def inner(experts, hidden_states, top_k_index, top_k_weights, _forward=forward):
            self.inner_rows.append((int(hidden_states.shape[0]), top_k_index.clone()))
            return _forward(experts, hidden_states, top_k_index, top_k_weights)

        inner._beam_test_wrapped = True
        monkeypatch.setattr(base, "forward", inner)

    def _hook(self, experts, args, output):
        hidden, ids, weights = args
        self.calls.append((experts, hidden.detach().clone(), ids.clone(), weights.detach().clone(),
                           output.detach().clone()))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_experts_compute_only_kept_pairs(implementation, monkeypatch):
    model = _beam_model()
    model.set_experts_implementation(implementation)
    assert model.config._experts_implementation == implementation
    rec = _Recorder(model, monkeypatch)
    ids = torch.tensor(np.random.RandomState(0).randint(3, 160, size=(2, 9)))
    model.reset_beam_counts()
    with torch.no_grad():
        model(ids)
    counts = model.beam_pair_counts()

    assert len(rec.calls) == 2  # two MoE layers
    K = model.config.num_experts_per_tok
    kept_total = 0
    for (experts, hidden, top_ids, top_w, out), (rows, inner_ids) in zip(rec.calls, rec.inner_rows):
        E = experts.num_experts
        kept = int((top_ids < E).sum())
        kept_total += kept
        assert 0 < kept < top_ids.numel()  # some pairs dropped, some kept: the test sees the mask
        # the implementation got exactly the kept pairs, one per row, every id a real expert
        assert rows == kept and inner_ids.shape == (kept, 1) and int(inner_ids.max()) < E
        np.testing.assert_allclose(out.double().numpy(), _dense_reference(experts, hidden, top_ids, top_w).numpy(),
                                   atol=2e-5, rtol=0)
    assert counts == {"offered": 2 * 18 * K, "computed": kept_total}
    if implementation == "eager":
        assert rec.gemm_rows == []  # transformers' own loop, over the rows it was given
    else:  # up and down projection per layer, each over the kept rows only (not T * K)
        assert rec.gemm_rows == [n for n, _ in rec.inner_rows for _ in range(2)]


def test_implementations_agree_and_counters_equal_the_mask():
    model = _beam_model(seed=1)
    ids = torch.tensor(np.random.RandomState(1).randint(3, 160, size=(3, 7)))
    kept = []

    def hook(_router, _inp, out):
        kept.append(int((out[2] < model.config.num_experts).sum()))

    for block in modeling_beam.moe_blocks(model).values():
        block.gate.register_forward_hook(hook)
    logits, counts = {}, {}
    for impl in IMPLEMENTATIONS:
        model.set_experts_implementation(impl)
        model.reset_beam_counts()
        kept.clear()
        with torch.no_grad():
            logits[impl] = model(ids).logits.numpy()
        counts[impl] = model.beam_pair_counts()
        assert counts[impl]["computed"] == sum(kept) < counts[impl]["offered"]
    for impl in IMPLEMENTATIONS[1:]:
        np.testing.assert_allclose(logits[impl], logits["eager"], atol=1e-5, rtol=0)
        assert counts[impl] == counts["eager"]
    # tau 0: every pair kept (all rows computed); tau 1.01: none (no expert GEMM, the routed output is 0)
    for tau, expect in ((0.0, "offered"), (1.01, 0)):
        model.set_beam_tau(tau)
        model.reset_beam_counts()
        with torch.no_grad():
            model(ids)
        c = model.beam_pair_counts()
        assert c["computed"] == (c["offered"] if expect == "offered" else 0)


def test_families_keep_parity_under_batched_mm():
    """Every family's BEAM class gives the same logits under eager and batched_mm (shared experts, Mixtral's
    block layout, DeepSeek-V2's group-limited routing included)."""
    overrides = {"deepseek_v2": {}, "qwen2_moe": {}, "mixtral": {}, "olmoe": {}}
    ids = torch.tensor(np.random.RandomState(2).randint(3, 160, size=(2, 6)))
    for family, kw in overrides.items():
        model = _beam_model(family, seed=2, **kw)
        out = {}
        for impl in ("eager", "batched_mm"):
            model.set_experts_implementation(impl)
            model.reset_beam_counts()
            with torch.no_grad():
                out[impl] = (model(ids).logits.numpy(), model.beam_pair_counts())
        np.testing.assert_allclose(out["batched_mm"][0], out["eager"][0], atol=1e-5, rtol=0, err_msg=family)
        assert out["batched_mm"][1] == out["eager"][1], family
        assert 0 < out["eager"][1]["computed"] < out["eager"][1]["offered"], family


# ----------------------------------------------------------------------------- remote code

def test_remote_code_tables_match_the_module():
    assert remote_code._families() == modeling_beam.FAMILIES
    for name, model_cls in modeling_beam.MODELS.items():
        amap = remote_code.auto_map(name)
        assert amap == {"AutoConfig": f"modeling_beam.{model_cls.config_class.__name__}",
                        "AutoModelForCausalLM": f"modeling_beam.{name}"}
        assert remote_code.auto_map(modeling_beam.BASE_ARCHITECTURE[name]) == amap
    with pytest.raises(ValueError, match="no BEAM variant of LlamaForCausalLM; supported: BeamDeepseekV2"):
        remote_code.auto_map("LlamaForCausalLM")
    files = remote_code.remote_code_files()
    assert list(files) == ["modeling_beam.py"]
    # the copy is the module with its family table written in as a literal, nothing of beam_jax left, the rest as is
    text, source = files["modeling_beam.py"], open(modeling_beam.__file__, encoding="utf-8").read()
    imports = {line.split()[1] for line in text.splitlines()
               if line.lstrip().startswith(("from beam_jax", "import beam_jax"))}
    assert "from beam_jax.families import" in source and imports == {"beam_jax.extras"}  # extras: in a try block

    def table(code):
        return next(n for n in ast.parse(code).body if isinstance(n, ast.Assign) and n.targets[0].id == "FAMILIES")

    assert ast.literal_eval(table(text).value) == modeling_beam.FAMILIES
    head = source[:source.index("from beam_jax.families")].count("\n")
    out, src = text.splitlines(), source.splitlines()
    assert out[:head] == src[:head] and out[table(text).end_lineno:] == src[table(source).end_lineno:]
    lines = "\n".join(remote_code.usage_lines("/x/beam"))
    assert 'from_pretrained("/x/beam", trust_remote_code=True)' in lines and "convert.register()" in lines
    assert "vllm serve /x/beam" in lines and "python -m convert.vllm_plugin.serve /x/beam" in lines


# a meta-path finder that makes the named top-level packages unimportable, then runs the rest of the script
BLOCK = textwrap.dedent("""
    import sys

    class _Block:
        def __init__(self, names):
            self.names = names

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.names:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, _Block(set(sys.argv[1].split(","))))
""")

LOAD_REMOTE = BLOCK + textwrap.dedent("""
    import numpy as np, torch, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True,
                                                              dtype=torch.float32).eval()
    ids = torch.tensor(np.load(sys.argv[3]))
    model.reset_beam_counts()
    with torch.no_grad():
        logits = model(ids).logits.numpy()
    np.save(sys.argv[4], logits)
    import json
    print(json.dumps({"module": type(model).__module__, "class": type(model).__name__,
                      "counts": model.beam_pair_counts(),
                      "mask_dtype": str(model.model.layers[0].mlp.mask_router.weight.dtype),
                      "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("convert", "beam_jax"))}))
""")


def _env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
            "TOKENIZERS_PARALLELISM": "false"}


def test_export_loads_with_trust_remote_code_without_convert(tiny_model_dir, tmp_path):
    from convert.to_vllm import export
    from test_convert import fake_run

    fake_run(tiny_model_dir, tmp_path / "run", seed=3)
    out = export(tmp_path / "run" / "ckpt", tmp_path / "serve")
    # the export wrote the modelling file and config.json's auto_map (convert.remote_code), and the card says both ways
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"] == remote_code.auto_map(cfg["architectures"][0])
    for name, text in remote_code.remote_code_files().items():
        assert (out / name).read_text() == text
    card = (out / "README.md").read_text()
    assert f'from_pretrained("{out.absolute()}", trust_remote_code=True)' in card and "convert.register()" in card

    ids = np.random.RandomState(4).randint(3, 320, size=(2, 10))
    np.save(tmp_path / "ids.npy", ids)
    script = tmp_path / "load_remote.py"
    script.write_text(LOAD_REMOTE)
    res = subprocess.run([sys.executable, str(script), "convert,beam_jax", str(out), str(tmp_path / "ids.npy"),
                          str(tmp_path / "remote.npy")], capture_output=True, text=True, timeout=300,
                         env=_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["module"].startswith("transformers_modules.") and got["module"].endswith(".modeling_beam")
    assert got["class"] == "BeamQwen3MoeForCausalLM" and got["mask_dtype"] == "torch.float32"
    assert got["imported"] == []  # nothing of convert or beam_jax (they were unimportable anyway)

    # the same directory through `import convert` (registered classes; auto_map present, no trust_remote_code)
    modeling_beam.register()
    local = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(local) is modeling_beam.MODELS["BeamQwen3MoeForCausalLM"]
    local.reset_beam_counts()
    with torch.no_grad():
        want = local(torch.tensor(ids)).logits.numpy()
    counts = local.beam_pair_counts()
    assert 0 < counts["computed"] < counts["offered"]
    assert got["counts"] == counts
    np.testing.assert_allclose(np.load(tmp_path / "remote.npy"), want, atol=1e-6, rtol=0)


STANDALONE = BLOCK + textwrap.dedent("""
    import importlib.util
    spec = importlib.util.spec_from_file_location("modeling_beam", sys.argv[2])
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except ImportError as e:
        print(type(e).__module__, type(e).__name__, "|", e)
""")


@pytest.mark.parametrize("blocked, error", [("torch,convert,beam_jax", "builtins ImportError"),
                                            ("torch", "beam_jax.extras MissingExtraError")])
def test_missing_torch_is_one_clear_import_error(blocked, error, tmp_path):
    """Without torch, the file says so in one line: a plain ImportError where beam-jax is absent (the copy in an
    exported directory), beam-jax's MissingExtraError (printed as `error: ...` by its entry points) inside it."""
    script = tmp_path / "standalone.py"
    script.write_text(STANDALONE)
    res = subprocess.run([sys.executable, str(script), blocked, modeling_beam.__file__], capture_output=True,
                         text=True, timeout=120, env=_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    head, message = res.stdout.strip().splitlines()[-1].split(" | ")
    assert head == error
    assert "need the Python package 'torch', which is not installed: pip install torch" in message
    assert '".[torch]"' in message


def test_remote_code_module_needs_no_torch(tmp_path):
    script = tmp_path / "no_torch.py"
    script.write_text(BLOCK + "import convert.remote_code as rc\n"
                      "print(rc.auto_map('BeamMixtralForCausalLM')['AutoModelForCausalLM'],"
                      " len(rc.remote_code_files()['modeling_beam.py']) > 1000)\n")
    res = subprocess.run([sys.executable, str(script), "torch,transformers"], capture_output=True, text=True,
                         timeout=120, env=_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["modeling_beam.BeamMixtralForCausalLM", "True"]
