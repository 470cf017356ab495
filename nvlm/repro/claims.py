"""The six design findings of NVLM 1.0 that ``nvlm repro`` re-runs, each as arms (what changes between runs),
the metric it is judged on, the comparisons its verdict is computed from, and the paper's own numbers.

Sources: Tables 1–2 (§4.2–4.3, tile tags), Table 3 (§4.4, throughput), Table 5 (§4.5, diverse pretraining data),
Table 8 (§5.2, text-only SFT data), Table 9 (§6.5, frozen vs unfrozen LLM in NVLM-X's SFT), Appendix C (Perceiver
resampler and dense OCR).

Each claim says, before anything runs, why its task exercises the paper's mechanism (``mechanism``) and what must
be learned for the comparison to mean anything (``validity``: an arm that has to reach twice the chance level of
the metric). A claim whose check fails is reported as not tested, never with a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Arm:
    name: str
    arch: str
    model: dict[str, Any] = field(default_factory=dict)  # NVLMConfig dotted keys (model.overrides), both stages
    freeze_llm: bool = False  # stage 2's train.freeze_llm
    text_share: float = 0.2  # share of text-only SFT data in stage 2 (the demo recipe's 20 %)
    stage1_data: str = "diverse"  # "diverse": captions + task data (paper Table 4); "captions": captions only
    after_sft: str = ""  # a third stage from the stage-2 model on one task: "grpo" or "sft" (more of it)


@dataclass(frozen=True)
class Validity:
    """The check a claim must pass before its comparisons count: `arm`'s mean `metric` ≥ `factor` × chance."""

    arm: str
    metric: str
    factor: float = 2.0


@dataclass(frozen=True)
class Claim:
    name: str
    title: str
    claim: str  # the paper's finding in one sentence
    paper: str  # the paper's numbers, as a Markdown table
    arms: tuple[Arm, ...]
    tasks: tuple[str, ...]  # repro tasks trained and evaluated (nvlm.repro.tasks)
    metric: str  # the metric the verdict is about
    comparisons: tuple[tuple[str, str, str], ...]  # (arm A, arm B, metric): "A > B on metric"
    mechanism: str  # why the task exercises the paper's mechanism, written before measuring
    validity: Validity | None  # None: a timing claim (its rounds are its check)
    timing: bool = False  # compared by interleaved rounds (per-round ratios), not by seeds
    max_seq_len: int | None = None  # data.max_seq_len of every arm; None: the demo recipe's


# Tags as plain text, as in the paper and the released model: with one learned token per tag (the demo's
# tags.mode=special) the 2-D grid and 2-D bbox styles are the same model up to renaming the tokens (a first run
# gave identical per-seed numbers), and only text lets the LLM read the coordinates a tag spells out.
TEXT_TAGS = {"tags.mode": "text"}
TAG_ARMS_D = (
    Arm("low-res", "D", {**TEXT_TAGS, "tiling.max_tiles": 1}),
    Arm("DHR, no tag", "D", {**TEXT_TAGS, "tags.style": "none"}),
    Arm("DHR + 1-D tag", "D", {**TEXT_TAGS, "tags.style": "1d"}),
    Arm("DHR + 2-D grid tag", "D", {**TEXT_TAGS, "tags.style": "2d_grid"}),
    Arm("DHR + 2-D bbox tag", "D", {**TEXT_TAGS, "tags.style": "2d_bbox"}),
)
TAG_ARMS_X = (
    Arm("low-res", "X", {**TEXT_TAGS, "tiling.max_tiles": 1}),
    Arm("DHR, no tag", "X", {**TEXT_TAGS, "tags.style": "none"}),
    Arm("DHR + 1-D tag", "X", {**TEXT_TAGS, "tags.style": "1d"}),
)
TAG_SEQ_LEN = 256  # text 2-D bbox tags make tile_read samples up to 250 tokens long (special tokens: 79)
TABLE_1 = """| Tile tag format (NVLM-D, Yi-34B) | MMMU | MathVista | AI2D | ChartQA | DocVQA | TextVQA | OCRBench |
|---|---|---|---|---|---|---|---|
| Low-resolution (448²) | 50.9 | 46.1 | 67.0 | 64.8 | 52.9 | 78.2 | 622 |
| DHR + No tag | 50.0 | 51.7 | 79.9 | 76.1 | 80.2 | 78.4 | 728 |
| DHR + 2-D grid tag | 51.1 | 52.8 | 81.7 | 81.1 | 86.7 | 79.4 | 787 |
| DHR + 2-D bbox tag | 50.3 | 50.6 | 81.2 | 80.8 | 86.7 | 79.7 | 791 |
| DHR + 1-D tag | 52.0 | 53.8 | 82.1 | 81.1 | 87.4 | 79.9 | 806 |"""
TABLE_2 = """| Tile tag format (NVLM-X, Yi-34B) | MMMU | MathVista | AI2D | ChartQA | DocVQA | TextVQA | OCRBench |
|---|---|---|---|---|---|---|---|
| Low-resolution (448²) | 53.2 | 57.4 | 69.8 | 65.6 | 62.3 | 63.2 | 612 |
| DHR + No tag | 53.0 | 57.6 | 78.5 | 73.2 | 75.4 | 75.2 | 682 |
| DHR + 1-D tag | 54.1 | 59.6 | 80.7 | 79.2 | 80.9 | 78.6 | 744 |"""
TAG_TASKS = ("tile_read", "tile_mark")


