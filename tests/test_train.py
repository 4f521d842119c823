"""BEAM training end to end on a tiny model: report fields, step-0 equals Top-K, the regulariser lowers the
activation ratio, and resuming from a checkpoint reproduces the uninterrupted run's losses exactly."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import beam_jax
from beam_jax.configs import tiny
from beam_jax.routing import BeamHook, TopKHook
from beam_jax.pipeline import train_and_evaluate


def small_config(model_dir, data_dir, **train):
    c = tiny.get_config()
    c.model.path = str(model_dir)
    c.data.train = str(data_dir)
    c.data.seq_len = 32
    c.data.batch_size = 4
    c.data.eval_batches = 2
    c.train.steps = 6
    c.train.warmup_steps = 1
    c.train.log_every = 1
    c.train.ckpt_every = 3
    c.eval.taus = (0.5, 0.9)
    c.eval.policies = ("static_topk",)
    c.beam.target_ratio = 0.0
    for k, v in train.items():
        section, key = k.split("__")
        c[section][key] = v
    return c


def test_step0_equals_topk_bit_for_bit(tiny_model_dir):
    """A zero-initialised mask router keeps every candidate: BEAM's forward (inference and STE training
    form) is Top-K exactly, not approximately."""
    model = beam_jax.load_pretrained(tiny_model_dir)
    ids = np.random.RandomState(0).randint(3, 320, size=(2, 16))
    ref = np.asarray(model(ids, mask_hook=TopKHook()).logits)
    for hook in (BeamHook(0.5), BeamHook(0.5, train=True)):
        out = model(ids, mask_hook=hook)
        np.testing.assert_array_equal(np.asarray(out.logits), ref)
        assert all(bool(jnp.all(m.kept)) for m in out.moe)


def test_report_and_sparsity(tiny_model_dir, text_data_dir, tmp_path):
    c = small_config(tiny_model_dir, text_data_dir, beam__beta=2.0, train__lr=0.05, train__steps=12)
    report = train_and_evaluate(c, tmp_path)
    for key in ("base", "beam", "quality_retention", "moe_flops_reduction", "experts_per_token",
                "train_tokens_per_s", "peak_memory_bytes"):
        assert key in report, key
    assert set(report["experts_per_token"]) == {"overall", "per_layer"}
    assert len(report["experts_per_token"]["per_layer"]) == 2
    assert report["train_tokens_per_s"] > 0 and report["peak_memory_bytes"] > 0
    # the regulariser drives the activation ratio down: fewer experts than Top-K's 3, FLOPs saved
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["experts_per_token"] == 3.0  # step 1 starts at Top-K
    assert report["experts_per_token"]["overall"] < 2.0
    assert report["moe_flops_reduction"] > 0.3
    assert report["moe_flops_reduction"] == pytest.approx(1 - report["experts_per_token"]["overall"] / 3)
    for f in ("report.json", "sweep.md", "pareto.png", "experts_per_layer.png", "rank_drop.png",
              "loss_curves.png", "metrics.jsonl"):
        assert (tmp_path / f).is_file(), f
    assert list((tmp_path / "tensorboard").glob("events.*"))
    val = report["selection_sweep"]
    assert [r["policy"] for r in val] == ["topk", "beam", "beam", "static_topk", "static_topk"]
    assert {r["split"] for r in val} == {"validation"}
    rows = report["sweep"]  # the rows chosen on validation, scored on test
    assert rows[0]["policy"] == "topk" and {r["split"] for r in rows} == {"test"}
    assert {(r["policy"], r["value"]) for r in rows} <= {(r["policy"], r["value"]) for r in val}
    assert rows[0]["accuracy"] == report["base"]["accuracy"] and rows[0]["moe_flops_reduction"] == 0.0
    assert report["eval_split"] == "test" and report["selection_split"] == "validation"
    assert report["eval_tokens"] == rows[0]["tokens"] > 0
    assert set(report["tasks"]) == {"next_token", "line_completion", "multiple_choice"}
    # a random-weights model scores 0 on the tasks, so retention is undefined (nan) here; the shipped model's
    # figures are checked in test_tiny_e2e.py
    for r in rows + val:
        assert len(r["retention_ci95"]) == 2 and set(r["task_scores"]) == set(report["tasks"])
        assert r["bootstrap"]["resamples"] == 1000
    # only the mask routers are saved: 2 MoE layers x [64, 7] kernels
    ckpt_files = list((tmp_path / "ckpt").iterdir())
    assert ckpt_files


@pytest.mark.parametrize("controller,target", [("global", 0.0), ("per_layer", 0.5)])
def test_resume_reproduces_losses(tiny_model_dir, text_data_dir, tmp_path, controller, target):
    """A run killed after a checkpoint and resumed logs the same losses and betas as the uninterrupted run; with
    beam.controller = per_layer, beta is one value per MoE layer, each steered by its own layer's kept fraction."""
    c = small_config(tiny_model_dir, text_data_dir, beam__beta=0.5, beam__controller=controller,
                     beam__target_ratio=target, beam__controller_rate=0.5)
    c.eval.policies = ()
    c.eval.taus = ()
    full = tmp_path / "full"
    train_and_evaluate(c, full)
    log_full = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]

    part = tmp_path / "part"  # the same run, "killed" after its step-3 checkpoint
    part.mkdir()
    shutil.copytree(full / "ckpt" / "3", part / "ckpt" / "3")
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_full if r["step"] <= 3))
    train_and_evaluate(c, part, resume=True)
    log_part = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_part] == [r["step"] for r in log_full] == list(range(1, 7))
    for a, b in zip(log_full, log_part):
        assert a["loss"] == b["loss"] and a["experts_per_token"] == b["experts_per_token"], (a, b)
        assert a["beta"] == b["beta"]
    if controller == "per_layer":
        cfg = beam_jax.load_pretrained(tiny_model_dir).cfg
        betas = np.array([r["beta"] for r in log_full])  # [steps, MoE layers]
        assert betas.shape == (6, len(cfg.moe_layer_ids))
        kept = np.array([r["experts_per_layer"] for r in log_full]) / cfg.num_experts_per_tok
        # each layer's beta moved by its own kept fraction: up where it kept more than the target, down where less
        for step in range(1, 6):
            np.testing.assert_array_equal(np.sign(betas[step] - betas[step - 1]),
                                          np.sign(kept[step] - target), err_msg=f"step {step + 1}")
    else:
        assert all(r["beta"] == 0.5 for r in log_full)


