"""``nvlm eval run``: a model answers a benchmark, then the official scorer scores the answers.

    nvlm eval run --model DIR --task TASK --data PATH [PATH ...] [--limit N] [--batch-size B]
                  [--mode official|nvlm] [--max-new-tokens N] [--out evals/] [--restart]

``run_benchmark`` reads the benchmark (``nvlm.eval.benchmarks``), builds each item's pinned prompt, and answers
in left-padded batches with greedy decoding (``model.generate``). MMLU takes the letter with the highest
log-probability of ``" A"``, ``" B"``, ... after the 5-shot prompt, as the official harness does (when the
model gives logits; otherwise it generates and the letter is parsed). Every batch is appended to
``OUT/TASK/predictions.jsonl`` and flushed: one line per item, ``{"id", "prediction", ...the scorer's fields}``,
so the file can also be scored with ``nvlm eval score``. A re-run skips the ids already in the file (a line
torn by a crash is dropped and redone), then scores every item of the current run with ``score_items`` and
writes ``OUT/TASK/summary.json`` (``nvlm.eval.report.write_summary``). ``OUT/TASK/run.json`` records the
settings and a fingerprint of the data; resuming with another model, prompt, ``max_new_tokens`` or other data
is refused (``nvlm.eval.run_folder``) unless ``restart`` says to start over.

The command line (``nvlm.eval.cli``) calls this module; it imports nothing back from there. torch, tqdm and the
model are imported only when predictions are generated.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nvlm.eval.benchmarks import PROMPTS, DataError, Item, load_benchmark
from nvlm.eval.report import write_summary
from nvlm.eval.run_folder import (
    PREDICTIONS,
    SETTINGS,
    RunError,
    check_settings,
    read_predictions,
    settings,
    start_over,
)
from nvlm.eval.scorers import ScoringError, check_mode, score_items
from nvlm.eval.scorers.mmlu import LETTERS, letter_from_logprobs

__all__ = ["RunError", "letter_logprobs", "load_model", "render", "run_benchmark", "score_predictions"]


def run_benchmark(
    model: Any,
    task: str,
    data: str | Path | Sequence[str | Path],
    out: str | Path,
    limit: int | None = None,
    batch_size: int = 8,
    mode: str = "official",
    max_new_tokens: int | None = None,
    *,
    progress: bool = True,
    device: str = "auto",
    dtype: str = "auto",
    restart: bool = False,
    quantize: str | None = None,
    quantize_keep: tuple[str, ...] | None = None,
) -> dict:
    """Answer ``task`` from ``data`` with ``model`` (a checkpoint folder loaded only if there is something to
    generate, an NVLM model with its processor as a pair or ``LocalModel``, or a server client), append to
    ``out/task/predictions.jsonl``, score, write ``summary.json``.

    Returns the scorer's result (``score``, ``n``, ``items``, breakdowns) plus ``predictions``, ``summary``
    (paths), ``generated`` and ``reused`` (item counts). Raises DataError (bad ``data``), RunError (bad
    arguments or run folder, including a folder made from other data or settings; ``restart=True`` empties
    the folder first).
    """
    if task not in PROMPTS:
        raise RunError(f"unknown task {task!r}; choose from {', '.join(PROMPTS)}")
    if isinstance(model, tuple):
        model = LocalModel(*model)
    check_mode(mode)
    for name, value in (("limit", limit), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise RunError(f"{name} must be a positive integer, got {value!r}")
    bench = load_benchmark(task, data)
    items = bench.items[:limit]
    folder = Path(out) / task
    folder.mkdir(parents=True, exist_ok=True)
    if restart:
        start_over(folder)
    pred_path = folder / PREDICTIONS
    new_tokens = max_new_tokens or PROMPTS[task].max_new_tokens
    done = read_predictions(pred_path)
    check_settings(folder / SETTINGS, settings(task, model, new_tokens, bench.fingerprint(), quantize), bool(done))
    pending = [it for it in items if it.id not in done]
    if pending:
        if isinstance(model, str | Path):
            model = load_model(model, device, dtype, quantize, quantize_keep, batch_size)
        _generate(model, task, pending, done, pred_path, batch_size, new_tokens, len(items), progress)
    records = [{"id": it.id, **_prediction(done[it.id]), **it.fields} for it in items]
    result = score_predictions(task, records, mode, where=str(pred_path))
    summary = write_summary(out, task, result)
    return {
        **result,
        "predictions": str(pred_path),
        "summary": str(summary),
        "generated": len(pending),
        "reused": len(items) - len(pending),
    }


# task → scorer(records, mode) for tasks outside the paper's benchmarks (``nvlm.demo`` registers "demo")
EXTRA_SCORERS: dict[str, Callable[[list[dict], str], dict]] = {}


def register_scorer(task: str, scorer: Callable[[list[dict], str], dict]) -> None:
    """Score `task`'s predictions with `scorer` (the library never imports the demo: it registers itself)."""
    EXTRA_SCORERS[task] = scorer


