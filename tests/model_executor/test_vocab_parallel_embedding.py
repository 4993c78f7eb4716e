"""ParallelLMHead.logits: results larger than half glibc's mmap threshold are computed in row
chunks into a buffer kept between steps; they must match the one-call result
(within the dtype's tolerance: a GEMM may block a different row count differently)."""

from __future__ import annotations

import pytest
import torch

from pagedllm.distributed import TensorParallelGroup
from pagedllm.model_executor.layers import vocab_parallel_embedding as vpe
from pagedllm.model_executor.layers.linear import pack_linear_weights
from tests.utils import backend_names, get_backend


def _head(backend: str, dtype: torch.dtype, vocab: int = 300, hidden: int = 32):
    torch.manual_seed(0)
    head = vpe.ParallelLMHead(hidden, vocab, TensorParallelGroup())
    get_backend(backend, dtype).bind(head)
    head.weight.data = torch.randn(vocab, hidden).to(dtype)
    pack_linear_weights(head)
    return head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", backend_names())
def test_chunked_logits_equal_one_call(monkeypatch, backend, dtype):
    head = _head(backend, dtype)
    row_bytes = 300 * torch.empty(0, dtype=dtype).element_size()
    with torch.inference_mode():
        hidden = torch.randn(23, 32).to(dtype)
        whole = head.logits(hidden).clone()  # under the threshold: one call
        assert head._logits_buffer is None
        # 7 rows a chunk: 23 rows are 4 chunks, the last one short
        monkeypatch.setattr(vpe, "MMAP_THRESHOLD_BYTES", 2 * 7 * row_bytes)
        chunked = head.logits(hidden)
        assert chunked.shape == (23, 300)
        torch.testing.assert_close(chunked, whole)
        buffer = head._logits_buffer
        assert buffer is not None and buffer.shape[0] == 23
        # fewer rows reuse the buffer; more rows grow it
        fewer = head.logits(hidden[:10])
        assert fewer.data_ptr() == buffer.data_ptr()
        torch.testing.assert_close(fewer, whole[:10])
        more = torch.randn(40, 32).to(dtype)
        want = torch.cat([head.forward(more[:20]), head.forward(more[20:])])
        torch.testing.assert_close(head.logits(more), want)
        assert head._logits_buffer.shape[0] == 40
