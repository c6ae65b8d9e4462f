import itertools
import json
import math
from dataclasses import replace

import pytest
import torch

from cookbook import optimize as O
from cookbook import quantization as Q
from cookbook import recipe as R
from cookbook.cli import main
from cookbook.core import decoder_linears
from cookbook.data import calibration_batch
from cookbook.evaluate import PerplexityProtocol
from cookbook.measure import model_bytes
from cookbook.models import ByteTokenizer, tiny_model

SETTINGS = O.OptimizeSettings(calib_samples=2, calib_seq_len=32, profile_samples=1, profile_seq_len=32, group_size=32,
                              candidates=3, protocol=PerplexityProtocol(seq_len=32, stride=32, max_tokens=64),
                              prompt_tokens=8, new_tokens=4, repeats=1)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(num_layers=2), ByteTokenizer()


@pytest.fixture(scope="module")
def profiled(tiny):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile, weights = O.profile_model(model, tok, SETTINGS, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "profiling must not change the model"
    return profile, weights


@pytest.mark.parametrize("gptq_order", Q.GPTQ_ORDERS)
def test_gptq_options_match_gptq_on_the_float_inputs_of_layer_0(tiny, gptq_order):
    model, tok = tiny
    calib = calibration_batch(tok, 2, 32, seed=0)
    names = [n for n in decoder_linears(model) if n.startswith("model.layers.0.")]
    got = Q.gptq_options(model, calib, {n: [(4, 32)] for n in names}, gptq_order=gptq_order)
    work = tiny_model(num_layers=2)
    Q.quantize_model_layerwise(work, calib, "gptq", 4, 32, layers=[0], gptq_order=gptq_order)  # float inputs too
    for n in names:
        assert torch.equal(got[n, (4, 32)].codes, work.get_submodule(n).quantized_weight().codes), n


def test_gptq_options_refuses_names_that_are_not_decoder_linears(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj"):
        Q.gptq_options(model, calibration_batch(tok, 1, 16), {"model.layers.9.mlp.up_proj": [(4, 32)]})


def test_the_profile_prices_every_part_in_every_format(profiled, tiny):
    profile, _ = profiled
    parts = profile.parts()
    assert set(parts) == set(decoder_linears(tiny[0])) | {"lm_head"}
    for name, costs in parts.items():
        formats = SETTINGS.head_formats if name == "lm_head" else SETTINGS.linear_formats
        assert [c.fmt for c in costs] == list(formats)
        assert all(c.kl >= 0 and c.bytes > 0 and c.step_s > 0 for c in costs)
    linear = {c.fmt: c.bytes for c in parts["model.layers.0.mlp.up_proj"]}
    assert linear["int8"] > linear["int4"] > linear["int3"]
    head = {c.fmt: c for c in parts["lm_head"]}
    assert head["float32"].kl == 0 and head["float32"].bytes > head["int8"].bytes > head["int4"].bytes
    assert profile.base_bytes == model_bytes(tiny[0])


def test_the_estimated_bytes_are_the_built_models_bytes(profiled, tiny):
    profile, weights = profiled
    model = tiny[0]
    for fmt, head in (("int4", "int8"), ("int8", "float32"), ("int3", "int4")):
        plan = O.Plan({n: fmt for n in decoder_linears(model)}, head)
        built = O.run.build(model, plan, weights, SETTINGS)
        assert O.estimate(profile, plan).bytes == model_bytes(built), (fmt, head)


def brute_force(parts, capacity_bytes):
    best = None
    for combo in itertools.product(*parts.values()):
        if sum(c.bytes for c in combo) <= capacity_bytes:
            kl = sum(c.kl for c in combo)
            best = kl if best is None or kl < best else best
    return best


def test_the_knapsack_finds_the_exact_optimum():
    gen = torch.Generator().manual_seed(0)
    parts = {}
    for i in range(5):
        sizes = sorted(torch.randint(1, 8, (3,), generator=gen).tolist())
        kls = sorted(torch.rand(3, generator=gen).tolist(), reverse=True)
        parts[f"p{i}"] = [O.PartCost(f"p{i}", f"f{j}", s * O.UNIT, kl, 1e-3) for j, (s, kl) in enumerate(zip(sizes, kls))]
    low = sum(min(c.bytes for c in o) for o in parts.values())
    for extra in range(0, 30, 3):
        choice = O.knapsack(parts, extra)
        chosen = [next(c for c in parts[n] if c.fmt == f) for n, f in choice.items()]
        assert sum(c.bytes for c in chosen) <= low + extra * O.UNIT
        assert math.isclose(sum(c.kl for c in chosen), brute_force(parts, low + extra * O.UNIT))
    assert O.knapsack(parts, -1) is None


def test_an_impossible_budget_names_the_closest_plan(profiled):
    profile, _ = profiled
    with pytest.raises(O.BudgetError, match="--max-mib") as err:
        O.candidates(profile, O.Budget(max_bytes=1000), 3)
    assert err.value.closest.bytes > 1000
    assert all(f in ("int3", "int4") for f in err.value.closest.plan.linears.values())
    with pytest.raises(O.BudgetError, match="--min-decode-x"):
        O.candidates(profile, O.Budget(min_decode_x=1000.0), 3)
    with pytest.raises(ValueError, match="positive"):
        O.Budget(max_bytes=-5)


def test_candidates_meet_the_budget_by_estimate_and_differ(profiled):
    profile, _ = profiled
    limit = profile.base_bytes // 3
    found = O.candidates(profile, O.Budget(max_bytes=limit), 3)
    assert found and all(e.bytes <= limit for e in found)
    assert all(a.plan != b.plan for a, b in itertools.combinations(found, 2))
    assert found[0].kl <= min(e.kl for e in found)


def test_optimize_then_the_json_recipe_rebuilds_the_same_model(profiled, tiny, tmp_path):
    model, tok = tiny
    profile, weights = profiled
    budget = O.Budget(max_bytes=int(profile.base_bytes * 0.6))
    result = O.optimize(model, tok, budget, SETTINGS, profile, weights, progress=False)
    assert result.met and result.chosen.bytes <= budget.max_bytes
    assert result.chosen.bytes == result.chosen.estimate.bytes
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(O.recipe_dict(result, "tiny", SETTINGS)))
    rebuilt = R.apply_mixed_recipe(model, tok, path)
    built = O.run.build(model, result.chosen.estimate.plan, weights, SETTINGS)
    ids = calibration_batch(tok, 1, 16, seed=5)
    assert torch.equal(rebuilt(ids).logits, built(ids).logits)
    assert len(O.plan_table(result.chosen.estimate.plan)) == 3  # two layers and the head


def test_optimize_reuses_a_float_step_timed_before(profiled, tiny, monkeypatch):
    model, tok = tiny
    profile, weights = profiled
    budget = O.Budget(max_bytes=int(profile.base_bytes * 0.6))
    first = O.optimize(model, tok, budget, SETTINGS, profile, weights, progress=False)
    timed = []
    step = O.run.decode_step_s
    monkeypatch.setattr(O.run, "decode_step_s", lambda m, *a: timed.append(m) or step(m, *a))
    again = O.optimize(model, tok, budget, SETTINGS, profile, weights, progress=False, base_step_s=first.base_step_s)
    assert model not in timed, "the float model is not timed again"
    assert len(timed) == len(again.measured) and again.base_step_s == first.base_step_s


def test_a_bad_recipe_says_what_is_wrong(tmp_path, tiny):
    model, tok = tiny
    with pytest.raises(FileNotFoundError, match="cookbook optimize"):
        R.load_mixed_recipe(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="version-1"):
        R.load_mixed_recipe({"kind": "something else"})
    good = {"kind": O.RECIPE_KIND, "version": 1, "head": "int8", "linears": {"model.layers.0.mlp.up_proj": "int5"},
            "group_size": 32, "calibration": {"text": "shakespeare_train", "samples": 1, "seq_len": 16, "seed": 0}}
    with pytest.raises(ValueError, match="int5"):
        R.load_mixed_recipe(good)
    with pytest.raises(ValueError, match="calibration.seed"):
        R.load_mixed_recipe(good | {"calibration": {"text": "shakespeare_train", "samples": 1, "seq_len": 16}})
    with pytest.raises(ValueError, match="version-1"):
        R.load_mixed_recipe([1, 2])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        R.load_mixed_recipe(tmp_path / "bad.json")
    wrong = good | {"linears": {"model.layers.7.mlp.up_proj": "int4"}}
    with pytest.raises(ValueError, match="lacks"):
        R.apply_mixed_recipe(model, tok, wrong)


def test_spearman():
    assert O.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert O.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert O.spearman([1, 2], [1, 2]) is None


def test_the_cli_asks_for_a_budget(capsys):
    assert main(["optimize"]) == 2
    assert "--max-mib" in capsys.readouterr().err
    assert main(["optimize", "--max-mib", "-3"]) == 2
    assert "--max-mib -3.0" in capsys.readouterr().err
    assert main(["optimize", "--max-ppl-increase", "-5"]) == 2
    assert "percent" in capsys.readouterr().err


def test_an_untied_head_is_refused_before_any_work(tiny):
    untied = tiny_model(num_layers=2)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    with pytest.raises(ValueError, match="head_formats=\\('float32',\\)"):
        O.profile_model(untied, tiny[1], SETTINGS, progress=False)


def test_a_large_byte_limit_is_clamped_to_what_the_search_can_use(profiled):
    profile, _ = profiled
    assert O.search.capacity_for(profile, 10**15) == O.search.capacity_for(profile, None)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="int5"):
        replace(O.OptimizeSettings(), linear_formats=("int5",))
    with pytest.raises(ValueError, match="gptq_order"):
        replace(O.OptimizeSettings(), gptq_order="descending")


