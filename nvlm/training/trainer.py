"""The training loop for stage 1 (pretrain) and stage 2 (SFT), read top to bottom (paper §4.5, Tables 10–11).

One optimizer step reads `batch_size` samples from the blend, splits them into micro-batches (gradient
accumulation), and normalises the loss by the labelled tokens of the whole step, as Megatron does. Faults do
not lose work: checkpoints are atomic and a restarted run with the same ``--out`` resumes exactly; SIGTERM
saves and exits 0; a non-finite loss skips its step (weights untouched) and too many in a row stop the run
(`NonFiniteLoss`, exit code 3). The trainer knows nothing of parallelism; it is applied from outside.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import nvlm
from nvlm.data.blend import Blend, SampleStream, Source
from nvlm.data.formats import read_records
from nvlm.data.packing import collate_packed, pack_greedy
from nvlm.training.config import RunConfig
from nvlm.training.metrics import MetricsWriter, plot_curves, read_metrics
from nvlm.training.optim import lr_at, make_optimizer
from nvlm.training.stages import apply_stage, trainable_table
from nvlm.training.state import complete_checkpoints, load_checkpoint, save_checkpoint
from nvlm.vision.encoder import vision_config


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


def build_model(cfg: RunConfig) -> nvlm.NVLM:
    spec = cfg.model
    torch.manual_seed(cfg.train.seed)  # random-init backbones are then the same on every (re)start
    if spec.init_from:
        return nvlm.from_pretrained(spec.init_from)
    vision = spec.vision
    if isinstance(vision, dict):  # {"type": ..., **hf config}: a random vision tower
        vision = dict(vision)
        vision = vision_config(vision.pop("type"), **vision)
    return nvlm.build(spec.arch, llm=spec.llm, vision=vision, tokenizer=spec.tokenizer,
                      config={k: v for k, v in spec.overrides.items()})


def load_blend(cfg: RunConfig) -> Blend:
    sources = []
    for s in cfg.data.source_specs():
        records = list(read_records(s.path, s.image_root))
        sources.append(Source(s.name or Path(s.path).stem, records, s.weight))
    return Blend(sources, seed=cfg.train.seed)


class Trainer:
    def __init__(self, cfg: RunConfig, out: str | Path, model: nvlm.NVLM | None = None, log=print) -> None:
        self.cfg, self.out, self.log = cfg, Path(out), log
        self.out.mkdir(parents=True, exist_ok=True)
        cfg.save(self.out / "run_config.json")
        t = cfg.train
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.model = model if model is not None else build_model(cfg)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        apply_stage(self.model, t.stage, freeze_llm=t.freeze_llm, unfreeze_vision=t.unfreeze_vision)
        if t.activation_checkpointing:
            llm = self.model.llm  # transformers ≥ 5 renamed gradient_checkpointing_enable
            (getattr(llm, "activation_checkpointing_enable", None) or llm.gradient_checkpointing_enable)()
        self.log(f"stage {t.stage}: what trains\n{trainable_table(self.model)}")
        self.stream = SampleStream(load_blend(cfg), self.model.processor, cfg.data.max_seq_len, cfg.data.system,
                                   cfg.data.max_bad_in_row, cfg.data.max_bad_fraction)
        self.optimizer = make_optimizer(self.model, t.lr, t.weight_decay, t.betas)
        self.metrics = MetricsWriter(self.out)
        self.step = 0
        self.nonfinite_in_row = 0
        self.skipped = 0
        self._stop = False
        self._saved_step = -1

    # ---- one optimizer step --------------------------------------------------------------------------
    def batches(self, samples: list) -> list[dict[str, Any]]:
        t, proc = self.cfg.train, self.model.processor
        micro = [samples[i:i + t.micro_batch_size] for i in range(0, len(samples), t.micro_batch_size)]
        if not self.cfg.data.pack:
            return [proc.collate(m, padding_side="right") for m in micro]
        pad = proc.tokenizer.pad_token_id or 0
        out = []
        for m in micro:
            rows = pack_greedy([len(s.input_ids) for s in m], self.cfg.data.max_seq_len)
            out.append(collate_packed([[m[i] for i in row] for row in rows], pad))
        return out

    def train_step(self, batches: list[dict[str, Any]]) -> tuple[float, float, int]:
        """Forward/backward over the micro-batches; returns (loss, grad norm, labelled tokens)."""
        self.model.train()
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        use_bf16 = self.cfg.train.bf16 and self.device.type == "cuda"
        total = 0.0
        for b in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext():
                out = self.model(**b)
            loss = out.loss_sum / max(tokens, 1)
            if loss.requires_grad:  # stage 1, text-only micro-batch: nothing trainable on its path
                loss.backward()
            total += float(loss.detach())
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip))
        return total, norm, tokens

    # ---- the loop --------------------------------------------------------------------------------------
    def resume(self) -> None:
        done = complete_checkpoints(self.out / "checkpoints")
        if not done:
            return
        state = load_checkpoint(done[-1], self.model, self.optimizer)
        self.stream.load_state_dict(state["data"])
        self.step, self.skipped = state["step"], state.get("skipped", 0)
        self._saved_step = self.step
        self.metrics.truncate_after(self.step)
        self.log(f"resumed from {done[-1]} (step {self.step})")

    def save(self) -> Path:
        self._saved_step = self.step
        extra = {"data": self.stream.state_dict(), "skipped": self.skipped}
        return save_checkpoint(self.out / "checkpoints", self.step, self.model, self.optimizer, extra,
                               self.cfg.to_dict(), self.cfg.train.keep_last)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stop = True

    def run(self) -> TrainResult:
        t = self.cfg.train
        self.resume()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        progress = _progress(t.max_steps, self.step)
        start, seen = time.perf_counter(), 0
        try:
            while self.step < t.max_steps and not self._stop:
                t0 = time.perf_counter()
                samples = self.stream.batch(t.batch_size)
                lr = lr_at(self.step, t.max_steps, t.lr, t.min_lr, t.warmup_steps)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                self.optimizer.zero_grad(set_to_none=True)
                loss, norm, tokens = self.train_step(self.batches(samples))
                if math.isfinite(loss) and math.isfinite(norm):
                    self.optimizer.step()
                    self.nonfinite_in_row = 0
                else:  # skip: no update, weights untouched
                    self.optimizer.zero_grad(set_to_none=True)
                    self.skipped += 1
                    self.nonfinite_in_row += 1
                    if self.nonfinite_in_row >= t.max_nonfinite_in_row:
                        raise NonFiniteLoss(f"{self.nonfinite_in_row} non-finite losses in a row at step "
                                            f"{self.step}; lower train.lr or check the data")
                self.step += 1
                seen += len(samples)
                dt = time.perf_counter() - t0
                row = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": tokens,
                       "samples_per_s": len(samples) / dt, "skipped_nonfinite": self.skipped}
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    self.metrics.write(row)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if t.save_every and self.step % t.save_every == 0:
                    self.save()
        finally:
            signal.signal(signal.SIGTERM, previous)
            progress.close()
            self.metrics.close()
        elapsed = time.perf_counter() - start
        if self._saved_step != self.step:  # save_every may have just saved this step
            self.save()
        interrupted = self.step < t.max_steps
        final = None
        if not interrupted:
            final = self.out / "final"
            self.model.save_pretrained(final)
            rows = read_metrics(self.metrics.path)
            plot_curves({f"stage {t.stage}": [r["loss"] for r in rows]}, self.out / "loss.png")
        counts = dict(self.stream.counts)
        self.log(f"{'stopped by SIGTERM' if interrupted else 'done'} at step {self.step}; data: {counts}; "
                 f"non-finite steps skipped: {self.skipped}")
        return TrainResult(self.step, final, interrupted, counts, seen / elapsed if elapsed else 0.0)


def _progress(total: int, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, leave=False)
