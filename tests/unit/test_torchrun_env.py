"""`--launcher torchrun`: the rank, world and rendezvous come from torchrun's or srun's
variables, and their absence is a clear error naming what to set."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.training.torchrun import export_rank_env, rank_env

RENDEZVOUS = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def test_torchrun_variables() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", **RENDEZVOUS}
    ranks = rank_env(env)
    assert (ranks.rank, ranks.world_size, ranks.local_rank) == (3, 4, 1)
    assert (ranks.master_addr, ranks.master_port, ranks.source) == ("10.0.0.1", 29500, "torchrun")
    assert ranks.restarts == 0
    assert rank_env({**env, "TORCHELASTIC_RESTART_COUNT": "2"}).restarts == 2
    # torchrun inside a Slurm allocation: torchrun's variables describe this process
    assert rank_env({**env, "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}).rank == 3


def test_srun_variables_become_torch_env_variables() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_RESTART_COUNT": "1",
        **RENDEZVOUS,
    }
    ranks = rank_env(env)
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.source) == (5, 8, 1, "srun")
    assert ranks.restarts == 1
    out: dict[str, str] = {}
    export_rank_env(ranks, out)
    assert out == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }


def test_outside_torchrun_or_srun_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"neither torchrun's RANK.*torchrun --nnodes") as e:
        rank_env({"PATH": "/usr/bin"})
    assert "--launcher local" in str(e.value)
    with pytest.raises(ValueError, match=r"\(srun\): MASTER_ADDR, MASTER_PORT not set.*scontrol"):
        rank_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"})
    with pytest.raises(ValueError, match=r"\(torchrun\): LOCAL_RANK not set"):
        rank_env({"RANK": "0", "WORLD_SIZE": "2", **RENDEZVOUS})
    with pytest.raises(ValueError, match=r"RANK=2 is not in 0\.\.WORLD_SIZE-1=1"):
        rank_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", **RENDEZVOUS})
    with pytest.raises(ValueError, match=r"MASTER_PORT='x' is not an integer"):
        rank_env(
            {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", **RENDEZVOUS, "MASTER_PORT": "x"}
        )


def test_nodes_sharing_a_staging_folder_are_told_to_set_their_own(tmp_path: Path) -> None:
    """Each node's first rank marks the staging folder it staged; once all have, a folder
    with another node's mark is shared, whichever node marked it last."""
    from kiln.training.remote_run import check_node_staging, mark_node_staging

    own = [tmp_path / "node0", tmp_path / "node1"]
    for rank, folder in zip((0, 1), own, strict=True):
        mark_node_staging(folder, rank)
    for rank, folder in zip((0, 1), own, strict=True):
        check_node_staging(folder, rank)
    shared = tmp_path / "shared"
    mark_node_staging(shared, 0)
    mark_node_staging(shared, 1)  # clears the earlier launch's marks, so rank 0's too
    with pytest.raises(ValueError, match=r"node of rank1.*set KILN_STAGING_DIR"):
        check_node_staging(shared, 0)
    mark_node_staging(shared, 0)  # a later launch with one node: its own mark only
    check_node_staging(shared, 0)


def _world_env(rank: int, port: int, **extra: str) -> dict[str, str]:
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": "3",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "GROUP_WORLD_SIZE": "3",
        "TORCHELASTIC_RUN_ID": "job",
        "TORCHELASTIC_RESTART_COUNT": str(rank),  # torchrun counts restarts per node
    }
    return {**env, **extra}


def test_the_lead_of_a_torchrun_world_leaves_after_the_others() -> None:
    """torchrun's agents must reach their exit barrier after node 0's store has everyone
    (pytorch/pytorch#69520): the lead's process waits for the others' word, on a real
    TCPStore as torchrun's agent serves it."""
    import threading
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from kiln.training.launch import free_port
    from kiln.training.torchrun import leave_in_order

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10))
    endings = [leave_in_order(_world_env(r, port)) for r in (1, 2)]
    assert all(callable(e) for e in endings)
    done: list[float] = []
    lead = threading.Thread(
        target=lambda: done.append(
            leave_in_order(_world_env(0, port), timeout_s=20, grace_s=0.3) or time.monotonic()
        )
    )
    lead.start()
    time.sleep(0.5)
    endings[0]()  # type: ignore[misc]
    time.sleep(0.5)
    assert not done  # one rank is still running
    last = time.monotonic()
    endings[1]()  # type: ignore[misc]
    lead.join(timeout=10)
    assert done and done[0] - last >= 0.3  # after the last word, and the grace
    assert server.check(["kiln/leave/job/1", "kiln/leave/job/2"])


def test_the_lead_gives_up_waiting_and_says_so_never_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from kiln.training.launch import free_port
    from kiln.training.torchrun import leave_in_order

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10))
    said: list[str] = []
    start = time.monotonic()
    assert leave_in_order(_world_env(0, port), timeout_s=3.5, grace_s=0, say=said.append) is None
    assert 3.5 <= time.monotonic() - start < 8
    assert said == ["waiting for the other ranks' processes to end"]
    del server
    # nobody serving the store: no error, and no longer than the connection's timeout
    monkeypatch.setattr("kiln.training.torchrun.CONNECT_TIMEOUT_S", 0.5)
    gone = _world_env(0, free_port())
    assert leave_in_order(gone, timeout_s=30, grace_s=0) is None
    assert leave_in_order(_world_env(1, free_port())) is not None  # its word is best-effort
    leave_in_order(_world_env(1, free_port()))()  # type: ignore[misc]


@pytest.mark.parametrize(
    "change",
    [
        {"TORCHELASTIC_USE_AGENT_STORE": "False"},  # not torchrun's agent store
        {"GROUP_WORLD_SIZE": "1"},  # one node: its agent's barrier waits for nobody
        {"GROUP_WORLD_SIZE": "x"},
    ],
)
def test_leaving_in_order_is_only_for_multinode_torchrun(change: dict[str, str]) -> None:
    from kiln.training.torchrun import leave_in_order

    assert leave_in_order(_world_env(1, 1, **change)) is None
    assert leave_in_order(_world_env(0, 1, **change), timeout_s=30) is None
    srun = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}
    srun |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "GROUP_WORLD_SIZE": "2"}
    assert leave_in_order({**srun, "TORCHELASTIC_USE_AGENT_STORE": "True"}) is None
