"""One local Ray cluster with Serve for the tests that need it (see ``ray_cluster`` fixture)."""

from __future__ import annotations

import contextlib
import gc
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import psutil

from tests.servers import LOOPBACK, ServerUnavailable, free_port, log_tail


class RayCluster:
    """A local Ray cluster started by ``ray.init`` in this process, with Serve on a free port.

    ``address="local"`` always starts a new cluster (never joins another one on the machine),
    in a short private temp dir (``.temp_dir``; its ``session_latest/logs`` has every log).
    """

    #: set for the session: no usage reporting, no auth token written to ~/.ray
    environment: ClassVar[Mapping[str, str]] = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }

    def __init__(self, num_cpus: int = 4) -> None:
        self.num_cpus = num_cpus
        self.http_port = free_port()
        self.temp_dir = Path(tempfile.mkdtemp(prefix="sqray-", dir="/tmp"))
        self.address = ""
        self._roots: list[psutil.Process] = []

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def log_dir(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    def start(self) -> None:
        try:
            import ray
            from ray import serve
        except ImportError as exc:
            raise ServerUnavailable(f"ray[serve] is not installed: {exc}") from exc
        before = {process.pid for process in _descendants()}
        try:
            context = ray.init(
                address="local",
                num_cpus=self.num_cpus,
                include_dashboard=False,
                object_store_memory=256 * 1024 * 1024,
                log_to_driver=False,
                _temp_dir=str(self.temp_dir),
            )
            self.address = context.address_info["gcs_address"]
            serve.start(http_options={"host": LOOPBACK, "port": self.http_port})
        except Exception as exc:
            self._roots = [p for p in _descendants() if p.pid not in before]
            tails = self._log_tails()
            self.stop()
            raise ServerUnavailable(f"Ray did not start: {exc!r}\n{tails}") from exc
        self._roots = [p for p in _descendants() if p.pid not in before]

    def _log_tails(self) -> str:
        logs = sorted(self.log_dir.glob("*.err")) + sorted(self.log_dir.glob("*.out"))
        return "\n".join(f"--- {path.name}:\n{log_tail(path, 10)}" for path in logs[:8])

    def stop(self) -> None:
        """Shut Serve and Ray down, kill any Ray process still alive, remove the temp dir."""
        ray_processes = _with_descendants(self._roots)  # workers and agents started since
        if "ray" in sys.modules:  # start() got as far as importing it
            import ray
            from ray import serve

            if ray.is_initialized():
                with contextlib.suppress(Exception):
                    serve.shutdown()
            with warnings.catch_warnings():
                # Ray drops its Popen handles while the processes are still exiting;
                # _reap below waits for them instead.
                warnings.simplefilter("ignore", ResourceWarning)
                ray.shutdown()  # also stops the processes of a half-started node
                gc.collect()
        _reap(ray_processes, grace=10.0)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _with_descendants(roots: list[psutil.Process]) -> list[psutil.Process]:
    """``roots`` that still run, with all their descendants (psutil guards against pid reuse)."""
    found = []
    for root in roots:
        with contextlib.suppress(psutil.Error):
            found += [root, *root.children(recursive=True)]
    return found


def _reap(processes: list[psutil.Process], grace: float) -> None:
    """Wait up to ``grace`` for ``processes`` to exit, then SIGKILL the survivors."""
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
