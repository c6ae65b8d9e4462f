"""Unit tests for cookbook.moe on small random tensors and the tiny random Gemma 3 (fast, no real model)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cookbook import moe, moe_training
from cookbook.measure import count_parameters
from cookbook.models import tiny_model


def _layer(num_experts: int = 4, top_k: int = 2, capacity_factor: float | None = None, normalize: bool = True,
           d: int = 16, f: int = 24, seed: int = 0) -> moe.MoEFeedForward:
    torch.manual_seed(seed)
    layer = moe.MoEFeedForward(d, f, num_experts, top_k, capacity_factor, normalize, activation="gelu_pytorch_tanh")
    nn.init.normal_(layer.router.weight, std=0.5)
    return layer


def _reference(layer: moe.MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token by token, the slow obvious way: sum of the kept experts' outputs times their weights."""
    x = x.reshape(-1, layer.hidden_size)
    routing = moe.route(layer.router(x), layer.top_k, layer.normalize)
    capacity = moe.expert_capacity(len(x), layer.num_experts, layer.top_k, layer.capacity_factor)
    keep = moe.queue_positions(routing.experts, layer.num_experts) < capacity
    out = torch.zeros_like(x)
    for i in range(len(x)):
        for j in range(layer.top_k):
            if keep[i, j]:
                e = int(routing.experts[i, j])
                out[i] += routing.weights[i, j] * layer.experts.expert(e, x[i : i + 1])[0]
    return out


def _ids(n: int = 2, t: int = 12, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- routing


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), e=st.integers(1, 9), data=st.data())
def test_topk_weights_sum_to_one_and_pick_the_largest(n, e, data):
    k = data.draw(st.integers(1, e))
    logits = torch.randn(n, e, generator=torch.Generator().manual_seed(n * 31 + e)) * 3
    r = moe.route(logits, k)
    assert torch.allclose(r.weights.sum(-1), torch.ones(n), atol=1e-6)
    assert torch.allclose(r.probs.sum(-1), torch.ones(n), atol=1e-6)
    assert (r.experts.sort(dim=-1).values.diff(dim=-1) != 0).all(), "top-k experts must be distinct"
    chosen_min = r.probs.gather(1, r.experts).min(-1).values
    others = r.probs.scatter(1, r.experts, -1.0).max(-1).values
    assert (chosen_min >= others).all()


def test_unnormalised_weights_are_the_router_probabilities():
    logits = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    r = moe.route(logits, 2, normalize=False)
    assert torch.equal(r.weights, r.probs.gather(1, r.experts))
    assert (r.weights.sum(-1) < 1).all()


@pytest.mark.parametrize("e, k", [(4, 5), (1, 2), (4, 0), (4, -1)])
def test_bad_top_k_gives_a_clear_error(e, k):
    with pytest.raises(ValueError, match="top_k"):
        moe.route(torch.zeros(3, e), k)
    with pytest.raises(ValueError, match="top_k"):
        moe.MoEFeedForward(8, 16, e, k)


@pytest.mark.parametrize("cf", [0.0, -1.0])
def test_bad_capacity_factor(cf):
    with pytest.raises(ValueError, match="capacity_factor"):
        moe.MoEFeedForward(8, 16, 4, 2, capacity_factor=cf)


def test_wrong_hidden_size():
    layer = _layer(d=16)
    with pytest.raises(ValueError, match="hidden size 16"):
        layer(torch.randn(2, 3, 8))


def test_expert_capacity_formula():
    assert moe.expert_capacity(100, 8, 2, 1.0) == 25
    assert moe.expert_capacity(100, 8, 2, 1.25) == math.ceil(1.25 * 200 / 8)
    assert moe.expert_capacity(10, 4, 1, 0.1) == 1
    assert moe.expert_capacity(10, 2, 2, 8.0) == 10, "never more slots than tokens"
    assert moe.expert_capacity(37, 4, 2, None) == 37


