"""BEAM training steps on a Qwen3-30B-A3B-shaped reduced model, once per expert path, and what XLA compiled.

    python bench/gpu_train.py [--steps 20] [--paths auto] [--shape qwen3|tiny] [--out DIR]
    python bench/gpu_train.py --selftest          # the HLO check on single expert calls (CPU is enough)
    python bench/gpu_train.py --dry-run           # --shape tiny --steps 2: the whole flow in seconds on a CPU

Each path runs in its own process, so the peak memory is that path's and a path that runs out of memory or
time does not take the others with it. The processes start side by side (--jobs) and compile in parallel;
their steps are timed one path at a time. Each does:

1. the model: Qwen3-30B-A3B's layer shapes (d 2048, 32 query / 4 KV heads of 128, expert f 768, E 128, K 8,
   per-head qk norm) with fewer layers and a smaller vocabulary (--layers, --vocab), random weights, bfloat16
   on GPU (float32 on CPU); mask routers drawn so that about half of the routed pairs are kept;
2. one BEAM training step (mask routers trainable, the rest frozen, ``beam_jax.trainer.Trainer``), lowered
   and compiled ahead of time; the compiled HLO is searched for an *E-fold expert dot*: a dot (or cuBLAS /
   Triton GEMM) over the expert weights that does at least ``--fold-min`` times the work of the routed pairs
   (2 * tokens * K * d * f per projection), e.g. every expert on every token (the dense path), or a
   ``ragged_dot`` lowered to a zero-padded dense product over all E groups;
3. ``--steps`` steps after one warm-up step: tokens/s (median step), peak memory (the device's
   ``peak_bytes_in_use`` on GPU, the process's peak RSS on CPU) and XLA's own memory estimate.

The expert paths are the names of ``beam_jax.experts.EXPERT_PATHS`` plus the model's ``"kernel"`` path
(``beam_jax.masked_moe``), so a path added there is benchmarked with no change here; a path that cannot be
differentiated is reported as such, not as a failure of the run. The reference path gathers [T, K, d, f]
weights: it runs on fewer tokens (the row says how many). A path whose compiled step would take longer than
its time budget (estimated from its dot FLOPs) runs fewer steps, and says so.

Writes DIR/gpu_train.json (one row per path) and, per path, DIR/hlo_<path>.txt (the compiled step's HLO).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# --- HLO text: dots and what they cost ----------------------------------------------------------------------

_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_COMP_RE = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->\s*.*\{\s*$")
_CALL_ATTR_RE = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|called_computations)="
                           r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP_RE = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_GEMM_TARGET_RE = re.compile(r"gemm|matmul", re.IGNORECASE)


def _dims(s: str) -> tuple[int, ...]:
    s = s.strip()
    if not s:
        return ()
    out = []
    for tok in s.split(","):
        tok = tok.strip().lstrip("<=").strip()
        out.append(int(tok) if tok.isdigit() else 0)
    return tuple(out)


def _first_array(type_str: str):
    m = _ARRAY_RE.search(type_str)
    return (m.group(1), _dims(m.group(2))) if m else (None, ())


def _balanced(s: str, start: int) -> int:
    """Index of the bracket closing the one at s[start]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(s)):
        c = s[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i
    return len(s) - 1


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def _parse_instruction(line: str):
    """'%name = type opcode(operands), attrs' -> (name, type, opcode, [operand strings], attrs) or None."""
    body = line.strip()
    if body.startswith("ROOT "):
        body = body[5:]
    if " = " not in body:
        return None
    name, rhs = body.split(" = ", 1)
    name = name.strip().lstrip("%")
    if not re.fullmatch(r"[\w.\-]+", name):
        return None
    rhs = rhs.strip()
    if rhs.startswith("("):  # tuple type
        end = _balanced(rhs, 0)
        type_str, rest = rhs[: end + 1], rhs[end + 1:].strip()
    else:
        m = re.match(r"(\S+)\s+(.*)$", rhs)
        if not m:
            return None
        type_str, rest = m.group(1), m.group(2)
    m = re.match(r"([\w\-$]+)\(", rest)
    if not m:
        return None
    opcode = m.group(1)
    close = _balanced(rest, m.end() - 1)
    operands = _split_top(rest[m.end(): close])
    return name, type_str, opcode, operands, rest[close + 1:]


def _attr_dims(attrs: str, key: str) -> tuple[int, ...]:
    m = re.search(rf"\b{key}=\{{([^}}]*)\}}", attrs)
    return _dims(m.group(1)) if m else ()


def _json_dims(attrs: str, key: str) -> tuple[int, ...]:
    m = re.search(rf'"{key}"\s*:\s*\[([^\]]*)\]', attrs)
    if not m:
        return ()
    return tuple(int(t.strip().strip('"')) for t in m.group(1).split(",") if t.strip().strip('"').isdigit())


def parse_hlo_dots(hlo_text: str) -> list[dict]:
    """Every matrix product in an HLO module's text: ``dot``, ``ragged-dot``, and GEMM custom calls (cuBLAS,
    cuBLASLt), also inside fused computations (Triton GEMM fusions hold a plain ``dot``).

    Each: name, kind (dot | ragged-dot | custom-call target), computation, dtype, out / lhs / rhs dims,
    lhs_contracting / lhs_batch dims, flops (2 * output elements * contracted size, one execution), and
    executions (how often the enclosing computation runs: the product of known while-loop trip counts on
    the way from ENTRY; 1 where unknown), so executed flops = flops * executions.
    """
    shapes: dict[str, str] = {}
    comp_of: dict[str, str] = {}
    edges: dict[str, list[tuple[str, int]]] = {}
    entry = None
    comp = None
    raw = []
    for line in hlo_text.splitlines():
        m = _COMP_RE.match(line)
        if m and "=" not in line.split("(", 1)[0]:
            comp = m.group(2)
            if m.group(1):
                entry = comp
            # parameters declared in the header: 'param_0: f32[48,96]'
            if m.group(3):
                for p in _split_top(m.group(3)[1:-1]):
                    if ":" in p:
                        pname, ptype = p.split(":", 1)
                        shapes.setdefault(pname.strip().lstrip("%"), ptype.strip())
            continue
        if line.strip() == "}":
            comp = None
            continue
        ins = _parse_instruction(line)
        if ins is None:
            continue
        name, type_str, opcode, operands, attrs = ins
        shapes[name] = type_str
        comp_of[name] = comp
        trip = 1
        if opcode == "while":
            t = _TRIP_RE.search(attrs)
            trip = int(t.group(1)) if t else 1
        for key, val in _CALL_ATTR_RE.findall(attrs):
            for callee in re.findall(r"%?([\w.\-]+)", val):
                edges.setdefault(comp, []).append((callee, trip if key == "body" else 1))
        if opcode in ("dot", "ragged-dot") or (opcode == "custom-call" and _GEMM_TARGET_RE.search(
                (re.search(r'custom_call_target="([^"]*)"', attrs) or [None, ""])[1])):
            raw.append((name, type_str, opcode, operands, attrs, comp))

    # executions of each computation: DFS from ENTRY (max over call paths)
    execs: dict[str, int] = {}
    if entry is not None:
        stack = [(entry, 1)]
        while stack:
            c, n = stack.pop()
            if execs.get(c, 0) >= n:
                continue
            execs[c] = n
            for callee, f in edges.get(c, []):
                stack.append((callee, n * f))

    def operand_dims(op: str):
        t, d = _first_array(op)  # newer printers put the operand's type in front of its name
        if t is not None:
            return t, d
        ref = re.search(r"%?([\w.\-]+)\s*$", op)
        return _first_array(shapes.get(ref.group(1), "")) if ref else (None, ())

    dots = []
    for name, type_str, opcode, operands, attrs, comp in raw:
        dtype, out = _first_array(type_str)
        _, lhs = operand_dims(operands[0]) if operands else (None, ())
        _, rhs = operand_dims(operands[1]) if len(operands) > 1 else (None, ())
        if opcode == "custom-call":
            kind = re.search(r'custom_call_target="([^"]*)"', attrs).group(1)
            lc, lb = _json_dims(attrs, "lhs_contracting_dimensions"), _json_dims(attrs, "lhs_batch_dimensions")
        else:
            kind = opcode
            lc, lb = _attr_dims(attrs, "lhs_contracting_dims"), _attr_dims(attrs, "lhs_batch_dims")
        contract = math.prod(lhs[i] for i in lc if i < len(lhs)) if lhs else 0
        flops = 2 * math.prod(out) * contract if out else 0
        dots.append({"name": name, "kind": kind, "computation": comp, "dtype": dtype, "out": list(out),
                     "lhs": list(lhs), "rhs": list(rhs), "lhs_contracting": list(lc), "lhs_batch": list(lb),
                     "contracted": contract, "flops": flops, "executions": execs.get(comp, 1)})
    return dots


def expert_dot_report(hlo_text: str, *, num_experts: int, top_k: int, d_model: int, d_ff: int, tokens: int,
                      fold_min: float = 1.5) -> dict:
    """Does the compiled HLO hold an E-fold expert dot?

    A dot is an *expert dot* when it contracts over d, f, E*d or E*f and one of its operands or its output has
    a dimension of E, E*d or E*f (the expert weights, stacked or flattened), or it runs in a loop over E. Its
    *fold* is its executed flops over the routed work of one projection, 2 * tokens * K * d * f. The dense path
    has fold E/K, a ragged_dot lowered to a zero-padded dense product fold E, a real grouped GEMM or the
    per-pair gather about 1. Flagged: expert dots with fold >= fold_min.
    """
    E, K, d, f = num_experts, top_k, d_model, d_ff
    routed = 2 * tokens * K * d * f
    e_dims = {E, E * d, E * f}
    dots = parse_hlo_dots(hlo_text)
    flagged, expert = [], []
    for dt in dots:
        dims = set(dt["out"]) | set(dt["lhs"]) | set(dt["rhs"])
        looped = dt["executions"] > 1 and dt["executions"] % E == 0
        if dt["contracted"] in {d, f, E * d, E * f} and (dims & e_dims or looped):
            fold = dt["flops"] * dt["executions"] / routed if routed else 0.0
            row = {k: dt[k] for k in ("name", "kind", "dtype", "out", "lhs", "rhs", "executions")}
            row["fold"] = round(fold, 3)
            expert.append(row)
            if fold >= fold_min:
                flagged.append(row)
    kinds = sorted({dt["kind"] for dt in dots})
    targets = sorted(set(re.findall(r'custom_call_target="([^"]*)"', hlo_text)))
    return {
        "e_fold_dense_dot": bool(flagged),
        "max_fold": max((r["fold"] for r in expert), default=0.0),
        "fold_min": fold_min,
        "routed_flops_per_projection": routed,
        "flagged": sorted(flagged, key=lambda r: -r["fold"])[:12],
        "num_flagged": len(flagged),
        "num_expert_dots": len(expert),
        "num_dots": len(dots),
        "dot_kinds": kinds,
        "has_ragged_dot": any(dt["kind"] == "ragged-dot" for dt in dots),
        "custom_call_targets": targets,
        "dot_flops_executed": sum(dt["flops"] * dt["executions"] for dt in dots),
    }


# --- shapes ---------------------------------------------------------------------------------------------------

SHAPES = {
    # Qwen3-30B-A3B's layer: d 2048, 32 q heads / 4 KV heads of 128, qk norm per head, experts f 768, E 128, K 8
    "qwen3": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                  moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, rope_theta=1e6,
                  layers=2, vocab=32000, batch=4, seq=1024),
    # seconds on a CPU; no dimension equals another's role (so the HLO check cannot match by accident)
    "tiny": dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                 moe_intermediate_size=64, num_experts=16, num_experts_per_tok=2, rope_theta=1e6,
                 layers=2, vocab=500, batch=4, seq=40),
}


