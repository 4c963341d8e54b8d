"""Check megalong's GPU attention kernels against its PyTorch (SDPA) backend, on one GPU.

    python tools/gpu_check.py                 # everything, on GPU 0
    python tools/gpu_check.py --cp 4          # CP checks with 4 processes sharing the GPU
    python tools/gpu_check.py --allow-cpu     # dry run of the SDPA parts on CPU (not a GPU check)

What it checks (bf16 inputs; the reference is megalong's SDPA backend in float32 on the
same inputs, itself first checked against the explicit-mask reference):

1. each installed GPU backend (Transformer Engine THD, flash-attn varlen) on one device,
   without context parallelism: outputs and q/k/v gradients;
2. context parallelism: ``--cp`` processes share the GPU (gloo, tensors staged through the
   host) and run megalong's ring and all-to-all with every kernel; with at least ``--cp``
   GPUs each rank gets its own GPU (NCCL) and Transformer Engine's own CP is checked too;
3. the whole model: a tiny Llama built by ``megalong.model.llama.build_model`` (Transformer
   Engine layers when installed) gives the same loss and gradients with every kernel;
4. throughput: forward + backward tokens/s of each kernel on a long packed sequence with
   realistic document lengths, and on one full-causal document;
5. FP8: a 2-layer Llama-3-8B-shaped model with Transformer Engine layers in bf16 and in FP8
   (delayed and tensorwise scaling): the loss agrees within 1% and the speed-up is printed.

For training-step throughput and MFU at 64K run ``python benchmarks/train_step.py --gpu``.

Prints one line per check and a summary; exits 1 on any mismatch, 0 when everything
passed. Without a GPU it prints SKIP and exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalong.data.cp_shard import load_balanced_index  # noqa: E402
from megalong.model.attention.layout import DocumentLayout  # noqa: E402
from megalong.model.attention.local import flash_attn_available, flash_attention, sdpa_attention  # noqa: E402
from megalong.model.attention.reference import reference_attention  # noqa: E402
from megalong.model.attention.te import transformer_engine_available  # noqa: E402

# bf16 kernels against a float32 reference: max |diff| of the output, relative L2 error of gradients.
OUTPUT_TOLERANCE = 2e-2
GRADIENT_TOLERANCE = 2e-2


def boundaries(seq_length: int, seed: int, median: float = 600.0) -> torch.Tensor:
    """Realistic packed documents (log-normal lengths) plus a few tiny ones at the start."""
    generator = torch.Generator().manual_seed(seed)
    cuts, position = [0, 1, 3, 4], 4
    while position < seq_length:
        length = int(math.exp(math.log(median) + 1.2 * torch.randn((), generator=generator).item()))
        position = min(seq_length, position + max(1, length))
        cuts.append(position)
    return torch.tensor(cuts)


def make_case(seq_length, batch, heads, kv_heads, head_dim, device, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cu = [boundaries(seq_length, seed + b) for b in range(batch)]
    layout = DocumentLayout.from_sample_cu_seqlens(cu, seq_length)
    shapes = [(seq_length, batch, heads, head_dim), (seq_length, batch, kv_heads, head_dim),
              (seq_length, batch, kv_heads, head_dim), (seq_length, batch, heads * head_dim)]
    q, k, v, grad = (torch.randn(*s, generator=generator).to(device=device, dtype=dtype) for s in shapes)
    return layout, q, k, v, grad


def run_with_grads(fn, q, k, v, grad, dtype=None):
    inputs = [(x if dtype is None else x.to(dtype)).detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*inputs)
    out.backward(grad if dtype is None else grad.to(dtype))
    return out.detach(), [x.grad.detach() for x in inputs]


def compare(name, out, grads, ref_out, ref_grads, out_tol, grad_tol) -> bool:
    out_err = (out.float() - ref_out.float()).abs().max().item()
    grad_errs = [((g.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12)).item()
                 for g, r in zip(grads, ref_grads)]
    ok = out_err <= out_tol and max(grad_errs) <= grad_tol
    print(f"  [{'PASS' if ok else 'FAIL'}] {name}: max |out diff| {out_err:.2e} (tol {out_tol:g}); "
          f"relative grad error q/k/v {', '.join(f'{e:.2e}' for e in grad_errs)} (tol {grad_tol:g})")
    return ok


def kernels(device) -> dict:
    """Whole-sequence kernels available here: name -> fn(q, k, v, layout, scale)."""
    available = {"sdpa": lambda q, k, v, layout, scale: sdpa_attention(q, k, v, layout, scale)}
    if device.type == "cuda" and flash_attn_available():
        available["flash"] = flash_attention
    if device.type == "cuda" and transformer_engine_available():
        from megalong.model.attention.te import TEDocumentKernel

        te_modules = {}

        def te(q, k, v, layout, scale):
            if scale not in te_modules:
                te_modules[scale] = TEDocumentKernel(q.shape[-1], scale, layer_number=1).to(q.device)
            return te_modules[scale](q, k, v, layout)

        available["te"] = te
    return available


def check_single_device(args, device) -> list[str]:
    failures = []
    print("1. One device, no context parallelism")
    # The float32 SDPA backend against the explicit-mask definition first.
    layout, q, k, v, grad = make_case(1024, 2, 4, 2, 64, device, torch.float32, seed=1)
    scale = 1.0 / 8
    ref = run_with_grads(lambda q_, k_, v_: reference_attention(q_, k_, v_, layout.doc_ids, scale), q, k, v, grad)
    mine = run_with_grads(lambda q_, k_, v_: sdpa_attention(q_, k_, v_, layout, scale), q, k, v, grad)
    if not compare("sdpa fp32 vs explicit mask", *mine, *ref, 1e-4, 1e-4):
        failures.append("sdpa fp32 vs explicit mask")

    layout, q, k, v, grad = make_case(args.seq_length, 2, args.heads, args.kv_heads, args.head_dim,
                                      device, torch.bfloat16)
    scale = 1.0 / math.sqrt(args.head_dim)
    ref = run_with_grads(lambda q_, k_, v_: sdpa_attention(q_, k_, v_, layout, scale), q, k, v, grad, torch.float32)
    for name, kernel in kernels(device).items():
        try:
            got = run_with_grads(lambda q_, k_, v_: kernel(q_, k_, v_, layout, scale), q, k, v, grad)
        except Exception as error:  # report, keep checking the others
            print(f"  [FAIL] {name} bf16: {type(error).__name__}: {error}")
            failures.append(f"{name} bf16 (error)")
            continue
        if not compare(f"{name} bf16 vs sdpa fp32", *got, *ref, OUTPUT_TOLERANCE, GRADIENT_TOLERANCE):
            failures.append(f"{name} bf16")
    return failures


def _cp_worker(args, device_type: str, one_gpu_per_rank: bool) -> list:
    """One CP rank: sharing one device with the others (gloo; GPU tensors staged through the
    host), or on its own GPU with NCCL, where Transformer Engine's own CP is checked too."""
    import torch.distributed as dist

    from megalong.model.attention.ring import ring_attention
    from megalong.model.attention.ulysses import ulysses_attention

    rank_env = int(os.environ["RANK"])
    if one_gpu_per_rank:
        torch.cuda.set_device(rank_env)
    dist.init_process_group("nccl" if one_gpu_per_rank else "gloo", init_method="env://")
    if device_type == "cuda":
        device = torch.device("cuda", rank_env if one_gpu_per_rank else 0)
    else:
        device = torch.device("cpu")
    group, rank, cp = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seq = args.cp_seq_length
    layout, q, k, v, grad = make_case(seq, 1, args.heads, args.kv_heads, args.head_dim, device, dtype, seed=3)
    scale = 1.0 / math.sqrt(args.head_dim)
    ref_out, ref_grads = run_with_grads(lambda q_, k_, v_: sdpa_attention(q_, k_, v_, layout, scale),
                                        q, k, v, grad, torch.float32)
    index = load_balanced_index(seq, cp, rank).to(device)
    shard = [x.index_select(0, index) for x in (q, k, v, grad)]
    results = []
    runs = [("ring (PyTorch blocks)", lambda q_, k_, v_: ring_attention(q_, k_, v_, layout, group, scale))]
    for name, kernel in kernels(device).items():
        runs.append((f"all-to-all + {name}", lambda q_, k_, v_, kernel=kernel: ulysses_attention(
            q_, k_, v_, layout, group, lambda a, b, c, lay: kernel(a, b, c, lay, scale))))
    if one_gpu_per_rank and transformer_engine_available():
        from megalong.model.attention.te import TEContextParallelKernel

        for comm in ("ring", "a2a"):
            te_cp = TEContextParallelKernel(args.head_dim, scale, 1, group, comm)
            runs.append((f"Transformer Engine's own CP ({comm}) on THD",
                         lambda q_, k_, v_, te_cp=te_cp: te_cp(q_, k_, v_, layout)))
    for name, fn in runs:
        try:
            out, grads = run_with_grads(fn, *shard)
            out_err = (out.float() - ref_out.index_select(0, index)).abs().max().item()
            grad_errs = [((g.float() - r.index_select(0, index)).norm() / r.index_select(0, index).norm()).item()
                         for g, r in zip(grads, ref_grads)]
            results.append((name, out_err, grad_errs, None))
        except Exception as error:
            results.append((name, None, None, f"{type(error).__name__}: {error}"))
    dist.destroy_process_group()
    return results


