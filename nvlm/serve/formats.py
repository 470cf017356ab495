"""The request shapes of structured outputs (``nvlm.serve.grammar`` compiles what they ask for): OpenAI's
``response_format`` (``text``, ``json_object``, or ``json_schema`` with ``name``, ``schema`` and ``strict``) and
vLLM's ``structured_outputs`` (exactly one of ``json``, ``regex``, ``choice``, ``grammar``, ``json_object``).
Pydantic models, so /openapi.json documents them; every string and list has a bound.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from nvlm.serve.grammar import Spec

MAX_GRAMMAR = 64 * 1024  # characters of a JSON schema (as compact JSON), a regex or a grammar


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class JSONSchema(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(default="response", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=4096)
    schema_: dict[str, Any] | bool = Field(alias="schema", description="the JSON Schema the answer follows")
    strict: bool | None = Field(default=False, description="no properties or items beyond those the schema names")


class TextFormat(_Strict):
    type: Literal["text"]


class JSONObjectFormat(_Strict):
    type: Literal["json_object"]


class JSONSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchema


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]
Choice = Annotated[str, Field(min_length=1, max_length=1024)]


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: exactly one constraint."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | bool | str | None = Field(
        default=None, alias="json", max_length=MAX_GRAMMAR, description="a JSON Schema (object or JSON text)"
    )
    regex: str | None = Field(default=None, min_length=1, max_length=MAX_GRAMMAR, description="the answer matches it")
    choice: list[Choice] | None = Field(default=None, min_length=1, max_length=256, description="the answer is one")
    grammar: str | None = Field(default=None, min_length=1, max_length=MAX_GRAMMAR, description="EBNF (GBNF)")
    json_object: bool | None = Field(default=None, description="any JSON object")

    def spec(self) -> Spec:
        given = [
            k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, k) not in (None, False)
        ]
        if len(given) != 1:
            raise ValueError("structured_outputs: give exactly one of json, regex, choice, grammar, json_object")
        if self.json_ is not None:
            schema = self.json_
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"structured_outputs.json: not JSON ({e})") from None
            return Spec.of_schema(schema, strict=False)
        if self.regex is not None:
            return Spec("regex", self.regex)
        if self.choice is not None:
            return Spec.of_choice(self.choice)
        if self.grammar is not None:
            return Spec("grammar", self.grammar)
        return Spec("json_object")


def format_spec(fmt: TextFormat | JSONObjectFormat | JSONSchemaFormat | None) -> Spec | None:
    """OpenAI's ``response_format`` → what the answer is constrained to (None: free text)."""
    if isinstance(fmt, JSONObjectFormat):
        return Spec("json_object")
    if isinstance(fmt, JSONSchemaFormat):
        return Spec.of_schema(fmt.json_schema.schema_, strict=bool(fmt.json_schema.strict))
    return None
