"""``megalong plan``: which TP/PP/CP/DP and recomputation fit, and which is fastest.

    megalong plan RECIPE --nodes 1 --gpus-per-node 8 --gpu h100 [--gpu-memory 80GB]
    megalong plan --model llama3-8b --seq-length 524288 --global-batch 16 --nodes 1 --gpus-per-node 8

Prints the best layouts with their memory breakdown and step time, then why every other
(TP, PP, CP) family was rejected. Estimates only: see docs/plan.md for the formulas.
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
    parser.add_argument("--loss-chunk-tokens", type=int, default=None,
                        help=f"chunked cross entropy, tokens per chunk; 0 = full logits "
                             f"(default: the recipe's loss.chunk_tokens, as train uses it; {DEFAULT_LOSS_CHUNK} "
                             f"with --model)")
    parser.add_argument("--headroom", type=float, default=0.05, help="share of GPU memory kept free (default 0.05)")
    parser.add_argument("--top", type=int, default=3, help="how many layouts to show (default 3)")
    parser.add_argument("--show-rejected", action="store_true", help="list every rejected layout")


def _request(args):
    from megalong.config import ConfigError
    from megalong.model.config import ModelConfig
    from megalong.model.presets import resolve
    from megalong.plan.hardware import gpu_spec, parse_memory
    from megalong.plan.planner import PlanRequest
    from megalong.plan.recipe import read_recipe

    seq_length, global_batch, chunk = args.seq_length, args.global_batch, args.loss_chunk_tokens
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
    memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
    return PlanRequest(
        model=model, seq_length=seq_length, global_batch=global_batch, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, gpu=gpu_spec(args.gpu, memory), loss_chunk_tokens=chunk or None,
        precisions=precisions, memory_headroom=args.headroom,
    )


def _print_candidate(rank: int, candidate, request) -> None:
    from megalong.plan.memory import GB

    time, memory, layout = candidate.time, candidate.memory, candidate.layout
    tokens = request.global_batch * request.seq_length
    print(f"{rank}. {layout.describe()}")
    print(f"   memory  {memory.total / GB:6.1f} GB of {request.gpu.memory_gb:g} GB on pipeline stage "
          f"{memory.pipeline_stage}")
    for name, value in memory.breakdown().items():
        print(f"           {name.replace('_', ' '):22s} {value / GB:7.2f} GB")
    for note in memory.notes:
        print(f"           ({note})")
    print(f"   time    {time.total_s:8.2f} s/step  (compute {time.compute_s:.2f}, pipeline bubble {time.bubble_s:.2f}, "
          f"TP comm {time.tp_comm_s:.2f}, CP comm {time.cp_comm_s:.2f}, DP comm {time.dp_comm_s:.2f}, "
          f"PP comm {time.pp_comm_s:.2f})")
    print(f"           {time.tokens_per_s_per_gpu(tokens, request.world_size):,.0f} tokens/s per GPU, "
          f"MFU {100 * time.mfu(request.gpu, request.world_size):.0f}% (model FLOPs vs bf16 peak)")
    print(f"   use     {' '.join(layout.overrides())}")


def run(args: argparse.Namespace) -> int:
    import sys

    from megalong.config import ConfigError
    from megalong.plan.hardware import UnknownGpuError
    from megalong.plan.planner import plan
    from megalong.plan.summary import closest_to_fitting, family_outcomes, not_shown

    try:
        request = _request(args)
    except (ConfigError, UnknownGpuError, ValueError) as err:
        print(f"megalong plan: {err}", file=sys.stderr)
        return 2
    model = request.model
    print(f"Planning {model.preset or 'custom model'} ({model.num_layers} layers, hidden {model.hidden_size}, "
          f"{model.num_attention_heads}/{model.num_query_groups} heads) at {request.seq_length:,} tokens x "
          f"{request.global_batch} sequences per step on {request.nodes} x {request.gpus_per_node} "
          f"{request.gpu.name} ({request.gpu.memory_gb:g} GB each)")
    print(f"Assuming Transformer Engine kernels (flash attention, fused norms), sequence parallelism with TP, "
          + (f"chunked cross entropy ({request.loss_chunk_tokens} tokens per chunk)" if request.loss_chunk_tokens
             else "full logits (Megatron's cross entropy)") + f", {request.memory_headroom:.0%} memory kept free.")
    result = plan(request)
    print()
    if not result.candidates:
        print("No layout fits. Closest ones:")
        for rejection in closest_to_fitting(result, args.top):
            print(f"  {rejection.layout.describe()}: {rejection.reason}; {rejection.memory.describe()}")
    else:
        print(f"Best {min(args.top, len(result.candidates))} of {len(result.candidates)} layouts that fit:")
        for rank, candidate in enumerate(result.candidates[: args.top], 1):
            print()
            _print_candidate(rank, candidate, request)
    print()
    rejected = not_shown(result, args.top)
    if args.show_rejected:
        print(f"Rejected ({len(rejected)}):")
        for rejection in rejected:
            print(f"  {rejection.layout.describe()}: {rejection.reason}")
    else:
        print(f"Other layouts ({len(rejected)}, one line per TP/PP/CP/DP family, slower first, then too large, "
              f"then invalid; --show-rejected lists all):")
        for outcome in family_outcomes(rejected):
            print(f"  {outcome.describe()}")
    return 0 if result.candidates else 1
