"""xgrammar (the grammar engine vLLM and SGLang use): JSON schemas, regexes and EBNF compile to
a pushdown automaton whose token masks are precomputed per state, so filling a 49,152-token
mask takes microseconds."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from pagedllm.engine.structured_output.backend import (
    GrammarMatcher,
    StructuredOutputBackend,
    json_schema_problem,
)
from pagedllm.sampling_params import StructuredOutputsParams

try:
    import xgrammar as xgr
except ImportError:  # pragma: no cover - set-up installs it; say how if it is missing
    xgr = None


# The longest run of whitespace between two JSON tokens: room for a newline and indentation
# 4 levels deep at 4 spaces, and a bound on the whitespace loops small models fall into (a
# 135M model sampling at temperature 1 filled 150 tokens with newlines inside an object).
MAX_WHITESPACE_RUN = 20
# JSON-schema keywords xgrammar 0.2.9 parses but does not enforce (measured: a value breaking
# them is accepted); a schema using them gets a 400 instead of output that may break it.
IGNORED_KEYWORDS = {
    "not": "negated schemas",
    "uniqueItems": "unique array items",
    "if": "conditional schemas",
    "then": "conditional schemas",
    "else": "conditional schemas",
    "dependentRequired": "dependent properties",
    "dependentSchemas": "dependent schemas",
    "dependencies": "dependent properties",
    "contains": "array 'contains'",
    "minContains": "array 'contains'",
    "maxContains": "array 'contains'",
    "contentEncoding": "content encodings",
    "contentMediaType": "content media types",
    "contentSchema": "content schemas",
    "$dynamicRef": "dynamic references",
    "$recursiveRef": "recursive references",
}
# String formats it enforces (others, e.g. iri or regex, it ignores).
FORMATS = {
    "email", "date", "time", "date-time", "duration", "uuid", "uri", "uri-reference",
    "uri-template", "ipv4", "ipv6", "hostname", "json-pointer", "relative-json-pointer",
}  # fmt: skip
# Keywords whose value is a schema, a list of schemas, or a map of name -> schema.
SUBSCHEMA = ("additionalProperties", "items", "propertyNames", "unevaluatedProperties",
             "unevaluatedItems")  # fmt: skip
SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")


def check_json_schema(schema: Any, path: str = "#") -> None:
    """ValueError naming the first keyword (and where it is) that the grammar would not
    enforce, and for a schema that is not valid JSON Schema at all."""
    if path == "#" and (problem := json_schema_problem(schema)) is not None:
        raise ValueError(f"invalid JSON schema at {problem[0]}: {problem[1]}")
    if not isinstance(schema, dict):
        return
    for keyword, what in IGNORED_KEYWORDS.items():
        if keyword in schema:
            raise ValueError(
                f"the JSON-schema keyword {keyword!r} (at {path}) is not supported: "
                f"{what} cannot be enforced while decoding"
            )
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt not in FORMATS:
        raise ValueError(
            f"the string format {fmt!r} (at {path}) is not supported; the supported ones are "
            f"{', '.join(sorted(FORMATS))}"
        )
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        raise ValueError(
            f"'allOf' with more than one schema (at {path}) is not supported: merge them"
        )
    for keyword in SUBSCHEMA:
        if keyword in schema:
            check_json_schema(schema[keyword], f"{path}/{keyword}")
    for keyword in SUBSCHEMA_LISTS:
        for i, sub in enumerate(schema.get(keyword) or []):
            check_json_schema(sub, f"{path}/{keyword}/{i}")
    for keyword in SUBSCHEMA_MAPS:
        sub_map = schema.get(keyword)
        if isinstance(sub_map, dict):
            for name, sub in sub_map.items():
                check_json_schema(sub, f"{path}/{keyword}/{name}")


def ebnf_string(text: str) -> str:
    """A quoted EBNF literal matching ``text`` exactly (JSON's escapes are xgrammar's)."""
    return json.dumps(text, ensure_ascii=True)


def choice_grammar(choices: list[str]) -> str:
    return "root ::= " + " | ".join(ebnf_string(c) for c in choices)


class XgrammarMatcher(GrammarMatcher):
    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def accept_token(self, token_id: int) -> bool:
        return self._matcher.accept_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._matcher.rollback(num_tokens)

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()


class XgrammarBackend(StructuredOutputBackend):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        if xgr is None:
            raise ValueError(
                "structured outputs need the xgrammar package: pip install --no-deps "
                "xgrammar==0.2.9 apache-tvm-ffi (make setup does)"
            )
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        # NOTE: compiles run on the caller's thread (the server's worker threads), never on the
        # engine loop's; xgrammar also caches compiled grammars by their source.
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self.vocab_size = vocab_size

    def compile(self, params: StructuredOutputsParams) -> Any:
        kind = params.kind
        try:
            if kind == "json":
                check_json_schema(params.json)
                return self._compiler.compile_json_schema(
                    json.dumps(params.json),
                    any_whitespace=not params.disable_any_whitespace,
                    max_whitespace_cnt=MAX_WHITESPACE_RUN,
                )
            if kind == "json_object":
                # OpenAI's json_object is an object (xgrammar's built-in JSON grammar would
                # also allow an array or a bare value), with any properties.
                return self._compiler.compile_json_schema(
                    '{"type": "object"}',
                    any_whitespace=not params.disable_any_whitespace,
                    max_whitespace_cnt=MAX_WHITESPACE_RUN,
                    strict_mode=False,
                )
            if kind == "regex":
                return self._compiler.compile_regex(params.regex)
            if kind == "choice":
                return self._compiler.compile_grammar(choice_grammar(params.choice))
            return self._compiler.compile_grammar(params.grammar)
        except (RuntimeError, ValueError) as exc:  # RuntimeError: xgrammar's parse errors
            raise ValueError(f"invalid structured_outputs.{kind}: {_clean(str(exc))}") from exc

    def new_matcher(self, compiled: Any) -> GrammarMatcher:
        return XgrammarMatcher(xgr.GrammarMatcher(compiled))

    def allocate_bitmask(self, rows: int) -> np.ndarray:
        return np.full((rows, (self.vocab_size + 31) // 32), -1, dtype=np.int32)


def _clean(message: str) -> str:
    """xgrammar prefixes its messages with a time stamp and a C++ source location."""
    message = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", message.strip())
    return message.splitlines()[0] if message else message