def score_predictions(task: str, records: list[dict], mode: str = "official", where: str = "") -> dict:
    """``score_items`` for the 13 benchmarks; a registered scorer for other tasks (the demo's)."""
    try:
        if task in EXTRA_SCORERS:
            return EXTRA_SCORERS[task](records, mode)
        return score_items(task, records, mode)
    except ScoringError as exc:
        at = f"item {records[exc.index]['id']!r}: " if exc.index is not None else ""
        raise RunError(f"{where}: {at}{exc.message}") from None


class LocalModel:
    """An NVLM model with its processor, asked the way the runner asks a server client: ``generate(prompts,
    images, max_new_tokens=, stop=)``; it also gives next-token logits (``letter_logprobs``)."""

    def __init__(self, model: Any, processor: Any, name_or_path: str | None = None) -> None:
        self.model, self.processor, self.name_or_path = model, processor, name_or_path

    def generate(self, prompts: list[str], images: list[list[Any]], **kwargs: Any) -> Any:
        return self.model.generate(self.processor, prompts, images, **kwargs)


def load_model(
    path: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str | None = None,
    quantize_keep: tuple[str, ...] | None = None,
    batch_size: int = 8,
) -> LocalModel:
    """``nvlm.load`` on ``device`` (auto: CUDA when present) in ``dtype`` (auto: bf16 on CUDA), `quantize`d
    (``nvlm.inference.quantize``), after the memory plan for `batch_size` rows is checked against the device."""
    if not (Path(path) / "config.json").is_file():  # said before torch, transformers and peft are imported
        raise RunError(f"{path}: no saved nvlm model there (no config.json); give a folder written by save_pretrained")
    from nvlm.config import ConfigError
    from nvlm.errors import UserError
    from nvlm.inference.memory import Serving, load_checked, resolve
    from nvlm.inference.schemes import DEFAULT_KEEP

    device, dtype = resolve(device, dtype)
    keep = DEFAULT_KEEP if quantize_keep is None else quantize_keep
    s = Serving(quantize=quantize, keep=keep, dtype=dtype, device=device, max_batch=batch_size)
    try:
        model, processor = load_checked(path, s)
    except UserError:
        raise
    except (FileNotFoundError, ConfigError, OSError, ValueError) as exc:
        raise RunError(f"{path}: cannot load the model ({exc})") from None
    return LocalModel(model.eval(), processor, str(Path(path).resolve()))


def _prediction(rec: dict) -> dict:
    return {k: rec[k] for k in ("prediction", "logprobs") if k in rec}


