"""The README's TensorBoard pictures: which demo each shows, which view, what it depends on, and its stamp.

One place for what ``tools/tensorboard_screenshots.py`` makes and ``tests/test_readme_pictures.py`` checks (standard
library only: the test imports it without Chromium, TensorBoard or torch).

A picture is stale when what it shows may have changed since it was taken. Two stamps, written into each PNG as text
chunks by the screenshot tool, say what it was taken from:

- ``gradguard:stamp``: the demo command, the view (dashboard URL, viewer settings, window) and a SHA-256 of each
  source file the picture depends on (:data:`DEMO_SOURCES` + the picture's own ``sources``). Compared with the
  working tree by a fast test.
- ``gradguard:story``: what the guarded demo run did (its steps and each guard event's step, kind and LR after it).
  A ``slow`` test reruns the guarded demo and compares: a change of the guard's *behaviour* (where it acts, how it
  cuts the LR) makes the pictures stale without listing the whole core below.

The source lists are chosen narrow on purpose. Listed: what the demo trains and how (the settings, the examples,
``default_callbacks``) and the code that names, writes and draws what each view shows. Not listed: the clipping,
guard and recovery rules (their effect on the run is what the story stamp checks), the CLI, the report command,
docstrings elsewhere. Too broad a list and every commit invalidates the pictures; too narrow and they drift unseen.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMAGES = Path("docs") / "images"
#: the one command that regenerates the committed pictures (what a stale-picture failure tells you to run)
REGENERATE = "make pictures PICTURES_OUT=docs/images"
STAMP_KEY = "gradguard:stamp"
STORY_KEY = "gradguard:story"

#: TensorBoard's own viewer defaults (smoothing 0.6, outliers ignored): no URL parameter, nothing in local storage
DEFAULTS: Mapping[str, str] = {}
#: what the README recommends for scalar charts: smoothing 0 (a URL parameter), outliers kept (local storage)
RECOMMENDED = {"_ignoreYOutliers": "false"}


@dataclass(frozen=True)
class DemoRun:
    """One ``gradguard demo`` command line (without ``--logdir``, which the tool chooses)."""

    example: str
    both: bool = False
    quick: bool = False
    seed: int = 0

    @property
    def argv(self) -> list[str]:
        """The command, as a person types it."""
        args = ["gradguard", "demo", self.example]
        args += ["--both"] * self.both + ["--quick"] * self.quick
        return args + (["--seed", str(self.seed)] if self.seed else [])


#: the demos the pictures come from: the default demo (what ``make demo`` runs), and the deep CNN for the
#: gradient-flow picture (21 layers; the LSTM's three say little)
DEMO_RUNS: dict[str, DemoRun] = {"lstm": DemoRun("lstm", both=True), "cnn": DemoRun("cnn")}

#: what every picture of a demo depends on: the demo settings and run, the example it trains and the callbacks it adds
DEMO_SOURCES: dict[str, tuple[str, ...]] = {
    name: (
        "lightning_gradguard/demo.py",
        "lightning_gradguard/callbacks/default_callbacks.py",
        "lightning_gradguard/examples/data.py",
        "lightning_gradguard/examples/lstm.py" if name == "lstm" else "lightning_gradguard/examples/deep_cnn.py",
    )
    for name in DEMO_RUNS
}

_SCALARS = ("lightning_gradguard/core/engine/_scalars.py", "lightning_gradguard/callbacks/_log_writer.py")


@dataclass(frozen=True)
class Picture:
    """One README picture: a TensorBoard view of one demo's logs.

    Attributes:
        name: file name under ``docs/images``.
        demo: key of :data:`DEMO_RUNS`.
        fragment: TensorBoard's URL fragment: the dashboard and the settings it reads from the URL.
        local: settings the dashboards keep in local storage (empty: TensorBoard's defaults).
        window: Chromium's window (width, height); with ``actual_size``, the smallest one.
        require: (plugin, tag) that must be in the logs before the screenshot (else the page is empty).
        actual_size: tick the Images tab's *Show actual image size* (a card is otherwise 350 px wide); the window
            then grows to show the whole image at its size.
        sources: files (or glob patterns) drawing or naming what the view shows, besides :data:`DEMO_SOURCES`.
        shows: what a reader should see in it.
    """

    name: str
    demo: str
    fragment: str
    window: tuple[int, int]
    require: tuple[str, str]
    sources: tuple[str, ...]
    shows: str
    local: Mapping[str, str] = field(default_factory=dict)
    actual_size: bool = False

    def view(self) -> dict[str, Any]:
        """The view's part of the stamp."""
        return {
            "fragment": self.fragment,
            "local": dict(sorted(self.local.items())),
            "window": list(self.window),
            "actual_size": self.actual_size,
        }


PICTURES: tuple[Picture, ...] = (
    Picture(
        "tensorboard_overview.png",
        "lstm",
        "images&tagFilter=gradguard%2Foverview",
        (1280, 900),
        ("images", "gradguard/overview"),
        # the overview's drawing and the scalars it draws
        ("lightning_gradguard/overview.py", "lightning_gradguard/core/engine/_timeline.py", *_SCALARS),
        "the guarded LSTM run's overview figure at TensorBoard's default settings: the norm spike, the rollback and "
        "the LR cut, labelled",
        local=DEFAULTS,
        actual_size=True,
    ),
    Picture(
        "tensorboard_custom_scalars.png",
        "lstm",
        "custom_scalars&_smoothingWeight=0",
        (1280, 1150),
        ("scalars", "gradguard/clip_threshold_log10"),
        ("lightning_gradguard/callbacks/_tensorboard_layout.py", *_SCALARS),
        "one card per question (norm vs threshold, LR, loss, clipped/flagged counts, guard totals)",
        local=RECOMMENDED,
    ),
    Picture(
        "tensorboard_scalars.png",
        "lstm",
        "scalars&_smoothingWeight=0&tagFilter=gradguard%2F",
        (1280, 1100),
        ("scalars", "gradguard/grad_norm"),
        _SCALARS,
        "every gradguard/ tag in its own chart",
        local=RECOMMENDED,
    ),
    Picture(
        "tensorboard_histograms.png",
        "lstm",
        "histograms&tagFilter=gradguard%2F(update_ratio%7Clayer_grad_norms)%24",
        (1280, 900),
        ("histograms", "gradguard/update_ratio"),
        ("lightning_gradguard/callbacks/_monitor_capture.py",),
        "per-layer gradient norms and update ratios over the run",
    ),
    Picture(
        "tensorboard_images.png",
        "cnn",
        "images&tagFilter=gradient_flow",
        (1280, 900),
        ("images", "gradguard/gradient_flow"),
        ("lightning_gradguard/callbacks/_gradient_flow.py", "lightning_gradguard/callbacks/_monitor_capture.py"),
        "the deep CNN's gradient flow, one bar per layer",
    ),
    Picture(
        "tensorboard_text.png",
        "lstm",
        "text",
        (1280, 800),
        # the guard's event lines (core/engine/_engine.py's _TEXT_TAG; tests check the two agree)
        ("text", "gradguard/nan_guard_events"),
        ("lightning_gradguard/core/guard/_policy.py", "lightning_gradguard/callbacks/_monitor_state.py"),
        "the guard's event lines: the rollback, its cause and the LR scale",
    ),
)
BY_NAME = {p.name: p for p in PICTURES}


def source_files(picture: Picture, root: Path = ROOT) -> list[str]:
    """The files a picture depends on, relative to ``root`` (globs expanded), sorted.

    Raises:
        FileNotFoundError: a listed file, or a pattern that matches nothing (the list has rotted).
    """
    found: set[str] = set()
    for pattern in (*DEMO_SOURCES[picture.demo], *picture.sources):
        if any(c in pattern for c in "*?["):
            matches = [p for p in root.glob(pattern) if p.is_file()]
            if not matches:
                raise FileNotFoundError(f"{picture.name}: no file under {root} matches {pattern!r}")
            found.update(p.relative_to(root).as_posix() for p in matches)
        elif (root / pattern).is_file():
            found.add(pattern)
        else:
            raise FileNotFoundError(f"{picture.name}: source {pattern!r} is missing under {root}")
    return sorted(found)


def file_digest(path: Path) -> str:
    """SHA-256 of a text file with its line endings made ``\\n`` (a Windows checkout gives the same digest)."""
    return hashlib.sha256(path.read_bytes().replace(b"\r\n", b"\n")).hexdigest()


def stamp(picture: Picture, root: Path = ROOT) -> dict[str, Any]:
    """What ``picture`` shows, as it stands in ``root`` now: the demo command, the view and each source's digest."""
    return {
        "picture": picture.name,
        "command": DEMO_RUNS[picture.demo].argv,
        "view": picture.view(),
        "sources": {rel: file_digest(root / rel) for rel in source_files(picture, root)},
    }


def encode(value: Any) -> str:
    """A stamp as the text of a PNG chunk (ASCII JSON, keys sorted)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def story(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What the guarded runs of a demo did, from its results (``gradguard demo --json``, ``DemoResult.to_dict()``):
    per guarded run, the steps and each guard event as ``[step, kind, lr after it (two digits)]``.

    Example:
        >>> story([{"example": "lstm", "guarded": True, "steps": 700,
        ...         "events": [{"step": 7, "kind": "rollback", "lr": 0.030000001, "cause": "loss_divergence"}]}])
        [{'run': 'lstm_guarded', 'steps': 700, 'events': [[7, 'rollback', 0.03]]}]
    """
    return [
        {
            "run": f"{r['example']}_guarded",
            "steps": int(r["steps"]),
            "events": [[int(e["step"]), str(e["kind"]), _two_digits(float(e["lr"]))] for e in r.get("events", [])],
        }
        for r in results
        if r.get("guarded")
    ]


def _two_digits(x: float) -> float:
    return x if not math.isfinite(x) or x == 0 else float(f"{x:.2g}")


def read_chunks(png: Path) -> dict[str, str]:
    """The text chunks of a PNG (Pillow)."""
    from PIL import Image

    with Image.open(png) as img:
        return {str(k): str(v) for k, v in getattr(img, "text", {}).items()}


def stale_reasons(picture: Picture, png: Path, root: Path = ROOT) -> list[str]:
    """Why ``png`` no longer shows what ``picture`` shows from the sources under ``root`` (empty: it is current)."""
    if not png.is_file():
        return [f"{png} is missing"]
    text = read_chunks(png).get(STAMP_KEY)
    if text is None:
        return [f"{png.name} has no {STAMP_KEY!r} stamp (made by hand or by an older tool)"]
    try:
        old = json.loads(text)
    except ValueError:
        return [f"{png.name}: its {STAMP_KEY!r} stamp is not JSON"]
    new = stamp(picture, root)
    reasons = []
    if old.get("command") != new["command"]:
        made = " ".join(old.get("command") or ["?"])
        reasons.append(f"made by {made!r}, the demo is now {' '.join(new['command'])!r}")
    if old.get("view") != new["view"]:
        reasons.append(f"view changed: {old.get('view')} -> {new['view']}")
    old_src: dict[str, str] = old.get("sources") or {}
    for rel, digest in new["sources"].items():
        if rel not in old_src:
            reasons.append(f"{rel} is a new source of this picture")
        elif old_src[rel] != digest:
            reasons.append(f"{rel} changed since the picture was taken")
    reasons += [f"{rel} is no longer a source of this picture" for rel in old_src if rel not in new["sources"]]
    return reasons


def readme_pictures(readme: Path) -> list[str]:
    """The ``docs/images/*.png`` file names README.md shows, in order of first appearance."""
    import re

    names = re.findall(r"docs/images/([\w.-]+\.png)", readme.read_text(encoding="utf-8"))
    return list(dict.fromkeys(names))
