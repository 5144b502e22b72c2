"""A fit with the three callbacks and a ModelCheckpoint every 2 steps, SIGKILLed halfway through writing the
checkpoint of step ``kill_at`` (the process dies inside the file write, as on a node failure or an OOM kill).

Run by tests/compat/test_faults.py in a subprocess. Argument: the checkpoint directory.
"""

import os
import signal
import sys
from pathlib import Path

import fsspec.implementations.local as fs_local
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.compat.common import build_all, seeded  # noqa: E402
from tests.models import make_trainer  # noqa: E402

KILL_AT = 6
_armed = {"on": False}
_real_write = fs_local.LocalFileOpener.write


def _dying_write(self, data, *args, **kwargs):
    if _armed["on"]:
        _real_write(self, data[: len(data) // 2])  # half of the checkpoint reaches the disk ...
        self.f.flush()
        os.fsync(self.f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies mid-write
    return _real_write(self, data, *args, **kwargs)


fs_local.LocalFileOpener.write = _dying_write


class ArmAt(Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step == KILL_AT:
            _armed["on"] = True


def main(ckpt_dir: str) -> None:
    torch.set_num_threads(1)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1, save_last=True)
    callbacks = build_all(guard={"action": "rollback", "snapshot": "checkpoint", "snapshot_confirm_steps": 1})
    trainer = make_trainer(ckpt_dir, [*callbacks, ArmAt(), ckpt], max_steps=12, enable_checkpointing=True, logger=False)
    trainer.fit(seeded())
    print("NOT KILLED")


if __name__ == "__main__":
    main(sys.argv[1])
