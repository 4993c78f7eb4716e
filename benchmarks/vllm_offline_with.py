#!/usr/bin/env python3
"""Run ../shared/peers/vllm_cpu_offline.py with extra ``vllm.LLM(...)`` keywords, for like-for-like
comparisons with pagedllm options the peer script does not expose (an fp8 KV cache, n-gram
speculative decoding):

  $PEERS_HOME/venvs/vllm-cpu/bin/python benchmarks/vllm_offline_with.py \\
      --llm-kwargs '{"speculative_config": {"method": "ngram", "num_speculative_tokens": 4,
                     "prompt_lookup_min": 2, "prompt_lookup_max": 3}}' \\
      -- --dtype bfloat16 --out /tmp/vllm_ngram.json

Everything after ``--`` goes to the peer script unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "..", "..", "shared", "peers", "vllm_cpu_offline.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm-kwargs", required=True, help="JSON object of vllm.LLM keywords")
    parser.add_argument("--peer-script", default=PEER)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    ns = parser.parse_args()
    extra = json.loads(ns.llm_kwargs)
    if not isinstance(extra, dict):
        parser.error("--llm-kwargs must be a JSON object")

    import vllm

    original = vllm.LLM.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **{**kwargs, **extra})

    vllm.LLM.__init__ = init
    rest = ns.rest[1:] if ns.rest[:1] == ["--"] else ns.rest
    sys.argv = [ns.peer_script, *rest]
    runpy.run_path(ns.peer_script, run_name="__main__")


if __name__ == "__main__":
    main()
