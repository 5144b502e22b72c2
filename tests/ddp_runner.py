"""Run a 2-process CPU DDP script in a subprocess: ``strategy="ddp"`` inside pytest would re-run pytest in rank 1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: what a rendezvous says when another process took the port between free_port() and the bind (a race with any
#: process on the machine, not a failure of the code under test)
PORT_TAKEN = ("EADDRINUSE", "Address already in use", "address already in use")


def port_was_taken(proc: subprocess.CompletedProcess[str]) -> bool:
    return proc.returncode != 0 and any(m in proc.stderr + proc.stdout for m in PORT_TAKEN)


def run_on_free_port(
    command: Callable[[int], list[str]], env: dict[str, str], timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``command(port)`` with ``MASTER_PORT=port`` for a free port; a port taken by another process before the
    rendezvous bound it is retried with a new one (twice)."""
    for _ in range(3):
        port = free_port()
        proc = subprocess.run(
            command(port), capture_output=True, text=True, timeout=timeout, env={**env, "MASTER_PORT": str(port)},
            cwd=cwd,
        )  # fmt: skip
        if not port_was_taken(proc):
            break
    return proc


def launcher_env() -> dict[str, str]:
    """This process's environment without a launcher's rank variables, one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def run_ddp_script(
    script: Path, out_dir: Path, timeout: float = 200, args: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``script out_dir [args...]`` with a clean launcher environment and a free MASTER_PORT; a hang becomes a
    timeout."""
    return run_on_free_port(
        lambda _port: [sys.executable, str(script), str(out_dir), *(args or [])], launcher_env(), timeout
    )


def leave_process_group(rank: int, world_size: int, out_dir: str | Path, timeout: float = 60.0) -> None:
    """End an ``mp.spawn`` worker without gloo's teardown race; call it last, after the results are written.

    Every rank meets a barrier and destroys the group. Rank 0 hosts the rendezvous store: if it is gone while
    another rank still tears its group down, that rank aborts at exit ("terminate called without an active
    exception", process exit by SIGABRT) after its work is done, now and then under load (CI with the suite's
    workers and two ranks on two cores). So the other ranks leave a marker file and exit at once, and rank 0 waits
    for their markers before it exits. Every rank ends with ``os._exit(0)``: no interpreter teardown, whose C++
    destructors are where the abort happens.
    """
    import time

    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    if rank:
        Path(out_dir, f".left{rank}").touch()
        os._exit(0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(Path(out_dir, f".left{r}").exists() for r in range(1, world_size)):
        time.sleep(0.05)
    os._exit(0)


def end_distributed(out_dir: str | Path) -> None:
    """The last call of a Lightning-launched 2-process script: if a process group is still up (Lightning keeps its
    group after a fit), leave it through :func:`leave_process_group`; a bare ``destroy_process_group()`` at exit
    aborted rank 0 of a finished run in CI ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        leave_process_group(dist.get_rank(), dist.get_world_size(), out_dir)
