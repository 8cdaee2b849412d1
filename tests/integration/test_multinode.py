"""Multi-node training on one machine: the same recipe on two nodes gives the losses of the
2-rank run on one node (bitwise: CPU fp32, the same world size and threads per rank).

- Ray: a real two-node cluster on 127.0.0.1 (`ray start --head` plus a worker node with
  its own resources, see `tests.helpers_ray_cluster`; the session's `two_node_cluster`),
  `kiln train --address HEAD` with `resources.placement: strict_spread`, so each of the 2
  Ray Train workers runs on its own node (either node has room for both: it is the
  placement that separates them); where they ran is read back from the launch's attempts
  file and checked against the cluster.
- torchrun: two torchrun agents (``--nnodes 2 --nproc_per_node 1``, node ranks 0 and 1, the
  rendezvous on 127.0.0.1) each start one `kiln train --launcher torchrun` process; then
  two processes with srun's variables of a requeued job finish the run from its checkpoint.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.training.launch import ATTEMPTS_FILE, free_port
from tests.helpers_output import library_lines
from tests.helpers_ray_cluster import LoopbackCluster
from tests.helpers_training import run_world, short_run_config

pytestmark = pytest.mark.slow

KILN = [sys.executable, "-m", "kiln"]


def write_recipe(
    path: Path, dataset: str, run: Path, resources: dict[str, Any], **extra: Any
) -> Path:
    data = {
        "kind": "train",
        "name": path.stem,
        "run_dir": str(run),
        "resources": resources,
        **short_run_config(dataset).model_dump(mode="json"),
        **extra,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def losses(run: Path) -> list[float]:
    summary = json.loads((run / "train_summary.json").read_text())
    values: list[float] = summary["losses"]
    return values


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def test_ray_train_workers_on_two_nodes(
    two_node_cluster: tuple[LoopbackCluster, list[dict[str, Any]]],
    short_dataset: str,
    short_reference: list[float],
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    cluster, nodes = two_node_cluster
    node_of = {n["node_id"]: n["resources"] for n in nodes}
    assert len(node_of) == 2
    listening = cluster.listening_addresses()
    assert listening and all(map(is_loopback, listening)), listening
    recipe = write_recipe(
        tmp_path / "two_nodes.yaml",
        short_dataset,
        run,
        {"workers": 2, "cpus_per_worker": 1, "launcher": "ray", "placement": "strict_spread"},
    )
    proc = subprocess.run(
        [*KILN, "train", str(recipe), "--address", cluster.address],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "[kiln] 2 Ray Train workers on 2 nodes" in proc.stdout
    assert losses(run) == short_reference  # exact

    (attempts_file,) = (run / "ray_train").glob(f"*/{ATTEMPTS_FILE}")
    (attempt,) = [json.loads(line) for line in attempts_file.read_text().splitlines()]
    workers = sorted(attempt["workers"], key=lambda w: w["rank"])
    assert [w["rank"] for w in workers] == [0, 1]
    assert sorted(w["node_id"] for w in workers) == sorted(node_of)  # one rank per node
    placed = sorted(
        next(k for k in node_of[w["node_id"]] if k.startswith("kiln_node_")) for w in workers
    )
    assert placed == ["kiln_node_a", "kiln_node_b"]


def test_torchrun_two_nodes_then_a_requeued_srun_job(
    short_dataset: str, short_reference: list[float], tmp_path: Path
) -> None:
    """Steps 1..4 on two torchrun "nodes", then steps 5..6 by the same world started the way
    srun starts a requeued job (its environment set here: no Slurm on this machine)."""
    run = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "torchrun.yaml",
        short_dataset,
        run,
        {"workers": 1, "cpus_per_worker": 1, "launcher": "torchrun"},
    )
    port = free_port()
    train = [*KILN[1:], "train", str(recipe), "--launcher", "torchrun"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
    torchrun += ["--master_addr=127.0.0.1", f"--master_port={port}"]
    outs = run_world(
        [[*torchrun, f"--node_rank={n}", *train, "--set", "stop_after_step=4"] for n in (0, 1)],
        [dict(os.environ)] * 2,
        [tmp_path / f"torchrun{n}.log" for n in (0, 1)],
    )
    assert "[kiln] training clip-tiny" in outs[0] and "steps (this invocation)" in outs[0]
    assert "[kiln]" not in outs[1] and "steps (this invocation)" not in outs[1]  # rank 0 reports
    # what DeepSpeed / torch print in a rank goes to the rank's log file, not torchrun's output
    assert not library_lines(outs[0] + outs[1]), outs[0][-3000:] + outs[1][-3000:]
    assert "DeepSpeed" in (run / "logs" / "torchrun-rank1.log").read_text()
    assert losses(run) == short_reference[:4]  # exact
    assert json.loads((run / "status.json").read_text())["state"] == "stopped"
    recorded = yaml.safe_load((run / "recipe.yaml").read_text())["resources"]
    assert (recorded["launcher"], recorded["workers"]) == ("torchrun", 2)  # torchrun's world

    srun = {"SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_RESTART_COUNT": "1"}
    srun |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    outs = run_world(
        [[sys.executable, *train]] * 2,
        [dict(os.environ, **srun, SLURM_PROCID=str(task)) for task in (0, 1)],
        [tmp_path / f"srun{task}.log" for task in (0, 1)],
    )
    assert "[kiln] resumed from step_00000004" in outs[0]
    summary = json.loads((run / "train_summary.json").read_text())
    assert (summary["resumed_from"], summary["last_step"]) == (4, 6)
    assert losses(run) == short_reference[4:]  # exact
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["last_step"], status["restarts"]) == ("completed", 6, 1)


def test_torchrun_launcher_outside_torchrun_is_a_clear_error(
    short_dataset: str, tmp_path: Path
) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml", short_dataset, tmp_path / "run", {"launcher": "local"}
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    proc = subprocess.run(
        [*KILN, "train", str(recipe), "--launcher", "torchrun"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "kiln train: error: --launcher torchrun runs one rank per process" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_cli_launch_flags_are_recipe_fields(
    short_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln.platform.cli import main

    recipe = write_recipe(tmp_path / "r.yaml", short_dataset, tmp_path / "run", {})
    assert main(["train", str(recipe), "--max-restarts", "-1"]) == 2
    assert "'resources.max_restarts' = -1 is invalid" in capsys.readouterr().err
    assert (
        main(["train", str(recipe), "--launcher", "local", "--set", "resources.placement=spread"])
        == 2
    )
    assert "placement='spread' places Ray Train workers" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
