import json
import math
import re
import sys

import pytest
import torch
from hypothesis import given, settings as hyp_settings
from hypothesis import strategies as st

from cookbook import bench
from cookbook.cli import main
from cookbook.errors import ModelLoadError
from cookbook.evaluate import PerplexityProtocol, perplexity
from cookbook.kernels import packed_int4_model
from cookbook.measure import GenerationSpeed
from cookbook.models import ByteTokenizer, tiny_model

TINY = dict(protocol=PerplexityProtocol(seq_len=32, stride=32, max_tokens=64), prompt_tokens=8, new_tokens=6,
            loop_new_tokens=4, warmup=0, repeats=1, calib_samples=2, calib_seq_len=32, group_size=32,
            serving_requests=4, saturation_requests=6, max_batch=2, attention_window=4)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(num_layers=3), ByteTokenizer()


@pytest.fixture(scope="module")
def rows(tiny):
    model, tok = tiny
    settings = bench.make_settings(torch.device("cpu"), compile=False, **TINY)  # compiled rows: see below
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = bench.run_bench(model, tok, torch.device("cpu"), settings, log=None)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the bench must leave the model unchanged"
    return out


def test_batching_rows_compare_three_policies_on_the_same_tokens(rows):
    batching = {r["variant"]: r for r in rows if r["technique"] == "serving" and " batching, batch" in r["variant"]}
    assert list(batching) == [f"{name}, batch 2" for name in bench.serving.BATCHING]
    assert all("6 requests all waiting" in r["notes"] and r["notes"].endswith("tokens differ between policies: 0 of 6")
               for r in batching.values())


def test_every_technique_gives_a_full_row(rows):
    failed = [r for r in rows if r["variant"] == "failed"]
    assert failed == [], failed
    assert rows[0]["technique"] == "baseline" and rows[0]["rel. change"] == 0.0
    techniques = {r["technique"] for r in rows}
    assert {"precision", "weight quantization", "activation quantization", "pruning", "parameter sharing",
            "mixture of experts", "attention", "decoding", "serving", "fine-tuning"} <= techniques
    for r in rows:
        assert list(r)[: len(bench.COLUMNS)] == list(bench.COLUMNS)