# ---- generation ---------------------------------------------------------------------------------------------
def _generate(
    model: Any,
    task: str,
    pending: list[Item],
    done: dict[str, dict],
    path: Path,
    batch_size: int,
    max_new_tokens: int,
    total: int,
    progress: bool,
) -> None:
    from tqdm import tqdm

    spec = PROMPTS[task]
    use_logprobs = task == "mmlu" and isinstance(model, LocalModel)
    # a local model is asked in its own template; a server gets messages (ChatML parsed back) and applies its own
    template = model.processor.config.template if isinstance(model, LocalModel) else "chatml"
    with (
        open(path, "a", encoding="utf-8") as f,
        tqdm(total=total, initial=total - len(pending), desc=task, unit="item", disable=not progress) as bar,
    ):
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            if use_logprobs:
                lps = letter_logprobs(
                    model,
                    [render(it.prompt, template) for it in batch],
                    [LETTERS[: len(it.fields["choices"])] for it in batch],
                )
                preds = [{"prediction": letter_from_logprobs(lp, len(lp)), "logprobs": lp} for lp in lps]
            else:
                texts = model.generate(
                    [render(it.prompt, template) for it in batch],
                    [_images(it) for it in batch],
                    max_new_tokens=max_new_tokens,
                    stop=list(spec.stop) or None,
                )
                preds = [{"prediction": t.strip() if spec.chat else t} for t in texts]
            for it, pred in zip(batch, preds, strict=True):
                done[it.id] = {"id": it.id, **pred, **it.fields}
                f.write(json.dumps(done[it.id], ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(batch))


def render(prompt: str | list[dict[str, str]], template: str = "chatml") -> str:
    """An item's model input: raw text as it is; chat messages in the model's `template` ("chatml", or the
    released NVLM-D's "release"), ending in the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    from nvlm.inference.prompt import render_messages

    return render_messages(prompt, template)


def _images(item: Item) -> list[Any]:
    from nvlm.vision.image_io import ImageLoadError, load_image

    out = []
    for image in item.images:
        source = image if isinstance(image, str) else image.load()  # EncodedImage, ParquetImage: bytes
        try:
            out.append(load_image(source))
        except (ImageLoadError, OSError) as exc:
            name = image if isinstance(image, str) else image.where
            raise DataError(f"{name}: cannot load the image of item {item.id!r} ({exc})") from None
    return out


def letter_logprobs(local: LocalModel, prompts: list[str], letters: list[str]) -> list[dict[str, float]]:
    """Per prompt ``{letter: log P(" " + letter | prompt)}`` for its letters (e.g. ``"ABCD"``).

    When every ``" X"`` is one token, one forward pass over the prompts reads them all (as the official
    harness reads the top log-probs); otherwise each prompt + ``" X"`` is scored as a continuation (sum of its
    tokens' log-probs)."""
    import torch

    model, tok = local.model, local.processor.tokenizer
    pairs = []  # (prompt index, letter, continuation token ids)
    for i, (prompt, choices) in enumerate(zip(prompts, letters, strict=True)):
        base = len(tok(prompt)["input_ids"])
        for letter in choices:
            pairs.append((i, letter, tok(prompt + " " + letter)["input_ids"][base:]))
    if any(not cont for _, _, cont in pairs):
        raise RuntimeError("a letter's continuation tokenizes to nothing")
    single = all(len(cont) == 1 for _, _, cont in pairs)
    texts = prompts if single else [prompts[i] + " " + letter for i, letter, _ in pairs]
    keep = 1 if single else max(len(cont) for _, _, cont in pairs) + 1
    batch = local.processor(texts, [[] for _ in texts], padding_side="left")
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=keep)
    logp = torch.log_softmax(out.logits.float(), dim=-1).cpu()  # [rows, keep, vocab]
    result: list[dict[str, float]] = [{} for _ in prompts]
    for row, (i, letter, cont) in enumerate(pairs):
        if single:
            result[i][letter] = float(logp[i, -1, cont[0]])
            continue
        k = len(cont)
        if batch["input_ids"][row, -k:].tolist() != cont:
            raise RuntimeError(f"the tokens of {' ' + letter!r} differ inside and outside the prompt")
        result[i][letter] = float(sum(logp[row, j - k - 1, cont[j]] for j in range(k)))
    return result
