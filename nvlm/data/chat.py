"""ChatML rendering (paper Appendix E): ``<|im_start|>{role}\\n{content}<|im_end|>\\n``.

Megatron's NVLM training format (Qwen2's template) uses this; the generation prompt is ``<|im_start|>assistant\\n``.
Images are ``<image>`` placeholders inside a message's content; ``chat_prompt`` puts one in front of the
question (``<image>\\n{question}``) as the released ``chat()`` does.

Injection: message content holding ``<|im_start|>``, ``<|im_end|>`` or ``<|endoftext|>`` is refused
(``ControlTokenError``), and so is an ``<image>`` in a ``chat_prompt`` question (its placeholders are ours); special
tokens, image markers and tile tags are refused by the processor (``Processor.check_text``) on all prompt text.
``template="release"`` renders the released NVLM-D-72B's own ``chat()`` string instead (its conversation.py
"chatml" in MPT style): system "Answer the questions." by default and no newline after ``<|im_end|>``:
``<|im_start|>system\\nAnswer the questions.<|im_end|>``
``<|im_start|>user\\n<image>\\nQ<|im_end|><|im_start|>assistant\\n`` (one string).
"""

from __future__ import annotations

from nvlm.data.processor import (
    CHATML_CONTROL,
    IM_END,
    IM_START,
    IMAGE_PLACEHOLDER,
    check_user_text,
    reserved_pattern,
)

__all__ = ["IM_END", "IM_START", "chat_prompt", "render_chat"]
_QUESTION_PATTERN = reserved_pattern([*CHATML_CONTROL, IMAGE_PLACEHOLDER], tile_tags=False)
RELEASE_SYSTEM = "Answer the questions."


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """[{"role": …, "content": …}, …] → one ChatML string; ControlTokenError if a content holds a ChatML string."""
    out = []
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"chat message role must be system, user or assistant, got {m.get('role')!r}")
        check_user_text(m["content"], what=f"message {i + 1} ({m['role']})")
        out.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def chat_prompt(question: str, num_images: int = 1, system: str | None = None, template: str = "chatml") -> str:
    """A single-turn prompt: `num_images` placeholders (one per line), then the question."""
    check_user_text(question, _QUESTION_PATTERN, "the question")
    if system is not None:
        check_user_text(system, _QUESTION_PATTERN, "the system prompt")
    content = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in range(num_images)) + question
    if template == "release":
        sys_part = f"{IM_START}system\n{RELEASE_SYSTEM if system is None else system}{IM_END}"
        return f"{sys_part}{IM_START}user\n{content}{IM_END}{IM_START}assistant\n"
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return render_chat(messages)
