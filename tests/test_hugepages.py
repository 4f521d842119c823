"""beam_jax.hugepages: large CPU buffers moved onto 2 MiB pages with their values unchanged, small ones and
non-arrays left alone, the switch and the once-per-owner cache; `generate` gives the same tokens either way."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beam_jax import hugepages as hp


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address` (kB, /proc/self/smaps)."""
    found, kib = False, 0
    for line in open("/proc/self/smaps"):
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            found = int(m.group(1), 16) <= address < int(m.group(2), 16)
        elif found and line.startswith("AnonHugePages:"):
            kib = int(line.split()[1])
    return kib


def _collapse_works() -> bool:
    probe = jnp.asarray(np.random.default_rng(0).standard_normal(3 * hp.PAGE // 4, dtype=np.float32))
    return hp.collapse(probe) > 0


def _needs_collapse():
    if not hp.available():
        pytest.skip("transparent huge pages unavailable here (not Linux, 'never', or BEAM_JAX_HUGEPAGES=0)")
    if not _collapse_works():
        pytest.skip("the kernel refuses MADV_COLLAPSE here (Linux < 6.1 or no free huge pages)")


def test_aligned_interior():
    P = hp.PAGE
    assert hp.aligned_interior(P, 3 * P) == (P, 3 * P)
    assert hp.aligned_interior(P + 64, 3 * P) == (2 * P, 2 * P)  # the partial pages at both ends left out
    assert hp.aligned_interior(P + 64, P) == (2 * P, 0)  # no whole page inside


def test_collapse_moves_a_large_buffer_onto_huge_pages_and_keeps_its_values():
    _needs_collapse()
    values = np.random.default_rng(1).standard_normal((1024, 3000), dtype=np.float32)  # 12 MB, random
    x = jnp.asarray(values)
    address = x.addressable_data(0).unsafe_buffer_pointer()
    start, length = hp.aligned_interior(address, x.nbytes)
    assert hp.collapse({"w": x, "step": 3}) == length > 0  # non-array leaves are skipped
    assert _anon_huge_kib(address + x.nbytes // 2) >= length // 1024
    np.testing.assert_array_equal(np.asarray(x), values)
    np.testing.assert_allclose(np.asarray(x @ x[:3000].T), values @ values[:3000].T, rtol=2e-5, atol=2e-3)


def test_small_arrays_and_the_switch(monkeypatch):
    _needs_collapse()
    small = jnp.asarray(np.random.default_rng(2).standard_normal(hp.MIN_BYTES // 4 - 16, dtype=np.float32))
    assert hp.collapse([small, jax.random.key(0), "not an array"]) == 0  # a PRNG key (extended dtype) is skipped
    big = jnp.asarray(np.random.default_rng(3).standard_normal(4 * hp.PAGE // 4, dtype=np.float32))
    monkeypatch.setenv("BEAM_JAX_HUGEPAGES", "0")
    assert not hp.available() and hp.collapse([big]) == 0


def test_collapse_once_per_owner_and_again_for_new_arrays():
    _needs_collapse()

    class Owner:
        pass

    rng = np.random.default_rng(4)
    owner, a = Owner(), jnp.asarray(rng.standard_normal(4 * hp.PAGE // 4, dtype=np.float32))
    assert hp.collapse_once(owner, [a]) > 0
    assert hp.collapse_once(owner, [a]) == 0  # the same arrays: nothing to do
    b = jnp.asarray(rng.standard_normal(4 * hp.PAGE // 4, dtype=np.float32))
    assert hp.collapse_once(owner, [a, b]) > 0  # b is new
    assert hp.collapse_once(Owner(), [a]) > 0  # another owner collapses for itself


def test_generate_gives_the_same_tokens_with_and_without_huge_pages(tmp_path, monkeypatch):
    """A tiny Qwen3-MoE with a 20000-word vocabulary (its embedding and LM head over 4 MB, so they move), random
    mask routers; greedy Top-K and BEAM tokens of `generate` with huge pages off and on, a fresh model each."""
    import beam_jax
    from flax import nnx
    from hf_tiny import make_tiny

    from beam_jax.routing import BeamHook, TopKHook

    make_tiny("qwen3_moe", tmp_path, vocab_size=20000)
    rs = np.random.RandomState(5)
    prompt = rs.randint(3, 20000, size=(2, 12)).astype(np.int32)
    out, moved_bytes = {}, []
    real = hp.collapse_once
    monkeypatch.setattr(hp, "collapse_once", lambda *a, **k: moved_bytes.append(real(*a, **k)) or moved_bytes[-1])
    for flag in ("0", "1"):
        monkeypatch.setenv("BEAM_JAX_HUGEPAGES", flag)
        moved_bytes.clear()
        model = beam_jax.load_pretrained(tmp_path)
        for block in (layer.mlp for layer in model.layers if layer.is_moe):
            k = block.mask_router.kernel
            k[...] = np.random.RandomState(6).normal(0, 2.0, k[...].shape).astype(np.float32)
        big = [x for x in jax.tree.leaves(nnx.state(model)) if x.nbytes >= hp.MIN_BYTES]
        assert big, "no array large enough to move"
        out[flag] = [np.asarray(beam_jax.generate(model, prompt, max_new_tokens=6, eos_token_id=(), mask_hook=h))
                     for h in (TopKHook(), BeamHook(0.5))]
        assert len(moved_bytes) == 2  # each generate call asks; the second finds the same arrays done
        if flag == "0":  # off: nothing asked of the kernel (whether malloc's memory has huge pages is its own affair)
            assert moved_bytes == [0, 0]
        elif _collapse_works():
            assert moved_bytes[0] >= hp.PAGE and moved_bytes[1] == 0, moved_bytes
            address = big[0].addressable_data(0).unsafe_buffer_pointer()
            assert _anon_huge_kib(address + big[0].nbytes // 2) > 0
    for a, b in zip(out["0"], out["1"]):
        np.testing.assert_array_equal(a, b)
