"""`beam_jax.plan`: published sizes give the published parameter counts, the estimate is within 20% of the
peak measured on CPU for tiny.py, the CLI says whether a run fits, and training refuses a run that does not."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from beam_jax import plan, sharding
from beam_jax.configs import deepseek_v2_lite, deepseek_v3, glm4_5_air, mixtral, qwen3_moe, tiny

HERE = Path(__file__).parent


def test_parse_bytes():
    assert plan.parse_bytes("80GB") == 80 * 10**9
    assert plan.parse_bytes("80GiB") == 80 * 2**30
    assert plan.parse_bytes("512MB") == 512 * 10**6
    assert plan.parse_bytes(1234) == 1234
    with pytest.raises(ValueError, match="plan.device_memory: cannot read 'lots'"):
        plan.parse_bytes("lots")


@pytest.mark.parametrize("mod,arch,billions", [(mixtral, "MixtralForCausalLM", 46.70),
                                               (qwen3_moe, "Qwen3MoeForCausalLM", 30.53),
                                               (deepseek_v2_lite, "DeepseekV2ForCausalLM", 15.71),
                                               # published: 671B without the MTP layer; 106B (12B active)
                                               (deepseek_v3, "DeepseekV3ForCausalLM", 671.03),
                                               (glm4_5_air, "Glm4MoeForCausalLM", 106.85)])
def test_published_sizes_without_checkpoint(mod, arch, billions):
    """The configs point at checkpoints that are not here: plan builds the model from the published
    config.json values, and counts the published number of parameters (+ BEAM's mask routers)."""
    c = mod.get_config()
    assert not (Path(c.model.path) / "config.json").exists()
    cfg, source = plan.model_config(c)
    assert cfg.architecture == arch and source.startswith("published")
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    params, opt, count = plan._state_bytes(cfg, c, mesh)
    routers = len(cfg.moe_layer_ids) * cfg.hidden_size * cfg.num_experts
    assert (count - routers) / 1e9 == pytest.approx(billions, rel=2e-3)
    f32 = routers * (2 if cfg.router_float32 else 1)  # mask routers, and DeepSeek's routers, are float32
    if cfg.topk_method == "noaux_tc":  # ... and so is the e_score_correction_bias [E] of each MoE layer
        f32 += len(cfg.moe_layer_ids) * cfg.num_experts
    assert params == (count - f32) * 2 + f32 * 4  # the rest bfloat16, all on one device


def test_unknown_model_is_refused_with_the_field():
    c = mixtral.get_config()
    c.model.path = "checkpoints/NoSuchModel-1B"
    with pytest.raises(ValueError, match=r"model.path='checkpoints/NoSuchModel-1B': no config.json there"):
        plan.model_config(c)


def test_estimate_within_20_percent_of_measured_peak():
    """tests/plan_measure.py in a fresh process: one tiny.py training step (its batch, 12 x 256, float32) on CPU,
    peak resident memory during the step's first execution plus the live jax arrays, against the plan."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(HERE / "plan_measure.py"), "tiny.py"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["measured_rss_delta"] > 100 * 2**20  # the step's buffers were seen (hundreds of MiB)
    assert 0.8 <= r["estimate"] / r["measured"] <= 1.2, r


def test_cli_says_whether_it_fits():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "beam_jax.plan", "--config", "tiny.py", "--devices", "2", "--target", "cpu",
           "--config.data.batch_size=4", "--config.data.seq_len=64"]
    ok = subprocess.run(cmd + ["--device_memory", "8GB"], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "mesh data=1, fsdp=2, expert=1, tensor=1" in ok.stdout and "-> fits" in ok.stdout
    assert "(2 rows per device)" in ok.stdout
    bad = subprocess.run(cmd + ["--device_memory", "20MB"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1 and "DOES NOT FIT" in bad.stdout, bad.stdout + bad.stderr[-2000:]


def test_training_refuses_a_run_that_does_not_fit(tiny_model_dir, text_data_dir, tmp_path):
    from beam_jax.pipeline import train_and_evaluate

    c = tiny.get_config()
    c.model.path = str(tiny_model_dir)
    c.data.train = str(text_data_dir)
    c.data.seq_len, c.data.batch_size = 32, 4
    c.plan.device_memory = "1MB"
    with pytest.raises(plan.MemoryPlanError, match=r"(?s)does not fit.*parameters.*activations\+temp.*DOES NOT FIT"):
        train_and_evaluate(c, tmp_path)
    assert not (tmp_path / "ckpt").exists()  # refused before training


def test_distillation_beyond_the_mask_counts_the_teacher_copy(monkeypatch):
    """beam.distill with trainable=all keeps a frozen teacher copy of the trainable weights (Trainer.teacher): the
    plan's parameter bytes count it (exactly the trainable weights' bytes more than the same config planned as if
    no copy were kept), and the planner asks the trainer's own rule."""
    from beam_jax import trainer

    c = tiny.get_config()
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    cfg, _ = plan.model_config(c)
    trainable_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(plan._abstract_split(cfg, c)[1]))
    assert c.train.trainable == "all" and c.beam.distill > 0 and trainable_bytes > 32e6
    assert trainer.keeps_teacher_copy(c.beam.distill, "all") and not trainer.keeps_teacher_copy(c.beam.distill, "mask")
    assert not trainer.keeps_teacher_copy(0.0, "all")
    with_copy = plan.estimate(c, mesh)
    monkeypatch.setattr(trainer, "keeps_teacher_copy", lambda distill, trainable: False)
    without = plan.estimate(c, mesh)
    assert with_copy.params - without.params == trainable_bytes