def test_refuses_existing_run_without_resume(tiny_model_dir, text_data_dir, tmp_path):
    c = small_config(tiny_model_dir, text_data_dir, train__steps=3)
    c.eval.policies = ()
    c.eval.taus = ()
    train_and_evaluate(c, tmp_path)
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    c.train.keep_ckpts = 1
    with pytest.raises(FileExistsError, match="--resume"):
        train_and_evaluate(c, tmp_path)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == saved  # refused: nothing deleted


def test_resuming_a_finished_run_keeps_only_the_newest_checkpoints(tiny_model_dir, text_data_dir, tmp_path):
    """A run killed between its last save and orbax's deletion of the oldest checkpoint holds keep + 1 of them;
    resumed, it has no step left to save, and must still end with the newest `keep_ckpts` (here: fewer kept)."""
    c = small_config(tiny_model_dir, text_data_dir, train__steps=3, train__ckpt_every=1, train__keep_ckpts=3)
    c.eval.policies = ()
    c.eval.taus = ()
    train_and_evaluate(c, tmp_path)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2", "3"]
    c.train.keep_ckpts = 2
    train_and_evaluate(c, tmp_path, resume=True)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2", "3"]
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("split", "train") == "train"] == [1, 2, 3]


def test_nonfinite_steps_are_refused_and_stop_the_run(tiny_model_dir, text_data_dir, tmp_path):
    """An Inf in a frozen weight of layer 1 makes every step non-finite: each is refused (parameters unchanged),
    the report names the layer, and after train.max_bad_steps in a row the run stops."""
    from beam_jax.data import BatchIterator
    from beam_jax.run_data import load_splits
    from beam_jax.trainer import LossConfig, Trainer, fit
    import transformers

    c = small_config(tiny_model_dir, text_data_dir, train__max_bad_steps=3)
    model = beam_jax.load_pretrained(tiny_model_dir)
    k = model.layers[1].self_attn.o_proj.kernel
    k[...] = k[...].at[0, 0].set(jnp.inf)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    splits = load_splits(c.data, tok)
    tr = Trainer(model, "mask", c.train, LossConfig(hook=BeamHook(0.5, train=True), impl="dense"))
    before = jax_tree_copy(tr.params)
    with pytest.raises(FloatingPointError, match=r"MoE layer 1.*stopping after 3 refused steps"):
        fit(tr, BatchIterator(splits["train"], 4, seed=0), tmp_path, c.train, beta=0.1)
    after = jax_tree_copy(tr.params)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    refused = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in refused] == ["refused"] * 3