def check_context_parallel(args, device) -> list[str]:
    from megalong.runtime.launch import run_processes

    one_gpu_per_rank = device.type == "cuda" and torch.cuda.device_count() >= args.cp
    if one_gpu_per_rank:
        print(f"2. Context parallelism over {args.cp} GPUs (NCCL), Transformer Engine's own CP included")
    else:
        print(f"2. Context parallelism on one device: {args.cp} processes share it (gloo)")
        if device.type == "cuda" and transformer_engine_available():
            print("  (Transformer Engine's own CP needs one GPU per CP rank with NCCL: not checked here)")
    failures = []
    per_rank = run_processes(_cp_worker, args.cp, args=(args, device.type, one_gpu_per_rank))
    for i, (name, *_rest) in enumerate(per_rank[0]):
        errors = [rank_results[i] for rank_results in per_rank]
        crashed = [e[3] for e in errors if e[3]]
        if crashed:
            print(f"  [FAIL] CP={args.cp} {name}: {crashed[0]}")
            failures.append(f"CP {name} (error)")
            continue
        out_err = max(e[1] for e in errors)
        grad_err = max(max(e[2]) for e in errors)
        ok = out_err <= OUTPUT_TOLERANCE and grad_err <= GRADIENT_TOLERANCE
        print(f"  [{'PASS' if ok else 'FAIL'}] CP={args.cp} {name}: max |out diff| {out_err:.2e}, "
              f"max relative grad error {grad_err:.2e} (all ranks)")
        if not ok:
            failures.append(f"CP {name}")
    return failures


