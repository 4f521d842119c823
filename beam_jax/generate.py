"""Autoregressive generation with a preallocated KV cache, compiled whole: one call per `generate`.

Matches `transformers`' `generate` conventions: left padding through `attention_mask`, sequences that hit
an end-of-sequence token continue with the pad token, greedy by default, sampling with temperature,
top-k and top-p.

The model is split once per call into its graph definition (static) and its state (arrays, passed to the
compiled function and only read), and one jitted function runs the prefill and the whole decode loop
(`lax.while_loop`, stopping early when every sequence has ended). So a generation costs one dispatch, no host
round trip per token, and no copy or write-back of the model's state. On the CPU (AVX2, AVX512-BF16, AMX builds) the
bf16 dense layers' kernels are also passed packed (`decode_packs`: made once per model, kept while it lives) for the
decode steps' products, as are the bf16 experts (`packed_experts`, impl="kernel"); the decode steps' attention runs
on the decode-attention kernel (`beam_jax.decode_attention`, `attention.decode_kernels`). The model's large arrays
and the packed copies are moved onto 2 MiB pages once (`beam_jax.hugepages`: a step streams them, faster over huge
pages). The KV cache length is bucketed
(`cache_bucket`), and `max_new_tokens`, the pad token and a hook's knobs (BEAM's tau) are traced, so changing
them within a bucket does not recompile. `generate_reference` is the plain step-by-step loop (one forward per
token, a host round trip each) that the tests hold the compiled path to.
"""

from __future__ import annotations

import math
import weakref
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import hugepages as _hp
from . import packed_experts as _pe
from . import rows_matmul as _rm
from .attention import decode_kernels, packed_weights
from .moe import Experts, MaskRouter
from .routing import TOPK

__all__ = ["generate", "generate_reference", "sample_next", "greedy", "cache_bucket", "compiled_cache_size",
           "decode_packs"]

MIN_BUCKET = 64