def jax_tree_copy(tree):
    import jax

    return [np.array(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("trainable", ["mask+router", "all"])
def test_trainable_sets_and_remat(tiny_model_dir, trainable):
    """mask+router / all train float32 master weights under bfloat16 compute; remat gives the same gradients."""
    import jax

    from beam_jax.trainer import LossConfig, Trainer

    c = small_config(tiny_model_dir, "unused", train__trainable=trainable)
    ids = np.random.RandomState(1).randint(3, 320, size=(2, 17))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((2, 16), np.float32)}
    grads = []
    for remat in (False, True):
        c.train.remat = remat
        model = beam_jax.load_pretrained(tiny_model_dir, dtype="bfloat16", param_dtype="float32")
        tr = Trainer(model, trainable, c.train, LossConfig(hook=BeamHook(0.5, train=True), impl="dense"))
        assert {x.dtype for x in jax.tree.leaves(tr.params)} == {np.dtype("float32")}
        names = tr.nonfinite_params(np.zeros(len(jax.tree.leaves(tr.params)), bool))
        assert any("mask_router" in n for n in names) and any(n.endswith("mlp.gate.kernel") for n in names)
        if trainable == "all":
            assert any("experts.w_gate" in n for n in names)
        else:
            assert not any("experts" in n or "self_attn" in n for n in names)
        g = jax.grad(lambda p: tr.loss(p, tr.frozen, {k: jax.numpy.asarray(v) for k, v in batch.items()}, 0.1)[0])(
            tr.params)
        grads.append([np.asarray(x) for x in jax.tree.leaves(g)])
        before = [np.asarray(x) for x in jax.tree.leaves(tr.params)]
        tr.step(batch, 0.1)  # learning rate 0 at the first warm-up step
        tr.step(batch, 0.1)
        after = [np.asarray(x) for x in jax.tree.leaves(tr.params)]
        assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_distill_loss_term(tiny_model_dir):
    """beam.distill: the teacher is the same model under Top-K, so at the zero-initialised mask (BEAM = Top-K) the
    KL is exactly 0 and its gradient vanishes; the loss and its gradient are (1 - d) times the plain LM ones."""
    import jax

    from beam_jax.trainer import LossConfig, Trainer

    c = small_config(tiny_model_dir, "unused")
    ids = np.random.RandomState(2).randint(3, 320, size=(2, 17))
    batch = {"input_ids": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
             "loss_mask": jnp.ones((2, 16), jnp.float32)}
    out = {}
    for d in (0.0, 0.5, 1.0):
        tr = Trainer(beam_jax.load_pretrained(tiny_model_dir), "mask", c.train,
                     LossConfig(hook=BeamHook(0.5, train=True), impl="dense", distill=d))
        (loss, m), g = jax.value_and_grad(lambda p: tr.loss(p, tr.frozen, batch, 0.0), has_aux=True)(tr.params)
        out[d] = (float(loss), m, [np.asarray(x) for x in jax.tree.leaves(g)])
    lm = out[0.0][1]["lm_loss"]
    assert "distill_loss" not in out[0.0][1] and lm > 1.0
    for d in (0.5, 1.0):
        assert out[d][1]["distill_loss"] == 0.0
        np.testing.assert_allclose(out[d][0], (1 - d) * float(lm), rtol=1e-6)
        for a, b in zip(out[d][2], out[0.0][2]):
            np.testing.assert_allclose(a, (1 - d) * b, rtol=1e-4, atol=1e-9)
    assert max(float(np.abs(x).max()) for x in out[0.0][2]) > 0  # the LM gradient itself is not 0
    # a mask that drops pairs makes the student differ from the teacher
    tr = Trainer(beam_jax.load_pretrained(tiny_model_dir), "mask", c.train,
                 LossConfig(hook=BeamHook(0.5, train=True), impl="dense", distill=1.0))
    tr.params = jax.tree.map(lambda x: jnp.asarray(np.random.RandomState(3).normal(0, 1.0, x.shape), x.dtype),
                             tr.params)
    loss, m = tr.loss(tr.params, tr.frozen, batch, 0.0)
    assert float(m["distill_loss"]) > 1e-7 and float(loss) == float(m["distill_loss"])



def test_distill_teacher_is_the_loaded_model_when_everything_trains(tiny_model_dir):
    """trainable=all with beam.distill: the teacher is a frozen copy of the weights as loaded, not the student.
    After steps that move every weight, the teacher's parameters are still the loaded ones bit for bit, the step's
    KL is the KL to the loaded model's Top-K logits (checked against a separately loaded model) and differs from
    the KL to the student's own Top-K logits; without distillation no copy is kept."""
    import jax

    from beam_jax import beam as beam_lib
    from beam_jax.trainer import LossConfig, Trainer

    c = small_config(tiny_model_dir, "unused", train__trainable="all", train__lr=1e-2, train__warmup_steps=0)
    ids = np.random.RandomState(4).randint(3, 320, size=(2, 17))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((2, 16), np.float32)}
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    lc = LossConfig(hook=BeamHook(0.5, train=True), impl="dense", distill=1.0)
    tr = Trainer(beam_jax.load_pretrained(tiny_model_dir, param_dtype="float32"), "all", c.train, lc)
    loaded = [np.asarray(x) for x in jax.tree.leaves(tr.params)]
    assert float(tr.evaluate(batch)["distill_loss"]) == 0.0  # zero-initialised mask: BEAM = Top-K = teacher
    for _ in range(3):
        tr.step(batch, 1.0)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(loaded, jax.tree.leaves(tr.teacher)))
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in zip(loaded, jax.tree.leaves(tr.params))]
    assert sum(moved) > len(moved) // 2

    student = tr.model()
    reference = beam_jax.load_pretrained(tiny_model_dir, param_dtype="float32")
    s_logits = student(jb["input_ids"], mask_hook=lc.hook, impl="dense").logits
    to_loaded, _ = beam_lib.distill_loss(s_logits, reference(jb["input_ids"], impl="dense").logits, jb["loss_mask"])
    to_self, _ = beam_lib.distill_loss(s_logits, student(jb["input_ids"], impl="dense").logits, jb["loss_mask"])
    got = float(tr.evaluate(batch)["distill_loss"])
    np.testing.assert_allclose(got, float(to_loaded), rtol=1e-4)
    assert abs(float(to_loaded) - float(to_self)) > 1e-3 * float(to_loaded) > 0

    assert Trainer(beam_jax.load_pretrained(tiny_model_dir, param_dtype="float32"), "all", c.train,
                   LossConfig(hook=BeamHook(0.5, train=True), impl="dense")).teacher is None