def test_rows_measure_what_they_claim(rows, tiny):
    model, tok = tiny
    by = {r["variant"]: r for r in rows}
    base = rows[0]
    assert base["perplexity"] == pytest.approx(perplexity(model, tok, TINY["protocol"]))
    assert base["bytes held"] == sum(p.numel() * 4 for p in model.parameters())  # tied embedding counted once
    # packed int4 holds fewer bytes than int8, which holds fewer than fp32; all stand for the same weights
    assert by["RTN int4"]["bytes held"] < by["RTN int8"]["bytes held"] < base["bytes held"]
    assert by["RTN int4"]["params"] == by["RTN int8"]["params"] == base["params"]
    assert by["GPTQ int4 + int8 embedding"]["bytes held"] < by["GPTQ int4"]["bytes held"]
    assert by["cast to bf16"]["bytes held"] == base["bytes held"] // 2
    assert by["MLP channels -25%"]["params"] < base["params"]
    assert by["Wanda 50% unstructured"]["bytes held"] == base["bytes held"]  # zeros stored densely
    # the float KV cache scores the protocol exactly like evaluate.perplexity
    assert by["KV cache (float)"]["perplexity"] == pytest.approx(base["perplexity"], rel=1e-4)
    assert "identical to no cache: True" in by["KV cache (float)"]["notes"]
    assert "identical to greedy: True" in next(r for r in rows if r["variant"].startswith("speculative"))["notes"]
    twin = by[f"speculative, packed int4 twin draft (RTN g32 + int4 head), k={bench.TWIN_K}"]
    assert "identical to our eager greedy: True" in twin["notes"]
    exits = [r for r in rows if r["variant"].startswith("early exit")]
    reads = [float(re.search(r"([\d.]+) whole-head reads per token", r["notes"]).group(1)) for r in exits]
    assert len(exits) == 2 and "shortlist" in exits[1]["variant"] and reads[1] < reads[0], reads
    # compile=False: the eager rows only, and prompt lookup on the eager decoder
    assert not [r for r in rows if "compile" in r["variant"]]
    assert "identical to greedy: True" in by["prompt lookup on the copy task, k=8, eager"]["notes"]
    # W8A8: int8 codes + fp16 row scales in place of fp32 weights
    for variant in ("LLM.int8 (threshold 6)", "W8A8 static + SmoothQuant"):
        assert by["RTN int4"]["bytes held"] < by[variant]["bytes held"] < base["bytes held"]
        assert by[variant]["perplexity"] == pytest.approx(base["perplexity"], rel=0.05)
        assert by[variant]["params"] == base["params"]  # the int8 codes stand for every weight
    # the factorized embedding holds V*r + r*H instead of V*H (tiny: V=512, H=64, r=32)
    cfg = model.config
    rank = cfg.hidden_size // 2
    factorized = by[f"embedding rank {rank} (SVD, no training)"]
    assert base["bytes held"] - factorized["bytes held"] == 4 * (cfg.vocab_size * cfg.hidden_size
                                                                - rank * (cfg.vocab_size + cfg.hidden_size))
    aware = by[f"embedding rank {rank} (activation-aware, no training)"]
    assert aware["bytes held"] == factorized["bytes held"] and aware["perplexity"] > base["perplexity"]
    # upcycled experts: 4x the MLP weights (+ routers), the same outputs before training
    moe_row = by["upcycled, 4 experts top-2"]
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size * cfg.num_hidden_layers
    assert moe_row["params"] - base["params"] == 3 * mlp + 4 * cfg.hidden_size * cfg.num_hidden_layers
    assert moe_row["perplexity"] == pytest.approx(base["perplexity"], rel=1e-4)
    # the tiny model's 3 layers are all sliding (window 8): a 4-token window on all of them changes the scores
    window = by["window 4 on every layer"]
    assert window["perplexity"] != pytest.approx(base["perplexity"], rel=1e-6) and "KV cache at 32,768" in window["notes"]
    assert window["decode tok/s"] is None
    # window 4 on every layer: 4 of the 8 cached tokens per layer at long context, so half the KV cache
    own, windowed = window["kv_cache_bytes"]
    assert own == 3 * 8 * 2 * 16 * 4 and windowed == own // 2  # layers x tokens kept x K,V x head_dim x fp32
    lora_row = by["LoRA r=8, all decoder linears"]
    assert lora_row["params"] > base["params"] and "trainable" in lora_row["notes"]
    watts = bench.make_settings(torch.device("cpu")).watts
    for r in rows:
        if r["decode tok/s"] is not None:
            assert r["decode tok/s"] > 0 and r["tokens/J"] == pytest.approx(r["decode tok/s"] / watts)


def test_compiled_rows(tiny):
    """The torch.compile rows, out of the full-bench fixture (each compile costs seconds even on the tiny model):
    `bench_compiled`'s, and `compiled_row` on a packed int4 model, as the GPTQ rows add it."""
    model, tok = tiny
    settings = bench.make_settings(torch.device("cpu"), **TINY)
    assert settings.compile
    static, compiled, lookup = bench.bench_compiled(model, tok, torch.device("cpu"), settings)
    assert static["variant"] == "static decode step, eager" and "compile" not in static["notes"]
    assert compiled["variant"] == "static decode step, torch.compile (fullgraph)"
    assert "compile + first tokens" in compiled["notes"] and compiled["decode tok/s"] > 0
    assert lookup["variant"] == "prompt lookup on the copy task, k=8, compiled"
    assert "identical to greedy: True" in lookup["notes"]
    packed = packed_int4_model(model, bench.INT4_HEAD_GROUP)
    eager_row = bench.measure_model(packed, tok, settings, "weight quantization", "RTN int4, packed", "int4",
                                    "the packed twin")
    row = bench.compiled_row(packed, tok, settings, eager_row)
    assert row["variant"] == "RTN int4, packed, compiled" and row["perplexity"] == eager_row["perplexity"]
    assert "greedy tokens as our eager loop: True" in row["notes"]


