"""`python -m cookbook`: run the notebooks headless, in order, and print their results tables.

    python -m cookbook list                 # the notebooks, in order
    python -m cookbook run                  # execute all of them, print each results table
    python -m cookbook run 00 03_outliers   # only these (by number or name prefix)
    python -m cookbook run --model google/gemma-3-1b-pt --inplace
    python -m cookbook info                 # model, device and versions
    python -m cookbook bench                # measure every technique, write reports/<device>.md/.json/.png
    python -m cookbook bench --device cuda --model google/gemma-3-1b-pt
    python -m cookbook optimize --max-mib 200   # a mixed-precision recipe under a budget, as JSON
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .models import MODEL_ENV_VAR, model_name
from .report import RESULTS_METADATA_KEY

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def list_notebooks(directory: Path = NOTEBOOK_DIR) -> list[Path]:
    if not directory.is_dir():
        raise SystemExit(f"No notebooks folder at {directory}; run from a clone of the cookbook (pip install -e .).")
    return sorted(p for p in directory.glob("[0-9][0-9]_*.ipynb"))


def select_notebooks(names: list[str], notebooks: list[Path]) -> list[Path]:
    """Notebooks whose file name starts with each given name ('03' or '03_outliers'), in order."""
    if not names:
        return notebooks
    chosen = []
    for name in names:
        stem = Path(name).stem
        matches = [nb for nb in notebooks if nb.stem.startswith(stem)]
        if not matches:
            raise SystemExit(f"No notebook matches {name!r}. Available: {', '.join(nb.stem for nb in notebooks)}")
        chosen += [m for m in matches if m not in chosen]
    return sorted(chosen)


def results_tables(nb) -> list[str]:
    """The plain-text results tables a notebook displayed with `show_results`."""
    tables = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if RESULTS_METADATA_KEY in output.get("metadata", {}):
                tables.append(output["data"]["text/plain"])
    return tables


def execute_notebook(path: Path, timeout: int, inplace: bool, output_dir: Path):
    import nbformat
    from nbclient import NotebookClient
    from tqdm.auto import tqdm

    nb = nbformat.read(path, as_version=4)
    code_cells = sum(c.cell_type == "code" for c in nb.cells)
    bar = tqdm(total=code_cells, desc=path.stem, unit="cell", leave=True)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        on_cell_executed=lambda **_: bar.update(1),
    )
    try:
        client.execute()
    finally:
        bar.close()
        target = path if inplace else output_dir / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target)
    return nb


def cmd_run(args: argparse.Namespace) -> int:
    if args.model:
        os.environ[MODEL_ENV_VAR] = args.model
    notebooks = select_notebooks(args.notebooks, list_notebooks())
    print(f"Running {len(notebooks)} notebook(s) on model {model_name()!r}; "
          f"executed copies go to {'the notebooks themselves' if args.inplace else args.output_dir}\n")
    failed = []
    for path in notebooks:
        start = time.perf_counter()
        try:
            nb = execute_notebook(path, args.timeout, args.inplace, Path(args.output_dir))
        except Exception as exc:  # report and go on with the next notebook
            failed.append(path.stem)
            print(f"\n[FAILED] {path.stem}: {type(exc).__name__}: {str(exc)[-2000:]}\n", file=sys.stderr)
            continue
        print(f"\n=== {path.stem} ({time.perf_counter() - start:.0f} s)")
        for table in results_tables(nb) or ["(no results table)"]:
            print(table, end="\n\n")
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"All {len(notebooks)} notebook(s) ran.")
    return 0


def cmd_list(_: argparse.Namespace) -> int:
    for nb in list_notebooks():
        print(nb.stem)
    return 0


def cmd_info(_: argparse.Namespace) -> int:
    import platform

    import torch
    import transformers

    from .models import resolve_device

    print(f"model:        {model_name()}  (set ${MODEL_ENV_VAR} or --model to change)")
    print(f"device:       {resolve_device()}")
    print(f"python:       {platform.python_version()}  torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"cpu threads:  {torch.get_num_threads()}")
    return 0


def report_errors(command) -> int:
    """Run command(); a CookbookError or ValueError (bad input, with what to do) prints as one line, exit code 2."""
    from .errors import CookbookError

    try:
        command()
    except (CookbookError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_command

    techniques = [t.strip() for t in args.only.split(",") if t.strip()] if args.only else None
    return report_errors(lambda: bench_command(args.model, args.device, args.quick, args.out, techniques, args.watts,
                                               args.usd_per_hour, args.name, compile=not args.no_compile))


def add_bench_parser(sub) -> argparse.ArgumentParser:
    bench = sub.add_parser("bench", help="measure every technique on one model and device, write a report")
    bench.add_argument("--model", help="model alias, local directory or Hugging Face id (default: Gemma 3 270M)")
    bench.add_argument("--device", help="cpu or cuda (default: cuda if available, else cpu)")
    bench.add_argument("--quick", action="store_true", help="smaller protocol and fewer repeats (recorded)")
    bench.add_argument("--out", default=str(REPO_ROOT / "reports"), help="folder for <device>.md/.json/.png")
    bench.add_argument("--only", help="comma-separated technique names, e.g. rtn,kv_cache (baseline always runs; "
                       "an unknown name prints the list)")
    bench.add_argument("--watts", type=float, help="assumed power draw for tokens/J (default: stated per device)")
    bench.add_argument("--usd-per-hour", type=float, help="assumed machine price for $/M tokens")
    bench.add_argument("--name", help="report file name without extension (default: cpu or cuda-<gpu>)")
    bench.add_argument("--no-compile", action="store_true",
                       help="skip the torch.compile rows (each compile takes tens of seconds; on CPU it needs a C++ compiler)")
    bench.set_defaults(func=cmd_bench)
    return bench


def cmd_optimize(args: argparse.Namespace) -> int:
    from .optimize import Budget
    from .optimize.command import optimize_command

    if args.max_mib is None and args.max_ppl_increase is None and args.min_decode_x is None:
        print("error: give a budget: --max-mib, --max-ppl-increase and/or --min-decode-x.", file=sys.stderr)
        return 2
    bad = [f"--{name.replace('_', '-')} {v}" for name in ("max_mib", "max_ppl_increase", "min_decode_x", "candidates")
           if (v := getattr(args, name)) is not None and not v > 0]
    if bad:
        print(f"error: {', '.join(bad)}: each limit must be a positive number (--max-ppl-increase in percent, "
              "e.g. 10).", file=sys.stderr)
        return 2

    def run() -> None:
        budget = Budget(None if args.max_mib is None else int(args.max_mib * 2**20),
                        None if args.max_ppl_increase is None else args.max_ppl_increase / 100, args.min_decode_x)
        heads = tuple(h.strip() for h in args.head_formats.split(",")) if args.head_formats else None
        optimize_command(args.model, budget, args.quick, args.out, args.profile, args.candidates, heads)

    return report_errors(run)


def add_optimize_parser(sub) -> argparse.ArgumentParser:
    opt = sub.add_parser("optimize", help="find a mixed-precision recipe (format per linear) under a budget")
    opt.add_argument("--max-mib", type=float, help="at most this many MiB held by the whole model")
    opt.add_argument("--max-ppl-increase", type=float, metavar="PERCENT",
                     help="perplexity at most this many percent above the float32 model's (e.g. 10)")
    opt.add_argument("--min-decode-x", type=float, help="decode at least this many times the float32 model's speed")
    opt.add_argument("--model", help="model alias, local directory or Hugging Face id (default: Gemma 3 270M)")
    opt.add_argument("--quick", action="store_true", help="fewer calibration / profile tokens and candidates")
    opt.add_argument("--candidates", type=int, help="plans built and measured (default 5; 3 with --quick)")
    opt.add_argument("--head-formats", help="comma-separated table formats to consider (default: float32,int8,int4)")
    opt.add_argument("--out", default="recipe.json", help="where the JSON recipe goes (default: recipe.json)")
    opt.add_argument("--profile", help="JSON file to reuse the sensitivity profile from (written if absent)")
    opt.set_defaults(func=cmd_optimize)
    return opt


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .evaluate import PerplexityProtocol
    from .models import load_model
    from .student_training import StudentSettings, student_command
    from .trainer import TrainSettings

    if args.what == "kd-vs-ce":
        return report_errors(lambda: kd_vs_ce(args))
    if args.what == "recovery":
        return report_errors(lambda: recovery(args))
    if args.what == "embedding":
        return report_errors(lambda: embedding(args))

    def run() -> None:
        changes = train_changes(args)
        keep = 12 if args.keep is None else args.keep  # the default student: 12 of 18 layers
        settings = StudentSettings(n_keep=keep, train=replace(TrainSettings(), **changes), share=args.share,
                                   relax_rank=args.relax_rank)
        if args.quick:
            settings = replace(settings, protocol=PerplexityProtocol(seq_len=256, stride=256, max_tokens=512))
        if args.stop_at is not None and not 1 <= args.stop_at <= settings.train.steps:
            raise ValueError(f"--stop-at must be in [1, {settings.train.steps}] (the schedule's --steps), "
                             f"got {args.stop_at}.")
        teacher, tok = load_model(args.model, device="cpu")
        if not 1 <= keep < teacher.config.num_hidden_layers:
            raise ValueError(f"--keep must be in [1, {teacher.config.num_hidden_layers - 1}], got {keep}.")
        variant = settings.variant()
        default = REPO_ROOT / ("build" if args.quick else "reports") / f"train-student-{keep}{variant}-cpu.json"
        out = Path(args.out) if args.out else default
        report = student_command(teacher, tok, model_name(args.model), settings, out, args.fresh,
                                 tag="-quick" if args.quick else "", stop_at=args.stop_at)
        print(f"student of layers {report['keep']} (step {report['steps run']}): perplexity "
              f"{report['student perplexity']:.2f} against the "
              f"teacher's {report['teacher perplexity']:.2f} ({report['ratio to teacher']:.2f}x), decode "
              f"{report['decode speedup']:.2f}x the teacher's speed; report: {out}")

    return report_errors(run)


def train_changes(args: argparse.Namespace) -> dict:
    """The TrainSettings fields the flags set; --quick: 6 steps, evaluated every 3."""
    changes = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size),
                                 ("eval_every", args.eval_every)) if v is not None}
    return {"steps": 6, "eval_every": 3, "warmup": 2, **changes} if args.quick else changes


def quick_settings(settings):
    """--quick for a run measured on two texts (recovery, embedding): 4 calibration windows and 512 tokens of each
    text in windows of 256, so the pipeline runs in a minute."""
    from dataclasses import replace

    from .evaluate import PerplexityProtocol

    short = PerplexityProtocol(seq_len=256, stride=256, max_tokens=512)
    return replace(settings, calib_samples=4, protocol=short,
                   second_protocol=replace(short, text=settings.second_protocol.text))


def recovery(args: argparse.Namespace) -> None:
    """`train recovery`: Wanda-prune the model, then distil it back toward the dense model with the zeros held."""
    from dataclasses import replace

    from .models import load_model
    from .recovery_training import RecoverySettings, pattern_slug, recovery_command, recovery_train_settings

    settings = RecoverySettings(pattern=args.pattern, train=replace(recovery_train_settings(), **train_changes(args)))
    if args.quick:
        settings = quick_settings(settings)
    teacher, tok = load_model(args.model, device="cpu")
    default = REPO_ROOT / ("build" if args.quick else "reports") / f"recovery-{pattern_slug(args.pattern)}-cpu.json"
    out = Path(args.out) if args.out else default
    report = recovery_command(teacher, tok, model_name(args.model), settings, out, args.fresh,
                              tag="-quick" if args.quick else "")
    ppl = {k: report[f"{k} perplexity"][settings.protocol.text] for k in ("pruned", "recovered", "dense")}
    print(f"Wanda {args.pattern}: perplexity {ppl['pruned']:.2f} pruned -> {ppl['recovered']:.2f} recovered, against "
          f"the dense {ppl['dense']:.2f} ({report['recovered ratio to dense']:.2f}x); report: {out}")


def embedding(args: argparse.Namespace) -> None:
    """`train embedding`: factorize the tied embedding (activation-aware, rank --rank), then train the factors."""
    from dataclasses import replace

    from .embedding_training import EmbeddingSettings, embedding_command, embedding_train_settings
    from .models import load_model

    settings = EmbeddingSettings(rank=args.rank, train=replace(embedding_train_settings(), **train_changes(args)))
    if args.quick:
        settings = quick_settings(settings)
    teacher, tok = load_model(args.model, device="cpu")
    default = REPO_ROOT / ("build" if args.quick else "reports") / f"factorized-embedding-r{args.rank}-cpu.json"
    out = Path(args.out) if args.out else default
    report = embedding_command(teacher, tok, model_name(args.model), settings, out, args.fresh,
                               tag="-quick" if args.quick else "")
    ppl = {k: report[f"{k} perplexity"][settings.protocol.text]
           for k in ("dense", "svd", "activation-aware", "fine-tuned")}
    print(f"embedding rank {args.rank}: perplexity {ppl['svd']:.2f} (SVD) -> {ppl['activation-aware']:.2f} "
          f"(activation-aware) -> {ppl['fine-tuned']:.2f} (fine-tuned), against the unfactorized "
          f"{ppl['dense']:.2f} ({report['ratio to dense']['fine-tuned']:.2f}x); report: {out}")


def kd_vs_ce(args: argparse.Namespace) -> None:
    """`train kd-vs-ce`: notebook 06's pair of students (distilled, CE only) on several samples of windows."""
    from .kd_vs_ce import PairSettings, kd_vs_ce_command
    from .models import load_model

    changes = {k: v for k, v in (("n_keep", args.keep), ("steps", args.steps), ("lr", args.lr)) if v is not None}
    if args.seeds is not None:
        changes["seeds"] = tuple(range(1, args.seeds + 1))
    settings = PairSettings(**changes)
    teacher, tok = load_model(args.model, device="cpu")
    out = Path(args.out) if args.out else REPO_ROOT / "reports" / "kd-vs-ce-cpu.json"
    report = kd_vs_ce_command(teacher, tok, model_name(args.model), settings, out)
    print(f"distilled lower than CE only in {report['distilled lower']} of {report['samples']} samples; perplexity "
          f"ratio {report['ratio, geometric mean']:.2f} (geometric mean; {report['ratio, min']:.2f} to "
          f"{report['ratio, max']:.2f}); report: {out}")


