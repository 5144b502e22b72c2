"""The README's TensorBoard pictures, regenerated from today's demo (headless Chromium, no browser driver).

    python tools/tensorboard_screenshots.py                        # run the demos, write the pictures to build/pictures
    python tools/tensorboard_screenshots.py --out docs/images      # ... and replace the README's (make pictures
                                                                   # PICTURES_OUT=docs/images)
    python tools/tensorboard_screenshots.py --views overview,text  # only some pictures
    python tools/tensorboard_screenshots.py LOGDIR --views images  # views of logs you already have (no stamp)

Which pictures, from which demo, with which viewer settings, is :mod:`readme_pictures` (``tools/readme_pictures.py``).
Without LOGDIR the tool runs each demo the pictures need (``gradguard demo lstm --both``, ``gradguard demo cnn``;
logs in a temporary folder, or ``--logs DIR`` to keep them), starts ``tensorboard --logdir`` on 127.0.0.1 for each,
waits until the logs hold the tag each view shows (a view of a missing tag is an empty page: the tool stops instead),
and lets Chromium (``chromium --headless --screenshot``; Debian: ``apt-get install chromium``) render each view with a
fresh profile, so TensorBoard's own defaults apply (smoothing 0.6, outliers ignored) unless the picture says
otherwise: smoothing is a URL parameter of the dashboards, the outlier setting lives in the page's local storage, so
each page is opened through a small same-origin proxy whose first page stores the picture's settings and goes on to
the dashboard. For the Images tab's overview the proxy also ticks *Show actual image size* (one click for a person;
a card is 350 px wide otherwise) and the window grows to the image.

Each picture is reduced to a palette PNG and carries two text chunks: ``gradguard:stamp`` (the demo command, the view
and a SHA-256 of each source the picture depends on) and ``gradguard:story`` (the guard's events in the demo run);
``tests/test_readme_pictures.py`` fails when a README picture's stamp no longer matches the sources.
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import readme_pictures as rp  # noqa: E402 - tools/ is not a package

DEFAULT_OUT = rp.ROOT / "build" / "pictures"
MAX_BYTES = 300_000
#: room around an image shown at its actual size in the Images tab (sidebar, card heading, step slider, margins)
ACTUAL_SIZE_MARGIN = (420, 300)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)

#: injected into TensorBoard's page for an ``actual_size`` picture: tick the Images tab's "Show actual image size"
#: (a paper-checkbox in the dashboard's shadow DOM) once it exists
ACTUAL_SIZE_SCRIPT = """<script>
(function () {
  function find(root) {
    for (const el of root.querySelectorAll("*")) {
      if (el.tagName === "PAPER-CHECKBOX" && el.textContent.trim() === "Show actual image size") return el;
      if (el.shadowRoot) { const hit = find(el.shadowRoot); if (hit) return hit; }
    }
    return null;
  }
  const timer = setInterval(function () {
    const box = find(document);
    if (box) { if (!box.checked) box.click(); clearInterval(timer); }
  }, 200);
})();
</script>"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no Chromium found: apt-get install chromium (Debian) or put chromium on PATH")


