import pytest
import torch

from cookbook import pruning as P
from cookbook import recovery_training as RT
from cookbook.cli import main
from cookbook.core import decoder_linears
from cookbook.evaluate import PerplexityProtocol
from cookbook.models import ByteTokenizer, tiny_model
from cookbook.trainer import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = PerplexityProtocol(seq_len=32, stride=32, max_tokens=64)


def tiny_settings(pattern: str) -> RT.RecoverySettings:
    train = TrainSettings(steps=4, batch_size=2, seq_len=32, lr=1e-3, warmup=1, eval_every=2, checkpoint_every=2)
    return RT.RecoverySettings(pattern=pattern, calib_samples=4, calib_seq_len=32, train=train, protocol=TINY,
                               second_protocol=TINY)


def test_patterns_parse_and_bad_ones_say_both_forms():
    assert RT.parse_pattern("50%") == (0.5, None) and RT.parse_pattern(" 2:4 ") == (None, (2, 4))
    with pytest.raises(ValueError, match="'50%'.*'2:4'"):
        RT.parse_pattern("half")
    with pytest.raises(ValueError, match="impossible"):
        RT.parse_pattern("100%")


def test_the_pruned_copy_shares_the_frozen_table_and_leaves_the_teacher_dense():
    teacher, tok = tiny_model(), ByteTokenizer()
    pruned = RT.wanda_pruned_copy(teacher, tok, tiny_settings("50%"))
    assert P.sparsity_of(pruned) == pytest.approx(0.5) and P.sparsity_of(teacher) == 0.0
    assert pruned.model.embed_tokens.weight is teacher.model.embed_tokens.weight
    assert [n for n, p in pruned.named_parameters() if not p.requires_grad] == ["model.embed_tokens.weight"]


@pytest.mark.parametrize("pattern", ["50%", "2:4"])
def test_training_moves_the_kept_weights_and_never_the_zeros(pattern):
    teacher, tok = tiny_model(), ByteTokenizer()
    settings = tiny_settings(pattern)
    pruned = RT.wanda_pruned_copy(teacher, tok, settings)
    zeros, before = RT.zero_counts(pruned), {n: l.weight.detach().clone() for n, l in decoder_linears(pruned).items()}
    run = RT.recovery_run(teacher, pruned, tok, settings, checkpoint=None, progress=False)
    assert RT.zero_counts(pruned) == zeros, "the pruned weights stay exactly zero"
    moved = [not torch.equal(before[n], l.weight) for n, l in decoder_linears(pruned).items()]
    assert all(moved) and all(torch.isfinite(torch.tensor(run["losses"])))
    assert [p["step"] for p in run["points"]] == [0, 2, 4]
    if pattern == "2:4":
        assert all(P.follows_nm(l.weight, 2, 4) for l in decoder_linears(pruned).values())
    assert not any(l.weight._backward_hooks for l in decoder_linears(pruned).values()), "the hooks are removed"


def test_train_recovery_rejects_a_bad_pattern_before_loading_anything(capsys):
    assert main(["train", "recovery", "--pattern", "half"]) == 2
    assert "2:4" in capsys.readouterr().err


def test_the_command_writes_a_report_and_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("COOKBOOK_CACHE", str(tmp_path / "cache"))
    teacher, tok = tiny_model(), ByteTokenizer()
    report = RT.recovery_command(teacher, tok, "tiny", tiny_settings("50%"), tmp_path / "r.json", progress=False)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["recovered perplexity"] == report["recovered perplexity"] and saved["sparsity"] == pytest.approx(0.5)
    assert saved["recovered ratio to dense"] == pytest.approx(
        saved["recovered perplexity"][TINY.text] / saved["dense perplexity"][TINY.text])
    assert RT.recovery_path("50%").with_suffix(".ckpt").exists() and RT.load_recovered("2:4") is None
    loaded = RT.load_recovered("50%")
    assert P.sparsity_of(loaded) == pytest.approx(0.5) and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    again = RT.recovery_command(teacher, tok, "tiny", tiny_settings("50%"), tmp_path / "r2.json", progress=False)
    assert again["recovered perplexity"] == report["recovered perplexity"], "a finished run resumes to its end"
