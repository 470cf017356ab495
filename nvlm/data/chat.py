"""ChatML rendering (paper Appendix E, SPEC §4): ``<|im_start|>{role}\\n{content}<|im_end|>\\n``.

The released NVLM-D-72B uses this template (Qwen2's); the generation prompt is ``<|im_start|>assistant\\n``.
Images are ``<image>`` placeholders inside a message's content; ``chat_prompt`` puts one in front of the
question (``<image>\\n{question}``) as the released ``chat()`` does.
"""

from __future__ import annotations

from nvlm.data.processor import IMAGE_PLACEHOLDER

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """[{"role": …, "content": …}, …] → one ChatML string."""
    out = []
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"chat message role must be system, user or assistant, got {m.get('role')!r}")
        out.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def chat_prompt(question: str, num_images: int = 1, system: str | None = None) -> str:
    """A single-turn prompt: `num_images` placeholders (one per line), then the question."""
    content = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in range(num_images)) + question
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return render_chat(messages)
