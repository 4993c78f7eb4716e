"""The interface a grammar engine implements. One backend serves an engine: it compiles a
request's StructuredOutputsParams once (shared by every request with the same key) and makes a
matcher per request, which follows the request's accepted tokens and says which tokens may
come next as a bitmask (bit t of word t // 32 set: token t allowed)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from pagedllm.sampling_params import StructuredOutputsParams


def json_schema_problem(schema: Any) -> tuple[str, str] | None:
    """(where, what) if ``schema`` is not valid JSON Schema (checked against its meta-schema),
    else None."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return "/".join(str(p) for p in exc.absolute_path) or "the top level", exc.message
    return None


class GrammarMatcher(ABC):
    """One request's position in its grammar."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) if the grammar forbids it."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens."""

    @abstractmethod
    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]``."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing may follow."""


class StructuredOutputBackend(ABC):
    name: str

    @abstractmethod
    def compile(self, params: StructuredOutputsParams) -> Any:
        """Compile a grammar; ValueError naming what is wrong for a bad schema/regex/EBNF."""

    @abstractmethod
    def new_matcher(self, compiled: Any) -> GrammarMatcher: ...

    @abstractmethod
    def allocate_bitmask(self, rows: int) -> np.ndarray:
        """[rows, words] int32, every token allowed."""
