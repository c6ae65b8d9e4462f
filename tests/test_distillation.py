"""Unit tests for cookbook.distillation: losses on known tensors, temperature limits, students cut
from a teacher, shared parameters (one storage) and the errors users see."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cookbook import count_parameters
from cookbook import distillation as D
from cookbook import factorized_embedding as FE
from cookbook.models import ByteTokenizer, cache_dir, tiny_model


def _logits(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------- losses on known tensors


def test_kl_on_a_two_token_example_matches_hand_computation():
    teacher = torch.tensor([[math.log(0.75), math.log(0.25)]])  # p = (0.75, 0.25)
    student = torch.tensor([[0.0, 0.0]])  # q = (0.5, 0.5)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert D.kd_kl_loss(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_kl_matches_torch_kl_div_times_t_squared():
    s, t = _logits(5, 7, 50, seed=1), _logits(5, 7, 50, seed=2)
    for temperature in (0.5, 1.0, 2.0, 4.0):
        reference = F.kl_div(
            F.log_softmax(s / temperature, -1).flatten(0, 1), F.log_softmax(t / temperature, -1).flatten(0, 1),
            log_target=True, reduction="batchmean",
        ) * temperature**2
        assert D.kd_kl_loss(s, t, temperature).item() == pytest.approx(reference.item(), rel=1e-5)


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    t = _logits(4, 30)
    assert D.kd_kl_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert D.kd_kl_loss(t + _logits(4, 30, seed=5), t, 2.0).item() > 0.01


def test_topk_kl_with_full_k_equals_full_kl():
    s, t = _logits(3, 6, 40, seed=3), _logits(3, 6, 40, seed=4)
    values, indices = D.teacher_topk(t, 40)
    assert indices.dtype == torch.int32
    full, topk = D.kd_kl_loss(s, t, 2.0), D.kd_kl_loss_topk(s, values, indices, 2.0)
    assert topk.item() == pytest.approx(full.item(), rel=1e-5)


def test_topk_kl_on_a_known_tensor():
    # teacher top-2 of 3 tokens: renormalised to softmax([2, 1]) over tokens 0 and 2.
    student = torch.tensor([[0.0, 1.0, 0.0]])
    values, indices = torch.tensor([[2.0, 1.0]]), torch.tensor([[0, 2]])
    p = torch.softmax(torch.tensor([2.0, 1.0]), 0)
    log_q = torch.log_softmax(student[0], 0)[[0, 2]]
    expected = (p * (p.log() - log_q)).sum().item()
    assert D.kd_kl_loss_topk(student, values, indices, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_distillation_loss_mixes_kl_and_ce():
    s, t = _logits(2, 5, 32, seed=6), _logits(2, 5, 32, seed=7)
    labels = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))
    values, indices = D.teacher_topk(t, 8)
    ce = F.cross_entropy(s.flatten(0, 1), labels.flatten())
    kl = D.kd_kl_loss_topk(s, values, indices, 2.0)
    loss, kl_out, ce_out = D.distillation_loss(s, labels, values, indices, temperature=2.0, alpha=0.3)
    assert ce_out.item() == pytest.approx(ce.item(), rel=1e-6)
    assert kl_out.item() == pytest.approx(kl.item(), rel=1e-6)
    assert loss.item() == pytest.approx(0.3 * kl.item() + 0.7 * ce.item(), rel=1e-6)
    assert D.distillation_loss(s, labels, values, indices, 2.0, alpha=0.0)[0].item() == pytest.approx(ce.item())
    assert D.distillation_loss(s, labels, values, indices, 2.0, alpha=1.0)[0].item() == pytest.approx(kl.item())


def test_distillation_loss_ignores_masked_labels():
    s, t = _logits(1, 4, 16, seed=8), _logits(1, 4, 16, seed=9)
    labels = torch.tensor([[1, 2, -100, -100]])
    values, indices = D.teacher_topk(t, 4)
    _, kl, ce = D.distillation_loss(s, labels, values, indices, 1.0, 0.5)
    assert ce.item() == pytest.approx(F.cross_entropy(s[0, :2], labels[0, :2]).item(), rel=1e-6)
    assert kl.item() == pytest.approx(D.kd_kl_loss_topk(s[0, :2], values[0, :2], indices[0, :2]).item(), rel=1e-6)


# ---------------------------------------------------------------- temperature limits


def test_soft_targets_tend_to_one_hot_as_t_goes_to_zero():
    logits = torch.tensor([1.0, 3.0, 2.5, -1.0])
    assert torch.allclose(D.soft_targets(logits, 1e-3), F.one_hot(torch.tensor(1), 4).float(), atol=1e-6)


def test_soft_targets_tend_to_uniform_as_t_grows():
    logits = _logits(10)
    assert torch.allclose(D.soft_targets(logits, 1e5), torch.full((10,), 0.1), atol=1e-4)
    entropies = [-(p * p.log()).sum().item() for p in (D.soft_targets(logits, t) for t in (0.5, 1, 2, 4))]
    assert entropies == sorted(entropies)  # higher T, softer targets


def test_high_temperature_kl_becomes_logit_matching():
    # Hinton et al. 2015: for large T, T^2 * KL -> mean over tokens of sum_i (dz_i - mean dz)^2 / (2V).
    s, t = _logits(3, 20, seed=10, scale=1.0).double(), _logits(3, 20, seed=11, scale=1.0).double()
    d = (t - s) - (t - s).mean(-1, keepdim=True)
    expected = ((d**2).sum(-1) / (2 * 20)).mean().item()
    assert D.kd_kl_loss(s, t, 1e3).item() == pytest.approx(expected, rel=1e-2)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.05, 20.0), st.integers(0, 10_000))
def test_kl_is_non_negative_and_topk_kl_is_never_below_zero(temperature, seed):
    s, t = _logits(4, 24, seed=seed), _logits(4, 24, seed=seed + 1)
    assert D.kd_kl_loss(s, t, temperature).item() >= -1e-5
    values, indices = D.teacher_topk(t, 6)
    # sum_k p_k log(p_k / q_k) >= -log(sum_k q_k) >= 0 when the teacher is renormalised over k tokens
    assert D.kd_kl_loss_topk(s, values, indices, temperature).item() >= -1e-5


# ---------------------------------------------------------------- clear errors


def test_mismatched_vocabularies_raise_clear_errors():
    with pytest.raises(ValueError, match="same tokenizer"):
        D.kd_kl_loss(_logits(2, 10), _logits(2, 12))
    values, indices = D.teacher_topk(_logits(2, 50), 5)
    with pytest.raises(ValueError, match="share one vocabulary"):
        D.kd_kl_loss_topk(_logits(2, 20), values, indices)


def test_check_same_vocabulary_names_the_problem():
    D.check_same_vocabulary(ByteTokenizer({"a": 0, "b": 1}), ByteTokenizer({"a": 0, "b": 1}))
    with pytest.raises(ValueError, match="one shared vocabulary"):
        D.check_same_vocabulary(ByteTokenizer({"a": 0, "b": 1}), ByteTokenizer({"a": 0, "c": 1}))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature_is_rejected(temperature):
    with pytest.raises(ValueError, match="temperature"):
        D.kd_kl_loss(_logits(2, 5), _logits(2, 5), temperature)


def test_bad_alpha_k_and_shapes_are_rejected():
    s, labels = _logits(1, 3, 8), torch.zeros(1, 3, dtype=torch.long)
    values, indices = D.teacher_topk(_logits(1, 3, 8), 2)
    with pytest.raises(ValueError, match="alpha"):
        D.distillation_loss(s, labels, values, indices, alpha=1.5)
    with pytest.raises(ValueError, match="labels"):
        D.distillation_loss(s, labels[:, :2], values, indices)
    with pytest.raises(ValueError, match="k must be"):
        D.teacher_topk(s, 9)
    with pytest.raises(ValueError, match="Shapes do not line up"):
        D.kd_kl_loss_topk(s, values[:, :2], indices[:, :2])


# ---------------------------------------------------------------- students cut from a teacher


def test_evenly_spaced_layers():
    assert D.evenly_spaced_layers(18, 6) == [2, 5, 8, 11, 14, 17]
    assert D.evenly_spaced_layers(18, 9) == [1, 3, 5, 7, 9, 11, 13, 15, 17]
    assert D.evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="n_keep"):
        D.evenly_spaced_layers(18, 0)


def test_student_with_all_layers_reproduces_the_teacher():
    teacher = tiny_model(num_layers=3)
    student = D.make_student(teacher, [0, 1, 2])
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-5)


def test_student_copies_layers_and_shares_only_the_embedding():
    teacher = tiny_model(num_layers=4)
    student = D.make_student(teacher, [1, 3])
    assert student.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    assert student.model.embed_tokens.weight.data_ptr() == teacher.model.embed_tokens.weight.data_ptr()
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # tied
    src, dst = teacher.model.layers[3].mlp.up_proj.weight, student.model.layers[1].mlp.up_proj.weight
    assert torch.equal(src, dst) and src.data_ptr() != dst.data_ptr()  # a copy, not the teacher's tensor
    copied = D.make_student(teacher, [0], share_embedding=False)
    assert copied.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="distinct layer indices"):
        D.make_student(teacher, [0, 4])


def test_student_generates_with_a_kv_cache_like_without():
    student = D.make_student(tiny_model(num_layers=4), [0, 2])
    ids = torch.randint(3, 512, (1, 6), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        cached = student.generate(ids, use_cache=True, **kwargs)
        uncached = student.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_training_the_student_leaves_the_teacher_unchanged_and_lowers_the_loss():
    teacher = tiny_model(num_layers=4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = D.make_student(teacher, [0, 3])
    frozen = D.freeze_embedding(student)
    assert frozen == 512 * 64
    inputs = torch.randint(3, 512, (8, 16), generator=torch.Generator().manual_seed(2))
    cache = D.cache_teacher_topk(teacher, inputs.repeat(4, 1), k=8)
    assert cache.values.shape == (32, 15, 8) and cache.values.dtype == torch.float16
    assert bool((cache.mass > 0).all() and (cache.mass <= 1 + 1e-4).all())
    torch.manual_seed(0)
    log = D.train_student(student, cache, steps=8, batch_size=4, lr=3e-3, alpha=0.5)
    assert len(log.loss) == 8 and log.loss[-1] < log.loss[0]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match="windows"):
        D.train_student(student, cache, steps=9, batch_size=4)


def test_saved_student_loads_back_identically(tmp_path):
    from transformers import AutoModelForCausalLM

    student = D.make_student(tiny_model(num_layers=4), [1, 3])
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-5)


def test_student_dir_is_in_the_cache():
    assert D.student_dir().parent == cache_dir()


# ---------------------------------------------------------------- ALBERT: sharing and factorizing


def test_shared_layers_use_one_storage_and_count_once():
    model = tiny_model(num_layers=4)
    unique_before = count_parameters(model)
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    D.share_layer_parameters(model, D.consecutive_groups(4, 2))
    layers = model.model.layers
    for a, b in ((0, 1), (2, 3)):
        for (name, pa), (_, pb) in zip(layers[a].named_parameters(), layers[b].named_parameters(), strict=True):
            assert pa is pb and pa.data_ptr() == pb.data_ptr(), name
    assert layers[0].mlp.up_proj.weight.data_ptr() != layers[2].mlp.up_proj.weight.data_ptr()
    assert count_parameters(model) == unique_before - 2 * per_layer
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]  # own KV-cache slots


def test_shared_parameters_stay_shared_through_training():
    model = tiny_model(num_layers=2)
    D.share_layer_parameters(model, [[0, 1]])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(4))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)


def test_share_groups_are_validated():
    model = tiny_model(num_layers=4)
    with pytest.raises(ValueError, match="disjoint"):
        D.share_layer_parameters(model, [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="group_size"):
        D.consecutive_groups(4, 3)


def test_repeat_layers_runs_each_layer_twice_on_one_storage():
    model = D.make_student(tiny_model(num_layers=4), [1, 3])
    unique_before = count_parameters(model)
    types_before = list(model.config.layer_types)
    D.repeat_layers(model, 2)
    layers = model.model.layers
    assert model.config.num_hidden_layers == len(layers) == 4
    assert model.config.layer_types == [t for t in types_before for _ in range(2)]
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]
    assert layers[0].mlp.up_proj.weight.data_ptr() == layers[1].mlp.up_proj.weight.data_ptr()
    assert D.layer_storage_groups(model) == [[0, 1], [2, 3]]
    assert count_parameters(model) == unique_before  # deeper, not bigger
    ids = torch.randint(3, 512, (1, 6), generator=torch.Generator().manual_seed(6))
    kwargs = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    with torch.no_grad():  # four KV-cache slots, one per use
        assert torch.equal(model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs))
    with pytest.raises(ValueError, match="uses"):
        D.repeat_layers(model, 0)


def test_repeat_layers_once_changes_nothing():
    model = tiny_model(num_layers=2)
    ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        after = D.repeat_layers(model, 1)(input_ids=ids).logits
    assert torch.equal(before, after)
    assert D.layer_storage_groups(model) == [[0], [1]]


def test_matmul_flops_count_every_use_of_a_shared_weight():
    model = tiny_model(num_layers=2)
    per_layer = sum(m.in_features * m.out_features for m in model.model.layers[0].modules()
                    if isinstance(m, torch.nn.Linear))
    head = 512 * 64
    assert D.matmul_flops_per_token(model) == 2 * (2 * per_layer + head)
    D.share_layer_parameters(model, [[0, 1]])  # half the unique weights, the same work
    assert D.matmul_flops_per_token(model) == 2 * (2 * per_layer + head)
    FE.factorize_embedding(model, rank=8)  # lookup free, then 8 x 64; head 64 x 8 + 8 x 512
    assert D.matmul_flops_per_token(model) == 2 * (2 * per_layer + 8 * 64 + 64 * 8 + 8 * 512)


def test_kd_vs_ce_trains_both_students_per_sample_and_reports_them(tmp_path):
    from test_bench import ByteTokenizer  # the tiny model's tokenizer, one id per byte

    from cookbook.evaluate import PerplexityProtocol
    from cookbook.kd_vs_ce import PairSettings, kd_vs_ce_command, summarize

    teacher = tiny_model(num_layers=3)
    settings = PairSettings(n_keep=2, steps=2, seq_len=16, k=8, seeds=(1, 2),
                            protocol=PerplexityProtocol(seq_len=16, stride=16, max_tokens=64))
    report = kd_vs_ce_command(teacher, ByteTokenizer(), "tiny", settings, tmp_path / "r.json", progress=False)
    assert [p["seed"] for p in report["pairs"]] == [1, 2] and report["samples"] == 2
    assert all(math.isfinite(p[k]) for p in report["pairs"] for k in ("CE only", "distilled"))
    assert json.loads((tmp_path / "r.json").read_text())["pairs"] == report["pairs"]
    assert summarize([{"CE only": 4.0, "distilled": 2.0}, {"CE only": 1.0, "distilled": 2.0}]) == {
        "samples": 2, "distilled lower": 1, "ratio, geometric mean": 1.0, "ratio, min": 0.5, "ratio, max": 2.0}
    with pytest.raises(ValueError, match="seeds"):
        PairSettings(seeds=())


def test_kd_vs_ce_command_refuses_bad_settings_with_a_clear_message(capsys):
    from cookbook.cli import main

    assert main(["train", "kd-vs-ce", "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err
