"""Command-line plumbing shared by the entry points: `--config NAME_OR_PATH` (ml_collections config file,
bare names resolved in `beam_jax/configs/`), `--config.a.b=value` overrides, `--workdir`, `--resume`."""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from .configs import resolve


def define_flags(default_config: str):
    config_flags.DEFINE_config_file("config", None, "config file or built-in name (e.g. tiny.py)", lock_config=True)
    flags.DEFINE_string("workdir", None, "directory for everything the run writes (default: runs/<config name>)")
    flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in WORKDIR/ckpt")
    return default_config


def resolve_config_arg(argv: list[str], default: str) -> list[str]:
    """Rewrite `--config tiny.py` / `--config=tiny` to the built-in file's path; add the default if absent."""
    out, i, found = [], 0, False
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            out += ["--config", resolve(argv[i + 1])]
            i, found = i + 2, True
            continue
        if a.startswith("--config="):
            out.append("--config=" + resolve(a.split("=", 1)[1]))
            found = True
        else:
            out.append(a)
        i += 1
    if not found:
        out[1:1] = ["--config", resolve(default)]
    return out


def check_overrides(argv: list[str]) -> None:
    """Refuse `--config.a.b=...` for a key the config does not have, naming it (and the nearest key)."""
    import difflib
    import importlib.util

    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    path = path or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    spec = importlib.util.spec_from_file_location("_beam_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    known = set()

    def walk(d, prefix):
        for k, v in d.items():
            known.add(prefix + k)
            if hasattr(v, "items"):
                walk(v, prefix + k + ".")

    walk(cfg, "")
    for a in argv:
        if a.startswith("--config.") and not a.startswith("--config.py"):
            key = a[len("--config."):].split("=", 1)[0]
            if key not in known:
                near = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise KeyError(f"unknown config key '{key}' in {path}{hint}")


def config_name() -> str:
    from pathlib import Path

    return Path(flags.FLAGS["config"].config_filename).stem


def run(main, default_config: str):
    """absl entry: resolves the config argument, then calls main(config, workdir, resume)."""
    from absl import app

    define_flags(default_config)
    try:
        argv = resolve_config_arg(sys.argv, default_config)
        check_overrides(argv)
    except (FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e.args[0] if e.args else e}")

    def _main(_argv):
        from pathlib import Path

        from absl import logging

        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO

        FLAGS = flags.FLAGS
        workdir = Path(FLAGS.workdir or f"runs/{config_name()}")
        return main(FLAGS.config, workdir, FLAGS.resume)

    app.run(_main, argv=argv)