def test_packed_rows_hold_the_same_codes_in_fewer_bytes_per_token(rows, tiny):
    model, tok = tiny
    by = {r["variant"]: r for r in rows}
    for bits in (8, 4):
        ref, packed, head = (by[f"RTN int{bits}{s}"] for s in ("", ", packed", " + int8 head, packed"))
        assert packed["params"] == ref["params"] == rows[0]["params"]
        assert packed["perplexity"] == pytest.approx(ref["perplexity"], rel=0.02)  # bf16 activations
        assert head["bytes/token"] < packed["bytes/token"] and "bf16" in head["notes"]
    int4_head = by[f"GPTQ int4 + int4 head g{bench.INT4_HEAD_GROUP}, packed"]
    assert int4_head["params"] == rows[0]["params"]
    assert int4_head["bytes/token"] < by["GPTQ int4 + int8 head, packed"]["bytes/token"]
    for method in ("GPTQ", "AWQ"):
        assert by[f"{method} int4 + int8 head, packed"]["perplexity"] == pytest.approx(
            by[f"{method} int4"]["perplexity"], rel=0.02)
    nf4, nf4_packed, nf4_head = (by[f"NF4 + double quant{s}"] for s in ("", ", packed", " + int8 head, packed"))
    assert nf4_packed["params"] == nf4["params"] == nf4_head["params"] == rows[0]["params"]
    assert nf4_packed["bytes/token"] == nf4["bytes/token"] > nf4_head["bytes/token"]  # the same NF4 bytes
    assert nf4_packed["perplexity"] == pytest.approx(nf4["perplexity"], rel=1e-5)  # prefill: the reference path


def test_torchao_rows_are_measured_or_say_how_to_install(rows, tiny, monkeypatch):
    ao = [r for r in rows if r["variant"].startswith("torchao")]
    assert ao
    for r in ao:  # measured where torchao is installed (an optional extra), else a row that says so
        assert (r["decode tok/s"] and r["params"] == rows[0]["params"]) or "not measured" in r["notes"], r
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if it were not installed
    model, tok = tiny
    settings = bench.make_settings(torch.device("cpu"), compile=False, **TINY)
    (row,) = bench.TECHNIQUES["torchao"](model, tok, torch.device("cpu"), settings)
    assert row["decode tok/s"] is None and "pip install -e '.[torchao]'" in row["notes"]


def test_llamacpp_row_says_why_it_is_not_measured_for_another_model(rows):
    row = next(r for r in rows if r["technique"] == "llama.cpp")
    assert row["decode tok/s"] is None and "not measured: the GGUF is the default model's" in row["notes"]


def test_share_of_the_roofline_uses_the_measured_bandwidth_and_skips_aggregates():
    settings = bench.make_settings(torch.device("cpu"), **TINY)
    one = bench.result_row("x", "one stream", "f", decode=50.0) | {"bytes/token": 10**8}
    many = bench.result_row("serving", "batch", "f", decode=500.0, aggregate=True) | {"bytes/token": 10**8}
    bench.finish_rows([one, many], settings, bandwidth=1e10)  # ceiling 1e10 / 1e8 = 100 tok/s
    assert one["% roofline"] == pytest.approx(50.0) and many["% roofline"] is None
    assert bench.finish_rows([bench.result_row("x", "y", "f", decode=5.0)], settings)[0]["% roofline"] is None


def test_each_technique_takes_the_bandwidth_read_beside_it(tiny):
    """run_bench reads the bandwidth before and after each technique; its rows keep the better reading, and their
    share of the roofline is taken against it, not against one reading for the whole run."""
    model, tok = tiny
    settings = bench.make_settings(torch.device("cpu"), compile=False, **TINY)
    readings = iter([2e9, 5e9, 4e9, 1e9])  # baseline: before, after; precision: before, after
    rows = bench.run_bench(model, tok, torch.device("cpu"), settings, ["precision"], log=None,
                           read_bandwidth=lambda: next(readings))
    assert [r["bandwidth"] for r in rows] == [5e9] + [4e9] * (len(rows) - 1)
    for r in rows:
        if r["decode tok/s"] is not None:
            assert r["% roofline"] == pytest.approx(100 * r["decode tok/s"] * r["bytes/token"] / r["bandwidth"])


