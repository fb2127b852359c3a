"""Real servers for the test suite, each on free loopback ports in a temp dir of its own.

No Docker and no system services: every server is a child process in its own process group,
started once per test session by the fixtures in ``tests/conftest.py`` and killed with its whole
group at the end. A launcher that cannot start its server raises ``ServerUnavailable`` with the
reason and the tail of the server's log; the fixtures turn that into a skip locally and into a
failure under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import quote

LOOPBACK = "127.0.0.1"


class ServerUnavailable(Exception):
    """A server binary is missing, or its server failed or was too slow to start."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, or a note that there is none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or f"(empty log at {path})"


def find_binary(name: str, *preferred: Path) -> str:
    """The first existing path among ``preferred``, else ``name`` on PATH."""
    for path in preferred:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found is None:
        raise ServerUnavailable(
            f"{name} not found (install it with: bash scripts/bootstrap.sh --servers)"
        )
    return found


def venv_binary(name: str) -> str:
    """A console script installed next to the running interpreter (the project's venv)."""
    return find_binary(name, Path(sys.executable).parent / name)


# The direct child of pytest, sharing the server's process group: it starts the server and,
# if pytest dies without tearing down (killed, timed out), sees its stdin pipe close and kills
# the whole group, so no server outlives the test run. SIGTERM or SIGUSR1 sent to the group is
# meant for the server; the guard only waits for the server and exits with its status.
_GUARD = """
import os, signal, subprocess, sys, threading
signal.signal(signal.SIGTERM, lambda *_: None)
signal.signal(signal.SIGUSR1, lambda *_: None)
server = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
def orphaned():
    sys.stdin.buffer.read()
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=orphaned, daemon=True).start()
code = server.wait()
sys.exit(code if code >= 0 else 128 - code)
"""


