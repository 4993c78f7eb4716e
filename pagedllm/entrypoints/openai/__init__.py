"""The OpenAI-compatible HTTP server (``pagedllm serve``); see docs/server.md."""
