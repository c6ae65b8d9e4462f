import pytest

from cookbook import calibration_batch, load_text
from cookbook.data import available_texts


def test_shipped_texts_are_there():
    assert {"shakespeare_train", "shakespeare_eval", "python_reference_eval"} <= set(available_texts())
    assert "PROSPERO" in load_text("shakespeare_eval")


def test_unknown_text_lists_the_available_ones():
    with pytest.raises(ValueError, match="shakespeare_eval"):
        load_text("wikitext")


def test_calibration_batch_shape_bos_and_seed(tokenizer):
    a = calibration_batch(tokenizer, n_samples=3, seq_len=16, seed=1)
    b = calibration_batch(tokenizer, n_samples=3, seq_len=16, seed=1)
    assert a.shape == (3, 16)
    assert (a[:, 0] == tokenizer.bos_token_id).all()
    assert (a == b).all()
    with pytest.raises(ValueError):
        calibration_batch(tokenizer, n_samples=0)


def test_copy_task_repeats_the_passage_start(tokenizer):
    from cookbook.data import copy_task

    ids = copy_task(tokenizer, passage_tokens=40, cue_tokens=8)
    assert ids[0, 0] == tokenizer.bos_token_id
    assert ids[0, 1:9].tolist() == ids[0, -8:].tolist()  # the cue is the passage's first 8 tokens
    with pytest.raises(ValueError, match="cue_tokens"):
        copy_task(tokenizer, passage_tokens=8, cue_tokens=8)
    with pytest.raises(ValueError, match="too far"):
        copy_task(tokenizer, start=10**7)