def _model_worker(backends, device_type: str) -> dict:
    """Loss and gradients of a tiny Llama (Megatron-Core GPTModel) with each attention backend."""
    from megalong.config.parallel import ParallelConfig
    from megalong.model import preset_config
    from megalong.model.attention import packed_seq_params_for
    from megalong.model.llama import build_model
    from megalong.runtime import init_distributed, set_seed

    parallel = ParallelConfig()
    init_distributed(parallel, device=device_type)
    on_gpu = device_type == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    seq = 512
    generator = torch.Generator().manual_seed(0)
    cu = [boundaries(seq, 7, median=60.0), boundaries(seq, 8, median=200.0)]
    stream = torch.randint(0, 512, (2, seq + 1), generator=generator).to(device)
    params = packed_seq_params_for(cu, seq)
    results = {}
    for backend in backends:
        set_seed(1234)  # identical initial weights for every backend
        model_cfg = preset_config("test-tiny", attention_backend=backend,
                                  params_dtype="bf16" if on_gpu else "fp32")
        model = build_model(model_cfg, parallel, on_gpu=on_gpu)[0]
        position_ids = torch.arange(seq, device=device).expand(2, seq)
        losses = model(stream[:, :-1], position_ids, attention_mask=None, labels=stream[:, 1:],
                       packed_seq_params=params)
        loss = losses.float().mean()
        loss.backward()
        results[backend] = {"loss": loss.item(),
                            "grads": {n: p.grad.float().cpu() for n, p in model.named_parameters()}}
    return results