def test_unseparated_decode_is_none_with_a_note_not_a_made_up_speed(tiny, monkeypatch):
    model, tok = tiny
    # what a loaded machine can time: the whole generate no slower than its one-token run
    noisy = GenerationSpeed(prompt_tokens=8, new_tokens=6, prefill_s=0.37, first_token_s=0.38, generate_s=0.36)
    monkeypatch.setattr(bench.rows, "measure_generation", lambda *args, **kwargs: noisy)
    settings = bench.make_settings(torch.device("cpu"), **TINY)
    row = bench.finish_rows([bench.measure_model(model, tok, settings, "baseline", "as loaded", "float32", "x")],
                            settings)[0]
    assert row["decode tok/s"] is None and row["tokens/J"] is None and row["$/M tokens"] is None
    assert row["notes"] == "x; " + bench.UNSEPARATED_DECODE
    assert row["prefill tok/s"] == pytest.approx(8 / 0.37)


def test_missing_student_is_reported_not_invented(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.setenv("COOKBOOK_CACHE", str(tmp_path))
    (row,) = bench.bench_distilled_student(model, tok, torch.device("cpu"), bench.make_settings(torch.device("cpu"), **TINY))
    assert row["perplexity"] is None and "run notebook 06 first" in row["notes"]


@given(tps=st.floats(1e-3, 1e5), watts=st.floats(1.0, 2000.0), usd=st.floats(0.01, 100.0))
@hyp_settings(max_examples=50, deadline=None)
def test_energy_and_cost_formulas(tps, watts, usd):
    assert bench.tokens_per_joule(tps, watts) * watts == pytest.approx(tps)
    cost = bench.usd_per_million_tokens(tps, usd)
    # a million tokens take 1e6 / tps seconds, billed at usd per 3600 s
    assert cost == pytest.approx(1e6 / tps / 3600 * usd)
    assert bench.usd_per_million_tokens(2 * tps, usd) == pytest.approx(cost / 2)
    assert bench.tokens_per_joule(None, watts) is None and bench.usd_per_million_tokens(0.0, usd) is None


def test_pareto_front():
    rows = [{"perplexity": 10.0, "bytes held": 100}, {"perplexity": 12.0, "bytes held": 50},
            {"perplexity": 13.0, "bytes held": 60}, {"perplexity": 9.0, "bytes held": 200},
            {"perplexity": None, "bytes held": 1}]
    assert [r["bytes held"] for r in bench.pareto_front(rows, "bytes held")] == [100, 50, 200]
    speed = [{"perplexity": 10.0, "s": 5.0}, {"perplexity": 11.0, "s": 4.0}, {"perplexity": 12.0, "s": 9.0}]
    assert [r["s"] for r in bench.pareto_front(speed, "s", higher_is_better=True)] == [5.0, 9.0]


def test_report_writes_markdown_json_and_plot(rows, tmp_path):
    settings = bench.make_settings(torch.device("cpu"), **TINY)
    report = bench.BenchReport(rows, "tiny", bench.machine_info(torch.device("cpu")), settings.describe(),
                               settings.assumptions, 1.0)
    paths = report.write(tmp_path, "cpu")
    md = paths["md"].read_text()
    assert "## Machine" in md and "torch" in md and TINY["protocol"].describe() in md
    assert "not a measurement" in md and "W per busy CPU thread" in md
    assert "![Pareto plot](cpu.png)" in md and paths["png"].stat().st_size > 10_000
    data = json.loads(paths["json"].read_text())
    assert data["model"] == "tiny" and len(data["rows"]) == len(rows)
    assert data["settings"]["watts"] == settings.watts


def test_quick_settings_and_stated_assumptions():
    cpu = torch.device("cpu")
    quick, full = bench.make_settings(cpu, quick=True), bench.make_settings(cpu)
    assert quick.quick and quick.protocol.max_tokens < full.protocol.max_tokens
    assert math.isclose(full.watts, bench.CPU_WATTS_PER_THREAD * torch.get_num_threads())
    given_ = bench.make_settings(cpu, watts=42.0, usd_per_hour=1.5)
    assert given_.watts == 42.0 and given_.usd_per_hour == 1.5 and "as given on the command line" in given_.assumptions


def test_clear_errors():
    with pytest.raises(ValueError, match="Unknown technique.*choose from"):
        bench.check_techniques(["rtn", "quantum"])
    assert bench.check_techniques(["lora", "rtn"]) == ["rtn", "lora"]  # suite order
    with pytest.raises(ValueError, match="watts"):
        bench.BenchSettings(watts=0)
    with pytest.raises(ValueError, match="new_tokens"):
        bench.BenchSettings(new_tokens=1)
    with pytest.raises(ValueError, match="stride == seq_len"):
        bench.cached_perplexity(None, None, PerplexityProtocol(seq_len=32, stride=16), None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error(capsys):
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        bench.bench_command(None, "cuda", True, "unused")
    assert main(["bench", "--device", "cuda", "--quick"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_cli_rejects_unknown_technique_before_loading(capsys):
    assert main(["bench", "--only", "rtn,teleport"]) == 2
    assert "Unknown technique" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--watts", "lots"])


def test_report_reads_back_with_its_protocol(rows, tmp_path):
    settings = bench.make_settings(torch.device("cpu"), **TINY)
    report = bench.BenchReport(rows, "tiny", bench.machine_info(torch.device("cpu")), settings.describe(),
                               settings.assumptions, 1.0)
    back = bench.load_report(report.write(tmp_path, "cpu")["json"])
    assert back.rows == json.loads(json.dumps(rows, default=str)) and back.date == report.date
    assert bench.report_protocol(back) == TINY["protocol"]
    assert "load average" in " ".join(back.machine)
    with pytest.raises(FileNotFoundError, match="python -m cookbook bench"):
        bench.load_report(tmp_path / "missing.json")
    assert "--only" not in back.command()
    back.techniques = ["rtn", "lora"]
    assert back.command().endswith("--only rtn,lora") and "--only rtn,lora" in back.markdown("cpu.png")


def test_speed_vs_baseline_and_recipe_rows(rows):
    rel = bench.speed_vs_baseline(rows)
    assert rel[0]["decode x baseline"] == pytest.approx(1.0)
    recipe = [r for r in rel if r["technique"] == "recipe"]
    assert [r["variant"].split(":")[0] for r in recipe] == ["recipe 1", "recipe 2", "recipe 3", "recipe 4",
                                                            "recipe 5", "recipe 5", "recipe 5"]
    assert recipe[0]["bytes held"] == recipe[1]["bytes held"] and recipe[2]["bytes held"] < recipe[1]["bytes held"]
    # recipe 4 records whether our KV-cache loop decoded the no-cache loop's tokens (notebook 14 asserts it on the
    # real model, tests/test_recipe.py on a packed tiny model). Not pinned here: the two loops reach the packed
    # modules with different row counts, so different kernels (one-token steps: the int4 kernel in bf16 and our
    # float32 int8 head; longer inputs: PyTorch's int8 kernel, or under ATEN_CPU_CAPABILITY=default the float
    # path), and this random model's 4th token is a near tie (top-2 logit gap 0.0008) that the kernel set decides
    assert isinstance(recipe[3]["tokens_identical"], bool)
    assert f"tokens identical to no cache: {recipe[3]['tokens_identical']}" in recipe[3]["notes"]
    fig = bench.plot_pareto(rel, "tiny", path=recipe[:3], speed_key="decode x baseline", speed_label="x baseline")
    assert len(fig.axes) == 2 and fig.axes[0].get_legend() is not None
