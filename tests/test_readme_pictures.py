"""The README's TensorBoard pictures show today's demo: each PNG's stamp matches the sources it was taken from.

``tools/tensorboard_screenshots.py`` writes into each picture a ``gradguard:stamp`` text chunk (the demo command, the
view and a SHA-256 of each source the picture depends on, listed in ``tools/readme_pictures.py``) and a
``gradguard:story`` chunk (the guard's events in that demo run). A picture whose stamp no longer matches the working
tree fails here, naming what changed and the command that regenerates the pictures; the ``slow`` test reruns the
guarded demos and compares their events with the story the pictures show.
"""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _load(name: str):
    """Import ``tools/<name>.py`` the way the tool imports its neighbour (tools/ on sys.path)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


rp = _load("readme_pictures")
README = rp.ROOT / "README.md"
SHOWN = rp.readme_pictures(README)


@pytest.mark.parametrize("name", SHOWN)
def test_readme_picture_is_current(name):
    pytest.importorskip("PIL")
    picture = rp.BY_NAME.get(name)
    assert picture is not None, f"README.md shows docs/images/{name}, which tools/readme_pictures.py does not make"
    reasons = rp.stale_reasons(picture, rp.ROOT / rp.IMAGES / name)
    assert not reasons, f"docs/images/{name} is stale: " + "; ".join(reasons) + f". Regenerate: {rp.REGENERATE}"


def test_readme_shows_every_picture_the_tool_makes():
    assert SHOWN, "README.md shows no docs/images/*.png"
    unshown = [p.name for p in rp.PICTURES if p.name not in SHOWN]
    assert not unshown, f"tools/readme_pictures.py makes {unshown}, which README.md does not show"


@pytest.mark.parametrize("picture", rp.PICTURES, ids=lambda p: p.name)
def test_picture_sources_exist(picture):
    files = rp.source_files(picture)
    assert set(rp.DEMO_SOURCES[picture.demo]) <= set(files)


def test_the_text_picture_waits_for_the_guards_tag():
    from lightning_gradguard.core.engine._engine import _TEXT_TAG

    assert rp.BY_NAME["tensorboard_text.png"].require == ("text", _TEXT_TAG)


def test_demo_commands_parse_with_the_cli():
    from lightning_gradguard.cli import _parser

    for name, demo in rp.DEMO_RUNS.items():
        assert demo.argv[:2] == ["gradguard", "demo"]
        args = _parser().parse_args(demo.argv[1:])
        assert (args.example, args.both, args.quick, args.seed) == (name, demo.both, demo.quick, demo.seed)


def test_story_doctest():
    assert doctest.testmod(rp, raise_on_error=False).failed == 0


# --- the stamp logic on a temporary tree and PNG (written by the tool's own writer) ---


@pytest.fixture
def tree(tmp_path):
    """A stand-in repository: the LSTM demo's sources and two drawing modules."""
    for rel in rp.DEMO_SOURCES["lstm"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "draw.py").write_text("COLOUR = 'red'\n")
    (tmp_path / "pkg" / "sub" / "_overview_fig.py").write_text("SIZE = 3\n")
    return tmp_path


@pytest.fixture
def picture():
    return rp.Picture(
        "shot.png",
        "lstm",
        "images&tagFilter=x",
        (800, 600),
        ("images", "x"),
        ("pkg/draw.py", "pkg/**/*overview*.py"),
        "",
    )


def _shoot(tool, root, picture, png: Path, chunks=None) -> Path:
    from PIL import Image

    raw = png.with_suffix(".raw.png")
    Image.new("RGB", (40, 30), (255, 128, 0)).save(raw)
    if chunks is None:
        chunks = {rp.STAMP_KEY: rp.encode(rp.stamp(picture, root)), rp.STORY_KEY: rp.encode([])}
    tool._save(raw, png, chunks)
    return png


