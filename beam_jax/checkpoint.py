"""Checkpoints of a run under `workdir/ckpt` with orbax: the trainer's state tree (trainable parameters and
optimizer state) plus JSON metadata (step, data position, beta, base-model fingerprint, config); atomic saves
and deletions, one-line errors for a failed save or a damaged checkpoint, and `restore_trainable` to load a
finished run's trained parameters into a model."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from .trainable import trainable_filter


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (full disk, unwritable directory, ...); the previous one is intact."""


def _save_failure_reason(e: BaseException) -> str:
    """The OS-level reason of a failed save, in one short line (orbax and tensorstore wrap it in their own types)."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return f"{seen.strerror} [errno {seen.errno}]" + (f": {seen.filename}" if seen.filename else "")
        seen = seen.__cause__ or seen.__context__
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}{' ...' if len(msg) > 300 else ''}"


class CheckpointRestoreError(ValueError):
    """A complete checkpoint's files are damaged (truncated, corrupt) or do not fit the run."""


class _HoldOrbaxErrors(logging.Filter):
    """Holds orbax's ERROR records (tracebacks logged by its writer threads) while a save runs: they are released
    when the save succeeds and dropped once it failed, where CheckpointSaveError gives the reason in one line
    (BEAM_TRACEBACK=1 lets them through)."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.failed = False

    def filter(self, record):
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            if not self.failed:
                self.held.append(record)
            return False
        return True


class _Stderr:
    """Holds what is written to stderr (fd 2: Python and C alike) during a checkpoint restore. A failed restore
    leaves orbax's other in-flight reads failing in its threads for a moment, each printing a traceback (from C
    callbacks too); `settle` lets them finish into the held output, which is then dropped, since the
    CheckpointRestoreError raised next says what failed. After a good restore the held output is written out."""

    def __enter__(self):
        import sys
        import tempfile

        self.active = not os.environ.get("BEAM_TRACEBACK")
        if self.active:
            sys.stderr.flush()
            self.file = tempfile.TemporaryFile()
            self.saved = os.dup(2)
            os.dup2(self.file.fileno(), 2)
        return self

    def settle(self, seconds: float = 0.3):
        import gc
        import sys

        if not self.active:
            return
        hook, sys.unraisablehook = sys.unraisablehook, lambda _: None  # un-awaited coroutines of the failed read
        try:
            time.sleep(seconds)
            gc.collect()
        finally:
            sys.unraisablehook = hook
        self.file.truncate(0)

    def __exit__(self, *exc):
        import sys

        if self.active:
            sys.stderr.flush()
            os.dup2(self.saved, 2)
            os.close(self.saved)
            self.file.seek(0)
            held = self.file.read()
            self.file.close()
            if held:
                os.write(2, held)
        return False


class Checkpointer:
    """orbax CheckpointManager under `workdir/ckpt`: the trainer's state tree plus JSON metadata.

    A save is atomic: orbax writes `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` when complete, so a
    process killed mid-save leaves at most a temporary directory, which `latest_step` ignores and the next
    manager on the directory deletes. Deleting an old checkpoint is atomic too: it is renamed into `.deleted/`
    (emptied after each save and on start), so a kill mid-deletion never leaves a half-deleted `<step>`; `prune`
    deletes the complete checkpoints beyond the newest `keep`, which orbax only does after a save. A save
    that fails raises CheckpointSaveError naming the directory and the OS error; the checkpoints already there
    are untouched.
    """

    TRASH = ".deleted"

    def __init__(self, directory: Path, keep: int = 3):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Checkpointer keep: expected an integer >= 1, got {keep!r}")
        self.directory = Path(directory).absolute()
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                     cleanup_tmp_directories=True,
                                                                     todelete_subdir=self.TRASH))
        except OSError as e:
            raise CheckpointSaveError(f"{self.directory}: cannot use as checkpoint directory "
                                      f"({_save_failure_reason(e)})") from e
        self.keep = keep
        self._empty_trash()

    def prune(self):
        """Delete all but the newest `keep` complete checkpoints (the trainer calls it once a resume restored).

        orbax enforces `max_to_keep` only after a save, so a run killed between a save's rename and the deletion
        it triggers (or resumed with a smaller `keep`) would otherwise keep the extra step for good when no save
        follows, e.g. a resumed run whose last step is already saved. Collective, like orbax's deletions.
        """
        for step in sorted(self.manager.all_steps())[:-self.keep]:
            self.manager.delete(step)  # renamed into TRASH first: atomic, like orbax's own deletions
        self._empty_trash()

    def _empty_trash(self):
        import shutil

        if jax.process_index() == 0:  # orbax's primary host is the one that deletes
            shutil.rmtree(self.directory / self.TRASH, ignore_errors=True)

    def save(self, step: int, tree: dict, meta: dict):
        previous = self.manager.latest_step()
        hold = _HoldOrbaxErrors()
        logger = logging.getLogger("absl")
        if not os.environ.get("BEAM_TRACEBACK"):
            logger.addFilter(hold)
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                            meta=ocp.args.JsonSave(meta)))
            self.manager.wait_until_finished()
        except Exception as e:  # orbax/tensorstore raise ValueError, OSError, RuntimeError... for a failed write
            hold.failed = True  # stays installed: orbax threads still failing after this must not print either
            kept = f"the last complete checkpoint is step {previous}" if previous is not None else \
                "no earlier checkpoint"
            raise CheckpointSaveError(f"{self.directory}: saving the checkpoint of step {step} failed "
                                      f"({_save_failure_reason(e)}); {kept}") from e
        logger.removeFilter(hold)
        for record in hold.held:
            logger.handle(record)
        self._empty_trash()

    def latest_step(self):
        return self.manager.latest_step()

    def restore(self, step: int, target: dict):
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        with _Stderr() as stderr:
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                         meta=ocp.args.JsonRestore()))
                return out.state, out.meta
            except Exception as e:  # a truncated or corrupt file: orbax and tensorstore raise many types
                earlier = [s for s in self.manager.all_steps() if s < step]
                hint = f"; delete it to resume from step {max(earlier)}" if earlier else ""
                msg = " ".join(str(e).split())
                failure = CheckpointRestoreError(f"{self.directory / str(step)}: checkpoint unreadable "
                                                 f"({type(e).__name__}: {msg[:300]}{' ...' if len(msg) > 300 else ''})"
                                                 f"{hint}")
            stderr.settle()
        raise failure

    def close(self):
        self.manager.close()


def restore_trainable(ckpt_dir, model, step: int | None = None) -> dict:
    """Load a run's trained parameters (e.g. the mask routers) into `model` in place; returns the checkpoint's
    metadata (step, base-model fingerprint, config). `ckpt_dir` is WORKDIR/ckpt or one step's folder in it."""
    ckpt_dir = Path(ckpt_dir).absolute()
    if step is None and ckpt_dir.name.isdigit() and (ckpt_dir / "state").exists():
        step, ckpt_dir = int(ckpt_dir.name), ckpt_dir.parent
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint found (no such directory)")
    mgr = ocp.CheckpointManager(ckpt_dir)
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint found")
    if step not in mgr.all_steps():
        raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint of step {step} (steps: {sorted(mgr.all_steps())})")
    try:
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises several types for a missing or corrupt item
        raise ValueError(f"{ckpt_dir / str(step)}: checkpoint metadata unreadable ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]})") from None
    trainable = trainable_filter(meta.get("trainable", "mask"))
    params = nnx.state(model, trainable)
    target = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(params))}
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    try:
        tree = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(target,
                                         restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding),
                                                                   target),
                                         partial_restore=True)))["state"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{ckpt_dir / str(step)}: trained parameters do not fit {model.cfg.architecture} "
                         f"({e})") from None
    nnx.replace_by_pure_dict(params, tree["params"])
    nnx.update(model, params)
    mgr.close()
    return {"step": step, **meta}
