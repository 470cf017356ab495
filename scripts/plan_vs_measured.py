"""Check the dry-run memory estimate (``nvlm.training.plan``) against a measured peak on one GPU.

    python scripts/plan_vs_measured.py                 # CUDA: ~250 M Qwen2-like LLM + small InternViT
    python scripts/plan_vs_measured.py --fsdp          # the same through parallelize() in a 1-process group
    python scripts/plan_vs_measured.py --device cpu    # small shapes; peak from the profiler's memory timeline
    python scripts/plan_vs_measured.py --time          # step time: plan_time's estimate vs gloo/CPU, 1 and 2 procs

``--time`` checks the time model (``nvlm.training.plan_time``) rather than memory: for 1 and 2 processes
(FSDP2 over gloo, one thread each, the plan's bf16 mixed precision) it measures the median step of the CPU
shapes, and estimates it with the hardware figures measured on the spot by microbenchmarks: the "peak" is a
bf16 matmul's FLOP/s at the LLM's own shape (micro-batch tokens × hidden → ffn; compute_efficiency = 1: that
rate is taken as what the step's kernels reach; a square 1024³ matmul's rate is printed beside it),
the link bandwidth is gloo's all_reduce bus bandwidth between the two processes (2·(n-1)/n · bytes / time), the
memory bandwidth a large copy's. On CPU the overlap the model assumes does not exist (gloo runs on the same
cores), so the estimate with max(compute, FSDP) is a lower bound and compute + FSDP an upper one: both printed.

For NVLM-D and NVLM-X, with activation checkpointing off and on, it plans a `RunConfig` built here, then
builds the same model with ``nvlm.build`` and trains a few steps in one process with the plan's policy:
trainable weights fp32, frozen ones bf16, ``torch.autocast`` bf16, AdamW, one micro-batch of
``--micro-batch`` samples × ``--seq`` tokens with one image at the most tiles (rows 8 tokens apart, so there
is a padding mask as in training). The peak is ``torch.cuda.max_memory_allocated()`` (no CUDA context, no
fragmentation: compare ``max_memory_reserved`` for those); on CPU (the same policy, CPU autocast) it is the
peak of ``torch.profiler``'s memory timeline over the steps (every tensor the profiler saw alive).

Without ``--fsdp`` the plan's ``gathered`` and ``unsharded_grads`` terms do not apply; instead autocast keeps
bf16 copies of the trainable matmul weights for backward (``cache_enabled=False`` bounds them to what autograd
saves: all of them without AC, one layer's with AC), and fp32 norm weights make fp32 norm outputs with one
bf16 cast per consuming Linear (a few ×d bytes per token per layer the plan, which assumes bf16 compute
weights, does not count). The "single-proc" column is params + grads + optimizer + activations + those
copies. The input embeddings' output is cast to bf16, as FSDP2's bf16 compute weights would make it. With
``--fsdp`` the model goes through ``nvlm.distributed.parallel.parallelize`` (bf16 gathered weights, fp32
reduction) and "plan W=1" is the figure to compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, installed or not

import nvlm  # noqa: E402
from nvlm.models.llm import decoder_layers  # noqa: E402
from nvlm.testing.tiny import tiny_tokenizer  # noqa: E402
from nvlm.training.build import activation_checkpointing  # noqa: E402
from nvlm.training.config import DataSpec, ModelSpec, RunConfig, TrainConfig  # noqa: E402
from nvlm.training.plan import BF16, GIB, meta_model, plan  # noqa: E402
from nvlm.training.stages import apply_stage  # noqa: E402
from nvlm.vision.encoder import vision_config  # noqa: E402

# (llm config, vision config, overrides, seq, micro-batch)
SHAPES: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any], int, int]] = {
    "cuda": (
        dict(
            model_type="qwen2",
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=4,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
        dict(
            type="internvl",
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=6,
            num_attention_heads=8,
            image_size=[448, 448],
            patch_size=[14, 14],
            norm_type="rms_norm",
            use_qk_norm=True,
            use_mean_pooling=True,
        ),
        {"tiling.max_tiles": 6, "xattn.every": 4},
        2048,
        2,
    ),
    "cpu": (
        dict(
            model_type="qwen2",
            vocab_size=8192,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        ),
        dict(
            type="internvl",
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=[112, 112],
            patch_size=[14, 14],
            norm_type="rms_norm",
            use_qk_norm=True,
        ),
        {"tiling.max_tiles": 6, "xattn.every": 2},
        512,
        2,
    ),
}


def run_config(arch: str, stage: str, ac: bool, shapes: tuple, seq: int, micro: int) -> RunConfig:
    llm, vision, overrides = shapes[:3]
    names = {f.name for f in dataclasses.fields(TrainConfig)}  # the global batch field was renamed once
    gbs = {"global_batch_size" if "global_batch_size" in names else "batch_size": micro}
    return RunConfig(
        model=ModelSpec(arch=arch, llm_config=dict(llm), vision_config=dict(vision), overrides=dict(overrides)),
        data=DataSpec(max_seq_len=seq),
        train=TrainConfig(stage=stage, micro_batch_size=micro, activation_checkpointing=ac, **gbs),
    )


def _linear(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad)


def autocast_copies(model: nn.Module, ac: bool) -> int:
    """Bytes of bf16 weight copies autograd saves under autocast (trainable fp32 Linear weights)."""
    if not ac:
        return BF16 * _linear(model)
    layers, blocks = list(decoder_layers(model.llm)), list(model.xattn)
    inside = sum(_linear(m) for m in layers + blocks)  # recomputed per layer in backward
    one = max(map(_linear, layers)) + max(map(_linear, blocks), default=0)
    return BF16 * (_linear(model) - inside + one)


def make_batch(model: Any, proc: Any, seq: int, micro: int) -> dict[str, Any]:
    """`micro` samples with one image at the most tiles; rows 8 tokens shorter each (a padding mask, as in
    training), truncated to `seq` tokens."""
    c = model.config
    side = proc.tile_size
    cols = max(1, c.tiling.max_tiles // 2)
    image = Image.new("RGB", (side * cols, side * max(1, c.tiling.max_tiles // cols)), (120, 60, 200))
    answer = "the red circle is left of 42 blue squares . " * seq
    samples = []
    for i in range(micro):
        s = proc.encode_segments([("<image>\nDescribe the picture.", False), (answer, True)], [image])
        n = seq - 8 * i
        samples.append(
            dataclasses.replace(
                s, input_ids=s.input_ids[:n], labels=s.labels[:n], xattn_lo=s.xattn_lo[:n], xattn_hi=s.xattn_hi[:n]
            )
        )
    return proc.collate(samples, padding_side="right")


def measure(arch: str, cfg: RunConfig, shapes: tuple, device: str, steps: int, fsdp: bool) -> float:
    """Peak GiB allocated over `steps` training steps (CUDA allocator; on CPU the profiler's memory timeline)."""
    llm, vision, overrides = shapes[:3]
    v = dict(vision)
    torch.manual_seed(0)
    model, processor = nvlm.build(
        arch,
        llm=dict(llm),
        vision=vision_config(v.pop("type"), **v),
        tokenizer=tiny_tokenizer(),
        config=dict(overrides),
    )
    apply_stage(model, cfg.train.stage)
    cuda = device == "cuda"
    if cfg.train.activation_checkpointing:
        activation_checkpointing(model)  # the trainer's: x-attn blocks recomputed with their layers
    model.to(device).train()
    if fsdp:
        from nvlm.distributed.parallel import parallelize

        parallelize(model, mixed_precision=True)  # the plan's policy, on CPU (gloo) too
    else:
        for p in model.parameters():  # the plan's policy: frozen weights bf16, trainable ones fp32
            p.data = p.data.to(torch.float32 if p.requires_grad else torch.bfloat16)
        model.llm.get_input_embeddings().register_forward_hook(lambda m, i, out: out.to(torch.bfloat16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=cuda and not fsdp)
    batch = make_batch(model, processor, cfg.data.max_seq_len, cfg.train.micro_batch_size)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _steps(model, opt, batch, device, steps)
        peak = torch.cuda.max_memory_allocated() / GIB
    else:
        peak = _cpu_peak(functools.partial(_steps, model, opt, batch, device, steps))
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return peak


def _steps(model: Any, opt: Any, batch: dict[str, Any], device: str, steps: int) -> None:
    for _ in range(steps):
        with torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False):
            out = model(**batch)
        (out.loss_sum / max(out.num_tokens, 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # grads stay allocated, as under gradient accumulation
        del out


def _cpu_peak(fn: Any) -> float:
    """GiB: the peak of the CPU memory timeline torch.profiler records while `fn` runs."""
    import json
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for CUDA's snapshots; the CPU path stays
        prof.export_memory_timeline(f"{tmp}/mem.json", device="cpu")
        _, sizes = json.load(open(f"{tmp}/mem.json"))
    return max(sum(s) for s in sizes) / GIB


def _one_process_group(cuda: bool) -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)


# ---- --time: the step-time model against gloo/CPU -------------------------------------------------------------
def matmul_flops(m: int = 1024, k: int = 1024, n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of the fastest of `reps` bf16 (m×k)·(k×n) matmuls on this thread."""
    import time

    a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b, time) for _ in range(reps))
    return 2 * m * k * n / best


def copy_bandwidth(numel: int = 1 << 25, reps: int = 3) -> float:
    """Bytes/s of the fastest of `reps` copies of a `numel` fp32 tensor (read + write)."""
    import time

    a, b = torch.randn(numel), torch.empty(numel)
    return 2 * 4 * numel / min(_timed(lambda: b.copy_(a), time) for _ in range(reps))


def allreduce_busbw(world: int, numel: int = 1 << 22, reps: int = 5) -> float:
    """gloo all_reduce bus bandwidth, bytes/s: 2·(n-1)/n · bytes / the fastest of `reps` calls."""
    import time

    import torch.distributed as dist

    x = torch.ones(numel)
    dist.all_reduce(x)
    best = min(_timed(lambda: (dist.barrier(), dist.all_reduce(x)), time) for _ in range(reps))
    return 2 * (world - 1) / world * 4 * numel / best


def _timed(fn: Any, time: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _time_worker(rank: int, world: int, port: int, arch: str, ac: bool, seq: int, micro: int, steps: int, out: str):
    import json
    import statistics
    import time

    import torch.distributed as dist

    from nvlm.distributed.parallel import parallelize

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    llm, vision, overrides = SHAPES["cpu"][:3]
    # the square 1024³ matmul's rate, and the rate at the LLM's own shape (tokens × hidden → ffn): the one used
    peak, shaped, hbm = (
        matmul_flops(),
        matmul_flops(micro * seq, llm["hidden_size"], llm["intermediate_size"]),
        copy_bandwidth(),
    )
    bw = allreduce_busbw(world) if world > 1 else 0.0
    v = dict(vision)
    torch.manual_seed(0)
    model, processor = nvlm.build(
        arch,
        llm=dict(llm),
        vision=vision_config(v.pop("type"), **v),
        tokenizer=tiny_tokenizer(),
        config=dict(overrides),
    )
    apply_stage(model, "sft")
    if ac:
        activation_checkpointing(model)
    parallelize(model.train(), mixed_precision=True)  # bf16 gathers and compute, fp32 reduce-scatter: the plan's
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = make_batch(model, processor, seq, micro)
    times = []
    for i in range(steps + 1):  # step 0: warm-up
        dist.barrier()
        t0 = time.perf_counter()
        out_ = model(**batch)
        (out_.loss_sum / max(out_.num_tokens, 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        if i:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(
            json.dumps({"peak": peak, "shaped": shaped, "hbm": hbm, "bw": bw, "step_s": statistics.median(times)})
        )
    dist.destroy_process_group()


def time_check(archs: list[str], steps: int) -> None:
    import json
    import tempfile

    import torch.multiprocessing as mp

    from nvlm.training import plan_time
    from nvlm.training.plan import memory

    llm, vision, overrides, seq, micro = SHAPES["cpu"]
    print(f"CPU/gloo, FSDP2 bf16, 1 thread per process, micro-batch {micro} × {seq} tokens, median of {steps} steps")
    print(
        f"{'arch':<5}{'AC':<5}{'procs':>6}{'1024³ GF/s':>11}{'shaped':>8}{'gloo GB/s':>10}{'compute s':>10}"
        f"{'FSDP s':>8}{'est. s (max)':>13}{'est. s (sum)':>13}{'measured s':>11}{'meas/est':>9}"
    )
    for arch in archs:
        for ac in (False, True):
            for world in (1, 2):
                with tempfile.TemporaryDirectory() as tmp:
                    out = f"{tmp}/r.json"
                    port = 29600 + world + 2 * ac
                    mp.spawn(_time_worker, (world, port, arch, ac, seq, micro, steps, out), nprocs=world)
                    r = json.loads(Path(out).read_text())
                cfg = run_config(arch, "sft", ac, SHAPES["cpu"], seq, micro * world)
                hw = plan_time.Hardware(
                    peak_tflops=r["shaped"] / 1e12,
                    compute_efficiency=1.0,
                    nvlink_gbs=max(r["bw"], 1.0) / 1e9,
                    ib_gbs=max(r["bw"], 1.0) / 1e9,
                    link_efficiency=1.0,
                    hbm_gbs=r["hbm"] / 1e9,
                    gpus_per_node=world,
                )
                model = meta_model(cfg)
                e = plan_time.estimate(model, cfg, world, 1, micro, ac, hw, memory(model, cfg, world, 1, micro, ac))
                s = e["seconds_per_micro_batch"]
                serial = e["step_s"] - max(s["compute"], s["fsdp"]) + s["compute"] + s["fsdp"]
                print(
                    f"{arch:<5}{'on' if ac else 'off':<5}{world:>6}{r['peak'] / 1e9:11.1f}{r['shaped'] / 1e9:8.1f}"
                    f"{r['bw'] / 1e9:10.2f}"
                    f"{s['compute']:10.3f}{s['fsdp']:8.3f}{e['step_s']:13.3f}{serial:13.3f}{r['step_s']:11.3f}"
                    f"{r['step_s'] / e['step_s']:9.2f}"
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--archs", nargs="+", default=["D", "X"])
    ap.add_argument("--stage", default="sft", choices=["pretrain", "sft"])
    ap.add_argument("--seq", type=int, default=None, help="tokens per sample (default: the preset's)")
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--fsdp", action="store_true", help="shard with parallelize() in a 1-process group")
    ap.add_argument("--time", action="store_true", help="step time: plan_time's estimate vs gloo/CPU, 1 and 2 procs")
    args = ap.parse_args()
    if args.time:
        time_check(args.archs if args.archs != ["D", "X"] else ["D"], args.steps)
        return
    shapes = SHAPES[args.device]
    seq, micro = args.seq or shapes[3], args.micro_batch or shapes[4]
    cuda = args.device == "cuda"
    unit, scale = ("GiB", 1.0) if cuda else ("MiB", 1024.0)  # tiny CPU shapes read better in MiB
    if args.fsdp:
        _one_process_group(cuda)
    print(
        f"device {args.device}{' + FSDP2' if args.fsdp else ''}, stage {args.stage}, micro-batch {micro} × "
        f"{seq} tokens, {args.steps} steps; {unit}"
    )
    print(
        f"{'arch':<5}{'AC':<5}{'params':>8}{'grads':>8}{'optim':>8}{'gather':>8}{'activ':>8}{'casts':>8}"
        f"{'plan W=1':>10}{'single-proc':>13}{'measured':>10}{'meas/est':>10}"
    )
    for arch in args.archs:
        for ac in (False, True):
            cfg = run_config(arch, args.stage, ac, shapes, seq, micro)
            p = plan(cfg, 1)
            casts = 0.0 if args.fsdp else autocast_copies(meta_model(cfg), ac) / GIB
            m = {k: v * scale for k, v in p["memory_gib"].items()}
            single = m["params"] + m["grads"] + m["optimizer"] + m["activations"] + casts * scale
            est = p["gib_per_gpu"] * scale if args.fsdp else single
            peak = measure(arch, cfg, shapes, args.device, args.steps, args.fsdp)
            meas = f"{peak * scale:10.2f}{peak * scale / est:10.2f}"
            print(
                f"{arch:<5}{'on' if ac else 'off':<5}{m['params']:8.2f}{m['grads']:8.2f}{m['optimizer']:8.2f}"
                f"{m['gathered'] + m['unsharded_grads']:8.2f}{m['activations']:8.2f}{casts * scale:8.2f}"
                f"{p['gib_per_gpu'] * scale:10.2f}{single:13.2f}{meas}"
            )


if __name__ == "__main__":
    main()
