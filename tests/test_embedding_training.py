"""The factorized-embedding fine-tune (`python -m cookbook train embedding`) on the tiny random model: only the
factors train, the body stays the teacher's, the command reports, saves and resumes, and bad settings say why."""

import json

import pytest
import torch

from cookbook import embedding_training as ET
from cookbook.cli import main
from cookbook.evaluate import PerplexityProtocol
from cookbook.models import ByteTokenizer, tiny_model
from cookbook.trainer import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = PerplexityProtocol(seq_len=32, stride=32, max_tokens=64)


def tiny_settings(rank: int = 8) -> ET.EmbeddingSettings:
    train = TrainSettings(steps=4, batch_size=2, seq_len=32, lr=1e-3, warmup=1, eval_every=2, checkpoint_every=2)
    return ET.EmbeddingSettings(rank=rank, calib_samples=4, calib_seq_len=32, train=train, protocol=TINY,
                                second_protocol=TINY)


def test_only_the_factors_train_and_the_body_stays_the_teachers():
    teacher, tok = tiny_model(), ByteTokenizer()
    body_before = {n: p.detach().clone() for n, p in teacher.named_parameters() if "embed_tokens" not in n}
    model = ET.activation_aware_factorized(teacher, tok, tiny_settings())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.embed_tokens.a",
                                                                          "model.embed_tokens.b"]
    a_before = model.model.embed_tokens.a.detach().clone()
    run = ET.embedding_run(teacher, model, tok, tiny_settings(), checkpoint=None, progress=False)
    assert not torch.equal(a_before, model.model.embed_tokens.a) and model.lm_head.a is model.model.embed_tokens.a
    assert all(torch.equal(p, body_before[n]) for n, p in teacher.named_parameters() if n in body_before)
    assert [p["step"] for p in run["points"]] == [0, 2, 4] and all(torch.isfinite(torch.tensor(run["losses"])))


def test_the_command_writes_a_report_saves_the_factors_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("COOKBOOK_CACHE", str(tmp_path / "cache"))
    teacher, tok = tiny_model(), ByteTokenizer()
    report = ET.embedding_command(teacher, tok, "tiny", tiny_settings(), tmp_path / "e.json", progress=False)
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["fine-tuned perplexity"] == report["fine-tuned perplexity"]
    assert saved["ratio to dense"]["fine-tuned"] == pytest.approx(
        saved["fine-tuned perplexity"][TINY.text] / saved["dense perplexity"][TINY.text])
    assert saved["bytes"]["factors"] == 4 * (512 * 8 + 8 * 64)
    assert ET.load_fine_tuned(teacher, rank=16) is None
    loaded = ET.load_fine_tuned(teacher, rank=8)
    from cookbook.evaluate import perplexity
    assert perplexity(loaded, tok, TINY) == pytest.approx(report["fine-tuned perplexity"][TINY.text], rel=1e-5)
    again = ET.embedding_command(teacher, tok, "tiny", tiny_settings(), tmp_path / "e2.json", progress=False)
    assert again["fine-tuned perplexity"] == report["fine-tuned perplexity"], "a finished run resumes to its end"


def test_bad_ranks_are_refused_with_the_reason(capsys):
    with pytest.raises(ValueError, match="rank"):
        ET.EmbeddingSettings(rank=0)
    teacher, tok = tiny_model(), ByteTokenizer()
    with pytest.raises(ValueError, match="below the hidden size 64"):
        ET.embedding_command(teacher, tok, "tiny", tiny_settings(rank=64), None, progress=False)
    assert main(["train", "embedding", "--rank", "0"]) == 2
    assert "rank" in capsys.readouterr().err
