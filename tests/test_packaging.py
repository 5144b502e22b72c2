"""The built distribution works on its own: sdist -> wheel -> a fresh virtual environment -> import every module, fit.

The source tree is copied to ``tmp_path`` first, so concurrent runs never share a ``build/`` directory and the
checkout's own files cannot leak into the result. The fresh environment reuses the installed torch/lightning (a
``.pth`` line pointing at this interpreter's site-packages; the checkout's editable install is not processed from
there), and the wheel is installed with ``--no-deps``. So a module or data file missing from the sdist or the wheel
makes the import walk or the fit fail here, while the test stays offline and takes seconds, not a torch download.
``make wheel-check`` runs this file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_TREE = ("lightning_gradguard", "pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "MANIFEST.in")

_SMOKE = r"""
import importlib, pkgutil, sys
from pathlib import Path
import lightning_gradguard as gg
here = Path(gg.__file__).resolve()
assert Path(sys.prefix).resolve() in here.parents, f"imported from {here}, not from the fresh environment"
for name in gg.__all__:
    getattr(gg, name)
for mod in pkgutil.walk_packages(gg.__path__, "lightning_gradguard."):
    importlib.import_module(mod.name)
assert (here.parent / "py.typed").is_file(), "py.typed missing from the wheel"

import torch
import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
x = torch.randn(64, 4)
y = x.sum(1, keepdim=True)

class M(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
    def training_step(self, batch, i):
        loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
        return loss * float("nan") if self.global_step == 5 else loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

guard = gg.NaNGuard(action="skip")
trainer = pl.Trainer(max_steps=12, callbacks=[gg.AdaptiveGradientClipping("zscore"), guard], logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(M(), DataLoader(TensorDataset(x, y), batch_size=8))
assert trainer.global_step == 12
assert len(guard.events) == 1, guard.events  # the NaN step, skipped
assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())

model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
plain = gg.GradGuard(model, opt, action="skip")
for step in range(12):
    loss = torch.nn.functional.mse_loss(model(x[:8]), y[:8]) * (float("nan") if step == 5 else 1.0)
    loss.backward()
    if plain.before_step(loss):
        opt.step()
    plain.after_step()
    opt.zero_grad()
assert [e["step"] for e in plain.events] == [5], plain.events
print("SMOKE OK", gg.__version__)
"""


def _run(cmd: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _copy_tree(dst: Path) -> None:
    for name in _TREE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dst / name)


@pytest.mark.slow
def test_sdist_and_wheel_install_into_a_clean_environment(tmp_path: Path) -> None:
    pytest.importorskip("build", reason="install the dev extra: pip install -e '.[dev]'")
    src = tmp_path / "src"
    src.mkdir()
    _copy_tree(src)
    dist = tmp_path / "dist"
    # sdist first, then the wheel built from the unpacked sdist (build's default), so a file left out of the sdist
    # is also missing from the wheel
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)], cwd=tmp_path)
    wheels = list(dist.glob("*.whl"))
    sdists = list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1
    assert len(sdists) == 1

    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(wheels[0]) as whl:
        metadata = whl.read(meta).decode()
    assert "Name: lightning-gradguard" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "LICENSE is not shipped in the wheel"
    assert "lightning_gradguard/py.typed" in names
    shipped = {n for n in names if n.startswith("lightning_gradguard/") and n.endswith(".py")}
    in_tree = {p.relative_to(src).as_posix() for p in (src / "lightning_gradguard").rglob("*.py")}
    assert in_tree <= shipped, f"modules missing from the wheel: {sorted(in_tree - shipped)}"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    fresh_site = Path(
        _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).stdout.strip()
    )
    # reuse torch, lightning & co. from this interpreter; a plain path line does not process that dir's .pth files,
    # so the checkout's editable install stays invisible
    (fresh_site / "_reuse_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheels[0])],
        cwd=tmp_path,
    )
    assert (venv / "bin" / "gradguard").exists(), "the gradguard console script was not installed"
    out = _run([str(py), "-c", _SMOKE], cwd=tmp_path)
    assert "SMOKE OK" in out.stdout


@pytest.mark.slow
def test_api_reference_builds_without_warnings(tmp_path: Path) -> None:
    pytest.importorskip("pdoc", reason="install the dev extra: pip install -e '.[dev]'")
    out = tmp_path / "api"
    proc = _run([sys.executable, str(ROOT / "docs" / "api" / "build.py"), "--out", str(out)], cwd=ROOT)
    assert "API reference:" in proc.stdout
    assert "docs warning" not in proc.stderr
    top = (out / "lightning_gradguard.html").read_text()
    public = ("NaNGuard", "AdaptiveGradientClipping", "GradientNormMonitor", "DivergenceError", "GradGuard")
    for name in (*public, "ZScoreClipper", "make_clipper", "GuardDecision", "GuardEvent"):
        assert f'id="{name}"' in top, f"{name} has no entry in the API reference"
    core = out / "lightning_gradguard" / "core"
    for layer in ("measure", "clip", "guard", "recover", "engine"):  # each layer's public surface has a page
        assert (core / f"{layer}.html").is_file(), layer
    assert not list(core.rglob("_*.html")), "private (plumbing) modules must not get pages"
