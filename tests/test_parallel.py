"""Unit tests for cookbook.parallel: the cost model, sharding helpers, schedules and clear errors (fast, one
process), then real 2-process torchrun runs on a tiny model checking DDP / FSDP / TP / PP against one process."""

import torch
import torch.distributed as dist
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cookbook import count_parameters
from cookbook import parallel as P
from cookbook.models import tiny_model

# ---------------------------------------------------------------- cost model


def test_model_shape_counts_match_real_models():
    model = tiny_model()
    assert P.ModelShape.from_config(model.config).params() == count_parameters(model)
    assert P.GEMMA3_270M.params() == 268_098_176  # the real checkpoint's count (tied embedding once)
    assert abs(P.LLAMA2_7B.params() - 6.738e9) < 1e6 and abs(P.LLAMA2_70B.params() - 68.98e9) < 1e7


def test_submodel_shape_counts_untied_head():
    sub, vocab = P.real_submodel(tiny_model(), 1, torch.arange(3, 40))
    assert P.ModelShape.from_config(sub.config).params() == count_parameters(sub)
    assert len(vocab) == 37


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_memory_model_relations(p):
    shape = P.LLAMA2_7B
    single = P.memory_per_device(shape, "single", 1)["total"]
    assert single == shape.params() * 16  # fp32 weights + grads + two Adam moments
    assert P.memory_per_device(shape, "ddp", p)["total"] == single
    assert P.memory_per_device(shape, "fsdp", p)["total"] == pytest.approx(single / p)
    assert P.memory_per_device(shape, "tp", p)["total"] <= single
    assert P.memory_per_device(shape, "pp", p)["total"] <= single
    assert P.memory_per_device(shape, "pp", 1)["total"] == single
    assert P.comm_bytes_per_device(shape, "fsdp", p, 4096) == pytest.approx(
        1.5 * P.comm_bytes_per_device(shape, "ddp", p, 4096))


def test_tp_layer_params_match_a_sharded_layer():
    model = tiny_model()  # 4 heads, 1 KV head: the KV projection is replicated
    shape = P.ModelShape.from_config(model.config)
    P.tensor_parallel_layer(model.model.layers[0], rank=1, world_size=2)
    assert sum(p.numel() for p in model.model.layers[0].parameters()) == shape.tp_layer_params(2)
    assert shape.tp_layer_params(1) == shape.layer_params()


def test_ring_and_bubble_formulas():
    assert P.ring_wire_bytes("all_reduce", 100, 2) == 100
    assert P.ring_wire_bytes("all_gather", 100, 4) == 75
    assert P.bubble_fraction(2, 1) == 0.5 and P.bubble_fraction(4, 13) == 0.1875
    with pytest.raises(ValueError, match="Unknown collective"):
        P.ring_wire_bytes("broadcast", 1, 2)


def test_devices_needed():
    assert P.devices_needed(P.LLAMA2_7B, "fsdp", 80 * P.GiB, [1, 2, 4, 8]) == 2
    assert P.devices_needed(P.LLAMA2_7B, "ddp", 80 * P.GiB, [1, 2, 4, 8]) is None


# ---------------------------------------------------------------- schedules


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["gpipe", "1f1b"]), st.integers(1, 6), st.integers(0, 5), st.integers(1, 12))
def test_schedule_runs_each_microbatch_once_forward_before_backward(kind, p, s, m):
    s = s % p
    ops = P.pipeline_schedule(kind, s, p, m)
    assert sorted(i for k, i in ops if k == "F") == list(range(m))
    assert [i for k, i in ops if k == "B"] == list(range(m))  # backwards in micro-batch order
    assert all(ops.index(("F", i)) < ops.index(("B", i)) for i in range(m))
    want = m if kind == "gpipe" else min(p - s, m)
    assert P.max_in_flight(ops) == want


def test_schedule_errors():
    with pytest.raises(ValueError, match="Unknown schedule"):
        P.pipeline_schedule("zero-bubble", 0, 2, 4)
    with pytest.raises(ValueError):
        P.pipeline_schedule("gpipe", 2, 2, 4)


# ---------------------------------------------------------------- clear errors


def test_world_size_must_divide():
    with pytest.raises(ValueError, match=r"attention heads \(4\) is not divisible by the world size \(3\)"):
        P.tensor_parallel_layer(tiny_model().model.layers[0], 0, 3)
    with pytest.raises(ValueError, match="decoder layers"):
        P.stage_layer_bounds(18, 4)
    with pytest.raises(ValueError, match="global batch size"):
        P.split_batch(torch.zeros(6, 4), 4, 0)
    with pytest.raises(ValueError, match="micro-batches"):
        P.split_microbatches(torch.zeros(6, 4), 4)
    with pytest.raises(ValueError, match="number of layers"):
        P.memory_per_device(P.GEMMA3_270M, "pp", 4)
    with pytest.raises(ValueError, match="Unknown strategy"):
        P.memory_per_device(P.GEMMA3_270M, "zero", 2)
    with pytest.raises(ValueError, match="rank 2"):
        P.shard_range(8, 2, 2)