def model_config(shape: str, layers: int, vocab: int, seq: int):
    from beam_jax.config import ModelConfig

    s = SHAPES[shape]
    return ModelConfig(
        architecture="Qwen3MoeForCausalLM", vocab_size=vocab, hidden_size=s["hidden_size"],
        num_hidden_layers=layers, rms_norm_eps=1e-6, num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"], head_dim=s["head_dim"], qk_norm="head",
        rope_theta=s["rope_theta"], max_position_embeddings=max(seq, 4096), moe_layers=(True,) * layers,
        num_experts=s["num_experts"], num_experts_per_tok=s["num_experts_per_tok"],
        moe_intermediate_size=s["moe_intermediate_size"], norm_topk_prob=True)


def discover_paths() -> list[str]:
    """The expert paths a training step can take: experts.EXPERT_PATHS, then the model's "kernel" path."""
    from beam_jax.experts import EXPERT_PATHS

    names = list(EXPERT_PATHS)
    if "kernel" not in names:
        names.append("kernel")
    return names


def peak_memory() -> tuple[int, str]:
    import resource

    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


# --- one path (child process) ---------------------------------------------------------------------------------


def _write(path: Path | None, row: dict):
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, indent=1) + "\n")
        tmp.replace(path)


def run_path(args) -> dict:
    import types

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from beam_jax.model import MoECausalLM
    from beam_jax.routing import BeamHook
    from beam_jax.trainer import LossConfig, Trainer

    t_start = time.perf_counter()
    json_path = Path(args.json) if args.json else None
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(args.dtype or ("bfloat16" if on_gpu else "float32"))
    s = SHAPES[args.shape]
    E, K, d, f = s["num_experts"], s["num_experts_per_tok"], s["hidden_size"], s["moe_intermediate_size"]
    B, S = args.batch, args.seq
    path = args.child
    row = {"path": path, "status": "started", "backend": jax.default_backend(),
           "device": jax.devices()[0].device_kind, "dtype": dtype.name, "shape": args.shape,
           "layers": args.layers, "vocab": args.vocab, "d": d, "f": f, "E": E, "K": K}
    if path == "reference":  # gathers [T, K, d, f] per projection (and keeps them for the backward pass)
        per_token = 3 * 2 * K * d * f * dtype.itemsize
        cap_tokens = int(args.mem_cap_gb * 2**30 // per_token)
        if B * S > cap_tokens:
            S = max(8, min(S, cap_tokens) // 8 * 8)
            B = max(1, min(B, cap_tokens // S))
            row["note"] = (f"fewer tokens ({B}x{S}): the gather path materialises [T, K, d, f] "
                           f"(~{per_token / 2**20:.0f} MiB per token, cap {args.mem_cap_gb:g} GiB)")
    T = B * S
    row.update(batch=B, seq=S, tokens=T)

    cfg = model_config(args.shape, args.layers, args.vocab, S)
    model = MoECausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    rs = np.random.RandomState(0)
    for layer in model.layers:  # mask logits ~ N(0, 1): about half of the routed pairs kept
        mr = layer.mlp.mask_router
        mr.kernel[...] = jnp.asarray(rs.standard_normal(mr.kernel.shape) / math.sqrt(d), jnp.float32)
    tc = types.SimpleNamespace(lr=1e-3, warmup_steps=2, steps=max(args.steps, 3), final_lr_fraction=0.1,
                               grad_clip=1.0, weight_decay=0.0, grad_accum=1, remat=False)
    tr = Trainer(model, "mask", tc, LossConfig(hook=BeamHook(0.5, train=True), impl=path))
    ids = rs.randint(3, args.vocab, size=(B, S + 1)).astype(np.int32)
    batch = tr._put({"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((B, S), np.float32)})
    beta = jnp.float32(0.1)

    t0 = time.perf_counter()
    try:
        compiled = tr._step.lower(tr.params, tr.opt_state, tr.frozen, batch, beta).compile()
    except Exception as err:  # noqa: BLE001 - a path that cannot be differentiated or compiled is a result
        msg = " ".join(str(err).split())[:400]
        unsupported = isinstance(err, TypeError) or "differentiat" in msg.lower() or "jvp" in msg.lower()
        row.update(status="unsupported" if unsupported else "compile_failed",
                   error=f"{type(err).__name__}: {msg}")
        _write(json_path, row)
        return row
    row["compile_s"] = time.perf_counter() - t0
    hlo = compiled.as_text()
    if args.out:
        (Path(args.out) / f"hlo_{path}.txt").write_text(hlo)
    rep = expert_dot_report(hlo, num_experts=E, top_k=K, d_model=d, d_ff=f, tokens=T, fold_min=args.fold_min)
    row["hlo"] = rep
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        row["xla_flops"] = float(ca.get("flops", 0.0)) if ca else None
    except Exception:  # noqa: BLE001 - not every backend reports it
        row["xla_flops"] = None
    try:
        ma = compiled.memory_analysis()
        row["xla_memory"] = {k: int(getattr(ma, k)) for k in (
            "temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "peak_memory_in_bytes") if hasattr(ma, k)}
    except Exception:  # noqa: BLE001
        row["xla_memory"] = None
    step_flops = max(rep["dot_flops_executed"], row["xla_flops"] or 0.0)
    rate = args.assume_flops_per_s or (4e14 if on_gpu else 2e10)
    est = step_flops / rate
    row.update(status="compiled", step_flops=step_flops, est_step_s=est)
    _write(json_path, row)

    if args.go_file:  # compiled side by side with the other paths; timed one at a time
        t_wait = time.perf_counter()
        while not os.path.exists(args.go_file):
            if time.perf_counter() - t_wait > args.wait_s:
                row.update(status="no_turn", error=f"not given a turn to time within {args.wait_s:g} s")
                _write(json_path, row)
                return row
            time.sleep(0.05)
        row["waited_s"] = time.perf_counter() - t_wait
    steps = args.steps
    if est * (steps + 1) > args.budget_s:
        steps = max(0, int(args.budget_s / est) - 1) if est > 0 else steps
        row["steps_cut"] = (f"estimated {est:.2f} s per step ({step_flops:.3g} FLOP at {rate:.2g} FLOP/s): "
                            f"{steps} of {args.steps} steps fit the {args.budget_s:g} s budget")
    params, opt, frozen = tr.params, tr.opt_state, tr.frozen
    times, losses = [], []
    t_loop = time.perf_counter()
    if steps > 0 or est <= args.budget_s:
        t = time.perf_counter()
        params, opt, metrics = compiled(params, opt, frozen, batch, beta)  # warm-up
        jax.block_until_ready(metrics["loss"])
        row["first_step_s"] = time.perf_counter() - t
        losses.append(float(metrics["loss"]))
        kept = np.asarray(metrics.get("experts_per_layer", np.nan))
        row["experts_per_token"] = float(np.mean(kept)) if kept.size else None
        for _ in range(steps):
            if time.perf_counter() - t_loop > args.budget_s:
                row["steps_cut"] = f"time budget {args.budget_s:g} s reached after {len(times)} steps"
                break
            t = time.perf_counter()
            params, opt, metrics = compiled(params, opt, frozen, batch, beta)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t)
            losses.append(float(metrics["loss"]))
    row["steps_run"] = len(times)
    if times:
        med = sorted(times)[len(times) // 2]
        row.update(step_s_median=med, step_s_mean=sum(times) / len(times), tokens_per_s=T / med,
                   dot_tflops_per_s=rep["dot_flops_executed"] / med / 1e12)
    row["losses"] = [round(v, 5) for v in losses]
    row["finite"] = bool(all(math.isfinite(v) for v in losses))
    row["peak_memory_bytes"], row["peak_memory_source"] = peak_memory()
    row["wall_s"] = time.perf_counter() - t_start
    row["status"] = "ok" if row["finite"] else "nonfinite_loss"
    _write(json_path, row)
    return row


# --- self-test of the HLO check -------------------------------------------------------------------------------


def selftest(verbose=True) -> dict:
    """The check on single expert calls: the dense path must be flagged, the per-pair reference must not."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from beam_jax.experts import EXPERT_PATHS

    T, d, f, E, K = 40, 96, 64, 16, 2
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((T, d)), jnp.float32)
    wg = jnp.asarray(rng.standard_normal((E, d, f)), jnp.float32)
    wd = jnp.asarray(rng.standard_normal((E, f, d)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, E, (T, K)), jnp.int32)
    w = jnp.asarray(rng.random((T, K)), jnp.float32)
    out = {}
    for name, fn in EXPERT_PATHS.items():
        hlo = jax.jit(fn).lower(x, wg, wg, wd, ids, w).compile().as_text()
        rep = expert_dot_report(hlo, num_experts=E, top_k=K, d_model=d, d_ff=f, tokens=T)
        out[name] = {"e_fold_dense_dot": rep["e_fold_dense_dot"], "max_fold": rep["max_fold"],
                     "num_expert_dots": rep["num_expert_dots"]}
        if verbose:
            print(f"  {name:10s} E-fold dense dot: {rep['e_fold_dense_dot']!s:5s}  max fold {rep['max_fold']:6.2f}"
                  f"  expert dots {rep['num_expert_dots']}", flush=True)
    ok = out.get("dense", {}).get("e_fold_dense_dot") is True and \
        out.get("reference", {}).get("e_fold_dense_dot") is False
    return {"ok": ok, "backend": jax.default_backend(), "paths": out}


# --- parent: every path in its own process --------------------------------------------------------------------


def _child_cmd(args, path: str, json_path: Path, budget_s: float, go_file=None, wait_s=0.0) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", path, "--json", str(json_path),
           "--shape", args.shape, "--layers", str(args.layers), "--vocab", str(args.vocab),
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
           "--budget-s", f"{budget_s:.1f}", "--mem-cap-gb", str(args.mem_cap_gb), "--fold-min", str(args.fold_min)]
    if args.out:
        cmd += ["--out", args.out]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.assume_flops_per_s:
        cmd += ["--assume-flops-per-s", str(args.assume_flops_per_s)]
    if go_file is not None:
        cmd += ["--go-file", str(go_file), "--wait-s", f"{wait_s:.1f}"]
    return cmd


def run_all(args) -> dict:
    import jax

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = discover_paths() if args.paths == "auto" else [p for p in args.paths.split(",") if p]
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "jax": jax.__version__, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "shape": args.shape, "layers": args.layers,
            "vocab": args.vocab, "batch": args.batch, "seq": args.seq, "steps": args.steps, "paths": paths,
            "jobs": args.jobs}
    print(f"gpu_train: {info['backend']}:{info['device']}, jax {info['jax']}, {args.shape} x{args.layers} layers, "
          f"batch {args.batch}x{args.seq}, {args.steps} steps, paths {','.join(paths)}", flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if args.jobs > 1:  # several processes on one device: none may take most of its memory up front
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    results: dict[str, dict] = {}
    pending, running = list(paths), {}
    turn = None  # the path timing its steps now: one at a time, whatever --jobs is
    t_all = time.perf_counter()

    def status_of(jp):
        try:
            return json.loads(jp.read_text()).get("status")
        except (OSError, ValueError):
            return None

    while pending or running:
        left = args.timeout_s - (time.perf_counter() - t_all)
        while pending and len(running) < args.jobs:
            p = pending.pop(0)
            if left < 5:
                results[p] = {"path": p, "status": "skipped", "error": f"no time left ({left:.0f} s)"}
                continue
            jp, log, go = out_dir / f".gpu_train_{p}.json", out_dir / f"child_{p}.log", out_dir / f".go_{p}"
            jp.unlink(missing_ok=True)
            go.unlink(missing_ok=True)
            # one at a time: an equal share of what is left; side by side: all of it
            share = left / (len(pending) + 1) if args.jobs == 1 else left
            budget = min(args.budget_s, max(1.0, 0.4 * share))
            cmd = _child_cmd(args, p, jp, budget_s=budget, go_file=go, wait_s=max(1.0, left - budget))
            fh = open(log, "w")
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
            running[p] = (proc, fh, jp, log, go, time.perf_counter(), share)
        if turn is None:  # give the turn to the first path (in order) that has compiled
            for p in paths:
                if p in running and status_of(running[p][2]) == "compiled":
                    running[p][4].touch()
                    turn = p
                    break
        for p, (proc, fh, jp, log, go, t0, share) in list(running.items()):
            rc = proc.poll()
            if rc is None and time.perf_counter() - t0 > share:
                proc.kill()
                proc.wait()
                rc = "timeout"
            if rc is None:
                continue
            fh.close()
            del running[p]
            if turn == p:
                turn = None
            row = json.loads(jp.read_text()) if jp.exists() else {"path": p, "status": "no_result"}
            jp.unlink(missing_ok=True)
            go.unlink(missing_ok=True)
            row["child_rc"], row["child_s"] = rc, time.perf_counter() - t0
            if rc == "timeout":
                row["status"] = f"timeout_after_{row['status']}"
            elif rc != 0 and row.get("status") in ("started", "compiled", "no_result"):
                row["status"] = "crashed"
            if rc != 0:
                row["output_tail"] = log.read_text(errors="replace")[-3000:]
            results[p] = row
            print(format_row(row), flush=True)
        time.sleep(0.05)
    rows = [results[p] for p in paths]
    result = {**info, "rows": rows, "selftest": None}
    (out_dir / "gpu_train.json").write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(rows), flush=True)
    if args.with_selftest:  # written again with it; skipped when the paths took all the time
        if time.perf_counter() - t_all < args.timeout_s:
            result["selftest"] = selftest(verbose=False)
        else:
            result["selftest"] = {"ok": None, "backend": jax.default_backend(), "paths": {},
                                  "skipped": "no time left after the paths"}
        (out_dir / "gpu_train.json").write_text(json.dumps(result, indent=1) + "\n")
    if result["selftest"] is not None:
        st = result["selftest"]
        print(f"HLO self-test ({st['backend']}): {({True: 'ok', False: 'FAILED'}).get(st['ok'], 'skipped')} "
              + json.dumps(st["paths"]))
    print(f"wrote {out_dir / 'gpu_train.json'}")
    return result


def format_row(r: dict) -> str:
    h = r.get("hlo") or {}
    tps = f"{r['tokens_per_s']:10.0f}" if r.get("tokens_per_s") else f"{'-':>10}"
    mem = f"{r['peak_memory_bytes'] / 2**30:7.2f}" if r.get("peak_memory_bytes") else f"{'-':>7}"
    efold = {True: "yes", False: "no"}.get(h.get("e_fold_dense_dot"), "-")
    fold = f"{h['max_fold']:6.1f}" if h else f"{'-':>6}"
    extra = r.get("error") or r.get("steps_cut") or r.get("note") or ""
    return (f"{r['path']:10s} {r.get('status', '?'):22s} {r.get('tokens', '-')!s:>6} {tps} {mem} "
            f"{efold:>6} {fold} {r.get('steps_run', '-')!s:>5}  {extra[:110]}")


def format_table(rows) -> str:
    head = (f"{'path':10s} {'status':22s} {'tokens':>6} {'tokens/s':>10} {'peakGiB':>7} {'E-fold':>6} {'fold':>6} "
            f"{'steps':>5}")
    return "\n".join([head] + [format_row(r) for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", default="auto", help="comma list of expert paths, or auto (all of them)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--timeout-s", type=float, default=110.0, help="all paths together, start-up included")
    p.add_argument("--jobs", type=int, default=4,
                   help="paths started side by side (they compile in parallel; steps are timed one path at a time)")
    p.add_argument("--budget-s", type=float, default=15.0, help="seconds for one path's step loop")
    p.add_argument("--mem-cap-gb", type=float, default=40.0, help="reference path: gathered-weight bytes cap")
    p.add_argument("--fold-min", type=float, default=1.5)
    p.add_argument("--assume-flops-per-s", type=float, default=None,
                   help="rate for the step-time estimate (default 4e14 on GPU, 2e10 on CPU)")
    p.add_argument("--out", default=None, help="output folder (default bench/results/gpu_train_<date>; "
                                                 "with --dry-run a temporary folder)")
    p.add_argument("--with-selftest", action="store_true", help="also record the HLO self-test in the JSON")
    p.add_argument("--selftest", action="store_true", help="only the HLO check on single expert calls")
    p.add_argument("--dry-run", action="store_true", help="--shape tiny --steps 2, with the self-test")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--go-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--wait-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        args.shape, args.steps, args.with_selftest = "tiny", min(args.steps, 2), True
        args.layers = args.layers or 1
    s = SHAPES[args.shape]
    for k in ("layers", "vocab", "batch", "seq"):
        if getattr(args, k) is None:
            setattr(args, k, s[k])
    if args.selftest:
        res = selftest()
        print(f"selftest ({res['backend']}): {'ok' if res['ok'] else 'FAILED'}")
        return 0 if res["ok"] else 1
    if args.child:
        run_path(args)
        return 0
    if args.out is None:  # a dry run's numbers are not results: they go to a temporary folder
        args.out = (tempfile.mkdtemp(prefix="gpu_train_dry_") if args.dry_run
                    else str(ROOT / "bench" / "results" / f"gpu_train_{time.strftime('%Y%m%d')}"))
    if args.jobs > 1:  # this process and its children share the device: none may take most of it up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    res = run_all(args)
    bad = [r["path"] for r in res["rows"] if r.get("status") not in ("ok", "unsupported")]
    if res.get("selftest") is not None and res["selftest"]["ok"] is False:
        bad.append("selftest")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
