"""What tensor parallelism's communication costs per step on this machine: gloo all-reduce
(over loopback, between worker processes, as the mp backend runs it) of the hidden states a
step of T tokens moves, and the all-gather of the logits rank 0 samples from.

A Llama step under TP N runs 2 all-reduces per layer (after o_proj and after down_proj) plus
one for the vocab-parallel embedding, each of [T, hidden] fp32, and gathers [S, V / N] logits
(S sampled rows). Prints the median time per collective and the per-step total for SmolLM2
(30 layers, hidden 576, vocab 49152).

    .venv/bin/python benchmarks/tp_allreduce.py --world-size 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TOKENS = (1, 16, 64, 256, 512, 2048)


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _rank(rank: int, args, port: int, out) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world_size
    )
    rows = []
    for t in TOKENS:
        x = torch.randn(t, args.hidden)
        reduce_s = _time(lambda x=x: dist.all_reduce(x), args.iters)
        local = torch.randn(min(t, 256), -(-args.vocab // args.world_size))
        parts = [torch.empty_like(local) for _ in range(args.world_size)] if rank == 0 else None
        gather_s = _time(lambda x=local, p=parts: dist.gather(x, p, dst=0), args.iters)
        rows.append((t, reduce_s, gather_s))
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    from pagedllm.executor.base import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, args, port, out)) for r in range(args.world_size)]
    for proc in procs:
        proc.start()
    rows = out.get(timeout=600)
    for proc in procs:
        proc.join()
    n = 2 * args.layers + 1
    print(f"gloo over loopback, {args.world_size} ranks, 1 thread each; hidden {args.hidden}")
    print(f"{'tokens':>7} {'all-reduce us':>14} {'gather us':>10} {'per step ms':>12}")
    for t, reduce_s, gather_s in rows:
        step = n * reduce_s + gather_s
        print(f"{t:>7} {reduce_s * 1e6:>14.0f} {gather_s * 1e6:>10.0f} {step * 1e3:>12.2f}")
    print(f"(per step: {n} all-reduces of [tokens, {args.hidden}] + a gather of the logits)")


if __name__ == "__main__":
    main()
