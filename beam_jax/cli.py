"""Command-line plumbing shared by the entry points: `--config NAME_OR_PATH` (ml_collections config file,
bare names resolved in `beam_jax/configs/`), `--config.a.b=value` overrides, `--workdir`, `--resume`."""

from __future__ import annotations

import contextlib
import os
import sys

from absl import flags
from ml_collections import config_flags

from .configs import resolve


def expected_errors() -> tuple[type[BaseException], ...]:
    """The errors bad input or a faulty machine raise, each with a message naming the file, field or tensor:
    the entry points print them as one `error: ...` line (no traceback) and exit non-zero. ValueError covers
    ConfigError, CheckpointError, DataError and ExportError; OSError covers a missing file, an unwritable
    directory and a full disk; FloatingPointError is a run stopped after too many non-finite steps;
    MissingExtraError is an optional dependency that is not installed (the message names the extra)."""
    from .extras import MissingExtraError
    from .checkpoint import CheckpointSaveError

    return (ValueError, OSError, FloatingPointError, CheckpointSaveError, MissingExtraError)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@contextlib.contextmanager
def report_errors(hard_exit: bool = False):
    """Turn an expected error into `error: <message>` on stderr and exit status 1 (SystemExit); set
    BEAM_TRACEBACK=1 to get the traceback instead.

    hard_exit (the command-line entry points): leave at once with os._exit after printing, so that background
    writer threads meeting the same fault (orbax's, tensorboard's flush at exit on a full disk) cannot add their
    own tracebacks after the error line. Metrics and checkpoints are flushed as they are written; nothing is
    pending by then."""
    try:
        yield
    except expected_errors() as e:
        if os.environ.get("BEAM_TRACEBACK"):
            raise
        message = f"error: {one_line(e)}"
        if not hard_exit:
            sys.exit(message)
        sys.unraisablehook = lambda _: None  # no "Exception ignored in ..." from finalisers after the line
        sys.stdout.flush()
        print(message, file=sys.stderr, flush=True)
        os._exit(1)


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


def _load_config_file(path: str):
    """Run a config file's get_config(); any error in it becomes a ConfigError naming the file."""
    import importlib.util

    from .config import ConfigError

    try:
        spec = importlib.util.spec_from_file_location("_beam_config", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.get_config()
    except Exception as e:  # noqa: BLE001 - user code: a wrong type, a typo, a syntax error
        raise ConfigError(f"{path}: {type(e).__name__}: {' '.join(str(e).split())}") from None


def _keys(d, prefix="", depth=None) -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if hasattr(v, "items") and (depth is None or depth > 1):
            out |= _keys(v, prefix + k + ".", None if depth is None else depth - 1)
    return out


def check_overrides(argv: list[str], default: str | None = None) -> None:
    """Refuse a config with a key the entry point does not know, naming the file and key (and the nearest known
    key): a `section.key` of the config file absent from the built-in `default` config, or a `--config.a.b=...`
    override absent from the config file. Override values that cannot parse as the field's int or float type are
    refused too. Raises ConfigError."""
    import difflib

    from .config import ConfigError

    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    path = path or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    cfg = _load_config_file(path)

    def refuse(key, known, where):
        near = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"unknown config key '{key}' in {where}{hint}")

    if default is not None and resolve(default) != path:
        schema = _keys(_load_config_file(resolve(default)), depth=2)  # sections and their keys
        for key in sorted(_keys(cfg, depth=2) - schema):
            refuse(key, schema, path)
    known = _keys(cfg)
    for a in argv:
        if a.startswith("--config.") and not a.startswith("--config.py"):
            key, _, value = a[len("--config."):].partition("=")
            if key not in known:
                refuse(key, known, path)
            current = cfg
            for part in key.split("."):
                current = current[part]
            kind = type(current)
            if "=" in a and kind in (int, float):
                try:
                    kind(value)
                except ValueError:
                    raise ConfigError(f"config key '{key}' must be {kind.__name__}, got {value!r} "
                                      f"(from {a})") from None


def config_name() -> str:
    from pathlib import Path

    return Path(flags.FLAGS["config"].config_filename).stem


def run(main, default_config: str):
    """absl entry: resolves the config argument, then calls main(config, workdir, resume)."""
    from absl import app

    define_flags(default_config)
    try:
        argv = resolve_config_arg(sys.argv, default_config)
        check_overrides(argv, default_config)
    except expected_errors() as e:
        sys.exit(f"error: {one_line(e)}")

    def _main(_argv):
        from pathlib import Path

        from absl import logging

        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO

        FLAGS = flags.FLAGS
        workdir = Path(FLAGS.workdir or f"runs/{config_name()}")
        with report_errors(hard_exit=True):
            from .configs import base

            base.check(FLAGS.config)  # values out of range (the file's or an override's), naming the key
            return main(FLAGS.config, workdir, FLAGS.resume)

    app.run(_main, argv=argv)