def test_queue_positions_put_first_choices_first():
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]])  # (n=3, k=2)
    pos = moe.queue_positions(experts, 2)
    # expert 0: first choices of tokens 0 and 2 (positions 0, 1), then token 1's second choice (2)
    assert pos.tolist() == [[0, 1], [0, 2], [1, 2]]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), e=st.integers(2, 6), cf=st.floats(0.1, 3.0), data=st.data())
def test_no_expert_over_capacity(n, e, cf, data):
    k = data.draw(st.integers(1, e))
    logits = torch.randn(n, e, generator=torch.Generator().manual_seed(n + 7 * e)) * 2
    r = moe.route(logits, k)
    cap = moe.expert_capacity(n, e, k, cf)
    keep = moe.queue_positions(r.experts, e) < cap
    kept = moe.tokens_per_expert(r.experts, e, keep)
    routed = moe.tokens_per_expert(r.experts, e)
    assert (kept <= cap).all()
    assert torch.equal(kept, torch.minimum(routed, torch.tensor(cap))), "only the overflow is dropped"


# ---------------------------------------------------------------- the layer


@pytest.mark.parametrize("k, cf, normalize", [(1, None, True), (2, None, True), (2, 0.5, True), (3, 1.0, False)])
def test_layer_matches_token_by_token_reference(k, cf, normalize):
    layer = _layer(num_experts=4, top_k=k, capacity_factor=cf, normalize=normalize)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(-1, 16), _reference(layer, x), atol=1e-5, rtol=1e-4)


def test_dropped_tokens_get_zero_and_stats_report_them():
    layer = _layer(num_experts=4, top_k=1, capacity_factor=0.25)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(2))
    out = layer(x)
    stats = layer.last
    assert stats.capacity == 3 and (stats.kept <= 3).all()
    dropped = ~stats.keep.any(dim=1)
    assert dropped.sum() == 40 - stats.kept.sum()
    assert torch.equal(out[dropped], torch.zeros_like(out[dropped]))
    assert stats.drop_rate == pytest.approx(dropped.float().mean().item())
    assert stats.tokens_fully_dropped == pytest.approx(stats.drop_rate)
    assert moe.drop_rate_from_counts(stats.routed, 1, 0.25) == pytest.approx(stats.drop_rate)


def test_drop_rate_from_counts_matches_the_layer_for_top2():
    layer = _layer(num_experts=4, top_k=2, capacity_factor=0.8)
    layer(torch.randn(50, 16, generator=torch.Generator().manual_seed(7)))
    assert layer.last.drop_rate > 0
    assert moe.drop_rate_from_counts(layer.last.routed, 2, 0.8) == pytest.approx(layer.last.drop_rate)


def test_gradients_reach_router_and_experts():
    layer = _layer(num_experts=4, top_k=2)
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(3))
    (layer(x).square().sum() + layer.aux_loss + layer.z_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.gate_proj.grad.abs().sum() > 0


# ---------------------------------------------------------------- auxiliary losses


def test_balance_loss_is_one_at_uniform_routing_and_e_when_collapsed():
    e = 4
    uniform_probs = torch.full((8, e), 1 / e)
    round_robin = torch.arange(8)[:, None] % e  # (8, 1): each expert twice
    assert moe.load_balancing_loss(uniform_probs, round_robin).item() == pytest.approx(1.0)
    collapsed_probs = torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), e).float()
    assert moe.load_balancing_loss(collapsed_probs, torch.zeros(8, 1, dtype=torch.long)).item() == pytest.approx(e)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 30), e=st.integers(2, 8), seed=st.integers(0, 1000))
def test_balance_loss_minimum_is_at_uniform(n, e, seed):
    """Assignments spread evenly: the loss is 1 whatever the probabilities; with the router's probabilities
    matching its dispatch (f = P, the differentiable proxy), E * sum P^2 >= 1, with equality only at uniform."""
    probs = torch.softmax(torch.randn(n * e, e, generator=torch.Generator().manual_seed(seed)), -1)
    even = torch.arange(n * e)[:, None] % e
    assert moe.load_balancing_loss(probs, even).item() == pytest.approx(1.0, abs=1e-5)
    p_mean = probs.mean(0)
    assert e * p_mean.square().sum().item() >= 1.0 - 1e-6