def tags(arch: str = "D") -> Claim:
    d = arch.upper() == "D"
    arms = TAG_ARMS_D if d else TAG_ARMS_X
    tagged = [a.name for a in arms if "tag" in a.name and "no tag" not in a.name]
    return Claim(
        name="tags" if d else "tags-x",
        title=f"Tile tags for dynamic high resolution, NVLM-{arch.upper()} (paper Table {1 if d else 2})",
        claim="DHR beats one low-resolution tile, and tile tags in the decoder beat DHR without tags "
        "(largest gains on OCR-like tasks)",
        paper=TABLE_1 if d else TABLE_2,
        arms=arms,
        tasks=TAG_TASKS,
        metric="char_accuracy",  # partial credit on the 3 digits: exact match stays near 0 at CPU budgets
        comparisons=tuple((t, "DHR, no tag", "char_accuracy") for t in tagged)
        + (("DHR, no tag", "low-res", "char_accuracy"),),
        mechanism="tile_read's digits are legible only at full tile resolution (the thumbnail shrinks them 3×), "
        "so low resolution cannot read them; its answer is the digits in reading order over grids that change "
        "from image to image, and tile_mark's square thumbnail hides the grid: without a tag the decoder sees "
        "a run of tiles whose count and order it must infer, while a tag names each tile's index",
        validity=Validity("DHR + 1-D tag", "char_accuracy"),
        max_seq_len=TAG_SEQ_LEN,
    )


TEXT_SFT = Claim(
    name="text-sft",
    title="Text-only SFT data keeps the LLM's text skills (paper Table 8, §5.2)",
    claim="blending text-only SFT data into multimodal SFT keeps (even improves) the backbone's text accuracy, "
    "while models without good text data lose 6–7 points",
    paper="""| Model (backbone) | text-only avg. 4 | vs backbone |
|---|---|---|
| Qwen2-72B-Instruct (backbone) | 79.8 | — |
| LLaVA-OneVision 72B (Qwen2-72B) | 73.5 | −6.3 |
| InternVL-2-Llama3-76B (Llama-3-70B) | 69.9 | −6.7 |
| NVLM-D 1.0 72B (Qwen2-72B, with text-only SFT data) | 84.1 | +4.3 |
| NVLM-X 1.0 72B | 82.3 | +2.5 |""",
    arms=(Arm("0 % text-only", "D", text_share=0.0), Arm("20 % text-only", "D", text_share=0.2)),
    tasks=TAG_TASKS,
    metric="text_accuracy",
    comparisons=(("20 % text-only", "0 % text-only", "text_accuracy"),),
    mechanism="stage 2 trains the LLM on image tasks whose answers are digits and tile numbers; single-digit "
    "addition never appears in them, so what the text backbone knew of it is only kept if text-only data "
    "rehearses it (the 20 % arm) and is eroded by updates for other outputs otherwise (the 0 % arm)",
    validity=Validity("20 % text-only", "text_backbone_accuracy"),
)