class Process:
    """A child process in a new process group, writing to a log file; ``stop`` kills the group.

    The group dies with pytest even when pytest is killed before its teardown runs.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", _GUARD, *argv],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """The process group id (the guard's pid; the server runs as its child)."""
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the whole process group (the guard ignores SIGTERM and SIGUSR1)."""
        _signal_group(self.pid, sig)

    def wait_until(
        self,
        ready: Callable[[], bool],
        timeout: float,
        what: str,
        on_timeout: Callable[[], None] | None = None,
    ) -> None:
        """Poll ``ready`` until true; on exit or timeout stop the group and raise with the log.

        ``on_timeout`` runs before the stop, e.g. to make the process dump its stacks.
        """
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.alive():
                code = self.popen.returncode
                self.stop()
                raise ServerUnavailable(
                    f"{self.name} exited with code {code} before {what}; "
                    f"log tail ({self.log}):\n{log_tail(self.log)}"
                )
            if time.monotonic() > deadline:
                if on_timeout is not None:
                    on_timeout()
                self.stop()
                raise ServerUnavailable(
                    f"{self.name} not {what} after {timeout:.0f}s; "
                    f"log tail ({self.log}):\n{log_tail(self.log)}"
                )
            time.sleep(0.1)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left after ``grace``."""
        _signal_group(self.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace)
        _signal_group(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        if self.popen.stdin is not None:
            self.popen.stdin.close()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _resp(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """Send one Redis command over a raw socket and return the first reply line."""
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(payload)
        return sock.recv(4096).split(b"\r\n", 1)[0]


class RedisServer:
    """``redis-server`` without persistence on a free port; ``.url(db)`` addresses one db."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / "redis.log"
        self._process: Process | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://{LOOPBACK}:{self.port}/{db}"

    def start(self, timeout: float = 30.0) -> None:
        argv = [
            find_binary("redis-server"),
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--protected-mode", "yes",
        ]  # fmt: skip
        self._process = Process("redis-server", argv, self.log)
        self._process.wait_until(self._pong, timeout, "answering PING")

    def _pong(self) -> bool:
        try:
            return _resp(self.port, "PING") == b"+PONG"
        except OSError:
            return False

    def flushall(self) -> None:
        """Empty every db (cheap; the ``redis_url`` fixture does it before each test)."""
        reply = _resp(self.port, "FLUSHALL")
        if reply != b"+OK":
            raise RuntimeError(f"FLUSHALL answered {reply!r}")

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None

    def restart(self) -> None:
        """Stop and start again on the same port (all data is lost: there is no persistence)."""
        self.stop()
        self.start()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server stopped with SIGSTOP (connections stay open, nothing answers) until the
        block ends, then resumed."""
        assert self._process is not None, "redis-server is not running"
        _signal_group(self._process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            _signal_group(self._process.pid, signal.SIGCONT)

    def running(self) -> bool:
        return self._process is not None and self._process.alive()

    close = stop


RABBITMQ_SBIN = Path("/usr/lib/rabbitmq/bin")  # Debian's scripts that do not `su rabbitmq`


class RabbitMQServer:
    """A private RabbitMQ node (own epmd, cookie, data and log dirs) on free loopback ports.

    ``.url`` is the default vhost; ``add_vhost()`` gives a fresh, isolated one. ``restart()``
    keeps port and data (vhosts, durable queues, persistent messages survive it).
    """

    def __init__(self, workdir: Path, config: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.node = f"sqtest-{os.getpid()}-{secrets.token_hex(3)}@localhost"
        self.log = workdir / "rabbitmq-server.log"
        self.config = {"listeners.tcp.default": f"{LOOPBACK}:{self.port}", **(config or {})}
        self._epmd_port = free_port()
        self._dist_port = free_port()
        self._env = self._environment()
        self._epmd: Process | None = None
        self._server: Process | None = None

    @property
    def url(self) -> str:
        return self.vhost_url("/")

    def vhost_url(self, vhost: str) -> str:
        return f"amqp://guest:guest@{LOOPBACK}:{self.port}/{quote(vhost, safe='')}"

    def _environment(self) -> dict[str, str]:
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16))
            cookie.chmod(0o400)
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq-env.conf").write_text("")
        conf = "".join(f"{key} = {value}\n" for key, value in self.config.items())
        (self.workdir / "rabbitmq.conf").write_text(conf)
        ctl_port = free_port()
        return {
            **os.environ,
            "HOME": str(home),
            "ERL_EPMD_ADDRESS": LOOPBACK,
            "ERL_EPMD_PORT": str(self._epmd_port),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self._dist_port),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(ctl_port),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(ctl_port + 100),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.workdir / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(self.workdir / "rabbitmq.pid"),
        }

    def start(self, timeout: float = 120.0) -> None:
        server = find_binary("rabbitmq-server", RABBITMQ_SBIN / "rabbitmq-server")
        if self._epmd is None or not self._epmd.alive():
            epmd = find_binary("epmd", Path("/usr/bin/epmd"))
            argv = [epmd, "-port", str(self._epmd_port), "-address", LOOPBACK]
            self._epmd = Process("epmd", argv, self.workdir / "epmd.log", env=self._env)
            self._epmd.wait_until(lambda: port_open(self._epmd_port), 30, "listening")
        self._server = Process("rabbitmq-server", [server], self.log, env=self._env)
        started = time.monotonic()
        self._server.wait_until(lambda: port_open(self.port), timeout, "accepting AMQP")
        remaining = max(10.0, timeout - (time.monotonic() - started))
        self._server.wait_until(self._booted, remaining, "booted (rabbitmqctl await_startup)")

    def _booted(self) -> bool:
        try:
            self.ctl("await_startup", "--timeout", "10", timeout=30)
        except RuntimeError:
            return False
        return True

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n NODE *args`` against this node; its stdout, or RuntimeError."""
        ctl = find_binary("rabbitmqctl", RABBITMQ_SBIN / "rabbitmqctl")
        argv = [ctl, "-q", "-n", self.node, *args]
        try:
            done = subprocess.run(
                argv, env=self._env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} timed out after {timeout}s") from exc
        if done.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} exited {done.returncode}:\n"
                f"{done.stdout}\n{done.stderr}"
            )
        return done.stdout

    def add_vhost(self) -> str:
        """Create a fresh vhost that guest may use fully; returns its name."""
        vhost = f"t-{secrets.token_hex(6)}"
        permission = {"user": "guest", "vhost": vhost, "configure": ".*", "write": ".*"}
        definitions = {"vhosts": [{"name": vhost}], "permissions": [{**permission, "read": ".*"}]}
        path = self.workdir / f"{vhost}.json"
        path.write_text(json.dumps(definitions))
        try:
            self.ctl("import_definitions", str(path))  # one CLI round trip instead of two
        finally:
            path.unlink()
        return vhost

    def delete_vhost(self, vhost: str) -> None:
        """Delete a vhost with everything in it (its connections are closed by the broker)."""
        self.ctl("delete_vhost", vhost)

    def set_consumer_timeout(self, milliseconds: int | None, check_every_ms: int = 500) -> None:
        """Set the node-wide ``consumer_timeout`` for channels opened afterwards; ``None``
        restores the defaults. Channels check it every ``check_every_ms`` (the default tick,
        60 s, is too slow for tests). The node is shared: restore it when the test ends."""
        if milliseconds is None:
            erlang = "application:unset_env(rabbit, consumer_timeout), " + (
                "application:set_env(rabbit, channel_tick_interval, 60000)."
            )
        else:
            erlang = (
                f"application:set_env(rabbit, consumer_timeout, {int(milliseconds)}), "
                f"application:set_env(rabbit, channel_tick_interval, {int(check_every_ms)})."
            )
        self.ctl("eval", erlang)

    def running(self) -> bool:
        return self._server is not None and self._server.alive()

    def stop(self) -> None:
        """Stop the node (gracefully if it answers, then kill its process group)."""
        if self._server is None:
            return
        if self._server.alive():
            with contextlib.suppress(RuntimeError):
                self.ctl("stop", timeout=30)
        self._server.stop()
        self._server = None

    def restart(self) -> None:
        """Stop and start again on the same port with the same data (connection-loss tests)."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the node and its private epmd."""
        self.stop()
        if self._epmd is not None:
            self._epmd.stop()
            self._epmd = None


class SQSServer:
    """An SQS endpoint from ``moto_server``; ``.url`` is the broker URL, ``.reset()`` empties it."""

    region = "us-east-1"
    access_key = "testing"
    secret_key = "testing"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / "moto_server.log"
        self._process: Process | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"sqs://{self.access_key}:{self.secret_key}@{LOOPBACK}:{self.port}"

    def aws_environment(self) -> dict[str, str]:
        """The AWS variables the session runs with (clients need no other configuration)."""
        return {
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def start(self, timeout: float = 60.0) -> None:
        argv = [venv_binary("moto_server"), "-H", LOOPBACK, "-p", str(self.port)]
        env = {**os.environ, **self.aws_environment()}
        self._process = Process("moto_server", argv, self.log, env=env)
        self._process.wait_until(self._answers, timeout, "answering HTTP")

    def _answers(self) -> bool:
        try:
            self.reset()
        except OSError:
            return False
        return True

    def reset(self) -> None:
        """Forget every queue and message (moto's reset API)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()

    def running(self) -> bool:
        return self._process is not None and self._process.alive()

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None

    close = stop