def test_balance_loss_gradient_pushes_probability_off_the_busy_expert():
    logits = torch.zeros(6, 3, requires_grad=True)
    experts = torch.tensor([[0], [0], [0], [0], [1], [2]])  # expert 0 overloaded
    moe.load_balancing_loss(torch.softmax(logits, -1), experts).backward()
    assert (logits.grad[:, 0] > 0).all(), "descending the loss lowers expert 0's logit"


def test_balance_loss_matches_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(4))
    r = moe.route(logits, 2)
    theirs = load_balancing_loss_func((logits,), num_experts=6, top_k=2)
    assert moe.load_balancing_loss(r.probs, r.experts).item() == pytest.approx(theirs.item() / 2, rel=1e-5)


def test_z_loss():
    assert moe.router_z_loss(torch.zeros(5, 4)).item() == pytest.approx(math.log(4) ** 2, rel=1e-6)
    big = torch.randn(5, 4) * 10
    assert moe.router_z_loss(big) > moe.router_z_loss(big / 10)


def test_utilisation_metrics():
    assert moe.load_cv(torch.tensor([5, 5, 5, 5])) == 0.0
    assert moe.load_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(1.0)
    assert moe.load_entropy(torch.tensor([20, 0, 0, 0])) == pytest.approx(0.0)
    assert moe.capacity_needed(torch.tensor([10, 5, 5, 0])) == pytest.approx(2.0)
    joint_indep = torch.ones(3, 4)
    assert moe.normalized_mutual_information(joint_indep) == pytest.approx(0.0, abs=1e-6)
    joint_det = torch.eye(4)
    assert moe.normalized_mutual_information(joint_det) == pytest.approx(1.0)
    experts = torch.tensor([[0, 1], [2, 1]])
    groups = torch.tensor([0, 1])
    assert moe.group_expert_shares(experts, groups, 2, 3).tolist() == [[1, 1, 0], [0, 1, 1]]


# ---------------------------------------------------------------- upcycling


def test_upcycled_model_is_identical_at_init():
    model = tiny_model()
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        moe.upcycle_mlps(model, num_experts=4, top_k=2, router_std=1.0)  # a strong random router
        up = model(ids).logits
    assert len(moe.moe_layers(model)) == model.config.num_hidden_layers
    torch.testing.assert_close(up, dense, atol=1e-5, rtol=1e-5)
    assert max(m.last.routed.max().item() for m in moe.moe_layers(model).values()) > 0


def test_upcycling_with_noise_moves_the_output_a_little():
    model = tiny_model()
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        moe.upcycle_mlps(model, 4, 2, noise=0.01, seed=1)
        diff = (model(ids).logits - dense).abs().max().item()
    assert 0 < diff < 0.05 * dense.abs().max().item()


def test_switch_style_unnormalised_k1_scales_the_output():
    model = tiny_model(num_layers=1)
    mlp = model.model.layers[0].mlp
    layer = moe.MoEFeedForward.from_dense(mlp, 4, 1, normalize=False, router_std=1.0,
                                          generator=torch.Generator().manual_seed(0))
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))
    p = moe.route(layer.router(x), 1, normalize=False).weights  # (6, 1) top-1 probability
    torch.testing.assert_close(layer(x), p * mlp(x), atol=1e-6, rtol=1e-5)