FREEZE_LLM = Claim(
    name="freeze-llm",
    title="NVLM-X with a frozen vs trained LLM in SFT (paper Table 9, §6.5)",
    claim="freezing the LLM during NVLM-X's multimodal SFT costs vision-language accuracy",
    paper="""| NVLM-X | MMMU val | MathVista | VQAv2 | AI2D | TextVQA | ChartQA | DocVQA | RealWorldQA | OCRBench |
|---|---|---|---|---|---|---|---|---|---|
| 34B, frozen LLM | 51.6 | 51.8 | 83.8 | 72.4 | 72.4 | 74.4 | 73.2 | 63.4 | 696 |
| 34B, LLM trained | 54.0 | 59.2 | 84.5 | 79.6 | 78.2 | 79.4 | 79.2 | 64.8 | 802 |
| 72B, frozen LLM | 54.4 | 60.6 | 85.3 | 76.2 | 76.2 | 76.2 | 76.4 | 65.3 | 722 |
| 72B, LLM trained | 57.4 | 64.6 | 85.2 | 84.2 | 80.2 | 82.9 | 82.9 | 66.1 | 828 |""",
    arms=(Arm("LLM frozen", "X", freeze_llm=True), Arm("LLM trained", "X")),
    tasks=TAG_TASKS,
    metric="char_accuracy",
    comparisons=(("LLM trained", "LLM frozen", "char_accuracy"),),
    mechanism="the answers are formats the text backbone never produced (digits in reading order, tile numbers); "
    "with the LLM frozen only the gated cross-attention layers and the projector can steer it there, while a "
    "trained LLM also adapts its own layers",
    validity=Validity("LLM trained", "char_accuracy"),
)

# latents per tile (resampler.latents): the demo's 32 px tile carries 4 tokens (4×4 patches, pixel shuffle), so 4
# latents compress nothing and isolate what Appendix C blames: latents that mix the tile's tokens
RESAMPLER_LATENTS = 4
RESAMPLER = Claim(
    name="resampler",
    title="A Perceiver resampler hurts dense OCR (paper Appendix C, Figure 9)",
    claim="Flamingo with its Perceiver resampler cannot fit a document-OCR set (training loss stays ≈ 0.4) while "
    "the same model without it reaches ≈ 0; NVLM-X therefore reads the tile tokens directly",
    paper="""| Flamingo 1.3B on 30K OCR samples (Figure 9) | training loss after many epochs |
|---|---|
| with Perceiver resampler | ≈ 0.4 |
| without (x-attention over the image tokens) | ≈ 0 |""",
    arms=(
        Arm("no resampler", "X", {"resampler.latents": 0}),
        Arm(f"resampler ({RESAMPLER_LATENTS} latents)", "X", {"resampler.latents": RESAMPLER_LATENTS}),
    ),
    tasks=("ocr_line",),
    metric="char_accuracy",
    comparisons=(
        ("no resampler", f"resampler ({RESAMPLER_LATENTS} latents)", "char_accuracy"),
        (f"resampler ({RESAMPLER_LATENTS} latents)", "no resampler", "final_loss"),  # its loss stays higher
    ),
    mechanism="ocr_line puts two digits in fixed slots of each tile; transcribing them in order needs each "
    "token's place in the tile, which cross-attention over the tile tokens keeps and learned latents that "
    "pool every token of the tile blur",
    validity=Validity("no resampler", "char_accuracy"),
)

SPEED = Claim(
    name="speed",
    title="Training throughput of NVLM-D, -X and -H at equal shapes (paper Table 3)",
    claim="X trains faster than H, and H faster than D (X 1.76×, H 1.26× D's samples/s), because X and H move "
    "tile tokens out of the decoder sequence",
    paper="""| Model (34B, 128 H100, 6+1 tiles) | ms / iteration | samples / s | vs D |
|---|---|---|---|
| NVLM-X | 5,063 | 50.6 | 1.76× |
| NVLM-H | — | 36.2 | 1.26× |
| NVLM-D | 8,885 | 28.8 | 1.00× |""",
    arms=(Arm("D", "D"), Arm("X", "X"), Arm("H", "H")),
    tasks=(),
    metric="samples_per_s",
    comparisons=(("X", "H", "samples_per_s"), ("H", "D", "samples_per_s"), ("X", "D", "samples_per_s")),
    mechanism="at equal shapes D puts every tile's tokens into the decoder sequence, H only the thumbnail's, "
    "X none; the decoder's cost grows with its sequence, so X < H < D in time per sample",
    validity=None,
    timing=True,
)

