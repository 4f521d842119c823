"""beam_jax.checkpoint: `prune` keeps the newest `keep` checkpoints, whatever state a killed run left; opening a
directory deletes nothing (a run started without --resume must fail with its checkpoints intact)."""

import jax.numpy as jnp
import numpy as np
import pytest

from beam_jax.checkpoint import Checkpointer


def _tree(step):
    return {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) * (step + 0.5)}


def _save_steps(directory, steps, keep):
    ck = Checkpointer(directory, keep=keep)
    for s in steps:
        ck.save(s, _tree(s), {"step": s})
    ck.close()


def test_prune_deletes_checkpoints_beyond_keep(tmp_path):
    """The state a kill between a save's rename and orbax's deletion leaves (one step too many) is pruned, so a
    resumed run with nothing left to save still ends with the newest `keep` steps only."""
    d = tmp_path / "ckpt"
    _save_steps(d, [1, 2, 3, 4], keep=3)
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == ["2", "3", "4"]
    ck = Checkpointer(d, keep=2)
    assert sorted(ck.manager.all_steps()) == [2, 3, 4]  # opening alone deletes nothing
    ck.prune()
    assert sorted(ck.manager.all_steps()) == [3, 4]
    assert sorted(p.name for p in d.iterdir()) == ["3", "4"]  # the trash is emptied too
    tree, meta = ck.restore(4, _tree(0))  # the kept ones still restore, values intact
    np.testing.assert_array_equal(np.asarray(tree["w"]), np.asarray(_tree(4)["w"]))
    assert meta["step"] == 4
    ck.close()


def test_prune_within_keep_deletes_nothing(tmp_path):
    d = tmp_path / "ckpt"
    _save_steps(d, [1, 2], keep=3)
    ck = Checkpointer(d, keep=3)
    ck.prune()
    assert sorted(ck.manager.all_steps()) == [1, 2]
    ck.close()


@pytest.mark.parametrize("keep", [0, -1, None, 2.0])
def test_keep_must_be_a_positive_integer(tmp_path, keep):
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path / "ckpt", keep=keep)
