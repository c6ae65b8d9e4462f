"""The multi-process runs of the parallelism notebook, one mode per strategy. Launch with torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m cookbook.parallel_runs ddp \\
        --model SUBMODEL_DIR --data batch.pt --out ddp.json

(or `cookbook.parallel.launch("ddp", "ddp.json", args=[...])`). Every rank loads the model saved with
`save_pretrained` in --model and the token batches saved with `torch.save` in --data, shape (steps, B, t);
rank 0 writes the measurements as JSON to --out (and, for ddp / fsdp, the gradients and final weights to
--out with the suffix .pt). Backend: NCCL on GPUs, gloo on CPU; the code is the same.

Modes:
  ddp   DistributedDataParallel: each rank trains on B / world rows, gradients all-reduced in buckets.
  fsdp  FSDP2 `fully_shard` per decoder layer + root (ZeRO-3): weights, grads and Adam states sharded.
  tp    Megatron tensor parallel of every decoder layer: logits and gradients vs the unsharded model.
  pp    Pipeline parallel over decoder layers: our GPipe / 1F1B on send/recv, timed per stage, and
        torch.distributed.pipelining's ScheduleGPipe as the library cross-check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from cookbook import parallel as P
from cookbook.core import decoder_layers
from cookbook.measure import PeakMemory, time_function


def setup() -> tuple[int, int, torch.device]:
    """Join the process group: NCCL with one GPU per rank when there are enough GPUs, else gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = P.worker_device(world, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(P.backend_for(device))
    return dist.get_rank(), dist.get_world_size(), device


def load(path: str, device: torch.device):
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


def clean_name(name: str) -> str:
    """Parameter names without the wrappers DDP / FSDP / TP insert."""
    return name.replace("module.", "").replace("_fsdp_wrapped_module.", "").replace(".inner.", ".")


def run_data_parallel(args, rank, world, device, mode: str) -> dict:
    model = load(args.model, device)
    batches = torch.load(args.data).to(device)  # (steps, B, t)
    P.check_divisible(batches.shape[1], world, "the global batch size", "Use a batch the world size divides.")
    counter = P.CommCounter()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        model.register_comm_hook(None, counter.ddp_hook())
        with PeakMemory() as mem:
            losses, grads, times, opt = P.train_steps(model, batches, args.lr, rank, world)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        with counter.watch_collectives(), PeakMemory() as mem:  # (DTensor.full_tensor uses functional
            losses, grads, times, opt = P.train_steps(model, batches, args.lr, rank, world)  # collectives: not counted)
    held = P.state_bytes(model, opt)
    n = sum(P.full_tensor(p).numel() if hasattr(p, "full_tensor") else p.numel() for p in model.parameters())
    flat = torch.zeros(n, device=device)  # as many floats as all gradients: time one bare all-reduce of them
    allreduce_s = time_function(lambda: dist.all_reduce(flat), warmup=1, repeats=3, device=device).median_s
    final = {clean_name(n): P.full_tensor(p.detach()).clone() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"first_grads": {clean_name(n): g for n, g in grads.items()}, "final_params": final},
                   Path(args.out).with_suffix(".pt"))
    return {"losses": P.mean_over_ranks(losses), "step_s": statistics.median(times[1:] or times), "state_bytes": held,
            "comm": counter.as_dict(), "comm_steps": len(batches), "rss_peak_bytes": mem.cpu_peak_bytes,
            "allreduce_all_grads_s": allreduce_s}


def run_tensor_parallel(args, rank, world, device) -> dict:
    model = load(args.model, device).eval()
    ids = torch.load(args.data)[0].to(device)  # (B, t): the first batch
    ref_logits = model(input_ids=ids).logits  # (B, t, V), unsharded
    P.causal_lm_loss(ref_logits, ids).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_logits = ref_logits.detach()
    model.zero_grad(set_to_none=True)
    layer_bytes = {"unsharded": sum(P.tensor_nbytes(p) for p in decoder_layers(model)[0].parameters())}
    with torch.no_grad():
        t_full = time_function(lambda: model(input_ids=ids), warmup=1, repeats=3).median_s

    counter = P.CommCounter()
    partial = P.tensor_parallel_model(model, rank, world, counter=counter)
    layer_bytes["per_rank"] = sum(P.tensor_nbytes(p) for p in decoder_layers(model)[0].parameters())
    logits = model(input_ids=ids).logits
    forward = counter.as_dict()
    loss = P.causal_lm_loss(logits, ids)
    loss.backward()
    backward = {k: v - forward["payload"].get(k, 0) for k, v in counter.payload.items()}  # the f's in backward
    for p in partial:  # replicated weights that only saw this rank's heads: sum their gradients
        counter.add("all_reduce_partial_grads", P.tensor_nbytes(p.grad))
        dist.all_reduce(p.grad)
    grad_err = 0.0
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            want = P.sharded_reference(module, ref_grads[clean_name(f"{name}.{pname}")])
            grad_err = max(grad_err, P.max_relative_error({"g": p.grad}, {"g": want}))
    with torch.no_grad():
        model_tp = lambda: model(input_ids=ids)  # noqa: E731
        t_tp = time_function(model_tp, warmup=1, repeats=3).median_s
    return {"logits_max_abs_diff": (logits.detach() - ref_logits).abs().max().item(),
            "logits_max_abs": ref_logits.abs().max().item(), "grad_max_rel_error": grad_err,
            "forward_comm": forward["payload"], "forward_calls": forward["calls"], "backward_comm": backward,
            "partial_grad_bytes": counter.payload["all_reduce_partial_grads"],
            "layers": len(decoder_layers(model)), "tokens": ids.numel(), "hidden": model.config.hidden_size,
            "layer_param_bytes": layer_bytes, "forward_s_unsharded": t_full, "forward_s_tp": t_tp}


