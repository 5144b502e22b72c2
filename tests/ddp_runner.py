"""Run a 2-process CPU DDP script in a subprocess: ``strategy="ddp"`` inside pytest would re-run pytest in rank 1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ddp_script(
    script: Path, out_dir: Path, timeout: float = 200, args: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``script out_dir [args...]`` with a clean launcher environment and a free MASTER_PORT; a hang becomes a
    timeout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(script), str(out_dir), *(args or [])],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
