"""Stages that tests plug into plans (`plugins: [tests.helpers_stages]`): they prove a stage
can be added without touching the runner, and make workers crash or stall on purpose."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field

from kiln.contracts import StrictModel
from kiln.data_curation.stage import MapStage, register


class CrashOnceConfig(StrictModel):
    """`flag`: a file; the first task to find it missing creates it and SIGKILLs its worker."""

    flag: str


class CrashOnceStage(MapStage[CrashOnceConfig]):
    """Passes rows through unchanged, after killing its own worker process once."""

    name = "crash_once"
    config = CrashOnceConfig

    def apply(self, table: pa.Table, cfg: CrashOnceConfig, ctx: Any) -> pa.Table:
        flag = Path(cfg.flag)
        if not flag.exists():
            flag.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return table


class SlowConfig(StrictModel):
    seconds: float = Field(default=1.0, ge=0, description="sleep per batch")


class SlowStage(MapStage[SlowConfig]):
    """Passes rows through unchanged, slowly (so a test can kill the run mid-step)."""

    name = "slow"
    config = SlowConfig

    def apply(self, table: pa.Table, cfg: SlowConfig, ctx: Any) -> pa.Table:
        time.sleep(cfg.seconds)
        return table


register(CrashOnceStage())
register(SlowStage())
