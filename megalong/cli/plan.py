"""``megalong plan``: which TP/PP/CP/DP and recomputation fit, and which is fastest.

    megalong plan RECIPE --nodes 1 --gpus-per-node 8 --gpu h100 [--gpu-memory 80GB]
    megalong plan RECIPE --nodes 8 --gpus-per-node 8 --layout cp=8,recompute=full
    megalong plan --model llama3-8b --seq-length 524288 --global-batch 16 --nodes 1 --gpus-per-node 8 --json

Prints the recipe's own layout, the best layouts with their memory and step time by part,
and one line counting the rejected layouts by reason (``--show-rejected`` lists each).
Predictions: see docs/plan.md for the formulas and their measured error.
"""

from __future__ import annotations

import argparse

DEFAULT_LOSS_CHUNK = 8192


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="training recipe (YAML); or give --model/--seq-length/--global-batch")
    parser.add_argument("overrides", nargs="*", help="recipe overrides key.sub=value")
    parser.add_argument("--model", help="model preset (e.g. llama3-8b) instead of a recipe")
    parser.add_argument("--seq-length", type=int, help="tokens per sequence (overrides the recipe)")
    parser.add_argument("--global-batch", type=int, help="sequences per optimizer step (overrides the recipe)")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu", default="h100", help="a100, h100, h200 or b200 (default: h100)")
    parser.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GB (default: the GPU's own)")
    parser.add_argument("--precision", default="bf16",
                        help="comma-separated precisions to consider: bf16, fp8 (default: bf16)")
    parser.add_argument("--layout", default="",
                        help="fix some dimensions, search the rest: tp=4,pp=8,vp=5,cp=2,dp=1,mbs=1,"
                             "recompute=full,dist_opt=true,precision=fp8")
    parser.add_argument("--grad-reduce-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="Megatron DDP's gradient buffer (grad_reduce_in_fp32); megalong trains with fp32 "
                             "(default), bf16 shows what a bf16 buffer would save")
    parser.add_argument("--loss-chunk-tokens", type=int, default=None,
                        help=f"chunked cross entropy, tokens per chunk; 0 = full logits "
                             f"(default: the recipe's loss.chunk_tokens, as train uses it; {DEFAULT_LOSS_CHUNK} "
                             f"with --model)")
    parser.add_argument("--headroom", type=float, default=0.05, help="share of GPU memory kept free (default 0.05)")
    parser.add_argument("--top", type=int, default=3, help="how many layouts to show (default 3)")
    parser.add_argument("--show-rejected", action="store_true", help="list every rejected layout with its reason")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (one object per layout) instead of text")


def _request(args):
    from megalong.config import ConfigError
    from megalong.model.config import ModelConfig
    from megalong.model.presets import resolve
    from megalong.plan.hardware import gpu_spec, parse_memory
    from megalong.plan.pin import parse_layout
    from megalong.plan.planner import Layout, PlanRequest
    from megalong.plan.recipe import read_recipe
    from megalong.plan.stack import MEGALONG
    from megalong.plan.workload import Workload

    seq_length, global_batch, chunk = args.seq_length, args.global_batch, args.loss_chunk_tokens
    facts = None
    if args.recipe:
        facts = read_recipe(args.recipe, tuple(args.overrides))
        model = facts.model
        seq_length = seq_length or facts.seq_length
        global_batch = global_batch or facts.global_batch
        if chunk is None:
            chunk = facts.loss_chunk_tokens
    elif args.model:
        model = resolve(ModelConfig(preset=args.model))
    else:
        raise ConfigError("give a RECIPE or --model PRESET")
    model.validate()  # a shape error names the field before any layout is tried
    if not seq_length or not global_batch:
        raise ConfigError("the sequence length and global batch are needed: set them in the recipe "
                          "(data.seq_length, schedule.global_batch_size) or pass --seq-length/--global-batch")
    if chunk is None:
        chunk = DEFAULT_LOSS_CHUNK
    precisions = tuple(p.strip() for p in args.precision.split(",") if p.strip())
    unknown = [p for p in precisions if p not in ("bf16", "fp8")]
    if unknown or not precisions:
        raise ConfigError(f"--precision: unknown {', '.join(unknown) or '(empty)'}; use bf16 and/or fp8")
    pin = parse_layout(args.layout)
    pin.check_world(args.nodes * args.gpus_per_node)
    if pin.precision:
        precisions = (pin.precision,)
    memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
    stack = MEGALONG.with_(grad_reduce_in_fp32=args.grad_reduce_dtype == "fp32")
    workload, recipe_layout = None, None
    if facts is not None:
        stack = stack.with_(overlap_dp_comm=facts.overlap_dp_comm)
        if facts.data is not None and facts.data.has_mixture:
            from dataclasses import replace

            workload = Workload.from_data(replace(facts.data, seq_length=seq_length), global_batch)
        world = args.nodes * args.gpus_per_node
        parallel = facts.parallel
        recipe_layout = Layout(
            parallel.tensor_parallel, parallel.pipeline_parallel, parallel.context_parallel,
            world // parallel.model_parallel_size, parallel.virtual_pipeline, facts.micro_batch, facts.recompute,
            parallel.distributed_optimizer, facts.precision,
        )
    return PlanRequest(
        model=model, seq_length=seq_length, global_batch=global_batch, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, gpu=gpu_spec(args.gpu, memory), loss_chunk_tokens=chunk or None,
        precisions=precisions, memory_headroom=args.headroom, pin=pin, stack=stack, workload=workload,
        recipe_layout=recipe_layout,
    )


def _print_candidate(label: str, candidate, request, best_time=None) -> None:
    from megalong.plan.memory import GB

    time, memory, layout = candidate.time, candidate.memory, candidate.layout
    tokens = request.global_batch * request.seq_length
    print(f"{label} {layout.describe()}")
    parts = ", ".join(f"{name.replace('_', ' ')} {value / GB:.1f}" for name, value in memory.breakdown().items()
                      if value)
    verdict = "fits in" if candidate.fits else "does NOT fit in"
    print(f"   memory {memory.total / GB:.1f} GB {verdict} {request.gpu.memory_gb:g} GB ({parts}; "
          f"pipeline stage {memory.pipeline_stage})")
    times = ", ".join(f"{name[:-2].replace('_', ' ')} {value:.2f}" for name, value in time.breakdown().items()
                      if value >= 0.005)
    slower = f"; {time.total_s / best_time:.2f}x the best layout's step" if best_time else ""
    print(f"   time   {time.total_s:.2f} s/step ({times}){slower}")
    print(f"          {time.tokens_per_s_per_gpu(tokens, request.world_size):,.0f} tokens/s per GPU, "
          f"MFU {100 * time.mfu(request.gpu, request.world_size):.0f}% (model FLOPs vs bf16 peak)")
    print(f"   use    {' '.join(layout.overrides())}")


def _print_text(result, args) -> None:
    from megalong.plan.summary import closest_to_fitting, not_shown, rejection_counts

    request = result.request
    model, stack = request.model, request.stack
    print(f"Planning {model.preset or 'custom model'} ({model.num_layers} layers, hidden {model.hidden_size}, "
          f"{model.num_attention_heads}/{model.num_query_groups} heads) at {request.seq_length:,} tokens x "
          f"{request.global_batch} sequences per step on {request.nodes} x {request.gpus_per_node} "
          f"{request.gpu.name} ({request.gpu.memory_gb:g} GB each)")
    print("Assuming megalong on Transformer Engine: sequence parallelism with TP, "
          + (f"chunked cross entropy ({request.loss_chunk_tokens} tokens per chunk)" if request.loss_chunk_tokens
             else "full logits (Megatron's cross entropy)")
          + f", {'fp32' if stack.grad_reduce_in_fp32 else 'bf16'} gradient buffer, "
          f"{request.memory_headroom:.0%} memory kept free.")
    print(f"Attention work: {request.workload.describe()}.")
    calibration = "calibrated on published runs" if request.efficiency.calibrated else \
        f"NOT calibrated for {request.gpu.generation} GPUs (borrowed from Hopper)"
    print(f"Step times are predictions ({calibration}; docs/plan.md gives their measured error).")
    if not request.pin.describe().startswith("("):
        print(f"Pinned: {request.pin.describe()}; the other dimensions are searched.")
    best_time = result.best.time.total_s if result.best else None
    if result.recipe is not None:
        print()
        if result.recipe.candidate is None:
            print(f"Recipe's layout: {result.recipe.layout.describe()}: cannot run here: {result.recipe.invalid}")
        else:
            _print_candidate("Recipe's layout:", result.recipe.candidate, request, best_time)
    print()
    if not result.candidates:
        closest = closest_to_fitting(result, args.top)
        print("No layout fits." + (" Closest ones:" if closest else " None is even valid (reasons below)."))
        for rejection in closest:
            print(f"  {rejection.layout.describe()}: {rejection.reason}; {rejection.memory.describe()}")
    else:
        print(f"Best {min(args.top, len(result.candidates))} of {len(result.candidates)} layouts that fit:")
        for rank, candidate in enumerate(result.candidates[: args.top], 1):
            print()
            _print_candidate(f"{rank}.", candidate, request)
    print()
    rejected = not_shown(result, args.top)
    counts = ", ".join(f"{count} {reason}" for reason, count in rejection_counts(rejected))
    print(f"Not shown: {len(rejected)} layouts ({counts})"
          + ("" if args.show_rejected else "; --show-rejected lists each."))
    if args.show_rejected:
        for rejection in rejected:
            print(f"  {rejection.layout.describe()}: {rejection.reason}")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from megalong.config import ConfigError
    from megalong.plan.hardware import UnknownGpuError
    from megalong.plan.planner import plan
    from megalong.plan.record import plan_record
    from megalong.plan.summary import not_shown

    try:
        request = _request(args)
    except (ConfigError, UnknownGpuError, ValueError, FileNotFoundError) as err:
        print(f"megalong plan: {err}", file=sys.stderr)
        return 2
    result = plan(request)
    if args.json:
        record = plan_record(result, args.top, args.show_rejected, not_shown(result, args.top))
        print(json.dumps(record, indent=1))
    else:
        _print_text(result, args)
    return 0 if result.candidates else 1
