"""The vLLM plugin's packed dense product against vLLM's own, per row count (convert/vllm_plugin/linear.py).

    flock /tmp/beam-bench.lock python bench/linear_rows.py [--out bench/results/linear_rows_<cpu>.md]

At Qwen3-30B-A3B's decode shapes (qkv 2048 -> 5120, o 4096 -> 2048, LM head 2048 -> 8192 at the serving benchmark's
vocabulary, router 2048 -> 128... 256), bfloat16, torch threads = the cores: the time of `packed_matmul` and of
vLLM's `UnquantizedLinearMethod.apply` for the same layer (oneDNN, or sgl's AMX kernel for small N where the
processor has AMX), the median of 50 calls after 2 warm-ups (`common.timeit`), and their ratio; on the
extension's AMX build also the packed product under its AVX512-BF16 build (vdpbf16ps), switched in the same process.
The plugin's `ROWS_MAX` (the rows up to which it takes the packed product) is chosen from this table per processor
kind. Needs the extension's AVX512-BF16 (or AMX) build.
"""

import argparse
import os
import time

import torch

from common import machine, timeit

SHAPES = [(5120, 2048, "qkv"), (2048, 4096, "o"), (8192, 2048, "LM head"), (256, 2048, "small N")]
ROWS = (1, 2, 3, 4, 8, 16, 32, 64, 512)


def main():
    from convert.vllm_plugin import linear
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    args = ap.parse_args()
    ext = linear._ffi()
    if ext is None:
        raise SystemExit("beam_jax._ffi has no AVX512-BF16 build here: nothing to compare")
    torch.set_num_threads(os.cpu_count() or 1)
    amx = torch.cpu._is_amx_tile_supported()
    lines = ["# Packed dense product against vLLM's, per row count (bench/linear_rows.py)", "",
             f"{machine()} | AMX {'yes' if amx else 'no'} | {time.strftime('%Y-%m-%d %H:%M %Z')} | "
             f"torch {torch.__version__} | plugin ROWS_MAX here: {linear.ROWS_MAX}", "",
             f"extension build: {ext.cpu_isa()}", ""]
    dp = ext.cpu_isa() == "amx"  # also time the vdpbf16ps loop the AMX build replaces
    lines += (["| layer | N x K | rows | packed us | vLLM us | vLLM / packed | packed avx512bf16 us "
               "| avx512bf16 / amx |",
               "| --- | --- | --- | --- | --- | --- | --- | --- |"] if dp else
              ["| layer | N x K | rows | packed us | vLLM us | vLLM / packed |",
               "| --- | --- | --- | --- | --- | --- |"])
    for N, K, name in SHAPES:
        method = linear._methods()[UnquantizedLinearMethod]()
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter((torch.randn(N, K) * 0.02).bfloat16(), requires_grad=False)
        method.process_weights_after_loading(layer)
        for rows in ROWS:
            x = torch.randn(rows, K).bfloat16()
            tp = 1e6 * timeit(lambda: linear.packed_matmul(x, layer.beam_packed, N), repeat=50, warmup=2)
            tv = 1e6 * timeit(lambda: method.base_apply(layer, x), repeat=50, warmup=2)
            row = f"| {name} | {N} x {K} | {rows} | {tp:.0f} | {tv:.0f} | {tv / tp:.2f} |"
            if dp:
                ext.set_cpu_isa("avx512bf16")
                try:
                    td = 1e6 * timeit(lambda: linear.packed_matmul(x, layer.beam_packed, N), repeat=50, warmup=2)
                finally:
                    ext.set_cpu_isa("amx")
                row += f" {td:.0f} | {td / tp:.2f} |"
            lines.append(row)
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    print(text)


if __name__ == "__main__":
    main()
