"""Structured outputs: an answer constrained to a JSON Schema, to any JSON object, to a regular expression, to one
of a list of strings or to an EBNF grammar, through xgrammar (the grammar engine vLLM and SGLang default to; of
the maintained libraries it had the lowest per-token cost on CPU when we measured them side by side).

- ``Grammars.compile`` runs on the request's thread, never the engine's: what is asked (``Spec``, canonical text)
  becomes a compiled grammar, which xgrammar's compiler caches by that text; a schema, pattern or grammar it
  cannot compile is a ``ValueError`` with the library's reason (the server's 400).
- Each constrained request holds its own matcher (``new_matcher``). Per step the output processor fills one
  token bitmask for its constrained rows and sets every token the grammar forbids to −inf before sampling
  (``TokenMasks``); each sampled token then advances the row's matcher. End-of-sequence tokens are allowed only
  where the grammar is complete, so an answer that ends with finish_reason "stop" always parses (one cut off by
  ``max_tokens``, "length", may not).
- JSON is generated compact (no whitespace between tokens), so a model cannot spend its budget on spaces.
- xgrammar 0.2.9 lowers a string's ``minLength`` / ``maxLength`` to a character class that admits raw control
  characters, which JSON forbids (a known bug of that release); its ``pattern`` path does not, so
  ``bounded_strings`` states such bounds as the equivalent pattern before compiling.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    import xgrammar

INSTALL = "structured outputs need xgrammar: pip install 'nvlm[structured]'"
CACHE_BYTES = 64 * 2**20  # compiled grammars kept by the compiler (a JSON Schema's is tens of KiB to a few MiB)

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class Spec:
    """What a request constrains its answer to. `text`: the schema as canonical JSON (sorted keys, no spaces),
    the pattern, the choices as a JSON list or the EBNF grammar; `strict`: JSON Schema only, no properties or
    items beyond those the schema names (OpenAI's ``strict: true``)."""

    kind: Kind
    text: str = ""
    strict: bool = False

    @staticmethod
    def of_schema(schema: Any, strict: bool) -> Spec:
        """Compact JSON, its key order kept (properties are generated in the schema's order)."""
        return Spec("json", json.dumps(schema, separators=(",", ":"), ensure_ascii=False), strict)

    @staticmethod
    def of_choice(choices: list[str]) -> Spec:
        return Spec("choice", json.dumps(choices, ensure_ascii=False))


DATA_KEYS = ("enum", "const", "default", "examples")  # their values are data, not schemas


def bounded_strings(schema: Any) -> Any:
    """`schema` with every ``minLength`` / ``maxLength`` written as the same bound in a ``pattern`` (see the
    module docstring); ValueError for a string with both, which the library would bound by the pattern alone."""
    if isinstance(schema, list):
        return [bounded_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in DATA_KEYS else bounded_strings(v) for k, v in schema.items()}
    lo, hi = out.get("minLength"), out.get("maxLength")
    ints = [v for v in (lo, hi) if isinstance(v, int) and not isinstance(v, bool)]
    if not ints:
        return out
    if "pattern" in out:
        raise ValueError("xgrammar bounds a string with both pattern and minLength/maxLength by its pattern alone")
    out.pop("minLength", None)
    out.pop("maxLength", None)
    low = lo if isinstance(lo, int) and not isinstance(lo, bool) else 0
    high = hi if isinstance(hi, int) and not isinstance(hi, bool) else ""
    out["pattern"] = f"^.{{{low},{high}}}$"  # JSON-string-aware in xgrammar: no quote, backslash or control
    return out


def _import() -> Any:
    try:
        import xgrammar as xgr
    except ImportError:
        raise ValueError(INSTALL) from None
    return xgr


def _reason(e: BaseException) -> str:
    """xgrammar's message on one line, without its C++ source location ("[time] file.cc:123: ")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    if text.startswith("[") and ": " in text:
        text = text.split(": ", 1)[1]
    return text.removeprefix("Check failed: (error.empty()) is false: ")[:300]


class Grammars:
    """One model's grammar compiler: its tokenizer's vocabulary as xgrammar sees it (built once; `vocab_size` is
    the width of the model's logits, which may exceed the tokenizer's length) and the compiler's cache."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int], tokenizer_lock: threading.Lock) -> None:
        xgr = _import()
        with tokenizer_lock:  # fast tokenizers refuse concurrent use
            info = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=max(vocab_size, len(tokenizer)), stop_token_ids=list(stop_ids)
            )
        self.vocab_size = info.vocab_size
        threads = max(1, min(8, os.cpu_count() or 1))
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_limit_bytes=CACHE_BYTES)

    def compile(self, spec: Spec) -> xgrammar.CompiledGrammar:
        """`spec` → its compiled grammar (cached); ValueError naming what failed and why."""
        c = self.compiler
        try:
            if spec.kind == "json_object":  # OpenAI's JSON mode: an object, anything in it
                return c.compile_json_schema('{"type":"object"}', any_whitespace=False, separators=(",", ":"))
            if spec.kind == "json":
                schema = json.dumps(bounded_strings(json.loads(spec.text)), ensure_ascii=False)
                return c.compile_json_schema(
                    schema, any_whitespace=False, separators=(",", ":"), strict_mode=spec.strict
                )
            if spec.kind == "regex":
                return c.compile_regex(spec.text)
            if spec.kind == "choice":  # one EBNF literal per string (JSON's escapes are EBNF's)
                alts = " | ".join(json.dumps(s, ensure_ascii=False) for s in json.loads(spec.text))
                return c.compile_grammar(f"root ::= {alts}")
            return c.compile_grammar(spec.text)
        except Exception as e:  # the library's reason, whatever its exception type: a 400, never a 500
            raise ValueError(f"{_WHAT[spec.kind]} cannot be compiled: {_reason(e)}") from None


