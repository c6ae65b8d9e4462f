"""Unit tests for cookbook.lora on small random tensors and the tiny random Gemma 3 (fast, no real model)."""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cookbook import lora
from cookbook.models import ByteTokenizer, tiny_model
from cookbook.quantization import NF4Linear

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _randomise_b(model: nn.Module, seed: int = 1) -> None:
    """B starts at zero; give it values so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)


def _ids(n: int = 2, t: int = 12, vocab: int = 512) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- the adapter layer


@settings(max_examples=25, deadline=None)
@given(rank=st.integers(1, 6), alpha=st.floats(0.5, 64.0), seed=st.integers(0, 1000))
def test_merged_weight_is_base_plus_scale_b_a(rank: int, alpha: float, seed: int) -> None:
    torch.manual_seed(seed)
    base = nn.Linear(12, 7)
    layer = lora.LoRALinear(base, rank=rank, alpha=alpha)
    with torch.no_grad():
        layer.lora_B.normal_()
    merged = layer.merged()
    expected = base.weight + (alpha / rank) * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(merged.weight, expected)
    torch.testing.assert_close(merged.bias, base.bias)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)


def test_new_adapter_starts_at_the_base_output_and_only_trains_a_b() -> None:
    base = nn.Linear(16, 8)
    layer = lora.LoRALinear(base, rank=4, alpha=8)
    x = torch.randn(2, 16)
    torch.testing.assert_close(layer(x), base(x))
    layer(x).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert layer.scale == 2.0


def test_add_lora_counts_and_freezes() -> None:
    model = tiny_model()
    names = lora.add_lora(model, TARGETS, rank=4, alpha=8)
    assert len(names) == 3 * model.config.num_hidden_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    expected = sum(4 * (layer.in_features + layer.out_features) for layer in lora.lora_layers(model).values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_merge_lora_gives_the_same_model_output() -> None:
    model = tiny_model()
    lora.add_lora(model, TARGETS, rank=4, alpha=8)
    _randomise_b(model)
    ids = _ids()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        lora.merge_lora(model)
        merged = model(input_ids=ids).logits
    assert not lora.lora_layers(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("q_proj"))
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- save / load


def test_adapter_save_load_round_trip(tmp_path) -> None:
    model = tiny_model()
    lora.add_lora(model, TARGETS, rank=4, alpha=8)
    _randomise_b(model)
    path = lora.save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = tiny_model()
    names = lora.load_adapter(fresh, path)
    assert sorted(names) == sorted(lora.lora_layers(model))
    for name, layer in lora.lora_layers(fresh).items():
        assert layer.rank == 4 and layer.alpha == 8
        torch.testing.assert_close(layer.lora_A, lora.lora_layers(model)[name].lora_A, rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_B, lora.lora_layers(model)[name].lora_B, rtol=0, atol=0)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    # the file holds only the adapters, a small fraction of the model
    assert path.stat().st_size < 0.2 * sum(p.numel() * 4 for p in fresh.parameters())


def test_load_adapter_into_a_different_model_says_what_does_not_match(tmp_path) -> None:
    model = tiny_model()
    lora.add_lora(model, TARGETS, rank=4, alpha=8)
    path = lora.save_adapter(model, tmp_path / "adapter.safetensors")
    with pytest.raises(ValueError, match="different model"):
        lora.load_adapter(tiny_model(hidden_size=32), path)
    with pytest.raises(ValueError, match="does not have"):
        lora.load_adapter(tiny_model(num_layers=1), path)
    with pytest.raises(FileNotFoundError, match="save_adapter"):
        lora.load_adapter(tiny_model(), tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- clear errors


def test_unknown_target_module_is_a_clear_error() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=r"No Linear layer named 'query'.*q_proj"):
        lora.add_lora(model, ["q_proj", "query"])
    assert not lora.lora_layers(model), "a failed add_lora must not leave half-adapted layers"
    with pytest.raises(ValueError, match="targets is empty"):
        lora.add_lora(model, [])


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": 2.5}, "rank must be a positive integer"),
    ({"alpha": 0}, "alpha must be > 0"),
    ({"dropout": 1.0}, "dropout must be in"),
])
def test_bad_lora_arguments(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        lora.add_lora(tiny_model(), ["q_proj"], **kwargs)


def test_other_misuse_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="larger than the layer"):
        lora.LoRALinear(nn.Linear(4, 3), rank=8)
    with pytest.raises(TypeError, match="in_features"):
        lora.LoRALinear(nn.LayerNorm(4))
    model = tiny_model()
    with pytest.raises(ValueError, match="no LoRA adapters to merge"):
        lora.merge_lora(model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        for p in model.parameters():
            p.requires_grad_(False)
        lora.train(model, [], steps=1)
    lora.add_lora(model, ["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(model, ["v_proj"])


# ---------------------------------------------------------------- peft cross-check


def test_ours_and_peft_give_the_same_output() -> None:
    peft = lora.import_peft()
    ours = tiny_model()
    lora.add_lora(ours, TARGETS, rank=4, alpha=8)
    _randomise_b(ours)
    theirs = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                             lora_dropout=0.0))
    assert lora.copy_lora_to_peft(lora.lora_state_dict(ours), theirs) == len(lora.lora_layers(ours))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- QLoRA base


def test_lora_on_an_nf4_base_trains_only_the_adapter_and_refuses_to_merge() -> None:
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(64, 32), block_size=64)
    layer = lora.LoRALinear(base, rank=4, alpha=8)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(x).square().mean().backward()
    assert layer.lora_A.grad is not None and not any(p.requires_grad for p in base.parameters())
    with pytest.raises(TypeError, match="re-quantize"):
        layer.merged()


def test_quantized_base_is_dequantized_again_in_backward_not_saved() -> None:
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(256, 512), block_size=64)
    x = torch.randn(4, 256, requires_grad=True)
    with lora.SavedActivations() as naive:
        y_naive = base(x)
    with lora.SavedActivations() as ours:
        y_ours = lora.frozen_base_forward(base, x)
    torch.testing.assert_close(y_ours, y_naive)
    weight_bytes = 256 * 512 * 4
    assert naive.bytes >= weight_bytes and ours.bytes < 0.1 * weight_bytes
    (g_naive,) = torch.autograd.grad(y_naive.sum(), x)
    (g_ours,) = torch.autograd.grad(y_ours.sum(), x)
    torch.testing.assert_close(g_ours, g_naive)


def test_remove_lora_restores_the_base_model() -> None:
    model = tiny_model()
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    lora.add_lora(model, TARGETS)
    _randomise_b(model)
    lora.remove_lora(model)
    assert not lora.lora_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no LoRA adapters to remove"):
        lora.remove_lora(model)


# ---------------------------------------------------------------- task, batches, loss, memory accounting


def test_make_batch_scores_only_the_completion_and_eos() -> None:
    tok = ByteTokenizer()
    examples = [lora.Example("ab", "xyz"), lora.Example("abcd", "q"), lora.Example("a", "b")]
    batch = lora.make_batch(tok, examples)
    assert batch.input_ids.shape == (3, 7) and batch.attention_mask[2].tolist() == [1] * 4 + [0] * 3
    assert batch.input_ids[2, 4:].tolist() == [0, 0, 0] and batch.labels[2, 4:].tolist() == [-100] * 3
    assert batch.labels[0].tolist() == [-100, -100, -100, *tok("xyz", add_special_tokens=False).input_ids, 1]
    assert batch.labels[1].tolist() == [-100] * 5 + [*tok("q", add_special_tokens=False).input_ids, 1]
    assert batch.completion_tokens == 4 + 2 + 2
    with pytest.raises(ValueError, match="max_len"):
        lora.make_batch(tok, examples, max_len=5)
    with pytest.raises(ValueError, match="at least one"):
        lora.make_batch(tok, [])


def test_completion_loss_matches_the_full_model_loss() -> None:
    model = tiny_model()
    batch = lora.make_batch(ByteTokenizer(), [lora.Example("hello", " world"), lora.Example("hi", " there!")])
    with torch.no_grad():
        ours = lora.completion_loss(model, batch)
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)


def test_training_lowers_the_loss_and_optimizer_state_is_two_moments() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    lora.add_lora(model, ["q_proj", "v_proj", "up_proj", "down_proj"], rank=4, alpha=8)
    batch = lora.make_batch(ByteTokenizer(), [lora.Example("ab", "cdcdcd"), lora.Example("ba", "dcdcdc")])
    before = lora.heldout_loss(model, batch)
    losses, optimizer = lora.train(model, [batch], steps=30, lr=3e-2)
    # a random tiny model's logits are bounded (small tied embeddings), so the floor is ~4.9 nats, not 0
    assert lora.heldout_loss(model, batch) < before - 0.5
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = lora.optimizer_state_bytes(optimizer)  # exp_avg + exp_avg_sq, plus one scalar step per tensor
    assert 2 * lora.gradient_bytes(trainable) <= state <= 2 * lora.gradient_bytes(trainable) + 8 * len(trainable)


def test_gradient_checkpointing_saves_fewer_activations() -> None:
    model = tiny_model(num_layers=4)
    lora.add_lora(model, ["q_proj", "v_proj"], rank=4)
    batch = lora.make_batch(ByteTokenizer(), [lora.Example("x" * 40, "y" * 40)] * 4)
    model.train()
    with lora.SavedActivations(model) as plain:
        lora.completion_loss(model, batch).backward()
    lora.set_gradient_checkpointing(model, True)
    with lora.SavedActivations(model) as ckpt:
        lora.completion_loss(model, batch).backward()
    assert 0 < ckpt.bytes < 0.5 * plain.bytes
    lora.set_gradient_checkpointing(model, False)
    with lora.SavedActivations(model) as again:
        lora.completion_loss(model, batch)
    assert again.bytes > 2 * ckpt.bytes


def test_task_file_and_record_parsing() -> None:
    train, heldout = lora.load_task("train"), lora.load_task("eval")
    assert len(train) >= 50 and len(heldout) >= 20
    assert not {e.prompt for e in train} & {e.prompt for e in heldout}
    assert all(lora.parse_record(e.completion) is not None for e in train + heldout)
    with pytest.raises(ValueError, match="No split 'test'"):
        lora.load_task("test")
    assert lora.parse_record(' {"capital": "Oslo"}') == {"capital": "Oslo"}
    assert lora.parse_record("1998") is None
    assert lora.parse_record('{"capital": "Oslo", "x": 1}') is None
