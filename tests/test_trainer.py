import pytest
import torch
import torch.nn.functional as F

from cookbook import distillation as D
from cookbook import student_training as S
from cookbook.cli import main
from cookbook.models import ByteTokenizer, tiny_model
from cookbook.trainer import TrainSettings, batch_rows, load_checkpoint, lr_at, text_windows, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedule_warms_up_then_decays_to_its_floor():
    s = TrainSettings(steps=100, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, s) == pytest.approx(1e-4) and lr_at(9, s) == pytest.approx(1e-3)
    assert lr_at(99, s) == pytest.approx(1e-4)
    assert all(lr_at(i, s) >= lr_at(i + 1, s) for i in range(9, 99))


def test_windows_start_with_bos_and_each_epoch_visits_every_window_once():
    w = text_windows(torch.arange(100, 130), 4, bos_id=2)  # 30 tokens -> 10 windows of BOS + 3
    assert w.shape == (10, 4) and (w[:, 0] == 2).all() and w[1, 1:].tolist() == [103, 104, 105]
    epoch = torch.cat([batch_rows(step, 2, 10, seed=3) for step in range(5)])
    assert sorted(epoch.tolist()) == list(range(10))
    assert torch.equal(batch_rows(7, 2, 10, seed=3), batch_rows(7, 2, 10, seed=3))
    assert not torch.equal(epoch, torch.cat([batch_rows(step, 2, 10, seed=3) for step in range(5, 10)]))