@pytest.mark.parametrize("steps,warmup", [(1, 0), (1, 1), (2, 5), (10, 0)])
def test_optimizer_schedule_for_short_runs(steps, warmup):
    """train.steps may be 1 and warm-up 0 (the config allows both): the schedule is built and its step is finite."""
    import jax
    from ml_collections import ConfigDict

    from beam_jax.trainer import make_optimizer

    tc = ConfigDict(dict(lr=1e-2, warmup_steps=warmup, steps=steps, final_lr_fraction=0.1, grad_clip=1.0,
                         weight_decay=0.0, grad_accum=1))
    tx = make_optimizer(tc)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for _ in range(steps + 1):
        updates, state = tx.update({"w": jnp.full(3, 0.5)}, state, params)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_base_lr_sets_the_rate_of_everything_but_the_mask_routers():
    """train.base_lr: the mask routers step at train.lr, every other trained parameter at base_lr (Adam's step on a
    constant gradient is the learning rate itself, so the sizes are exact)."""
    from ml_collections import ConfigDict

    from beam_jax.trainer import make_optimizer

    params = {"layers": {"0": {"mlp": {"mask_router": {"kernel": jnp.ones((4, 3))}, "gate": {"kernel": jnp.ones(5)}}}},
              "embed": jnp.ones(2)}
    grads = jax_tree_map(lambda x: jnp.full_like(x, 0.25), params)
    for base_lr, want_base in ((0.0, 1e-2), (1e-4, 1e-4)):
        tc = ConfigDict(dict(lr=1e-2, base_lr=base_lr, warmup_steps=1, steps=100, final_lr_fraction=1.0,
                             grad_clip=0.0, weight_decay=0.0, grad_accum=1))
        tx = make_optimizer(tc)
        state = tx.init(params)
        _, state = tx.update(grads, state, params)  # warm-up step: rate 0
        updates, _ = tx.update(grads, state, params)
        mlp = updates["layers"]["0"]["mlp"]
        np.testing.assert_allclose(mlp["mask_router"]["kernel"], -1e-2, rtol=1e-4)
        np.testing.assert_allclose(mlp["gate"]["kernel"], -want_base, rtol=1e-4)
        np.testing.assert_allclose(updates["embed"], -want_base, rtol=1e-4)


def jax_tree_map(f, tree):
    import jax

    return jax.tree.map(f, tree)


def test_retention_text_says_why_it_is_undefined():
    """The main job's last line: the retention with its CI, or, where a task's Top-K score is 0 (a random model),
    'undefined' naming that task instead of printing nan%."""
    from beam_jax.train import retention_text

    ok = {"quality_retention": 0.866, "quality_retention_ci95": [0.852, 0.878],
          "tasks": {"next_token": 0.57, "line_completion": 0.11, "multiple_choice": 0.82}}
    assert retention_text(ok) == "quality retained 86.6% [95% CI 85.2, 87.8] over 3 tasks"
    bad = {"quality_retention": float("nan"), "quality_retention_ci95": [float("nan")] * 2,
           "tasks": {"next_token": 0.001, "line_completion": 0.0, "multiple_choice": 0.25}}
    text = retention_text(bad)
    assert "undefined" in text and "line_completion" in text and "next_token" not in text and "nan" not in text
