"""Chat messages rendered in the model's own template, for every entry point (``nvlm chat``, ``nvlm serve``,
``nvlm eval run``): the prompt a model is asked with is the one it was trained and published with.

* ``chatml`` (nvlm's models, Megatron's NVLM training format): ``nvlm.data.chat.render_chat``.
* ``release`` (the released NVLM-D-72B): its own ``chat()`` string, conversation.py's "chatml" in MPT style: the
  system turn first ("Answer the questions." when the messages bring none), no newline after ``<|im_end|>``,
  ending in ``<|im_start|>assistant\\n``; ``nvlm.data.chat.chat_prompt(..., template="release")`` is its
  single-question case.
"""

from __future__ import annotations

from nvlm.data.chat import RELEASE_SYSTEM, render_chat
from nvlm.data.processor import IM_END, IM_START, check_user_text


def render_messages(messages: list[dict[str, str]], template: str = "chatml") -> str:
    """[{"role", "content"}, ...] → the prompt string in `template`, ending in the generation prompt."""
    if template != "release":
        return render_chat(messages)
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"chat message role must be system, user or assistant, got {m.get('role')!r}")
        check_user_text(m["content"], what=f"message {i + 1} ({m['role']})")
    system = RELEASE_SYSTEM
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    turns = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}" for m in messages)
    return f"{IM_START}system\n{system}{IM_END}{turns}{IM_START}assistant\n"
