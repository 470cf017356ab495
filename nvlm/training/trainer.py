"""The training loop for stage 1 (pretrain) and stage 2 (SFT), read top to bottom (paper §4.5, Tables 10–11).

One optimizer step reads `global_batch_size` samples from the blend, split over the processes (each reads its
own share, see ``SampleStream``) and into micro-batches (gradient accumulation), and normalises the loss by
the labelled tokens of the whole global step, as Megatron does: 1 or N processes take the same steps over the
same samples. Under torchrun the model is sharded with FSDP2 (``nvlm.distributed``), built on the meta
device on every process and filled from process 0, and every process runs the same modules each
micro-batch even when only some hold images (``touch_every_module``), so mixed text-only / image steps never hang.
Faults do not lose work: checkpoints (DCP) are atomic and a restarted run with the same ``--out`` resumes
exactly, also on another number of processes; SIGTERM saves and exits 0; a non-finite loss skips its step
(weights untouched) and too many in a row stop the run (`NonFiniteLoss`, exit code 3); a data error on one
process stops all of them with its message instead of leaving the others waiting.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import nvlm
from nvlm.data.blend import STEP_COUNTS, SampleStream, step_counts
from nvlm.data.mixture import Mixture
from nvlm.data.packing import collate_packed, pack_greedy, should_pack
from nvlm.data.prefetch import Prefetcher, StopSignals
from nvlm.data.sources import open_mixture
from nvlm.distributed.dcp import (
    CheckpointWriter,
    complete_checkpoints,
    export_pretrained,
    load_checkpoint,
)
from nvlm.distributed.parallel import (
    World,
    all_reduce,
    grad_norm,
    reshard,
    start_steps,
    use_cuda,
    with_layout,
)
from nvlm.distributed.tensor_parallel import clip_grad_norm
from nvlm.loading import Unfilled
from nvlm.models.packed_attention import use_packed_attention
from nvlm.rl.build import rl_step
from nvlm.rl.pairs import PairStream
from nvlm.training.build import build_model, build_sharded, prepare, run_model
from nvlm.training.config import RL_STAGES, ConfigError, RunConfig
from nvlm.training.flops import batch_flops, device_peak_flops
from nvlm.training.metrics import MetricsWriter, plot_curves, read_metrics
from nvlm.training.micro_batch import (
    fill_unused_grads,
    packed_attention_kind,
    touch_every_module,
    widen,
    with_host_work,
    with_unused,
)
from nvlm.training.optim import lr_at, make_optimizer
from nvlm.training.resume_check import check_resume, fingerprint
from nvlm.training.stages import trainable_table


class NonFiniteLoss(RuntimeError):
    """Too many non-finite losses in a row."""

    exit_code = 3


@dataclass
class TrainResult:
    steps: int
    final_dir: Path | None
    interrupted: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    samples_per_s: float = 0.0


def load_blend(cfg: RunConfig) -> Mixture:
    """The run's sources (``nvlm.data.sources``: JSONL, Parquet, WebDataset shards, InternVL meta-JSON), read by
    index and never held, mixed by weight in one seeded, random-access sequence."""
    return open_mixture(cfg.data.source_specs(), seed=cfg.train.seed)


def pinned(world: World | None, device: str) -> World:
    """The run's world on ``train.device`` (``use_cuda``): without one given, a one-process world there; "auto"
    keeps a given world's device; a one-process world is moved to "cpu" / "cuda"; a torchrun world has chosen its
    device and backend already (``init_world(train_device=...)``), and a mismatch is refused."""
    if world is None:
        return World(device=torch.device("cuda" if use_cuda(device) else "cpu"))
    if device == "auto":
        return world
    want = "cuda" if use_cuda(device) else "cpu"
    if not world.distributed:
        return dataclasses.replace(world, device=torch.device(want))
    if world.device.type != want:
        raise ConfigError(
            f"train.device={device} but the process group runs on {world.device.type}: start it with "
            f"init_world(train_device={device!r}), or hide the GPUs (CUDA_VISIBLE_DEVICES=) for a CPU run"
        )
    return world


class PeerFailed(RuntimeError):
    """Another process hit an error while reading its data; this one stops too (the error is in its log)."""

    exit_code = 4


class _NoMetrics:  # processes other than 0 log nothing
    path = None

    def write(self, row: dict[str, Any]) -> None: ...
    def truncate_after(self, step: int) -> None: ...
    def close(self) -> None: ...


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        out: str | Path,
        log=print,
        world: World | None = None,
        progress: bool = True,
    ) -> None:
        """`progress`: draw the per-step bar (callers that draw their own, such as ``nvlm repro``, turn it off)."""
        t = cfg.train
        self.world = pinned(world, t.device)
        if self.world.mesh is None:  # tp × dp_shard, checked; processes of one TP group read the same samples
            self.world = with_layout(self.world, t.tp, t.dp_shard)
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.log = log if self.world.main else (lambda *a, **k: None)
        self.accum = t.accumulation(self.world.dp_size)  # checked before any work
        if self.world.main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "run_config.json")
            for torn in (self.out / "checkpoints").glob("step_*.tmp"):  # saves a killed run never finished
                shutil.rmtree(torn, ignore_errors=True)
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.device = self.world.device
        built = run_model(cfg)  # the skeleton and its processor: the data stream needs no weights
        self.processor = built.processor
        self.stream: SampleStream | PairStream
        if t.stage == "dpo":  # preference pairs, not conversations (nvlm.rl.pairs)
            w = self.world
            self.stream = PairStream(
                cfg.data.source_specs(), self.processor, cfg.data.system, t.seed, w.dp_rank, w.dp_size
            )
        else:
            self.stream = SampleStream(
                load_blend(cfg),
                self.processor,
                cfg.data.max_seq_len,
                cfg.data.system,
                cfg.data.max_bad_in_row,
                cfg.data.max_bad_fraction,
                self.world.dp_rank,
                self.world.dp_size,
                read_timeout=cfg.data.read_timeout_s,
                workers=cfg.data.workers,
            )
        # packed rows attend per sample, never over the dense [rows, 1, T, T] mask (``packed_attention_kind``)
        self.packed_kernel = packed_attention_kind(self.packing, cfg.train.attn, self.device.type)
        self.packed_attention = self.packed_kernel == "per_sample"
        self.model = self._model(built)
        self._fingerprint = fingerprint(cfg)  # data and blend, saved with every checkpoint
        self.optimizer = make_optimizer(self.model, t.lr, t.weight_decay, t.betas)
        pairs = self.stream.records if isinstance(self.stream, PairStream) else None
        self.rl = (
            rl_step(self.model, self.processor, cfg, self.world, self.device, pairs) if t.stage in RL_STAGES else None
        )
        # MFU per logged step: model FLOPs (nvlm.training.flops, from the batches' shapes) / step time / this bf16
        # peak, looked up by GPU name; None (CPU, unknown GPUs): no MFU logged
        self.peak_flops = device_peak_flops(self.device)
        self.mfu: float | None = None  # the last logged step's, for the progress line
        self.metrics = MetricsWriter(self.out) if self.world.main else _NoMetrics()
        self.step = 0
        self.nonfinite_in_row = 0
        self.skipped = 0
        self.mixed = 0  # micro-batches where some processes held images and others none
        self._stop = False
        self._saved_step = -1
        self._checkpoints = CheckpointWriter(self.world, t.async_checkpoint)
        self._prefetch: Prefetcher | None = None
        self._data_state = self.stream.state_dict()  # the data position after the last batch trained on
        self._step_data: dict[str, float] = {}  # this step's data_wait_s and STEP_COUNTS, for metrics.jsonl

    def _model(self, built: Unfilled) -> nvlm.NVLM:
        """The run's model, filled and prepared (``nvlm.training.build``), its attention set for packed rows."""
        t = self.cfg.train
        if self.world.distributed:
            model = build_sharded(self.cfg, self.world, built)[0]  # prepared as it is filled
            if not self.world.main or self.world.tp > 1:  # distinct streams per data-parallel rank (dropout)
                torch.manual_seed(t.seed + self.world.dp_rank)  # the same within a TP group
        else:
            model = build_model(self.cfg, built)[0]
            prepare(model.to(self.device), t, self.world)
        if t.attn != "sdpa":  # variable-length attention over packed rows (see TrainConfig.attn)
            model.llm.set_attn_implementation(t.attn)
        elif self.packed_kernel == "flex_attention":
            model.llm.set_attn_implementation("flex_attention")
        elif self.packed_attention:
            use_packed_attention(model.llm)
        self.log(f"stage {t.stage}: what trains\n{trainable_table(model)}")
        if self.world.size > 1:
            self.log(
                f"{self.world.dp_size} data-parallel ranks (each tp {self.world.tp}) × {t.micro_batch_size} samples × "
                f"{self.accum} accumulation steps = global batch {t.global_batch_size}"
            )
        return model

    @property
    def packing(self) -> bool:
        """data.pack, or when unset: SFT with several samples per micro-batch (see DataSpec.pack)."""
        return should_pack(self.cfg.data.pack, self.cfg.train.stage, self.cfg.train.micro_batch_size)

    # ---- one optimizer step --------------------------------------------------------------------------
    def batches(self, samples: list) -> list[Any]:
        t, proc = self.cfg.train, self.processor
        if t.stage in RL_STAGES:  # the samples themselves: the RL step makes its rows (prompts, completions, pairs)
            return samples
        micro = [samples[i : i + t.micro_batch_size] for i in range(0, len(samples), t.micro_batch_size)]
        if not self.packing:
            return [proc.collate(m, padding_side="right") for m in micro]
        pad = proc.tokenizer.pad_token_id or 0
        # FlexAttention is compiled for fixed shapes: at most 8 row widths, each a multiple of max_seq_len / 8
        step = max(1, self.cfg.data.max_seq_len // 8) if self.packed_kernel == "flex_attention" else 1
        out = []
        for m in micro:
            rows = pack_greedy([len(s.input_ids) for s in m], self.cfg.data.max_seq_len)
            batch = collate_packed([[m[i] for i in row] for row in rows], pad, proc.tokens_per_tile)
            out.append(widen(batch, step, pad))
        return out

    def train_step(self, batches: list[dict[str, Any]]) -> tuple[float, float, int]:
        """Forward/backward over this process's micro-batches; returns the global (loss, grad norm, labelled
        tokens). Every process calls it with the same number of micro-batches."""
        self.model.train()
        w = self.world
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        images = [float(b.get("pixel_values") is not None) for b in batches]
        memory = float(any(b["memory_index"].numel() > 0 for b in batches))
        # one small collective; a TP group's processes hold the same batches: counted once
        tokens, any_memory, *with_images = [v / w.tp for v in all_reduce([local_tokens, memory, *images], w)]
        use_bf16 = self.cfg.train.bf16 and self.device.type == "cuda"
        # summed on the device: one read to the host per step, not one per micro-batch
        total = torch.zeros((), device=self.device)
        sync_last = w.distributed and self.cfg.train.sync_last_micro_batch
        for i, (b, anyone) in enumerate(zip(batches, with_images)):
            if sync_last:  # reduce-scatter only after the last micro-batch's backward (TrainConfig)
                self.model.set_requires_gradient_sync(i == len(batches) - 1)  # type: ignore[operator]
            # some process's micro-batch has images: every process runs the vision tower, projector and each
            # x-attn block (touch_every_module adds a blank tile or a memory no row sees where its batch lacks them)
            touch = w.distributed and anyone > 0
            self.mixed += int(w.main and anyone > 0 and anyone < w.dp_size)
            b = with_host_work(touch_every_module(b, self.model) if touch else b, self.model)
            with torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext():
                packed = self.packed_attention and b.get("attention_mask") is None
                out = self.model(**b, return_logits=False, packed=packed)  # the loss, no full logits
            # × data-parallel ranks: FSDP averages gradients over them; the sum over all tokens / all tokens is wanted
            loss = with_unused(out.loss_sum * w.dp_size / max(tokens, 1), out)
            if loss.requires_grad:
                loss.backward()
            elif w.distributed:  # stage 1, text-only everywhere: nothing trainable on its path, no backward
                reshard(self.model)  # so free the weights FSDP kept gathered for it
            total += out.loss_sum.detach().float()
        used = {
            "llm": True,
            "projector": any(with_images),
            "resampler": any(with_images),
            "vision": any(with_images),
            "xattn": any_memory > 0 and not self.model.gate_off,
        }
        params = fill_unused_grads(self.model, used)
        clip = clip_grad_norm if w.tp > 1 else torch.nn.utils.clip_grad_norm_  # TP: gradients on two meshes
        norm = grad_norm(clip(params, self.cfg.train.grad_clip))
        (summed,) = [v / w.tp for v in all_reduce([float(total)], w)]
        return summed / max(tokens, 1), norm, int(tokens)

    def _read(self) -> list[Any]:
        return self.batches(self.stream.batch(self.cfg.train.global_batch_size // self.world.dp_size))

    def _next_batches(self) -> list[Any] | None:
        """This process's micro-batches for the next step, or None when the run must stop (SIGTERM on any
        process). A data error on any process stops every process with that error."""
        error: Exception | None = None
        batches: list[Any] = []
        state = None
        waited = time.perf_counter()
        try:
            if self._prefetch is not None:  # wakes up on SIGTERM/SIGINT even if the reader is wedged
                batches, state = self._prefetch.next(lambda: self._stop) or ([], None)
            else:
                batches, state = self._read(), self.stream.state_dict()
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other processes
            error = e
        waited = time.perf_counter() - waited
        counts = step_counts(self._data_state, state) if state is not None else [0.0] * len(STEP_COUNTS)
        failed, stop, *counts = all_reduce([float(error is not None), float(self._stop), *counts], self.world)
        # this process's wait for the loader; the step's counts summed over processes (a TP group's once)
        self._step_data = {"data_wait_s": waited, **{k: round(v / self.world.tp) for k, v in zip(STEP_COUNTS, counts)}}
        if stop:  # the batch just read is not trained on: the checkpoint keeps the position before it
            if error is not None:  # a requested stop wins: the same signal may have broken the data workers
                self.log(f"stopping as requested; a data error met meanwhile is not raised: {error}")
            return None
        if error is not None:
            raise error
        if failed:
            raise PeerFailed("another process failed while reading its data (see its error); stopping")
        assert state is not None  # None only when the prefetcher saw stop(): returned above
        self._data_state = state
        return batches

    # ---- the loop --------------------------------------------------------------------------------------
    def resume(self) -> None:
        done = complete_checkpoints(self.out / "checkpoints")
        if not done:
            return
        check_resume(done[-1], self.cfg, self._fingerprint)  # same model, data and blend, or a clear refusal
        state = load_checkpoint(done[-1], self.model, self.optimizer, self.world)
        if state["rank_state"] is not None:
            self.stream.load_state_dict(state["rank_state"]["data"])
        else:  # another world size: go on from the furthest position any process had reached
            furthest = max(state["ranks"], key=lambda r: r["data"]["blend"]["position"])
            data = dict(furthest["data"])
            counts: dict[str, int] = {}
            for r in state["ranks"] if self.world.main else []:
                for k, v in r["data"]["counts"].items():
                    counts[k] = counts.get(k, 0) + v
            self.stream.load_state_dict({**data, "counts": counts})
            self.log(
                f"resuming a {state['world_size']}-process checkpoint on {self.world.size}: data continues "
                f"from blend position {data['blend']['position']} (no sample is read twice)"
            )
        self._data_state = self.stream.state_dict()
        self.step = state["step"]
        self.skipped = state["ranks"][0].get("skipped", 0)
        self._saved_step = self.step
        self.metrics.truncate_after(self.step)
        self.log(f"resumed from {done[-1]} (step {self.step})")

    def save(self, wait: bool = True) -> Path:
        """Checkpoint this step; `wait=False` (``train.async_checkpoint``): return once it is staged in host
        memory, written in the background (``CheckpointWriter``)."""
        self._saved_step = self.step
        rank_state = {"data": self._data_state, "skipped": self.skipped, "fingerprint": self._fingerprint}
        return self._checkpoints.save(
            self.out / "checkpoints",
            self.step,
            self.model,
            self.optimizer,
            rank_state,
            self.cfg.to_dict(),
            self.cfg.train.keep_last,
            wait=wait,
        )

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stop = True

    def run(self) -> TrainResult:
        """Train from the last complete checkpoint to `train.max_steps`, or until SIGTERM / Ctrl-C (then save)."""
        t = self.cfg.train
        self.resume()
        start_steps(self.world)  # start-up (build, load, resume) is over: collectives now wait the step timeout
        if self.cfg.data.prefetch > 0:
            self._prefetch = Prefetcher(self._read, self.stream.state_dict, self.cfg.data.prefetch)
        progress = _progress(t.max_steps, self.step, self.world.main and self.progress)
        start, first_step = time.perf_counter(), self.step
        stopped = False
        with StopSignals(lambda: setattr(self, "_stop", True)):  # SIGTERM and Ctrl-C: save, exit 0
            try:
                while self.step < t.max_steps:
                    batches = self._next_batches()
                    if batches is None:  # a stop was requested (on any process)
                        stopped = True
                        break
                    loss, lr = self.optimizer_step(batches)
                    progress.update(1)
                    mfu = {} if self.mfu is None else {"mfu": f"{100 * self.mfu:.1f}%"}
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **mfu)
                    if t.save_every and self.step % t.save_every == 0:
                        self.save(wait=False)
            finally:
                if self._prefetch is not None:
                    self._prefetch.close()
                    self._prefetch = None
                self.stream.close()  # data workers, if any
                progress.close()
                self.metrics.close()
        elapsed = time.perf_counter() - start
        seen = (self.step - first_step) * t.global_batch_size
        return self._finish(stopped, seen / elapsed if elapsed else 0.0)

    def optimizer_step(self, batches: list[Any]) -> tuple[float, float]:
        """One optimizer step over this process's micro-batches, logged; returns (loss, lr). A non-finite loss
        or gradient norm skips the update (weights untouched); too many in a row stop the run."""
        t = self.cfg.train
        t0 = time.perf_counter()
        lr = lr_at(self.step, t.max_steps, t.lr, t.min_lr, t.warmup_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if self.rl is not None:  # GRPO (rollouts, rewards, loss over the completions) or DPO (pairs)
            loss, norm, tokens = self.rl(batches, self.step, self.optimizer)
        else:
            loss, norm, tokens = self.train_step(batches)
        if math.isfinite(loss) and math.isfinite(norm):  # global values: every process agrees
            self.optimizer.step()
            self.nonfinite_in_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.nonfinite_in_row += 1
            if self.nonfinite_in_row >= t.max_nonfinite_in_row:
                raise NonFiniteLoss(
                    f"{self.nonfinite_in_row} non-finite losses in a row at step {self.step}; "
                    "lower train.lr or check the data"
                )
        self.step += 1
        row = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": norm,
            "tokens": tokens,
            "samples_per_s": t.global_batch_size / (time.perf_counter() - t0),
            "skipped_nonfinite": self.skipped,
            **self._step_data,  # data_wait_s, samples_degraded, samples_dropped, samples_bad
            **(self.rl.stats if self.rl is not None else {}),  # rewards, KL, clip fraction, rollout/train time
        }
        if self.step % t.log_every == 0 or self.step == t.max_steps:
            if self.peak_flops and self.rl is None:  # this process's FLOPs and time; shapes only, no device sync
                f = sum(batch_flops(self.model, b, t.stage, freeze_llm=t.freeze_llm,
                                    unfreeze_vision=t.unfreeze_vision) for b in batches)  # fmt: skip
                self.mfu = f / (t.global_batch_size / row["samples_per_s"]) / self.peak_flops
                row.update(model_tflop=f / 1e12, mfu=self.mfu)
            self.metrics.write(row)
        return loss, lr

    def _finish(self, stopped: bool, samples_per_s: float) -> TrainResult:
        """Save the last step, export ``final/`` and plot the loss when the run completed, and report."""
        t = self.cfg.train
        if self._saved_step != self.step:  # save_every may have just saved this step
            self.save()
        self._checkpoints.wait()  # a background save of this step: complete before exit or export
        interrupted = stopped or self.step < t.max_steps
        final = None
        if not interrupted:
            final = self.out / "final"
            # a bf16 sharded run exports bf16 weights (its fp32 master copy lives on in the DCP checkpoints)
            bf16 = self.world.distributed and t.bf16 and self.device.type == "cuda"
            export_pretrained(self.model, self.processor, final, self.world, torch.bfloat16 if bf16 else None)
            if isinstance(self.metrics, MetricsWriter):  # process 0
                rows = read_metrics(self.metrics.path)
                plot_curves({f"stage {t.stage}": [r["loss"] for r in rows]}, self.out / "loss.png")
        counts = self._counts()
        self.log(
            f"{'stopped by a signal' if interrupted else 'done'} at step {self.step}; data: {counts}; "
            f"non-finite steps skipped: {self.skipped}; mixed image/text-only micro-batches: {self.mixed}"
        )
        return TrainResult(self.step, final, interrupted, counts, samples_per_s)

    def _counts(self) -> dict[str, int]:
        """Data counts summed over processes."""
        mine = self._data_state["counts"]  # of the batches trained on, not those read ahead
        keys = sorted(
            set(mine) | {"read", "used", "used_with_images", "used_text_only", "bad_sample", "dropped_too_long"}
        )
        values = [v / self.world.tp for v in all_reduce([float(mine.get(k, 0)) for k in keys], self.world)]
        counts = {k: int(v) for k, v in zip(keys, values) if v}
        counts["mixed_microbatches"] = self.mixed
        return counts


def _progress(total: int, initial: int, show: bool = True) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, leave=False, disable=not show
    )