def _proxy(target: str) -> http.server.ThreadingHTTPServer:
    """A same-origin front for ``target``.

    ``/__view?to=FRAGMENT&local=JSON[&inject=actual_size]`` clears the page's local storage, stores ``local`` in it
    and opens ``/#FRAGMENT``; with ``inject``, TensorBoard's page comes with :data:`ACTUAL_SIZE_SCRIPT`.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            return

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _forward(self, data: bytes | None, inject: bool = False) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
            req = urllib.request.Request(target + self.path, data=data, headers=headers, method=self.command)
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    body = r.read()
                    if inject:
                        body = body.replace(b"</body>", ACTUAL_SIZE_SCRIPT.encode() + b"</body>", 1)
                    self._send(r.status, body, r.headers.get("Content-Type", "application/octet-stream"))
            except urllib.error.HTTPError as e:
                self._send(e.code, e.read(), e.headers.get("Content-Type", "text/plain"))

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            if url.path == "/__view":
                fragment = query["to"][0]
                local = json.loads(query.get("local", ["{}"])[0])
                inject = query.get("inject", [""])[0]
                sets = "".join(f"localStorage.setItem({json.dumps(k)},{json.dumps(v)});" for k, v in local.items())
                page = "/" + (f"?gradguard={inject}" if inject else "") + "#" + fragment
                script = f"localStorage.clear();{sets}location.replace({json.dumps(page)});"
                self._send(200, f"<script>{script}</script>".encode(), "text/html")
            else:
                self._forward(None, inject=url.path == "/" and query.get("gradguard") == ["actual_size"])

        def do_POST(self) -> None:  # noqa: N802
            self._forward(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return bytes(r.read())


def _tags(base: str, plugin: str) -> dict[str, set[str]]:
    """run -> tags of one plugin (``/data/plugin/<plugin>/tags``: a dict per run, a list for the text plugin)."""
    data = json.loads(_get(f"{base}/data/plugin/{plugin}/tags"))
    return {run: set(tags) for run, tags in data.items()}


def _has(tags: set[str], tag: str) -> bool:
    """``tag`` is among ``tags``, as is or with a suffix (``add_text`` writes ``<tag>/text_summary``)."""
    return tag in tags or any(t.startswith(tag + "/") for t in tags)


def _wait_for(tb: subprocess.Popen[bytes], base: str, needs: set[tuple[str, str]], timeout: float = 120.0) -> None:
    """Wait until TensorBoard serves every (plugin, tag) in ``needs`` and its tag lists stop changing."""
    deadline = time.monotonic() + timeout
    previous: Any = None
    missing = needs
    while time.monotonic() < deadline:
        if tb.poll() is not None:
            raise SystemExit(f"tensorboard exited ({tb.returncode}): try {' '.join(map(str, tb.args))} by hand")
        try:
            seen = {plugin: _tags(base, plugin) for plugin in {p for p, _ in needs}}
        except (OSError, ValueError):
            seen = None
        if seen is not None:
            missing = {(p, t) for p, t in needs if not any(_has(tags, t) for tags in seen[p].values())}
            if not missing and seen == previous:
                return
            previous = seen
        time.sleep(1.0)
    raise SystemExit(f"tensorboard at {base}: no {sorted(missing)} within {timeout:.0f} s (an empty view)")


def _image_size(base: str, tag: str) -> tuple[int, int]:
    """Width and height of the newest ``tag`` image of the first run that has one."""
    from PIL import Image

    for run in sorted(run for run, tags in _tags(base, "images").items() if tag in tags):
        query = urllib.parse.urlencode({"run": run, "tag": tag, "sample": 0})
        entries = json.loads(_get(f"{base}/data/plugin/images/images?{query}"))
        if entries:
            png = _get(f"{base}/data/plugin/images/individualImage?{entries[-1]['query']}")
            with Image.open(io.BytesIO(png)) as im:
                return im.size
    raise SystemExit(f"tensorboard at {base}: no {tag!r} image")


def _save(shot: Path, path: Path, chunks: Mapping[str, str]) -> None:
    """Palette PNG (what a screenshot of flat UI colours compresses best as), smaller if still too big, with
    ``chunks`` as text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    with Image.open(shot) as img:
        img = img.convert("RGB")
        for scale in (1.0, 0.85, 0.7, 0.55):
            size = (int(img.width * scale), int(img.height * scale))
            small = img if scale == 1.0 else img.resize(size, Image.LANCZOS)
            small.quantize(colors=96, method=Image.Quantize.MEDIANCUT).save(path, optimize=True, pnginfo=info)
            if path.stat().st_size <= MAX_BYTES:
                return


