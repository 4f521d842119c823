"""CI, core install only (`pip install -e .`, no extras): the documented GPU-pod job (`mixtral.py`, chat SFT)
shrunk to fit a 2-core CPU, so a runtime dependency missing from the core install fails CI.

    python .ci/core_job.py WORKDIR

Makes, without torch, a tiny random Mixtral in Hugging Face layout (config from `transformers.MixtralConfig`,
weights from `beam_jax.export_hf.save_pretrained`) with the shipped tokenizer and chat template, a JSONL of
`{"messages": [...]}` conversations, then runs

    python -m beam_jax.train --config mixtral.py --config.model.path=... --config.data.train=chat.jsonl ...

and checks its report; then `python -m convert.to_vllm` on the run (the export needs no torch) and that an
optional dependency missing here (torch for the PyTorch BEAM classes) is one `error:` line naming the extra.
Exit status 0 only if every step did what it should.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "beam_jax" / "assets" / "tiny-moe"


def make_mixtral(out: Path) -> Path:
    """A 2-layer Mixtral (d 64, 4 experts of width 64, K 2) with random weights and the shipped tokenizer."""
    import transformers
    from flax import nnx

    from beam_jax.export_hf import save_pretrained
    from beam_jax.families import family_for
    from beam_jax.model import MoECausalLM

    special = json.loads((ASSET / "config.json").read_text())
    hf = transformers.MixtralConfig(vocab_size=special["vocab_size"], hidden_size=64, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
                                    bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"],
                                    pad_token_id=special["pad_token_id"], tie_word_embeddings=False)
    hf.architectures = ["MixtralForCausalLM"]
    cfg = family_for("MixtralForCausalLM").build(hf)
    model = MoECausalLM(cfg, rngs=nnx.Rngs(0))
    config = hf.to_dict()
    config["dtype"] = "float32"
    return save_pretrained(model, out, config=config, tokenizer_dir=ASSET)


def make_chat(out: Path, n: int = 64) -> Path:
    """n conversations (system, user, assistant) drawn from the corpus's validation files."""
    from beam_jax import corpus

    rng = random.Random(0)
    files = corpus.stdlib_corpus().paths("validation")
    rows = []
    for i in range(n):
        text = files[i % len(files)].read_text(encoding="utf-8", errors="replace")
        lines = [line for line in text.splitlines() if line.strip()] or ["pass"]
        start = rng.randrange(max(1, len(lines) - 8))
        rows.append({"messages": [
            {"role": "system", "content": "You complete Python code."},
            {"role": "user", "content": "\n".join(lines[start:start + 4])},
            {"role": "assistant", "content": "\n".join(lines[start + 4:start + 8]) or "pass"}]})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, text=True, capture_output=True, cwd=ROOT, **kw)


def main(workdir: Path) -> int:
    workdir = workdir.absolute()
    model = make_mixtral(workdir / "tiny-mixtral")
    chat = make_chat(workdir / "chat.jsonl")
    run_dir = workdir / "run"
    res = run([sys.executable, "-m", "beam_jax.train", "--config", "mixtral.py",
               f"--config.model.path={model}", f"--config.data.train={chat}", "--config.data.seq_len=128",
               "--config.data.batch_size=4", "--config.train.steps=6", "--config.train.ckpt_every=3",
               "--config.model.dtype=float32", f"--workdir={run_dir}"])
    print(res.stdout[-3000:], res.stderr[-3000:], sep="\n")
    if res.returncode:
        print(f"core job: beam_jax.train exited {res.returncode}", file=sys.stderr)
        return 1
    report = json.loads((run_dir / "report.json").read_text())
    rows = report.get("sweep") or report.get("rows") or []
    print(f"core job: report.json with {len(rows)} sweep rows, keys {sorted(report)[:12]}")
    if not rows:
        print("core job: report.json has no sweep rows", file=sys.stderr)
        return 1

    res = run([sys.executable, "-m", "convert.to_vllm", str(run_dir / "ckpt"), "--out", str(workdir / "serve")])
    print(res.stdout[-2000:], res.stderr[-2000:], sep="\n")
    if res.returncode or not (workdir / "serve" / "config.json").is_file():
        print(f"core job: convert.to_vllm exited {res.returncode} without torch", file=sys.stderr)
        return 1

    res = run([sys.executable, "-c", "import beam_jax.cli as c\nwith c.report_errors():\n"
               "    import convert.modeling_beam"])
    lines = res.stderr.strip().splitlines()
    if res.returncode == 0 or len(lines) != 1 or not lines[0].startswith("error:") or "[" not in lines[0]:
        print(f"core job: importing the PyTorch BEAM classes without torch should give one 'error:' line "
              f"naming the extra, got exit {res.returncode}:\n{res.stderr[-2000:]}", file=sys.stderr)
        return 1
    print(f"core job: without torch -> {lines[0]}")
    print("core job: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/ci-core")))