def cache_bucket(n: int) -> int:
    """KV-cache slots for `n` positions: the next power of two, at least MIN_BUCKET (64)."""
    return max(MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def greedy(logits):
    """logits [B, V] -> [B] int32: `jnp.argmax` (the first maximum; the first NaN where there is one) as a max and a
    min over the positions that hit it: XLA:CPU's argmax (one variadic reduce) took 0.74 ms on [32, 8192] float32
    on the 2-core EPYC, these two plain reductions 0.19 ms (0.6 ms of a 32-row decode step)."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    pos = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    hit = (logits == m) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, pos, logits.shape[-1] - 1), axis=-1)


def sample_next(logits, rng, *, do_sample=False, temperature=1.0, top_k=0, top_p=1.0):
    """logits [B, V] (any float dtype; sampled in float32) -> next token ids [B] int32 (argmax, or a sample after the
    filters)."""
    if not do_sample:
        return greedy(logits)
    logits = logits.astype(jnp.float32) / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # smallest set whose probability reaches top_p: drop tokens whose preceding mass already exceeds it
        cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _is_eos(tokens, eos: tuple):
    """tokens [B] int32 -> [B] bool: whether each is one of the (static) end-of-sequence ids."""
    hit = jnp.zeros(tokens.shape, bool)
    for e in eos:
        hit = hit | (tokens == e)
    return hit


def _resolve(model, input_ids, attention_mask, eos_token_id, pad_token_id, max_new_tokens):
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"generate: input_ids must be [B, S], got shape {input_ids.shape}")
    mask = np.ones(input_ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != input_ids.shape:
        raise ValueError(f"generate: attention_mask {mask.shape} must match input_ids {input_ids.shape}")
    cfg = model.cfg
    eos = cfg.eos_token_id if eos_token_id is None else (
        tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (eos_token_id,))
    eos = tuple(int(e) for e in (eos or ()))
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None
                                                          else (eos[0] if eos else 0))
    return input_ids.astype(np.int32), mask.astype(np.int32), eos, int(pad)


class _Static:
    """A static jit argument compared by value whose hash never fails: a model's graph definition can hold
    unhashable static attributes (a loaded model's `beam_config` dict), so the hash falls back to a coarse one
    and equality decides."""

    def __init__(self, value):
        self.value = value
        try:
            self._hash = hash(value)
        except TypeError:
            self._hash = hash((type(value).__name__, getattr(value, "num_leaves", None),
                               len(getattr(value, "nodes", ()))))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _Static) and self._hash == other._hash and bool(self.value == other.value)


def _split_hook(hook):
    """A hook as (dynamic leaves, static rest): a pytree hook's array/number leaves (BEAM's tau) are traced so
    a new value does not recompile; anything else (a plain function) is static. A hook without
    leaves (`routing.TOPK`) is its treedef alone, so it compiles once too."""
    leaves, treedef = jax.tree_util.tree_flatten(hook)
    if all(isinstance(v, (int, float, np.number, np.ndarray, jax.Array)) and not isinstance(v, bool)
           for v in leaves):
        return [jnp.asarray(v) for v in leaves], (treedef, None)
    return [], (None, hook)


def _join_hook(leaves, static):
    treedef, hook = static.value
    return hook if treedef is None else jax.tree_util.tree_unflatten(treedef, leaves)


# ---- packed decode projections -----------------------------------------------------------------------------------

_PACKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (kernels packed, {path: PackedWeight})


def _path_key(path) -> str:
    return "/".join(str(p) for p in path)


def _packable(node) -> bool:
    if not isinstance(node, nnx.Linear):
        return False
    w = node.kernel[...]
    return (w.ndim == 2 and w.dtype == jnp.bfloat16 and w.shape[0] % 2 == 0
            and (node.dtype is None or jnp.dtype(node.dtype) == jnp.bfloat16))


def _packable_experts(node) -> bool:
    if not isinstance(node, Experts):
        return False
    ws = [p[...] for p in (node.w_gate, node.w_up, node.w_down)]
    return all(w.ndim == 3 and w.dtype == jnp.bfloat16 for w in ws) and ws[0].shape[1] % 2 == 0 == ws[0].shape[2] % 2


def _to_pack(model, packed: dict) -> list:
    """[(path key, arrays to pack, packer)] of what `decode_packs` packs in `model`; packed: what it packed last time
    (experts packed then stay packed: the memory check would now count their own copy against them)."""
    out = []
    experts = [(k, n) for k, n in ((_path_key(p), n) for p, n in nnx.iter_graph(model)) if _packable_experts(n)]
    if experts and _pe.packing_available():
        nbytes = sum(int(p[...].size) * 2 for _, n in experts for p in (n.w_gate, n.w_up, n.w_down))
        if any(k in packed for k, _ in experts) or _pe.fits_in_memory(nbytes):
            out += [(k, (n.w_gate[...], n.w_up[...], n.w_down[...]), _pe.pack_experts) for k, n in experts]
    pack = jax.jit(_rm.pack_weight)
    for path, node in nnx.iter_graph(model):  # one pass: this runs at every `generate` call (the cache check)
        if _packable(node):
            out.append((_path_key(path), (node.kernel[...],), pack))
        elif isinstance(node, MaskRouter) and node.kernel[...].ndim == 2:
            out.append((_path_key(path), (node.kernel[...],), _transpose))
    return out


_transpose = jax.jit(jnp.transpose)  # a mask router's kernel [d, E] -> [E, d] (`MaskRouter.at` gathers its rows)


def decode_packs(model) -> dict:
    """{module path: packed copy} that `generate` multiplies through the packed targets, or {} where packing is off
    (`rows_matmul.packing_available`: the AVX2, AVX512-BF16 and AMX CPU builds; ``BEAM_JAX_PACKED=0``):
    - every bfloat16 `nnx.Linear` (attention projections, dense MLPs, the LM head, routers held in bfloat16): a
      `rows_matmul.PackedWeight` (for Qwen3-30B-A3B about 4% of the model);
    - every bfloat16 `moe.Experts` (`packed_experts.packing_available`): a `packed_experts.PackedExperts` (as large
      as the experts; only where that copy leaves half of the available memory, `packed_experts.fits_in_memory`;
      ``BEAM_JAX_PACKED_EXPERTS=0`` turns it off). Elsewhere the expert kernel reads the experts in place;
    - every BEAM `moe.MaskRouter`: its kernel transposed, [E, d] float32 (`MaskRouter.at` reads the rows of a decode
      step's candidates alone).
    Packed once per model and kept while the model lives, packed again when an array has changed."""
    if not _rm.packing_available():
        return {}
    cached = _PACKS.get(model)
    items = _to_pack(model, cached[1] if cached is not None else {})
    arrays = tuple(a for _, arrs, _ in items for a in arrs)
    if cached is not None and len(cached[0]) == len(arrays) and all(a is b for a, b in zip(cached[0], arrays)):
        return cached[1]
    packs = {key: packer(*arrs) for key, arrs, packer in items}
    _PACKS[model] = (arrays, packs)
    return packs


def _packs_by_module(model, packs: dict) -> dict:
    """{path: packed copy} -> {id(module): packed copy} for the (merged, traced) model."""
    if not packs:
        return {}
    return {id(node): packs[key] for key, node in ((_path_key(p), n) for p, n in nnx.iter_graph(model))
            if key in packs and isinstance(node, (nnx.Linear, Experts, MaskRouter))}


@partial(jax.jit, static_argnames=("graphdef", "hook_static", "impl", "max_len", "eos", "do_sample", "temperature",
                                   "top_k", "top_p"))
def _generate_compiled(state, packs, input_ids, mask, max_new_tokens, pad, rng, hook_leaves, *, graphdef,
                       hook_static, impl, max_len, eos, do_sample, temperature, top_k, top_p):
    """Prefill + decode loop. input_ids, mask [B, S] int32; max_new_tokens, pad int32 scalars and rng (the
    PRNG key of the seed), all traced; packs: `decode_packs`.
    Returns (tokens [B, max_len - S] int32, pad-filled past the end; n [] int32: how many were generated)."""
    model = nnx.merge(graphdef.value, state)
    with packed_weights(_packs_by_module(model, packs)), decode_kernels():
        return _generate_traced(model, input_ids, mask, max_new_tokens, pad, rng, hook_leaves, hook_static=hook_static,
                                impl=impl, max_len=max_len, eos=eos, do_sample=do_sample, temperature=temperature,
                                top_k=top_k, top_p=top_p)


def _generate_traced(model, input_ids, mask, max_new_tokens, pad, rng, hook_leaves, *, hook_static, impl, max_len,
                     eos, do_sample, temperature, top_k, top_p):
    hook = _join_hook(hook_leaves, hook_static)
    B, S = input_ids.shape
    slots = max_len - S
    sample = partial(sample_next, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    cache = model.init_cache(B, max_len)
    # greedy steps take the LM head's logits as they are (bfloat16: the same argmax, no [B, V] conversion a step)
    out = model(input_ids, attention_mask=mask, cache=cache, mask_hook=hook, impl=impl, logits_to_keep=1,
                fresh_cache=True, float32_logits=do_sample)
    rng, sub = jax.random.split(rng)
    first = sample(out.logits[:, -1], sub)
    tokens = jnp.full((B, slots), pad, jnp.int32).at[:, 0].set(first)
    done = _is_eos(first, eos)
    ones = jnp.ones((B, 1), jnp.int32)

    def cond(carry):
        n, _, _, done, _ = carry
        return (n < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        n, cache, tokens, done, rng = carry
        prev = jax.lax.dynamic_index_in_dim(tokens, n - 1, axis=1, keepdims=True)
        step = model(prev, attention_mask=ones, cache=cache, mask_hook=hook, impl=impl, float32_logits=do_sample)
        rng, sub = jax.random.split(rng)
        nxt = jnp.where(done, pad, sample(step.logits[:, -1], sub))
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, n, axis=1)
        return n + 1, step.cache, tokens, done | _is_eos(nxt, eos), rng

    n, _, tokens, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out.cache, tokens, done, rng))
    return tokens, n


def compiled_cache_size() -> int:
    """How many compiled variants of the generation function exist (for tests: no recompiles)."""
    return _generate_compiled._cache_size()


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_token_id=None, pad_token_id=None, mask_hook=TOPK, impl: str = "kernel"):
    """input_ids [B, S] int (left-padded when `attention_mask` [B, S] has zeros) -> [B, S + new] int32.

    Greedy unless `do_sample` (then temperature, top-k and top-p filters, seeded by `seed`). Stops early when
    every sequence has produced an end-of-sequence token (`eos_token_id`: an id, a list, () for none; default
    the model config's); ended sequences continue with `pad_token_id` (default the config's, else the first
    eos id, else 0). impl="kernel" runs the experts through `beam_jax.masked_moe` (dropped pairs are skipped).
    The whole generation is one compiled call (see the module docstring); `generate_reference` is the same
    computation one forward at a time.
    """
    input_ids, mask, eos, pad = _resolve(model, input_ids, attention_mask, eos_token_id, pad_token_id,
                                         max_new_tokens)
    if max_new_tokens == 0:
        return jnp.asarray(input_ids)
    B, S = input_ids.shape
    graphdef, state = nnx.split(model)
    hook_leaves, hook_static = _split_hook(mask_hook)
    packs = decode_packs(model)
    _hp.collapse_once(model, (state, packs))  # huge pages under the weights a decode step streams, once per model
    tokens, n = _generate_compiled(
        state, packs, jnp.asarray(input_ids), jnp.asarray(mask), jnp.int32(max_new_tokens),
        jnp.int32(pad), jax.random.PRNGKey(seed), hook_leaves, graphdef=_Static(graphdef),
        hook_static=_Static(hook_static), impl=impl, max_len=cache_bucket(S + max_new_tokens), eos=eos,
        do_sample=bool(do_sample), temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    n = int(n)
    return jnp.concatenate([jnp.asarray(input_ids), tokens[:, :n]], axis=1)


@partial(nnx.jit, static_argnames=("mask_hook", "impl"))
def _forward(model, input_ids, attention_mask, cache, mask_hook, impl):
    out = model(input_ids, attention_mask=attention_mask, cache=cache, mask_hook=mask_hook, impl=impl)
    return out.logits[:, -1], out.cache


def generate_reference(model, input_ids, attention_mask=None, *, max_new_tokens: int = 32, do_sample: bool = False,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                       eos_token_id=None, pad_token_id=None, mask_hook=TOPK, impl: str = "kernel",
                       use_cache: bool = True):
    """`generate`'s semantics as a plain Python loop: one forward per token and a host round trip each (slow;
    the obviously-right reference). use_cache=False runs every step as a full forward over the whole prefix,
    without a KV cache. Same arguments and result as `generate`."""
    input_ids, mask, eos, pad = _resolve(model, input_ids, attention_mask, eos_token_id, pad_token_id,
                                         max_new_tokens)
    if max_new_tokens == 0:
        return jnp.asarray(input_ids)
    B, S = input_ids.shape
    rng = jax.random.PRNGKey(seed)
    if use_cache:
        cache = model.init_cache(B, S + max_new_tokens)
        logits, cache = _forward(model, jnp.asarray(input_ids), jnp.asarray(mask), cache, mask_hook, impl)
    else:
        logits = model(jnp.asarray(input_ids), attention_mask=jnp.asarray(mask), mask_hook=mask_hook,
                       impl=impl).logits[:, -1]
    seq, seq_mask = input_ids, mask
    tokens = []
    done = np.zeros(B, bool)
    for _ in range(max_new_tokens):
        rng, sub = jax.random.split(rng)
        nxt = np.asarray(sample_next(logits, sub, do_sample=do_sample, temperature=temperature, top_k=top_k,
                                     top_p=top_p))
        nxt = np.where(done, pad, nxt).astype(np.int32)
        tokens.append(nxt)
        done |= np.isin(nxt, eos)
        if done.all() or len(tokens) == max_new_tokens:
            break
        if use_cache:
            logits, cache = _forward(model, jnp.asarray(nxt[:, None]), jnp.ones((B, 1), jnp.int32), cache,
                                     mask_hook, impl)
        else:
            seq = np.concatenate([seq, nxt[:, None]], axis=1)
            seq_mask = np.concatenate([seq_mask, np.ones((B, 1), np.int32)], axis=1)
            logits = model(jnp.asarray(seq), attention_mask=jnp.asarray(seq_mask), mask_hook=mask_hook,
                           impl=impl).logits[:, -1]
    return jnp.concatenate([jnp.asarray(input_ids), jnp.asarray(np.stack(tokens, 1), jnp.int32)], axis=1)
