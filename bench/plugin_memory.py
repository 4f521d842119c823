"""Memory of a vLLM-CPU engine serving a BEAM export through the plugin: packed experts against vLLM's own.

    python bench/serve.py --models qwen3 --engines jax --batches 1     # makes the model directory once
    flock /tmp/beam-bench.lock python bench/plugin_memory.py [MODEL_DIR] [--out FILE.json]

For each setting, in a process of its own (so that one's peak does not hide the other's): BEAM_JAX_PACKED_EXPERTS=0
(vLLM's prepacked experts, `cpu_fused_moe`) and the default (the plugin packs each layer's experts for the
extension's kernel and drops vLLM's copy, where `convert.vllm_plugin.moe.packed_experts_available`). Reports the
process's resident memory after the engine is built and after a short generation (VmRSS), its peak (VmHWM), the
bytes of the experts the runners hold (vLLM's w13 / w2 and the packed copy), and the safetensors bytes on disk.
Default model: bench/serve.py's Qwen3-30B-A3B-shaped 2-layer export (`/tmp/beam_bench/qwen3-30b-a3b-shaped-2l`).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = "/tmp/beam_bench/qwen3-30b-a3b-shaped-2l"

WORKER = r"""
import gc, json, os, sys
sys.path[:0] = [sys.argv[2]]
os.environ.update({"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


from vllm import LLM, SamplingParams
from convert.vllm_plugin import moe

path = sys.argv[1]
config = json.load(open(os.path.join(path, "config.json")))
llm = LLM(model=path, dtype="bfloat16", max_model_len=256, seed=0, skip_tokenizer_init=True, enforce_eager=True,
          enable_prefix_caching=False, max_num_seqs=8)
gc.collect()
built = status("VmRSS")
llm.generate([{"prompt_token_ids": list(range(3, 19))}] * 8,
             SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, detokenize=False), use_tqdm=False)
runners = list(moe._RUNNERS)
nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
print(json.dumps({"rss_built": built, "rss_after_generate": status("VmRSS"), "peak": status("VmHWM"),
                  "runners": len(runners), "packed_runners": sum(r.beam_packed is not None for r in runners),
                  "vllm_expert_bytes": sum(nbytes((r.routed_experts.w13_weight, r.routed_experts.w2_weight))
                                           for r in runners),
                  "packed_expert_bytes": sum(nbytes(r.beam_packed) for r in runners if r.beam_packed is not None),
                  "packed_expert_calls": moe.PACKED_CALLS[0], "vllm_expert_calls": moe.DIRECT_CALLS[0]}))
"""


def measure(model_dir: str, packed: bool) -> dict:
    env = {**os.environ, "BEAM_JAX_PACKED_EXPERTS": "1" if packed else "0"}
    res = subprocess.run([sys.executable, "-c", WORKER, model_dir, str(ROOT)], capture_output=True, text=True,
                         env=env, timeout=1200)
    if res.returncode != 0:
        raise SystemExit(f"{model_dir}: the vLLM worker failed (packed={packed}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=DEFAULT)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if not Path(args.model_dir, "config.json").is_file():
        raise SystemExit(f"{args.model_dir}: no config.json (make the model with bench/serve.py, see the docstring)")
    disk = sum(f.stat().st_size for f in Path(args.model_dir).glob("*.safetensors"))
    rows = {"vllm_experts": measure(args.model_dir, False), "packed_experts": measure(args.model_dir, True)}
    gib = 2**30
    print(f"{args.model_dir}: safetensors {disk / gib:.2f} GiB")
    print("| experts | runners packed | expert bytes held GiB (vLLM / packed) | RSS built GiB | RSS after generate GiB "
          "| peak GiB | expert calls (packed / vLLM) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['packed_runners']}/{r['runners']} | {r['vllm_expert_bytes'] / gib:.2f} / "
              f"{r['packed_expert_bytes'] / gib:.2f} | {r['rss_built'] / gib:.2f} | "
              f"{r['rss_after_generate'] / gib:.2f} | {r['peak'] / gib:.2f} | {r['packed_expert_calls']} / "
              f"{r['vllm_expert_calls']} |")
    if args.out:
        sys.path[:0] = [str(ROOT)]
        from bench.common import write_result

        write_result("plugin_memory", {"command": " ".join(["python", *sys.argv]), "model_dir": args.model_dir,
                                       "safetensors_bytes": disk, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