def test_bad_settings_say_what_to_change():
    with pytest.raises(ValueError, match="steps"):
        TrainSettings(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainSettings(lr=-1.0)
    with pytest.raises(ValueError, match="fewer than one window"):
        text_windows(torch.arange(3), 8, bos_id=2)


def _run(model, settings, checkpoint, stop_at=None):
    windows = torch.randint(3, 500, (12, 16), generator=torch.Generator().manual_seed(0))

    def step_loss(rows):
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt  # the run is killed here
        calls.append(rows)
        ids = windows[rows]
        logits = model(input_ids=ids[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    calls = []
    curve = train(model, step_loss, len(windows), settings, evaluate=lambda: 1.0, checkpoint=checkpoint,
                  fingerprint={"what": "test"}, progress=False)
    return curve, calls


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    settings = TrainSettings(steps=6, batch_size=2, seq_len=16, warmup=2, eval_every=3, checkpoint_every=2)
    straight = tiny_model()
    curve, _ = _run(straight, settings, tmp_path / "a.ckpt")
    killed = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        _run(killed, settings, tmp_path / "b.ckpt", stop_at=5)  # checkpoint at step 4, killed in step 5
    resumed = tiny_model()
    curve_b, calls = _run(resumed, settings, tmp_path / "b.ckpt")
    assert len(calls) == 2, "only the steps after the last checkpoint run again"
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    assert curve_b.losses == pytest.approx(curve.losses) and [p["step"] for p in curve_b.points] == [0, 3, 6]


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    _run(tiny_model(), TrainSettings(steps=2, batch_size=2, seq_len=16, warmup=0), tmp_path / "c.ckpt")
    with pytest.raises(ValueError, match="another run"):
        load_checkpoint(tmp_path / "c.ckpt", {"settings": {}, "what": "other"})


def test_layers_kept_by_importance_and_the_hidden_loss():
    assert S.keep_by_importance([5.0, 900.0, 60.0, 7.0, 300.0], 3) == [1, 2, 4]
    with pytest.raises(ValueError, match="n_keep"):
        S.keep_by_importance([1.0, 2.0], 3)
    h = torch.randn(2, 5, 8)
    assert S.hidden_distill_loss(torch.zeros_like(h), h).item() == pytest.approx(1.0)
    assert S.hidden_distill_loss(h, h).item() == 0.0


def test_trainable_student_trains_everything_but_the_shared_table():
    teacher = tiny_model(num_layers=3)
    student = S.trainable_student(teacher, [0, 2])
    frozen = [n for n, p in student.named_parameters() if not p.requires_grad]
    assert frozen == ["model.embed_tokens.weight"] and student.config.num_hidden_layers == 2
    assert S.final_hidden(student, torch.tensor([[2, 5, 7]])).shape == (1, 3, teacher.config.hidden_size)


def test_train_command_rejects_bad_flags_before_loading_anything(capsys):
    assert main(["train", "student", "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err


def test_decode_speeds_time_each_model_on_the_bench_prompt():
    # decode time = generate(n) - generate(1): with a tiny model's ~1 ms steps, 3 of 4 tokens timed once were within
    # one busy moment's noise and gave a negative difference (NaN tok/s) in a full-suite run; 15 steps, best of 3
    speeds = S.decode_speeds({"two layers": tiny_model(), "one layer": tiny_model(num_layers=1)}, ByteTokenizer(),
                             new_tokens=16, repeats=3)
    assert set(speeds) == {"two layers", "one layer"} and all(v > 0 for v in speeds.values())


def test_a_stopped_run_goes_on_as_if_never_stopped(tmp_path):
    settings = TrainSettings(steps=6, batch_size=2, seq_len=16, warmup=2, eval_every=3, checkpoint_every=5)
    straight = tiny_model()
    curve, _ = _run(straight, settings, tmp_path / "a.ckpt")
    stopped = tiny_model()
    windows = torch.randint(3, 500, (12, 16), generator=torch.Generator().manual_seed(0))
    loss = lambda rows: F.cross_entropy(stopped(input_ids=windows[rows][:, :-1]).logits.flatten(0, 1),
                                        windows[rows][:, 1:].flatten())
    first = train(stopped, loss, 12, settings, lambda: 1.0, tmp_path / "b.ckpt", {"what": "test"}, False, stop_at=4)
    assert [p["step"] for p in first.points] == [0, 3, 4] and len(first.losses) == 4, "evaluated where it stopped"
    resumed = tiny_model()
    curve_b, calls = _run(resumed, settings, tmp_path / "b.ckpt")
    assert len(calls) == 2 and curve_b.losses == pytest.approx(curve.losses)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    with pytest.raises(ValueError, match="stop_at"):
        train(tiny_model(), loss, 12, settings, lambda: 1.0, stop_at=7)
    with pytest.raises(ValueError, match="past stop_at=3"):
        train(tiny_model(), loss, 12, settings, lambda: 1.0, tmp_path / "b.ckpt", {"what": "test"}, False, stop_at=3)


def test_a_shared_student_ties_pairs_from_their_mean_and_keeps_them_tied():
    teacher = tiny_model(num_layers=4)
    student = S.trainable_student(teacher, [0, 1, 2, 3], share=2, importance=[5.0, 1.0, 2.0, 9.0])
    assert D.layer_storage_groups(student) == [[0, 1], [2, 3]] and student.config.num_hidden_layers == 4
    up = lambda model, i: model.model.layers[i].mlp.up_proj.weight
    assert torch.equal(up(student, 1), up(teacher, 0)) and torch.equal(up(student, 2), up(teacher, 3)), \
        "each pair starts from its more important layer"
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    S.final_hidden(student, torch.tensor([[2, 5, 7]])).pow(2).mean().backward()
    optimizer.step()
    assert D.layer_storage_groups(student) == [[0, 1], [2, 3]], "a step moves both uses of a shared weight at once"
    with pytest.raises(ValueError, match="share"):
        S.StudentSettings(n_keep=12, share=5)
    with pytest.raises(ValueError, match="importance"):
        S.trainable_student(teacher, [0, 1], share=2)


def test_train_student_checks_share_and_stop_at_before_loading_anything(capsys):
    assert main(["train", "student", "--share", "5"]) == 2
    assert "share" in capsys.readouterr().err
    assert main(["train", "student", "--steps", "100", "--stop-at", "101"]) == 2
    assert "--stop-at" in capsys.readouterr().err
    assert main(["train", "student", "--relax-rank", "4"]) == 2, "relaxing needs --share"
    assert "relax_rank" in capsys.readouterr().err


def test_relaxed_sharing_ties_only_the_linears_and_starts_as_strict_sharing():
    teacher = tiny_model(num_layers=4)
    relaxed = S.trainable_student(teacher, [0, 1, 2, 3], share=2, importance=[5.0, 1.0, 2.0, 9.0], relax_rank=2)
    layers = relaxed.model.layers
    assert layers[0].mlp.up_proj.base.weight is layers[1].mlp.up_proj.base.weight, "the pair's linears stay shared"
    assert layers[0].mlp.up_proj.lora_A is not layers[1].mlp.up_proj.lora_A and \
        layers[0].input_layernorm.weight is not layers[1].input_layernorm.weight, "each use has its own LoRA and norms"
    assert torch.equal(layers[1].input_layernorm.weight, teacher.model.layers[1].input_layernorm.weight)
    assert all(m.lora_B.abs().sum() == 0 for m in relaxed.modules() if hasattr(m, "lora_B")), "B = 0 at the start"
    assert all(p.requires_grad == ("embed_tokens" not in n) for n, p in relaxed.named_parameters())
    with pytest.raises(ValueError, match="relax_rank"):
        S.StudentSettings(n_keep=4, relax_rank=2)


def test_a_shared_run_reports_and_loads_back_from_its_checkpoint(tmp_path, monkeypatch):
    import json

    from cookbook.evaluate import PerplexityProtocol, perplexity

    monkeypatch.setenv("COOKBOOK_CACHE", str(tmp_path / "cache"))
    teacher, tok = tiny_model(num_layers=4), ByteTokenizer()
    tiny = PerplexityProtocol(seq_len=32, stride=32, max_tokens=64)
    settings = S.StudentSettings(n_keep=4, share=2, relax_rank=2, protocol=tiny, train=TrainSettings(
        steps=4, batch_size=2, seq_len=32, lr=1e-3, warmup=1, eval_every=1, checkpoint_every=2))
    report = S.student_command(teacher, tok, "tiny", settings, tmp_path / "s.json", progress=False, stop_at=2)
    assert json.loads((tmp_path / "s.json").read_text())["steps run"] == report["steps run"] == 2
    assert report["weights, in the cache folder"] == "student-4-layers-shared-2-relaxed-2-hidden-kd.ckpt"
    loaded = S.load_shared_student(teacher, settings)
    assert perplexity(loaded, tok, tiny) == pytest.approx(report["student perplexity"], rel=1e-5)
    assert S.load_shared_student(teacher, S.StudentSettings(n_keep=4, share=2, protocol=tiny)) is None