def check_model(args, device) -> list[str]:
    from megalong.runtime.launch import run_processes

    backends = list(kernels(device))
    print(f"3. Whole model (test-tiny Llama, Megatron-Core layers): {', '.join(backends)}")
    results = run_processes(_model_worker, 1, args=(backends, device.type))[0]
    reference = results["sdpa"]
    failures = []
    for backend, result in results.items():
        loss_err = abs(result["loss"] - reference["loss"]) / abs(reference["loss"])
        grad_err = max(((g - reference["grads"][n]).norm() / reference["grads"][n].norm().clamp_min(1e-12)).item()
                       for n, g in result["grads"].items())
        ok = loss_err <= 1e-2 and grad_err <= 5e-2
        print(f"  [{'PASS' if ok else 'FAIL'}] model with {backend}: loss {result['loss']:.5f} "
              f"(relative difference to sdpa {loss_err:.2e}), largest relative gradient difference {grad_err:.2e}")
        if not ok:
            failures.append(f"model with {backend}")
    return failures


def _fp8_worker(seq: int, repeats: int) -> dict:
    """Loss and tokens/s of a 2-layer Llama-3-8B-shaped model with TE layers, bf16 vs FP8."""
    from megalong.config.parallel import ParallelConfig
    from megalong.model import FP8Config, preset_config
    from megalong.model.llama import build_model
    from megalong.runtime import init_distributed, set_seed

    parallel = ParallelConfig()
    init_distributed(parallel, device="cuda")
    device = torch.device("cuda", torch.cuda.current_device())
    tokens = torch.randint(0, 128000, (1, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    position_ids = torch.arange(seq, device=device)[None]
    results = {}
    for name, fp8 in (("bf16", None), ("fp8 (delayed scaling, hybrid)", FP8Config()),
                      ("fp8 (tensorwise scaling)", FP8Config(recipe="tensorwise"))):
        set_seed(1234)
        model = None
        cfg = preset_config("llama3-8b", num_layers=2, params_dtype="bf16", transformer_impl="transformer_engine",
                            attention_backend="te", fp8=fp8)
        try:
            model = build_model(cfg, parallel, on_gpu=True)[0]

            def step():
                loss = model(tokens[:, :-1], position_ids, attention_mask=None, labels=tokens[:, 1:]).float().mean()
                loss.backward()
                return loss.item()

            loss = step()  # warm-up; FP8 scales settle
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            torch.cuda.synchronize()
            results[name] = {"loss": loss, "tokens_per_s": seq * repeats / (time.perf_counter() - start)}
        except Exception as error:  # an FP8 recipe this GPU / TE version lacks
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        del model
        torch.cuda.empty_cache()
    return results


def check_fp8(args) -> list[str]:
    from megalong.runtime.launch import run_processes

    print(f"5. FP8 through Transformer Engine: 2-layer Llama-3-8B shape, {args.fp8_seq_length} tokens, "
          "bf16 vs FP8 (loss at initialization, forward + backward tokens/s)")
    results = run_processes(_fp8_worker, 1, args=(args.fp8_seq_length, args.repeats))[0]
    reference = results["bf16"]
    if "error" in reference:
        print(f"  [FAIL] bf16 with Transformer Engine layers: {reference['error']}")
        return ["TE bf16 model"]
    print(f"  bf16: loss {reference['loss']:.4f}, {reference['tokens_per_s']:,.0f} tokens/s")
    failures = []
    for name, result in results.items():
        if name == "bf16":
            continue
        if "error" in result:
            print(f"  [FAIL] {name}: {result['error']}")
            failures.append(name)
            continue
        # At initialization the loss is ~ln(vocab); FP8 rounding moves it by well under 1%.
        loss_err = abs(result["loss"] - reference["loss"]) / reference["loss"]
        ok = loss_err <= 1e-2
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: loss {result['loss']:.4f} (relative difference {loss_err:.1e}), "
              f"{result['tokens_per_s']:,.0f} tokens/s = {result['tokens_per_s'] / reference['tokens_per_s']:.2f}x bf16")
        if not ok:
            failures.append(name)
    return failures


def measure_throughput(args, device) -> None:
    print(f"4. Throughput, forward + backward, one sequence of {args.throughput_seq_length} tokens, "
          f"{args.heads} query / {args.kv_heads} KV heads of {args.head_dim}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seq = args.throughput_seq_length
    documents, q, k, v, grad = make_case(seq, 1, args.heads, args.kv_heads, args.head_dim, device, dtype, seed=5)
    causal = DocumentLayout.causal(1, seq)
    lengths = torch.diff(documents.flat_cu_seqlens()).double()
    print(f"  {len(lengths)} documents; FLOP ratio sum(len^2)/S^2 = {float((lengths ** 2).sum() / seq ** 2):.4f}")
    scale = 1.0 / math.sqrt(args.head_dim)
    for name, kernel in kernels(device).items():
        for label, layout in (("documents", documents), ("one document", causal)):
            def step():
                run_with_grads(lambda q_, k_, v_: kernel(q_, k_, v_, layout, scale), q, k, v, grad)

            try:
                step()  # warm-up (kernel selection, TE module creation)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.repeats):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - start) / args.repeats
                print(f"  {name:6s} {label:13s} {seq / seconds:12,.0f} tokens/s ({seconds * 1000:.1f} ms per step)")
            except Exception as error:
                print(f"  {name:6s} {label:13s} error: {type(error).__name__}: {error}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Check megalong's GPU attention backends on one GPU.")
    parser.add_argument("--seq-length", type=int, default=8192, help="correctness checks, per sample")
    parser.add_argument("--cp", type=int, default=2, help="CP processes sharing the device (0: skip)")
    parser.add_argument("--cp-seq-length", type=int, default=4096)
    parser.add_argument("--throughput-seq-length", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heads", type=int, default=32, help="query heads (Llama-3-8B: 32)")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads (Llama-3-8B: 8)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-model", action="store_true", help="skip the whole-model check")
    parser.add_argument("--fp8-seq-length", type=int, default=8192, help="tokens in the FP8 check (0: skip it)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run the SDPA parts on CPU to try the script itself (checks no GPU kernel)")
    args = parser.parse_args(argv)

    if torch.cuda.is_available():
        device = torch.device("cuda", 0)
        torch.backends.cuda.matmul.allow_tf32 = False
        print(f"GPU: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
              f"Transformer Engine {'installed' if transformer_engine_available() else 'not installed'}; "
              f"flash-attn {'installed' if flash_attn_available() else 'not installed'}")
    elif args.allow_cpu:
        device = torch.device("cpu")
        print("No GPU: dry run of the SDPA parts on CPU (--allow-cpu); no GPU kernel is checked")
    else:
        print("SKIP: no GPU visible (torch.cuda.is_available() is False); nothing was checked")
        return 0

    failures = check_single_device(args, device)
    if args.cp > 1:
        failures += check_context_parallel(args, device)
    if not args.skip_model:
        failures += check_model(args, device)
    if args.fp8_seq_length and device.type == "cuda":
        if transformer_engine_available():
            failures += check_fp8(args)
        else:
            print("5. FP8: SKIP, Transformer Engine is not installed")
    if not args.skip_throughput:
        measure_throughput(args, device)
    if failures:
        print(f"FAILED: {len(failures)} check(s): {'; '.join(failures)}")
        return 1
    print("OK: every check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