def test_stamp_matches_then_names_the_changed_source(tree, picture, tmp_path):
    pytest.importorskip("PIL")
    tool = _load("tensorboard_screenshots")
    png = _shoot(tool, tree, picture, tmp_path / "shot.png")
    assert rp.stale_reasons(picture, png, tree) == []
    stamped = json.loads(rp.read_chunks(png)[rp.STAMP_KEY])
    assert stamped["command"] == ["gradguard", "demo", "lstm", "--both"]
    assert set(stamped["sources"]) == {*rp.DEMO_SOURCES["lstm"], "pkg/draw.py", "pkg/sub/_overview_fig.py"}

    (tree / "pkg" / "draw.py").write_bytes(b"COLOUR = 'red'\r\n")  # a Windows checkout: the same source
    assert rp.stale_reasons(picture, png, tree) == []

    (tree / "pkg" / "draw.py").write_text("COLOUR = 'blue'\n")
    assert rp.stale_reasons(picture, png, tree) == ["pkg/draw.py changed since the picture was taken"]

    (tree / "pkg" / "draw.py").write_text("COLOUR = 'red'\n")
    (tree / "lightning_gradguard" / "demo.py").write_text("STEPS = 1\n")
    assert rp.stale_reasons(picture, png, tree) == ["lightning_gradguard/demo.py changed since the picture was taken"]


def test_new_or_dropped_source_view_and_command_changes_are_stale(tree, picture, tmp_path):
    pytest.importorskip("PIL")
    tool = _load("tensorboard_screenshots")
    png = _shoot(tool, tree, picture, tmp_path / "shot.png")
    (tree / "pkg" / "overview_more.py").write_text("X = 1\n")
    assert rp.stale_reasons(picture, png, tree) == ["pkg/overview_more.py is a new source of this picture"]
    (tree / "pkg" / "overview_more.py").unlink()

    fewer = dataclasses.replace(picture, sources=("pkg/**/*overview*.py",))
    assert rp.stale_reasons(fewer, png, tree) == ["pkg/draw.py is no longer a source of this picture"]

    smoothed = dataclasses.replace(picture, fragment="images&tagFilter=x&_smoothingWeight=0")
    (reason,) = rp.stale_reasons(smoothed, png, tree)
    assert reason.startswith("view changed")

    cnn = dataclasses.replace(picture, demo="cnn", sources=("pkg/draw.py",))
    for rel in rp.DEMO_SOURCES["cnn"]:
        (tree / rel).write_text(f"# {rel}\n")
    reasons = rp.stale_reasons(cnn, png, tree)
    assert reasons[0] == "made by 'gradguard demo lstm --both', the demo is now 'gradguard demo cnn'"


def test_a_picture_without_stamp_is_stale(tree, picture, tmp_path):
    pytest.importorskip("PIL")
    tool = _load("tensorboard_screenshots")
    png = _shoot(tool, tree, picture, tmp_path / "shot.png", chunks={})
    (reason,) = rp.stale_reasons(picture, png, tree)
    assert "no 'gradguard:stamp' stamp" in reason
    assert rp.stale_reasons(picture, tmp_path / "absent.png", tree) == [f"{tmp_path / 'absent.png'} is missing"]


def test_a_rotted_source_list_is_an_error(tree, picture):
    (tree / "pkg" / "draw.py").unlink()
    with pytest.raises(FileNotFoundError, match="source 'pkg/draw.py' is missing"):
        rp.source_files(picture, tree)
    (tree / "pkg" / "draw.py").write_text("\n")
    (tree / "pkg" / "sub" / "_overview_fig.py").unlink()
    with pytest.raises(FileNotFoundError, match=r"no file .* matches 'pkg/\*\*/\*overview\*\.py'"):
        rp.source_files(picture, tree)


# --- the story: the guard still does what the pictures show ---


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the guarded demos (~30 s on one core; minutes on a loaded 2-core machine)
@pytest.mark.parametrize("demo", sorted({rp.BY_NAME[n].demo for n in SHOWN if n in rp.BY_NAME}))
def test_the_pictures_tell_todays_story(demo, tmp_path):
    pytest.importorskip("PIL")
    if demo == "cnn":
        pytest.importorskip("sklearn")
    from lightning_gradguard.demo import run_demo

    stories = {}
    for name in SHOWN:
        if name in rp.BY_NAME and rp.BY_NAME[name].demo == demo:
            png = rp.ROOT / rp.IMAGES / name
            stories[name] = rp.read_chunks(png).get(rp.STORY_KEY) if png.is_file() else None
    run = rp.DEMO_RUNS[demo]
    result = run_demo(run.example, quick=run.quick, guarded=True, logdir=tmp_path, seed=run.seed, progress_bar=False)
    today = rp.story([result.to_dict()])
    for name, text in stories.items():
        shown = json.loads(text) if text else None
        assert shown == today, (
            f"docs/images/{name} shows the guarded {demo} demo as {shown}; today it runs as {today}. "
            f"Regenerate: {rp.REGENERATE}"
        )