def test_remap_tokens_rejects_unknown_ids():
    vocab = torch.tensor([2, 5, 9])
    assert P.remap_tokens(torch.tensor([[9, 2, 5]]), vocab).tolist() == [[2, 0, 1]]
    with pytest.raises(ValueError, match="not in the sub-model's vocabulary"):
        P.remap_tokens(torch.tensor([3]), vocab)


# ---------------------------------------------------------------- one-process equivalences


def test_submodel_keeps_the_real_weights():
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    sub, vocab = P.real_submodel(model, model.config.num_hidden_layers, ids)
    with torch.no_grad():
        want = model(ids).logits[..., vocab]  # (b, t, V): the full model's logits on the kept tokens
        got = sub(P.remap_tokens(ids, vocab)).logits
    assert (got - want).abs().max() < 1e-5


def test_pipeline_stages_compose_to_the_model():
    model = tiny_model(num_layers=4)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = ids
        for s in range(2):
            h = P.PipelineStageModule(model, s, 2)(h)
        assert (h - model(ids).logits).abs().max() < 1e-5
    with pytest.raises(ValueError, match="decoder layers"):
        P.PipelineStageModule(model, 0, 3)


# ---------------------------------------------------------------- real 2-process runs (torchrun, gloo)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny Gemma 3 sub-model saved for the workers, 3 global batches (3, 8, 16), and one-process references."""
    folder = tmp_path_factory.mktemp("parallel")
    raw = torch.randint(0, 512, (3, 8, 16), generator=torch.Generator().manual_seed(0))
    sub, vocab = P.real_submodel(tiny_model(num_layers=2), 2, raw)
    sub.save_pretrained(folder / "model")
    batches = P.remap_tokens(raw, vocab)
    torch.save(batches, folder / "batch.pt")
    losses, grads, _, _ = P.train_steps(sub, batches, lr=1e-3)
    final = {n: p.detach().clone() for n, p in sub.named_parameters()}
    args = ["--model", folder / "model", "--data", folder / "batch.pt", "--lr", "1e-3"]
    return folder, args, {"losses": losses, "grads": grads, "final": final, "params": count_parameters(sub)}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_data_parallel_matches_one_process(tiny_run, mode):
    folder, args, ref = tiny_run
    result = P.launch(mode, folder / f"{mode}.json", args=args, timeout=120)
    saved = torch.load(folder / f"{mode}.pt")
    # the printed command names the run's files, not this machine's temporary folder
    assert f"--out $WORK/{mode}.json" in result["command"] and str(folder) not in result["command"] + result["log"]
    assert result["world_size"] == 2 and result["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    assert result["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert P.max_relative_error(saved["first_grads"], ref["grads"]) < 1e-4
    # Adam divides by sqrt(v): for weights whose gradient is ~0 float rounding moves the update by up to lr, so the
    # weights after 3 steps are compared in units of the learning rate (a wrong gradient would be off by ~lr).
    assert max((saved["final_params"][k] - v).abs().max().item() for k, v in ref["final"].items()) < 0.05 * 1e-3
    per_step = {op: b / result["comm_steps"] for op, b in result["comm"]["payload"].items()}
    param_bytes = 4 * ref["params"]
    if mode == "ddp":  # every gradient all-reduced once per step
        assert per_step["all_reduce"] == param_bytes
        assert result["state_bytes"]["params"] == param_bytes
    else:  # gradients reduce-scattered once (plus padding); each rank holds half the states
        assert param_bytes <= per_step["reduce_scatter"] < 1.01 * param_bytes
        assert result["state_bytes"]["optimizer"] == pytest.approx(param_bytes, rel=0.01)


def test_tensor_parallel_matches_one_process(tiny_run):
    folder, args, _ = tiny_run
    r = P.launch("tp", folder / "tp.json", args=args, timeout=120)
    assert r["logits_max_abs_diff"] < 1e-5 * max(1.0, r["logits_max_abs"])
    assert r["grad_max_rel_error"] < 1e-4
    per_layer = 2 * r["tokens"] * r["hidden"] * 4  # two all-reduces of (B, t, d) fp32 per layer
    assert r["forward_comm"]["all_reduce"] == r["layers"] * per_layer == r["backward_comm"]["all_reduce"]


def test_pipeline_matches_one_process(tiny_run):
    folder, args, _ = tiny_run
    r = P.launch("pp", folder / "pp.json", args=[*args, "--microbatches", "1,4", "--repeats", "1"], timeout=120)
    last = r["stages"][-1]
    for run in last["runs"]:
        assert run["loss"] == pytest.approx(r["ref_loss"], rel=1e-5)
    assert last["library"]["loss"] == pytest.approx(r["ref_loss"], rel=1e-5)
    for stage in r["stages"]:
        assert max(run["grad_max_rel_error"] for run in stage["runs"]) < 1e-4
        assert stage["library"]["grad_max_rel_error"] < 1e-4
        for run in stage["runs"]:
            assert run["sent_bytes"] == r["tokens"] * r["hidden"] * 4  # activations or their gradients, once
    assert [run["peak_in_flight"] for run in r["stages"][0]["runs"]] == [1, 4, 1, 2]  # gpipe m=1,4; 1f1b m=1,4


def test_counter_restores_torch_distributed():
    before = dist.all_reduce
    with P.CommCounter().watch_collectives():
        assert dist.all_reduce is not before
    assert dist.all_reduce is before