def run_pipeline_parallel(args, rank, world, device) -> dict:
    model = load(args.model, device)
    batch = torch.load(args.data)[0].to(device)  # (B, t)
    model.train()
    ref_loss = P.causal_lm_loss(model(input_ids=batch).logits, batch)  # single process, whole batch
    ref_loss.backward()
    stage = P.PipelineStageModule(model, rank, world)
    names = {id(p): n for n, p in model.named_parameters()}
    ref_grads = {names[id(p)]: p.grad.clone() for p in stage.parameters()}
    d = model.config.hidden_size
    runs = []
    for kind in args.schedules.split(","):
        for m in map(int, args.microbatches.split(",")):
            micro = P.split_microbatches(batch, m)
            ops = P.pipeline_schedule(kind, rank, world, m)
            best = None
            for _ in range(args.repeats):  # the first repeat also warms up; keep the fastest step
                model.zero_grad(set_to_none=True)
                counter = P.CommCounter()
                result = P.run_pipeline_step(stage, ops, rank, world, micro, d, counter)
                if best is None or result.step_end - result.step_start < best[0].step_end - best[0].step_start:
                    best = (result, counter)
            result, counter = best
            grads = {names[id(p)]: p.grad for p in stage.parameters()}
            runs.append({"schedule": kind, "microbatches": m, "loss": result.loss,
                         "grad_max_rel_error": P.max_relative_error(grads, ref_grads), "bubble": result.bubble,
                         "busy_s": result.busy_s, "step_s": result.step_end - result.step_start,
                         "peak_in_flight": result.peak_in_flight, "sent_bytes": counter.payload.get("send", 0),
                         "events": [(k, i, s - result.step_start, e - result.step_start)
                                    for k, i, s, e in result.events]})
    library = library_gpipe(stage, rank, world, batch, args.library_microbatches, device)
    grads = {names[id(p)]: p.grad for p in stage.parameters()}
    library["grad_max_rel_error"] = P.max_relative_error(grads, ref_grads)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"runs": runs, "library": library, "layers": len(stage.layers),
                                      "param_bytes": sum(P.tensor_nbytes(p) for p in stage.parameters())})
    return {"ref_loss": ref_loss.item(), "stages": per_rank, "tokens": batch.numel(), "hidden": d}


def library_gpipe(stage, rank, world, batch, m, device) -> dict:
    """The same step with torch.distributed.pipelining's ScheduleGPipe (it scales gradients by 1 / m)."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    stage.zero_grad(set_to_none=True)
    pipe = PipelineStage(stage, rank, world, device)
    schedule = ScheduleGPipe(pipe, n_microbatches=m, loss_fn=P.causal_lm_loss)
    losses: list[torch.Tensor] = []
    if rank == 0:
        schedule.step(batch)
    elif rank == world - 1:
        schedule.step(target=batch, losses=losses)
    else:
        schedule.step()
    return {"microbatches": m, "loss": sum(x.item() for x in losses) / m if losses else 0.0}


def summary(result: dict) -> str:
    """One line of what the run measured, printed by rank 0."""
    if result["mode"] in ("ddp", "fsdp"):
        return "loss per step " + " -> ".join(f"{x:.4f}" for x in result["losses"])
    if result["mode"] == "tp":
        return (f"max |logits - unsharded| {result['logits_max_abs_diff']:.1e}, "
                f"all-reduced forward {sum(result['forward_comm'].values()) / 2**20:.1f} MiB")
    runs = result["stages"][-1]["runs"]
    return f"{len(runs)} pipeline steps, last-stage losses " + ", ".join(f"{r['loss']:.4f}" for r in runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["ddp", "fsdp", "tp", "pp"])
    parser.add_argument("--model", required=True, help="directory written by save_pretrained")
    parser.add_argument("--data", required=True, help="torch.save'd token batches, shape (steps, B, t)")
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--schedules", default="gpipe,1f1b")
    parser.add_argument("--microbatches", default="1,2,4,8")
    parser.add_argument("--library-microbatches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    rank, world, device = setup()
    torch.manual_seed(0)
    start = time.perf_counter()
    if args.mode in ("ddp", "fsdp"):
        result = run_data_parallel(args, rank, world, device, args.mode)
    elif args.mode == "tp":
        result = run_tensor_parallel(args, rank, world, device)
    else:
        result = run_pipeline_parallel(args, rank, world, device)
    result.update(mode=args.mode, world_size=world, backend=dist.get_backend(), device=device.type,
                  wall_s=time.perf_counter() - start)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"state_bytes": result.get("state_bytes"),
                                      "rss_peak_bytes": result.get("rss_peak_bytes")})
    result["per_rank"] = per_rank
    if rank == 0:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"[{args.mode}] {world} processes, {result['backend']} on {device.type}, "
              f"{result['wall_s']:.1f} s: {summary(result)}; wrote {args.out}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Every result is written and the process group destroyed. Skip the interpreter's own teardown: with gloo,
    # it sometimes aborts there ("terminate called without an active exception", about 1 run in 10 on 2 CPU
    # cores) after a run that finished cleanly, and torchrun then reports the whole run as failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
