"""Tensor-parallel ranks 1..N-1 as Ray actors, on whatever nodes the Ray cluster has (one
placement-group bundle per rank), running the same Worker code as the mp backend. Rank 0 stays
in the engine process; the ranks meet in a torch.distributed process group on the engine's node
(gloo on CPU, NCCL on CUDA): Ray places and supervises the workers, torch.distributed carries
the tensors."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading

from pagedllm import envs
from pagedllm.executor.base import Executor, free_port
from pagedllm.model_executor.worker import Worker, WorkerConfig

logger = logging.getLogger(__name__)


class _RayWorker:
    """The actor: builds its rank's Worker on creation, then serves calls until shutdown."""

    def __init__(self, config: WorkerConfig, rank: int) -> None:
        logging.basicConfig(level=envs.log_level())
        self.worker = Worker(config, rank)

    def ready(self) -> int:
        return os.getpid()

    def serve(self, init_method: str) -> None:
        self.worker.join(init_method)
        self.worker.serve_calls()


class RayExecutor(Executor):
    def __init__(self, config: WorkerConfig, address: str | None = None) -> None:
        super().__init__()
        address = address or os.environ.get("RAY_ADDRESS")
        if address is None and "ray" not in sys.modules:
            # The cluster the engine starts itself serves this machine only: keep Ray's
            # services on loopback (by default it binds them to the node's network address).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        try:
            import ray
            from ray.util.placement_group import placement_group, remove_placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError:
            raise ValueError(
                "--distributed-executor-backend ray needs Ray: pip install 'pagedllm[ray]'"
            ) from None
        self._ray = ray
        self._remove_pg = remove_placement_group
        self.world_size = config.world_size
        connect(ray, address)
        cpus = 1 if config.device == "cpu" else 0
        bundles = [{"CPU": max(cpus, 1)} for _ in range(config.world_size - 1)]
        if config.device != "cpu":
            bundles = [{"CPU": 1, "GPU": 1} for _ in bundles]
        self._pg = placement_group(bundles, strategy="PACK")
        timeout = envs.worker_start_timeout()
        ready, _ = ray.wait([self._pg.ready()], timeout=timeout)
        if not ready:
            remove_placement_group(self._pg)
            raise RuntimeError(
                f"the Ray cluster cannot place {len(bundles)} workers ({bundles[0]} each) "
                f"within {timeout:.0f} s: it has {ray.cluster_resources()}"
            )
        actor_class = ray.remote(_RayWorker)
        env = (
            {"GLOO_SOCKET_IFNAME": os.environ["GLOO_SOCKET_IFNAME"]}
            if ("GLOO_SOCKET_IFNAME" in os.environ)
            else {}
        )
        self._actors = [
            actor_class.options(
                num_cpus=bundles[i]["CPU"],
                num_gpus=bundles[i].get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, i),
                runtime_env={"env_vars": env} if env else None,
                name=None,
            ).remote(config, i + 1)
            for i in range(len(bundles))
        ]
        try:
            self.driver = Worker(config, rank=0)
            pids = ray.get([a.ready.remote() for a in self._actors], timeout=timeout)
            host = ray.util.get_node_ip_address()
            init_method = f"tcp://{host}:{free_port(host)}"
            self._serving = [a.serve.remote(init_method) for a in self._actors]
            self.driver.join(init_method)
        except BaseException as exc:
            self._kill()
            if isinstance(exc, ray.exceptions.RayError):
                raise RuntimeError(f"a Ray tensor-parallel worker failed to start: {exc}") from exc
            raise
        threading.Thread(target=self._monitor, name="pagedllm-ray-monitor", daemon=True).start()
        logger.info(
            "tensor parallel: %d ranks, ranks 1.. as Ray actors (pids %s)", self.world_size, pids
        )

    def _monitor(self) -> None:
        done, _ = self._ray.wait(self._serving, num_returns=1, timeout=None)
        reason = "returned"
        try:
            self._ray.get(done[0])
        except Exception as exc:
            reason = f"failed: {type(exc).__name__}: {exc}"
        self._report_failure(f"a Ray tensor-parallel worker actor {reason}")

    def _shutdown(self) -> None:
        if self._failure is None:
            with contextlib.suppress(Exception):
                self.driver.tp.broadcast_object(None)
                self._ray.get(self._serving, timeout=10)
        from pagedllm.distributed import destroy_distributed

        with contextlib.suppress(Exception):
            destroy_distributed()
        self._kill()

    def _kill(self) -> None:
        for actor in getattr(self, "_actors", []):
            with contextlib.suppress(Exception):
                self._ray.kill(actor)
        with contextlib.suppress(Exception):
            self._remove_pg(self._pg)


def connect(ray, address: str | None) -> None:
    """Join the cluster at ``address`` (``ray start --head`` prints it), or start a local
    one; a cluster that cannot be reached is a ValueError naming the flag, within seconds
    (Ray itself retries for minutes)."""
    if ray.is_initialized():
        return
    if address is None:
        ray.init(log_to_driver=False, include_dashboard=False)
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address != "auto":
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"--ray-address {address}: no Ray cluster answers there ({exc}); start one "
                "with `ray start --head` and pass the address it prints"
            ) from None
    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as exc:
        raise ValueError(
            f"--ray-address {address}: cannot connect to a Ray cluster there ({exc})"
        ) from None