def _run_demo(name: str, logdir: Path) -> list[dict[str, Any]]:
    """Run one demo of :data:`readme_pictures.DEMO_RUNS` into ``logdir``; its results (``--json``)."""
    demo = rp.DEMO_RUNS[name]
    results = logdir / "results.json"
    cmd = [sys.executable, "-m", "lightning_gradguard.cli", *demo.argv[1:]]
    cmd += ["--logdir", str(logdir), "--no-progress-bar", "--json", str(results)]
    t0 = time.perf_counter()
    print(f"$ {' '.join(demo.argv)} --logdir {logdir}", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(demo.argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    for line in done.stdout.splitlines():
        if line.startswith(("lstm demo", "cnn demo", "  NaNGuard", "    step", "  verdict")):
            print("   ", line.strip())
    print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)
    return list(json.loads(results.read_text()))


def _shoot(
    logdir: Path, pictures: list[rp.Picture], out: Path, wait_ms: int, chunks: Mapping[str, Mapping[str, str]]
) -> None:
    """Screenshots of ``pictures`` from one TensorBoard over ``logdir``."""
    chromium = _chromium()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    tb = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = None
    try:
        _wait_for(tb, base, {p.require for p in pictures})
        proxy = _proxy(base)
        front = f"http://127.0.0.1:{proxy.server_address[1]}"
        for picture in pictures:
            width, height = picture.window
            if picture.actual_size:
                w, h = _image_size(base, picture.require[1])
                width, height = max(width, w + ACTUAL_SIZE_MARGIN[0]), max(height, h + ACTUAL_SIZE_MARGIN[1])
            query = {"to": picture.fragment, "local": json.dumps(dict(picture.local))}
            if picture.actual_size:
                query["inject"] = "actual_size"
            path = out / picture.name
            with tempfile.TemporaryDirectory() as tmp:  # a fresh profile: nothing kept from another view
                shot = Path(tmp) / "shot.png"
                cmd = [
                    chromium,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={tmp}/profile",
                    f"--window-size={width},{height}",
                    f"--virtual-time-budget={wait_ms}",
                    f"--screenshot={shot}",
                    f"{front}/__view?{urllib.parse.urlencode(query)}",
                ]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
                _save(shot, path, chunks.get(picture.name, {}))
            print(f"{path} ({width}x{height} window, {path.stat().st_size // 1000} KB)", flush=True)
    finally:
        if proxy is not None:
            proxy.shutdown()
        tb.terminate()
        tb.wait(timeout=30)


def _select(views: str | None) -> list[rp.Picture]:
    if not views:
        return list(rp.PICTURES)
    wanted = [v.strip() for v in views.split(",") if v.strip()]
    names = {p.name: p for p in rp.PICTURES} | {p.name.removeprefix("tensorboard_")[:-4]: p for p in rp.PICTURES}
    unknown = [v for v in wanted if v not in names]
    if unknown:
        raise SystemExit(f"unknown view(s) {unknown}; known: {sorted(n for n in names if not n.endswith('.png'))}")
    return [names[v] for v in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", nargs="?", help="screenshot these logs instead of running the demos (no stamp)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"folder for the PNGs ({DEFAULT_OUT})")
    parser.add_argument("--views", default=None, help="comma-separated pictures, e.g. overview,text (default: all)")
    parser.add_argument("--logs", default=None, help="keep the demos' logs in this folder (default: a temporary one)")
    parser.add_argument("--wait", type=int, default=20000, help="ms of page time before each screenshot (20000)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    pictures = _select(args.views)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.logdir:
        print("logs given: the pictures get no stamp (tests/test_readme_pictures.py fails on them in docs/images)")
        _shoot(Path(args.logdir), pictures, out, args.wait, {})
    else:
        # stamped before the demos run, from the sources they are about to import (a rotted source list stops the
        # tool here, not after minutes of training)
        try:
            stamps = {p.name: rp.encode(rp.stamp(p)) for p in pictures}
        except FileNotFoundError as e:
            raise SystemExit(f"{e} (the lists are in tools/readme_pictures.py)") from None
        with tempfile.TemporaryDirectory(prefix="gradguard-pictures-") as tmp:
            root = Path(args.logs) if args.logs else Path(tmp)
            for demo in dict.fromkeys(p.demo for p in pictures):
                logdir = root / demo
                if logdir.exists():
                    shutil.rmtree(logdir)
                story = rp.encode(rp.story(_run_demo(demo, logdir)))
                mine = [p for p in pictures if p.demo == demo]
                chunks = {p.name: {rp.STAMP_KEY: stamps[p.name], rp.STORY_KEY: story} for p in mine}
                _shoot(logdir, mine, out, args.wait, chunks)
    print(f"{len(pictures)} pictures in {out.resolve()} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