_WHAT = {
    "json": "the JSON schema",
    "json_object": "the JSON object grammar",
    "regex": "the regex",
    "choice": "the choice",
    "grammar": "the grammar",
}
_ENGINES: weakref.WeakKeyDictionary[Any, Grammars] = weakref.WeakKeyDictionary()
_BUILD = threading.Lock()


def grammars_for(engine: Any) -> Grammars:
    """The engine's model's `Grammars`, built on first use (ValueError if xgrammar is not installed)."""
    with _BUILD:
        if engine not in _ENGINES:
            tok = engine.processor.tokenizer
            width = int(getattr(engine.model.llm.config, "vocab_size", 0) or len(tok))
            _ENGINES[engine] = Grammars(tok, width, engine.stop_ids, engine.tokenizer_lock)
        return _ENGINES[engine]


class Matcher:
    """A request's own matcher over a compiled grammar: it follows the tokens that request generates."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self.state = xgr.GrammarMatcher(compiled)
        self.vocab_size: int = compiled.tokenizer_info.vocab_size

    def accept(self, token: int) -> None:
        if not self.state.accept_token(token):  # the mask allowed it: refusing it here is a bug, not the user's
            raise RuntimeError(f"the grammar matcher refused token {token}, which its own mask allowed")

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its end-of-sequence token was taken."""
        return bool(self.state.is_terminated())


class TokenMasks:
    """The output processor's bitmask: one row per row of a step, filled for the constrained ones and applied to
    the logits in place."""

    def __init__(self) -> None:
        self._mask: torch.Tensor | None = None  # int32 [rows, ceil(vocab / 32)], grown as needed

    def apply(self, logits: torch.Tensor, rows: list[int], matchers: list[Matcher]) -> None:
        """Set to −inf the logits of `rows` (of [n, width]) that their `matchers` forbid next."""
        import xgrammar as xgr

        n, width, vocab = logits.shape[0], logits.shape[-1], matchers[0].vocab_size
        if self._mask is None or self._mask.shape[0] < n or self._mask.shape[1] != (vocab + 31) // 32:
            self._mask = xgr.allocate_token_bitmask(max(n, 8), vocab)
        mask = self._mask[:n]
        for row, m in zip(rows, matchers, strict=True):
            m.state.fill_next_token_bitmask(mask, row)
        used = min(width, vocab)
        if logits.device.type == "cpu":
            xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=used, indices=rows, backend="cpu")
        else:  # xgrammar's GPU kernel is Triton's; without Triton, its plain-torch one
            dev = mask.to(logits.device, non_blocking=True)
            if _has_triton():
                xgr.apply_token_bitmask_inplace(logits, dev, vocab_size=used, indices=rows, backend="triton")
            else:
                xgr.apply_token_bitmask_inplace(logits, dev, vocab_size=used, indices=rows, backend="torch_native")
        if width > vocab:  # logits past the tokenizer's vocabulary are no text the grammar could accept
            logits[rows, vocab:] = float("-inf")


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None