PRETRAIN_DATA = Claim(
    name="pretrain-data",
    title="Diverse pretraining data vs captions only (paper Table 5, §4.5)",
    claim="stage 1 on a diverse blend (captioning, VQA, charts, OCR, math) beats stage 1 on caption data alone "
    "(LLaVA-1.5's), after the same SFT",
    paper="""| Pretraining data (NVLM-D, Yi-34B) | MMMU | MathVista | AI2D | ChartQA | DocVQA | TextVQA | OCRBench |
|---|---|---|---|---|---|---|---|
| LLaVA-1.5 data (captions) | 51.8 | 48.9 | 80.5 | 80.3 | 85.2 | 78.9 | 760 |
| Our pretraining data (diverse, Table 4) | 52.0 | 53.8 | 82.1 | 81.1 | 87.4 | 79.9 | 806 |""",
    arms=(Arm("captions only", "D", TEXT_TAGS, stage1_data="captions"), Arm("diverse", "D", TEXT_TAGS)),
    tasks=TAG_TASKS,
    metric="char_accuracy",
    comparisons=(("diverse", "captions only", "char_accuracy"),),
    mechanism="stage 1 trains the projector (and the vision tower) with the LLM frozen; captions only ask what a "
    "scene shows, while the task data also asks where things are and what is written, so the projector already "
    "carries the positions and glyphs the held-out tasks need when the same, short stage 2 begins",
    validity=Validity("diverse", "char_accuracy"),
    max_seq_len=TAG_SEQ_LEN,
)

RL_VS_SFT = Claim(
    name="rl-vs-sft",
    title="GRPO vs more SFT after SFT, on counting (beyond the paper, which stops at SFT)",
    claim="from the same SFT checkpoint, GRPO with an exact-match reward raises held-out counting accuracy more "
    "than as many more samples of SFT on the same task, and generalises better to canvases larger than any it "
    "trained on (RL generalises, SFT memorises: Chu et al., 2025)",
    paper="""| Source | finding |
|---|---|
| NVLM 1.0 (§4.5) | no RL stage: SFT is the last stage |
| Chu et al., 2025, *SFT Memorizes, RL Generalizes* | outcome-reward RL improves out-of-distribution \
variants of a visual task; SFT on the same data degrades them |""",
    arms=(
        Arm("GRPO", "D", after_sft="grpo"),
        Arm("more SFT", "D", after_sft="sft"),
        Arm("GRPO, NVLM-X", "X", after_sft="grpo"),
        Arm("more SFT, NVLM-X", "X", after_sft="sft"),
    ),
    tasks=("count",),
    metric="count_accuracy",
    comparisons=(
        ("GRPO", "more SFT", "count_accuracy"),
        ("GRPO", "more SFT", "wide_accuracy"),
        ("GRPO, NVLM-X", "more SFT, NVLM-X", "count_accuracy"),
        ("GRPO, NVLM-X", "more SFT, NVLM-X", "wide_accuracy"),
    ),
    mechanism="after the demo's SFT the model counts 1-5 shapes well above chance but not reliably; more SFT "
    "pushes up the log-probability of the one reference digit for the images it sees, while GRPO samples "
    "several answers per image and moves probability towards the sampled answers that were right and away from "
    "the wrong ones the model itself prefers, which SFT never penalises; canvases of 8-9 tiles (beyond every "
    "training image's 1-6) change where and how large the shapes are, so what each arm learned about counting "
    "rather than about the training images shows there",
    # the stage-2 model both arms start from must count above chance (a plateau, not nothing learned); 1.5×, not
    # 2×: the task is chosen for being where SFT stalls (NVLM-D of the quick demo: 0.36, 1.8× chance)
    validity=Validity("more SFT", "start_count_accuracy", factor=1.5),
)

NAMES = ("tags", "speed", "pretrain-data", "text-sft", "freeze-llm", "resampler")
EXTRA = ("rl-vs-sft",)  # not in `all`: four stage-3 arms × seeds on top of two stage-1 + 2 runs per seed


def claim(name: str, arch: str = "D") -> Claim:
    fixed = {
        "speed": SPEED,
        "pretrain-data": PRETRAIN_DATA,
        "text-sft": TEXT_SFT,
        "freeze-llm": FREEZE_LLM,
        "resampler": RESAMPLER,
        "rl-vs-sft": RL_VS_SFT,
    }
    return tags(arch) if name == "tags" else fixed[name]
