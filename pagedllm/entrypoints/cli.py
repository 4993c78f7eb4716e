"""The ``pagedllm`` command: ``generate`` (offline, one-shot), ``serve`` (OpenAI-compatible
HTTP server)."""

from __future__ import annotations

import argparse
import logging
import sys

from pagedllm import envs
from pagedllm.entrypoints.engine_cli_args import add_engine_args, engine_args_from_namespace


def _generate(ns: argparse.Namespace) -> int:
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sampling_params import SamplingParams

    args = engine_args_from_namespace(ns)
    llm = LLM(**{k: v for k, v in vars(args).items()})
    params = SamplingParams(
        temperature=ns.temperature,
        top_p=ns.top_p,
        max_tokens=ns.max_tokens,
        seed=ns.sampling_seed,
    )
    if ns.chat:
        outs = llm.chat(
            [[{"role": "user", "content": p}] for p in ns.prompts], params, use_tqdm=False
        )
    else:
        outs = llm.generate(ns.prompts, params, use_tqdm=False)
    for out in outs:
        print(out.outputs[0].text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for prompts and print it")
    gen.add_argument("prompts", nargs="+", help="prompt text(s)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--sampling-seed", type=int, default=None)
    add_engine_args(gen)
    gen.set_defaults(func=_generate)
    sub.add_parser(
        "serve",
        help="start the OpenAI-compatible server (see `pagedllm serve --help`)",
        add_help=False,
    )
    sub.add_parser("bench", help="benchmarks: throughput, latency, serve, sweep", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=envs.log_level(), format="%(levelname)s %(asctime)s %(name)s: %(message)s"
    )
    if argv and argv[0] == "serve":
        from pagedllm.entrypoints.openai.api_server import main as serve_main

        return serve_main(argv[1:])
    if argv and argv[0] == "bench":
        from pagedllm.entrypoints.bench import main as bench_main

        return bench_main(argv[1:])
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
