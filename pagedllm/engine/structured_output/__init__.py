"""Structured outputs: grammars that constrain what a request may generate (JSON schemas,
regexes, choices, EBNF), chosen once in the engine process (see manager.py)."""

from pagedllm.engine.structured_output.manager import StructuredOutputManager

__all__ = ["StructuredOutputManager"]
