"""Same-process A/B of the CPU weight-streaming loops and of decode attention against an earlier revision of them.

    python bench/stream_ab.py [--base REV] [--quick] [--cases experts,proj,experts_packed,packed,attention]
                              [--out FILE]

Compiles `bench/stream_ab.cc` with two copies of `ffi/masked_moe_cpu_kernel.h` and
`ffi/decode_attention_cpu_kernel.h` in one binary: the ones at git revision REV (default HEAD) and the working
tree's, under different namespaces, with the flags of the best CPU kernel build this processor has (AVX512-BF16
where it has it, else AVX2). Then times both through their public entry points (the expert kernel `MaskedMoe` on
row-major and, with AVX512-BF16, on packed experts; `RowsMatmul` and `PackedRowsMatmul`, the decode projections'
products; `DecodeAttention`) with a two-thread runner, bfloat16, in interleaved rounds, each round on weights (a KV
cache) the round before did not read (so neither finds the other's in the last-level cache): Qwen3-30B-A3B's MoE
layer at decode batches 1, 8 and 64 (8 random experts of 128 per token), its decode projections (q, k/v, o, an LM
head of 8192 words) at 1, 8 and 32 rows, and its decode attention (32 query heads, 4 KV heads of 128) at
`ATTENTION_SHAPES`. Reports best times, GB/s (expert bytes a round reads; the projection's matrix; the allowed
slots' keys and values) and the mean speed-up of the working tree over REV; writes bench/results/stream_ab_cpu.json.
Process-to-process speed on a shared VM moves 10-25%; only ratios from one process are compared. About 3 minutes on
2 cores (~2.5 GB of weights in memory).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax.ffi

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXPERT_TOKENS = [1, 8, 64]
PROJ_SHAPES = [("q_proj", 2048, 4096), ("k_proj", 2048, 512), ("o_proj", 4096, 2048), ("lm_head", 2048, 8192)]
# decode attention (batch, cache slots, allowed slots): bench/serve.py's steps (prompt 16 + 64 new in a 128-slot
# cache, 48 slots filled on average), and longer contexts
ATTENTION_SHAPES = [(1, 128, 48), (8, 128, 48), (32, 128, 48), (8, 128, 80), (1, 2048, 2000), (8, 512, 400)]
FAMILIES = ("experts", "proj", "experts_packed", "packed", "attention")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build(base: str, out_dir: Path) -> tuple[Path, str]:
    """Compiles the A/B binary into out_dir; returns it and the instruction set it was built for."""
    base_dir = out_dir / "base"
    base_dir.mkdir()
    for name in ("masked_moe_cpu_kernel.h", "masked_moe.h", "decode_attention_cpu_kernel.h"):
        try:
            text = subprocess.run(["git", "show", f"{base}:ffi/{name}"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"stream_ab: cannot read ffi/{name} at revision {base!r}: {e.stderr.strip()}")
        (base_dir / name).write_text(text)
    flags = ["-mavx2", "-mfma", "-mf16c"]
    isa = "avx2"
    if "avx512_bf16" in _cpu_flags():
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]
        isa = "avx512bf16"
    binary = out_dir / "stream_ab"
    cmd = [shutil.which("g++") or "g++", "-O3", "-std=c++17", *flags, "-I", jax.ffi.include_dir(),
           f'-DBASE_HEADER="{base_dir / "masked_moe_cpu_kernel.h"}"',
           f'-DHEAD_HEADER="{ROOT / "ffi" / "masked_moe_cpu_kernel.h"}"',
           f'-DBASE_ATTN_HEADER="{base_dir / "decode_attention_cpu_kernel.h"}"',
           f'-DHEAD_ATTN_HEADER="{ROOT / "ffi" / "decode_attention_cpu_kernel.h"}"',
           str(ROOT / "bench" / "stream_ab.cc"), "-o", str(binary), "-lpthread"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"stream_ab: compiling bench/stream_ab.cc failed:\n{r.stderr[-4000:]}")
    return binary, isa


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="git revision whose streaming loop is the baseline")
    ap.add_argument("--quick", action="store_true", help="one expert case and one projection (smoke check)")
    ap.add_argument("--cases", default=None,
                    help="comma list of experts, proj, experts_packed, packed, attention (default: all; the packed "
                         "ones only where the processor has AVX512-BF16, the only build with a fast packed loop)")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/stream_ab_cpu.json)")
    args = ap.parse_args()
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or args.base
    bf16 = "avx512_bf16" in _cpu_flags()
    families = (args.cases.split(",") if args.cases
                else ["experts", "proj"] + (["experts_packed", "packed"] * bf16) + ["attention"])
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise SystemExit(f"stream_ab: unknown --cases {sorted(unknown)}: {', '.join(FAMILIES)}")
    cases = [[fam, str(t)] for fam in families if fam.startswith("experts") for t in EXPERT_TOKENS]
    cases += [[fam, str(k), str(n), str(m)] for fam in families if fam in ("proj", "packed")
              for m in (1, 8, 32) for _, k, n in PROJ_SHAPES]
    cases += [["attention", *map(str, shape)] for shape in ATTENTION_SHAPES if "attention" in families]
    if args.quick:  # one expert case (batch 1) and one projection (k_proj, one row) of the kinds asked for
        cases = ([c for c in cases if c[0].startswith("experts")][:1]
                 + [c for c in cases if c[1:] == ["2048", "512", "1"]][:1])
    names = {(k, n): name for name, k, n in PROJ_SHAPES}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        binary, isa = build(args.base, Path(tmp))
        print(f"base {base_rev} vs working tree, {isa} build")
        for case in cases:
            r = subprocess.run([str(binary), *case], capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"stream_ab: {' '.join(case)} failed ({r.returncode}): {r.stderr.strip()}")
            res = json.loads(r.stdout)
            experts, attention = res["case"].startswith("experts"), res["case"] == "attention"
            if attention:
                res["shape"] = f"L{res['slots']} n{res['allowed']}"
            elif not experts:
                res["shape"] = names.get((res["K"], res["N"]), f"{res['K']}x{res['N']}")
            label = res["case"] if experts else f"{res['case']} {res['shape']}"
            rows = res["tokens"] if experts else res["batch"] if attention else res["rows"]
            print(f"{label:15s} rows {rows:2d}  base {res['base_best_ms']:8.3f} ms ({res['base_GBps']:5.1f} GB/s)"
                  f"  head {res['head_best_ms']:8.3f} ms ({res['head_GBps']:5.1f} GB/s)"
                  f"  head/base speed-up (mean) x{res['head_speedup_mean']:.2f}", flush=True)
            results.append(res)
    if args.quick:
        return
    out = write_result("stream_ab", {"command": "python bench/stream_ab.py " + " ".join(sys.argv[1:]),
                                     "base": base_rev, "cpu_isa": isa, "results": results}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