def add_train_parser(sub) -> argparse.ArgumentParser:
    tr = sub.add_parser("train", help="training runs: 'student' distils a layer-cut student (long, resumable); "
                                      "'recovery' distils a Wanda-pruned model back toward the dense one (resumable); "
                                      "'embedding' factorizes the tied embedding and trains the factors (resumable); "
                                      "'kd-vs-ce' compares notebook 06's two students over several samples")
    tr.add_argument("what", choices=["student", "recovery", "embedding", "kd-vs-ce"], help="what to train")
    tr.add_argument("--pattern", default="50%",
                    help="recovery: what Wanda prunes, a sparsity ('50%%') or N:M ('2:4')")
    tr.add_argument("--rank", type=int, default=256,
                    help="embedding: rank of the factors A (V x rank) and B (rank x H) (default 256)")
    tr.add_argument("--keep", type=int, help="decoder layers the student keeps (default: 12 of 18 for 'student', "
                                             "6 for 'kd-vs-ce')")
    tr.add_argument("--share", type=int, default=1,
                    help="student: consecutive kept layers that run on one set of weights (default 1: none; 2: pairs)")
    tr.add_argument("--relax-rank", type=int, default=0,
                    help="student with --share: each use of a shared layer gets its own norms and a LoRA of this "
                         "rank (relaxed sharing; default 0: strict)")
    tr.add_argument("--stop-at", type=int, help="student: stop after this many steps of the schedule (resumable "
                                                "later, as if never stopped); the report holds the curve so far")
    tr.add_argument("--seeds", type=int, help="kd-vs-ce: samples of training windows, seeds 1..N (default 5)")
    tr.add_argument("--steps", type=int,
                    help="optimizer steps (default 1200; recovery: 240; embedding: 200; kd-vs-ce: 10, notebook 06's)")
    tr.add_argument("--lr", type=float, help="peak learning rate (default 3e-4; recovery and embedding: 1e-4)")
    tr.add_argument("--batch-size", type=int, help="windows of 256 tokens per step (default 4; embedding: 2)")
    tr.add_argument("--eval-every", type=int,
                    help="steps between held-out perplexity points (default 50; recovery: 20; embedding: 25)")
    tr.add_argument("--model", help="teacher: model alias, local directory or Hugging Face id (default: Gemma 3 270M)")
    tr.add_argument("--out", help="report path (default: reports/train-student-<keep>-cpu.json, "
                                  "reports/recovery-<50pct or 2of4>-cpu.json, reports/factorized-embedding-r<rank>-cpu.json, "
                                  "reports/kd-vs-ce-cpu.json)")
    tr.add_argument("--fresh", action="store_true", help="ignore the checkpoint of an earlier run and start over")
    tr.add_argument("--quick", action="store_true", help="6 steps on a short protocol, apart from the real run: checks the pipeline")
    tr.set_defaults(func=cmd_train)
    return tr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cookbook", description="Run the LLM Efficiency Cookbook.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute notebooks headless and print their results tables")
    run.add_argument("notebooks", nargs="*", help="numbers or names (default: all, in order)")
    run.add_argument("--model", help=f"model alias, local directory or Hugging Face id (sets ${MODEL_ENV_VAR})")
    run.add_argument("--inplace", action="store_true", help="write outputs back into notebooks/")
    run.add_argument("--output-dir", default="build/notebooks", help="where executed copies go")
    run.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    run.set_defaults(func=cmd_run)
    sub.add_parser("list", help="list the notebooks in order").set_defaults(func=cmd_list)
    sub.add_parser("info", help="model, device and versions").set_defaults(func=cmd_info)
    add_bench_parser(sub)
    add_optimize_parser(sub)
    add_train_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)