def test_a_saved_profile_is_reused_only_for_the_same_model_and_measurement(profiled, tmp_path):
    from cookbook.optimize.command import load_profile

    profile, _ = profiled
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"model": "tiny", "profile": profile.to_dict()}))
    assert load_profile(path, "tiny", replace(SETTINGS, candidates=5, repeats=3)).costs == profile.costs
    assert load_profile(path, "tiny", replace(SETTINGS, group_size=64)) is None
    assert load_profile(path, "tiny", replace(SETTINGS, gptq_order="input")) is None  # other GPTQ codes
    assert load_profile(path, "other", SETTINGS) is None
    assert load_profile(tmp_path / "absent.json", "tiny", SETTINGS) is None
    (tmp_path / "recipe.json").write_text(json.dumps({"kind": O.RECIPE_KIND}))
    with pytest.raises(ValueError, match="not a profile"):
        load_profile(tmp_path / "recipe.json", "tiny", SETTINGS)


def test_remeasured_kls_match_the_profile(profiled, tiny):
    from cookbook.optimize.profile import remeasure_kls

    profile, weights = profiled
    costs = {(c.part, c.fmt): c.kl for c in profile.costs}
    spot = [("model.layers.1.mlp.down_proj", "int3"), ("lm_head", "int4")]
    again = remeasure_kls(tiny[0], tiny[1], weights, SETTINGS, spot)
    assert all(again[k] == pytest.approx(costs[k], rel=1e-5, abs=1e-9) for k in spot)
