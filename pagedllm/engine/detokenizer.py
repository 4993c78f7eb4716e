"""Incremental detokenization with stop-string handling.

Fast tokenizers use ``tokenizers``' DecodeStream, which holds back bytes until they form valid
UTF-8, so a streamed text never contains a broken character. Slow tokenizers fall back to
re-decoding the output and holding back a trailing U+FFFD.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

from pagedllm.sampling_params import SamplingParams

# Prompt tokens fed to the stream first, so the first output token gets its leading space right
# (sentencepiece decoders strip the leading space of a text's first token).
NUM_PRIMING_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = list(params.stop or [])
        self.include_stop = params.include_stop_str_in_output
        # Text that might still become the start of a stop string is not shown while streaming.
        self.stop_buffer = max((len(s) for s in self.stop), default=1) - 1
        if self.include_stop:
            self.stop_buffer = 0
        self.text = ""
        self.token_ids: list[int] = []
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = backend
        self.stream = None
        if backend is not None:
            self.stream = DecodeStream(
                ids=list(prompt_token_ids[-NUM_PRIMING_TOKENS:]),
                skip_special_tokens=self.skip_special_tokens,
            )

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append tokens; return the stop string that matched, if any (text is then cut)."""
        start = len(self.text)
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            if self.stream is not None:
                piece = self.stream.step(self.backend, token_id)
                if piece:
                    self.text += piece
            else:
                self.text = self._slow_decode()
        if not self.stop:
            return None
        return self._check_stop(start)

    def _slow_decode(self) -> str:
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens)
        return text[:-1] if text.endswith("\ufffd") else text

    def _check_stop(self, new_text_start: int) -> str | None:
        best: tuple[int, str] | None = None
        for stop in self.stop:
            idx = self.text.find(stop, max(0, new_text_start - len(stop) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        self.text = self.text[: idx + len(stop) if self.include_stop else idx]
        return stop

    def output_text(self, finished: bool) -> str:
        if finished or not self.stop_buffer:
            return self.text
        return self.text[: max(0, len(self.text) - self.stop_buffer)]
