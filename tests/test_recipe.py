"""Unit tests for cookbook.recipe on the tiny random Gemma 3."""

import pytest
import torch

from cookbook import decoding as dec
from cookbook import kernels as K
from cookbook import quantization as Q
from cookbook import recipe as R
from cookbook.measure import model_bytes
from cookbook.models import ByteTokenizer, tiny_model

SMALL = R.Recipe(distill_steps=3, distill_seq_len=24, top_k=8, group_size=32, calib_samples=2, calib_seq_len=32)


@pytest.fixture(scope="module")
def applied():
    teacher, tok = tiny_model(num_layers=2), ByteTokenizer()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []

    def after(stage, model, result):
        seen.append((stage, {k: v.clone() for k, v in model.state_dict().items()}, result))

    final = R.apply_recipe(teacher, tok, SMALL, after_stage=after)
    return teacher, tok, before, seen, final


def test_the_teacher_is_left_unchanged(applied):
    teacher, _, before, _, final = applied
    assert final is not teacher
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_stages_run_in_order_and_do_what_they_say(applied):
    teacher, _, _, seen, final = applied
    assert [s for s, _, _ in seen] == list(R.STAGES)
    (_, pruned, width), (_, distilled, log), (_, _, left) = seen
    inter = teacher.config.intermediate_size
    assert width == inter - round(SMALL.mlp_fraction * inter)
    assert pruned["model.layers.0.mlp.down_proj.weight"].shape[1] == width
    changed = {k for k in pruned if not torch.equal(pruned[k], distilled[k])}
    assert changed and all(".mlp." in k for k in changed), "recovery trains the MLP weights only"
    assert len(log.ce) == SMALL.distill_steps and all(torch.isfinite(torch.tensor(log.loss)))
    linears = list(Q.decoder_linears(final).values())
    assert not linears and left == {}, left  # every linear and the head on the packed kernels
    assert sum(isinstance(m, (K.PackedInt4Linear, K.PackedInt8Linear)) for m in final.modules()) == 7 * 2
    assert isinstance(final.model.embed_tokens, Q.EmbedView) and isinstance(final.lm_head, K.PackedInt8Head)
    assert model_bytes(final) < 0.4 * model_bytes(teacher)
    assert not any(p.requires_grad for p in final.parameters())


def test_unpacked_recipe_keeps_the_reference_modules():
    teacher, tok = tiny_model(num_layers=2), ByteTokenizer()
    final = R.apply_recipe(teacher, tok, R.Recipe(**{**SMALL.__dict__, "packed": False, "distill_steps": 1}))
    assert sum(isinstance(m, Q.QuantLinear) for m in final.modules()) == 7 * 2
    assert isinstance(final.lm_head, Q.HeadView)


def test_the_final_model_decodes_the_same_with_and_without_our_cache(applied):
    final = applied[-1]
    prompt = torch.tensor([[2, 40, 41, 42, 43, 44]])  # (1, 6)
    cached, _ = dec.generate_with_cache(final, prompt, 5)
    assert cached.tokens == dec.generate_no_cache(final, prompt, 5).tokens


def test_recovery_runs_under_no_grad_and_refreezes():
    teacher, tok = tiny_model(num_layers=2), ByteTokenizer()
    student = tiny_model(num_layers=2, seed=1)
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))  # (2, 16)
    with torch.no_grad():
        log = R.distill_recovery(student, R.cache_teacher(teacher, student, ids, k=4), steps=2)
    assert len(log.loss) == 2 and not any(p.requires_grad for p in student.parameters())


def test_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="selected no parameters"):
        R.set_trainable(model, lambda name: "nothing" in name)
    assert R.set_trainable(model, lambda name: True) < sum(p.numel() for p in model.parameters())  # embedding frozen
    with pytest.raises(ValueError, match="sparsity"):
        R.Recipe(mlp_fraction=1.5)
    with pytest.raises(ValueError, match="distill_steps"):
        R.Recipe(distill_steps=0)
    with pytest.raises(ValueError, match="alpha"):
        R.Recipe(alpha=2.0)
    with pytest.raises(ValueError, match="share a vocabulary"):
        R.cache_teacher(model, tiny_model(vocab_size=300), torch.ones(1, 8, dtype=torch.long))
