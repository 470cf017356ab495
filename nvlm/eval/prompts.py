"""The pinned prompts of ``nvlm eval run`` (paper Sec. 6, Tables 7 and 8): ``PROMPTS`` and ``build_prompt``.

Vision benchmarks use those of NVIDIA's NVLM evaluation code, ``NVIDIA/Megatron-LM``
``examples/multimodal/run_text_generation.py`` (``get_conversation``: the system prompt and the suffix) and
``examples/multimodal/evaluation/evaluation_datasets.py`` (how options are listed): a ChatML conversation of a
system message and ``<image>\\n{text}``. NVIDIA released no prompts for the text benchmarks; there MMLU and
HumanEval follow their official harnesses (raw completion, no chat template) and GSM8K and MATH use the
instruction below (chat template). Decoding is greedy everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

FOLLOW = "Follow the user's instruction and answer questions."
LETTER = "Answer with the option's letter from the given choices directly."
WORD = "Answer the question using a single word or phrase."
WORD_NUMBER = "Answer the question using a single word, phrase, or number."


@dataclass(frozen=True)
class Prompt:
    """How one benchmark item becomes the model's input.

    ``user`` maps a question kind (``"default"``, or e.g. ``"multiple-choice"``) to the user message, where
    ``{question}`` is the benchmark's question and ``{options}`` its options, one a line, each written as
    ``option_line``. Vision tasks get ``<image>\\n`` in front of the user message (one per image).
    ``chat=False``: the text is completed as it is (no ChatML). Predictions of chat tasks are stripped, as
    Megatron's ``get_prompt_and_generated`` does; completions are kept verbatim.
    """

    system: str | None
    user: dict[str, str]
    max_new_tokens: int
    chat: bool = True
    stop: tuple[str, ...] = ()
    option_line: str = "{letter}. {text}\n"
    source: str = ""


PROMPTS: dict[str, Prompt] = {
    "vqav2": Prompt(FOLLOW, {"default": "{question}\n" + WORD}, 16, source="Megatron VQAv2"),
    "textvqa": Prompt(FOLLOW, {"default": "{question}\n" + WORD_NUMBER}, 16, source="Megatron TextVQA"),
    "docvqa": Prompt(FOLLOW, {"default": "{question}\n" + WORD_NUMBER}, 16, source="Megatron SPDocVQA"),
    "chartqa": Prompt(FOLLOW, {"default": "{question}\n" + WORD}, 16, source="Megatron ChartQA"),
    "ocrbench": Prompt(FOLLOW, {"default": "{question}"}, 64, source="Megatron OCRBench"),
    "ai2d": Prompt(
        FOLLOW,
        {"default": "{question}\n{options}" + LETTER},
        16,
        source="Megatron AI2D (options as in its MathVista/RealworldQA datasets)",
    ),
    "realworldqa": Prompt(
        FOLLOW,
        {"default": "{question}"},
        16,
        source="Megatron RealworldQA (the public question already lists the options)",
    ),
    "mmmu": Prompt(
        "Answer the questions.",
        {"multiple-choice": "{question}\n{options}\n" + LETTER, "open": "{question}\n" + WORD},
        16,
        option_line="({letter}) {text}\n",
        source="Megatron MMMU, prompt_style single_image (MMMU repo llava1.5 config)",
    ),
    "mathvista": Prompt(
        "You are math expert. Use your math knowledge to calculate the answer.",
        {"multi_choice": "{question}\n{options}" + LETTER, "free_form": "{question}"},
        64,
        source="Megatron MathVista (free_form: the dataset's query without 'Hint: ')",
    ),
    "mmlu": Prompt(
        None,
        {"default": "{question}"},
        8,
        chat=False,
        source="hendrycks/test evaluate.py 5-shot prompt; letter by log-probability",
    ),
    "gsm8k": Prompt(
        None,
        {
            "default": "{question}\nSolve the problem step by step. Write the final answer "
            'on the last line in the form "#### <number>".'
        },
        512,
        source="ours",
    ),
    "math": Prompt(
        None,
        {"default": "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."},
        1024,
        source="ours",
    ),
    "humaneval": Prompt(
        None,
        {"default": "{question}"},
        512,
        chat=False,
        stop=("\nclass", "\ndef", "\n#", "\nif", "\nprint"),
        source="openai/human-eval: complete the prompt; lm-eval humaneval stop strings",
    ),
    "demo": Prompt(
        None,
        {"default": "{question}"},
        4,
        source="nvlm demo: the LLaVA record's question, as the demo's own evaluation",
    ),
}
VISION = ("vqav2", "textvqa", "docvqa", "chartqa", "ocrbench", "ai2d", "realworldqa", "mmmu", "mathvista")


def options_text(task: str, options: list[str]) -> str:
    line = PROMPTS[task].option_line
    return "".join(line.format(letter=chr(65 + i), text=text) for i, text in enumerate(options))


def build_prompt(
    task: str, question: str, options: list[str] | None = None, kind: str = "default", num_images: int = 0
) -> str | list[dict[str, str]]:
    """The model input for one item: chat messages (system, user; the runner renders them as ChatML with the
    generation prompt) or, for ``chat=False`` tasks, the raw text to complete."""
    spec = PROMPTS[task]
    text = spec.user[kind].format(question=question, options=options_text(task, options or []))
    if task == "mmmu":
        text = mmmu_image_tag(text)
    if not spec.chat:
        return text
    text = "".join("<image>\n" for _ in range(num_images)) + text
    system = [{"role": "system", "content": spec.system}] if spec.system else []
    return system + [{"role": "user", "content": text}]


def mmmu_image_tag(q: str) -> str:
    """Megatron's ``MMMUDataset.process_image_tag`` (single-image style): word the ``<image 1>`` reference,
    drop ``<image 2>``..``<image 7>``. Applied to the whole prompt (question, options and instruction)."""
    q = q.strip()
    if q == "<image 1>":
        q = "Answer the question in the image."
    elif ":<image 1>" in q:
        q = q.replace(":<image 1>", " in the image. ").strip()
    elif ": <image 1>" in q:
        q = q.replace(": <image 1>", " in the image. ").strip()
    elif ".<image 1>" in q or ". <image 1>" in q:
        q = " ".join(part.strip() for part in q.split("<image 1>") if part.strip() != "")
    elif q.startswith("<image 1> "):
        q = q.replace("<image 1>", "" if q[10].isupper() else "The image").strip()
    elif q.startswith("<image 1>"):
        q = q.replace("<image 1>", "")
    elif q.endswith("<image 1>?"):
        q = q.replace("<image 1>", "the image")
    elif q.endswith("?<image 1>") or q.endswith("? <image 1>") or q.endswith("\n<image 1>"):
        q = q.replace("<image 1>", "").strip()
    elif " <image 1> " in q or " <image 1>" in q:
        q = q.replace("<image 1>", "the image")
    elif "()<image 1>" in q:
        q = q.replace("()<image 1>", "")
    elif "(<image 1>)" in q:
        q = q.replace("(<image 1>)", "")
    elif "<image 1>." in q:
        q = q.replace("<image 1>.", ". ")
    else:
        q = q.replace("<image 1>", ". ").strip()
    for i in range(2, 8):
        q = q.replace(f"<image {i}>", "")
    return q