def test_upcycle_selected_layers_and_errors():
    model = tiny_model(num_layers=3)
    moe.upcycle_mlps(model, 4, 1, layers=[1])
    assert list(moe.moe_layers(model)) == ["model.layers.1.mlp"]
    with pytest.raises(ValueError, match="out of range"):
        moe.upcycle_mlps(tiny_model(), 4, 1, layers=[5])
    with pytest.raises(ValueError, match="top_k=5 > num_experts=4"):
        moe.upcycle_mlps(tiny_model(), 4, 5)
    with pytest.raises(TypeError, match="gated MLPs"):
        moe.upcycle_mlps(model, 4, 1, layers=[1])  # already an MoE layer
    plain = tiny_model(num_layers=1)
    plain.model.layers[0].mlp = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    with pytest.raises(TypeError, match="gate_proj"):
        moe.upcycle_mlps(plain, 4, 1)
    with pytest.raises(TypeError, match="model.layers"):
        moe.upcycle_mlps(nn.Linear(3, 3), 4, 1)


def test_parameter_counts_match_the_built_model():
    model = tiny_model(num_layers=3)
    counted = moe.moe_parameter_counts(model.config, 4, 2, layers=[0, 2])
    assert counted["dense"] == count_parameters(model)
    moe.upcycle_mlps(model, 4, 2, layers=[0, 2])
    assert counted["total"] == count_parameters(model)
    inactive = sum(m.inactive_parameters() for m in moe.moe_layers(model).values())
    assert counted["active"] == counted["total"] - inactive


def test_flops_per_token():
    cfg = tiny_model().config
    dense = moe.flops_per_token(cfg)
    k1 = moe.flops_per_token(cfg, num_experts=8, top_k=1)
    k2 = moe.flops_per_token(cfg, num_experts=8, top_k=2)
    assert k1["mlp"] == dense["mlp"] and k2["mlp"] == 2 * dense["mlp"]
    assert k1["router"] == 2 * 64 * 8 * cfg.num_hidden_layers
    assert dense["lm_head"] == 2 * 64 * cfg.vocab_size
    assert moe.flops_per_token(cfg, context=10)["attention"] > dense["attention"]


# ---------------------------------------------------------------- cross-checks against transformers


@pytest.mark.parametrize("build, normalize", [(moe.mixtral_block_from, True), (moe.qwen3_moe_block_from, True),
                                              (moe.qwen3_moe_block_from, False)])
def test_same_output_as_transformers_blocks(build, normalize):
    layer = _layer(num_experts=6, top_k=2, normalize=normalize, d=32, f=48)
    block = build(layer, "gelu_pytorch_tanh")
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        theirs = block(x)
        logits, _, chosen = block.gate(x.reshape(-1, 32))
        ours = layer(x)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.router(x.reshape(-1, 32)), logits)
    assert torch.equal(layer.last.experts, chosen)


def test_mixtral_needs_normalised_weights():
    with pytest.raises(ValueError, match="normalize=True"):
        moe.mixtral_block_from(_layer(normalize=False), "silu")


# ---------------------------------------------------------------- training helpers


def test_forward_from_matches_the_model():
    model = tiny_model(num_layers=3)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        prefix = moe_training.frozen_prefix(model, ids, start=2)
        torch.testing.assert_close(moe_training.forward_from(model, prefix, last=4), ref[:, -4:], atol=1e-5, rtol=1e-5)


def test_train_moe_updates_only_moe_layers():
    model = tiny_model(num_layers=3)
    moe.upcycle_mlps(model, 4, 2, layers=[1, 2], noise=0.01)
    frozen = model.model.layers[0].mlp.gate_proj.weight.clone()
    router = model.model.layers[1].mlp.router.weight.clone()
    batches = [moe_training.frozen_prefix(model, _ids(seed=s), start=1) for s in range(3)]
    log = moe_training.train_moe(model, batches, balance_coef=0.1, last=4)
    assert len(log.lm) == len(log.cv) == 3 and all(math.isfinite(v) for v in log.lm)
    assert torch.equal(model.model.layers[0].mlp.gate_proj.weight, frozen)
    assert not torch.equal(model.model.layers[1].mlp.router.weight, router)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="start"):
        moe_training.train_moe(model, [moe_training.frozen_prefix(model, _ids(), start=2)])
    with pytest.raises(ValueError, match="no MoE layers"):
        moe_training.train_moe(tiny_model(), batches)
