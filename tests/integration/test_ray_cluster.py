"""Embedded Ray stays on loopback: the node IP and every listening socket are 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

from kiln.platform.ray_cluster import LOOPBACK, start_ray
from kiln.platform.ray_cluster import ray_session as kiln_ray_session


def _listening_addresses(pids: set[int]) -> set[str]:
    addrs = set()
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids and conn.laddr:
            addrs.add(conn.laddr.ip)
    return addrs


def _is_ray(p: psutil.Process) -> bool:
    try:
        return "ray" in " ".join(p.cmdline()).lower()
    except psutil.Error:
        return False


def test_embedded_ray_binds_loopback_only(ray_session: None) -> None:
    import ray

    assert ray.util.get_node_ip_address() == LOOPBACK
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {LOOPBACK}

    @ray.remote(num_cpus=0)
    def where() -> str:
        return ray.util.get_node_ip_address()

    assert ray.get(where.remote()) == LOOPBACK
    me = psutil.Process(os.getpid())
    # Ray's processes only: a training test's rank may still be exiting, with its torch
    # TCPStore socket (which torch binds to every interface) inherited by loader workers.
    pids = {p.pid for p in me.children(recursive=True) if _is_ray(p)} | {me.pid}
    addrs = _listening_addresses(pids)
    assert addrs, "Ray processes listen on nothing: the check would be vacuous"
    assert addrs <= {LOOPBACK, "::1", "::ffff:127.0.0.1"}, f"Ray listens beyond loopback: {addrs}"


def test_start_ray_leaves_a_running_ray_alone(ray_session: None) -> None:
    import ray

    with kiln_ray_session():
        assert start_ray() is False  # already up: joined, not restarted
    assert ray.is_initialized(), "a block that did not start Ray must not shut it down"


def test_no_address_means_a_private_ray_even_with_ray_address_set(tmp_path: Path) -> None:
    """RAY_ADDRESS (or another Ray on the machine) must not be joined when the recipe gives
    no address: the embedded Ray is started fresh, and kiln says which it did. The address
    here is a closed port, so joining it would fail. Also: kiln's SIGTERM handling
    survives `ray.init`, which installs Ray's own (a stack dump, then abort: a `kill` of
    `kiln train` on the Ray launcher ended with exit -6 and no `interrupted` record)."""
    code = (
        "import os, signal, time\n"
        "from kiln.platform import signals\n"
        "from kiln.platform.ray_cluster import start_ray; import ray\n"
        "signals.install()\n"
        "assert start_ray(num_cpus=1, dashboard=False)\n"
        "print('gcs', ray.get_runtime_context().gcs_address)\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(10)\n"
        "except KeyboardInterrupt:\n"
        "    print('sigterm handled', signals.terminated())\n"
        "ray.shutdown()\n"
    )
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[kiln] starting a private Ray on 127.0.0.1" in proc.stderr
    gcs = next(ln for ln in proc.stdout.splitlines() if ln.startswith("gcs "))
    assert gcs.split()[1].startswith("127.0.0.1:") and not gcs.endswith(":9")
    assert "sigterm handled True" in proc.stdout


_STOP_FIRST_RAYLET = """
import signal, threading, time
import psutil
from kiln.platform.ray_cluster import start_ray
me, stopped = psutil.Process(), []

def stop_first_raylet():
    while True:
        for p in me.children(recursive=True):
            try:
                if p.name() == "raylet":
                    p.send_signal(signal.SIGSTOP)  # it never registers with its GCS
                    stopped.append(p.pid)
                    return
            except psutil.Error:
                pass
        time.sleep(0.02)

threading.Thread(target=stop_first_raylet, daemon=True).start()
assert start_ray(num_cpus=1, dashboard=False)
import ray

@ray.remote(num_cpus=0)
def one():
    return 1

assert ray.get(one.remote()) == 1
names = [p.name() for p in me.children(recursive=True)]
print("stopped raylet exists", psutil.pid_exists(stopped[0]))
print("gcs servers", names.count("gcs_server"), "raylets", names.count("raylet"))
ray.shutdown()
"""


def test_a_start_that_misses_rays_deadline_is_made_once_more() -> None:
    """Ray gives its raylet 30 s to register with the GCS, then raises a bare Exception
    and leaves the processes it started running (`kiln train` printed Ray's traceback when
    a loaded 2-core machine missed it). Here the first raylet is stopped (SIGSTOP) as soon
    as it appears, so that start misses the deadline for real: kiln stops what it left and
    starts Ray once more, saying so, and the Ray it gets works."""
    proc = subprocess.run(
        [sys.executable, "-c", _STOP_FIRST_RAYLET], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Ray's processes did not come up within the 30 s Ray gives them" in proc.stderr
    assert "; starting it once more" in proc.stderr and "Traceback" not in proc.stderr
    assert "stopped raylet exists False" in proc.stdout  # the failed start's, killed
    assert "gcs servers 1 raylets 1" in proc.stdout, proc.stdout
