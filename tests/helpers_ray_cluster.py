"""A real two-node Ray cluster on this machine, listening on 127.0.0.1 only.

The head is ``ray start --head --block`` on 127.0.0.1. The worker node is this module run
as a script (``python -m tests.helpers_ray_cluster --address HEAD ...``): it makes the call
``ray start --address ... --block`` makes, ``ray._private.node.Node(params, head=False)``,
and blocks until SIGTERM. Why not ``ray start --address`` itself: it refuses to join a
cluster unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``, and that setting makes it rewrite a
127.0.0.1 node address into the machine's routable IP and bind its raylet and agents to
every interface (0.0.0.0 / ::); nodes on another loopback address (127.0.0.2) also bind to
every interface. Left at 127.0.0.1, both nodes' processes listen on loopback only (the
tests check it). Each node has `NODE_CPUS` CPUs (room for two 1-CPU workers, so only a
placement strategy puts them on different nodes) and a custom resource naming it
(``kiln_node_a`` on the head, ``kiln_node_b`` on the worker node).

Each node runs in a session of its own and is ended by its pid. The cluster has its own
temp dir (removed by `stop`), ports and auth token (``RAY_AUTH_MODE=token`` with
``RAY_AUTH_TOKEN``): `LoopbackCluster.env` is the environment a driver needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from kiln.training.launch import free_port

__all__ = ["LOOPBACK", "NODE_CPUS", "LoopbackCluster"]

LOOPBACK = "127.0.0.1"
NODE_CPUS = 2
RAY = str(Path(sys.executable).with_name("ray"))

_NODES_SCRIPT = """
import json, sys, time
import ray
from kiln.platform.ray_cluster import start_ray
start_ray(sys.argv[1])
deadline = time.monotonic() + float(sys.argv[3])
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= int(sys.argv[2]) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print("NODES", json.dumps([
    {"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]}
    for n in nodes
]))
"""


class LoopbackCluster:
    """Head + one worker node; `start` returns once both are up, `stop` ends both."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.dashboard_port = free_port()
        #: the head's dashboard, where Ray Jobs are submitted (`kiln submit --address`)
        self.dashboard_url = f"http://{LOOPBACK}:{self.dashboard_port}"
        self.env = dict(
            os.environ,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(32),
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        # short: Ray's unix sockets live under it (paths are limited to 107 bytes)
        self.temp = Path(tempfile.mkdtemp(prefix="kiln-ray-"))

    def _start_node(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the node
        self.procs.append(
            subprocess.Popen(
                cmd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    def start(self, timeout_s: float = 240.0) -> list[dict[str, Any]]:
        """Start both nodes; returns the alive nodes (node_id, ip, resources)."""
        temp = str(self.temp)
        head = [RAY, "start", "--head", "--block", "--disable-usage-stats"]
        head += [f"--node-ip-address={LOOPBACK}", f"--port={self.port}", f"--num-cpus={NODE_CPUS}"]
        head += ['--resources={"kiln_node_a": 1}', f"--temp-dir={temp}"]
        # Ray Train's controller polls the dashboard's State API
        head += ["--include-dashboard=true", f"--dashboard-host={LOOPBACK}"]
        head += [
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        ]
        head += [f"--dashboard-agent-listen-port={free_port()}"]
        deadline = time.monotonic() + timeout_s
        # the worker node joins once the head is registered (it gives up on a GCS that
        # knows no head node yet, which on a loaded machine can take a minute)
        self._start_until_seen("head", head, 1, deadline)
        worker = [sys.executable, "-m", "tests.helpers_ray_cluster", self.address, f"{temp}/w"]
        return self._start_until_seen("worker", [*worker, '{"kiln_node_b": 1}'], 2, deadline)

    def _start_until_seen(
        self, name: str, cmd: list[str], count: int, deadline: float, tries: int = 3
    ) -> list[dict[str, Any]]:
        """Start node `name` and wait until a driver sees `count` alive nodes. A Ray node
        gives its raylet a hard-coded 30 s to register and exits when that passes, which
        happens on a loaded machine: a node that exited is started again (`tries` times)."""
        for _ in range(tries):
            self._start_node(name, cmd)
            proc = self.procs[-1]
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    nodes = self.nodes(count, 30.0)
                except (RuntimeError, subprocess.TimeoutExpired):
                    nodes = []  # no head yet: a driver cannot connect
                if len(nodes) >= count:
                    return nodes
                time.sleep(2)
            if proc.poll() is None:
                break  # past the deadline
            self.procs.pop()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # what it had started
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log"))
        )
        raise RuntimeError(f"the 2-node Ray cluster did not come up ({name}):\n{logs}")

    def nodes(self, wait_for: int = 0, timeout_s: float = 0.0) -> list[dict[str, Any]]:
        """The alive nodes, seen by a driver (waits up to `timeout_s` for `wait_for`)."""
        out = subprocess.run(
            [sys.executable, "-c", _NODES_SCRIPT, self.address, str(wait_for), str(timeout_s)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s + 60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"could not list the cluster's nodes:\n{out.stderr[-3000:]}")
        # Ray may print other processes' logs to a driver's stdout: take the marked line
        line = next(ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("NODES "))
        nodes: list[dict[str, Any]] = json.loads(line.removeprefix("NODES "))
        return nodes

    def listening_addresses(self) -> set[str]:
        """Every address a process of either node listens on."""
        pids: set[int] = set()
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                pids |= {c.pid for c in psutil.Process(p.pid).children(recursive=True)} | {p.pid}
        return {
            c.laddr.ip
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids and c.laddr
        }

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM each node (worker first; `ray start --block` then stops its own
        processes), SIGKILL its session if it has not exited within `grace_s`. Idempotent."""
        if not self.procs:
            return
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()
        time.sleep(1)  # let raylets reap their workers
        shutil.rmtree(self.temp, ignore_errors=True)


def _worker_node(address: str, temp_dir: str, resources: str) -> None:
    """Join the cluster at `address` as a node on 127.0.0.1; block until SIGTERM, then
    stop the node's processes."""
    import ray._private.node
    from ray._private.parameter import RayParams

    params = RayParams(
        gcs_address=address,
        node_ip_address=LOOPBACK,
        num_cpus=NODE_CPUS,
        resources=json.loads(resources),
        temp_dir=temp_dir,
        include_log_monitor=True,  # its own temp dir: the head's monitor does not see its logs
        node_manager_port=0,
        dashboard_agent_listen_port=free_port(),
        min_worker_port=0,
        max_worker_port=0,
    )
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    print(f"worker node on {LOOPBACK} joined {address}", flush=True)
    while not stop:
        time.sleep(0.2)
    node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)


if __name__ == "__main__":
    _worker_node(*sys.argv[1:4])
