"""Screenshots of TensorBoard's views of a gradguard run, for the README (headless Chromium, no browser driver).

    gradguard demo lstm --both --logdir /tmp/demo_logs        # or any log directory with gradguard runs
    python tools/tensorboard_screenshots.py /tmp/demo_logs    # writes docs/images/tensorboard_*.png
    gradguard demo cnn --quick --logdir /tmp/cnn_logs         # the 21-layer gradient-flow image of the README
    python tools/tensorboard_screenshots.py /tmp/cnn_logs --views images

Starts ``tensorboard --logdir LOGDIR`` on 127.0.0.1, waits until it serves the runs, then lets Chromium
(``chromium --headless --screenshot``; Debian: ``apt-get install chromium``) render each dashboard with the viewer
settings the README recommends: smoothing 0 (a URL parameter of the dashboards) and outliers not ignored (kept in the
page's local storage, so each page is opened through a small same-origin proxy whose first page stores the setting
and then goes on to the dashboard). Each image is reduced to a palette PNG under 300 KB.
"""

from __future__ import annotations

import argparse
import http.server
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
MAX_BYTES = 300_000
# (file stem, dashboard and its URL settings, window size): the settings are the dashboards' own URL parameters
VIEWS = [
    ("custom_scalars", "custom_scalars&_smoothingWeight=0", (1280, 1150)),
    ("scalars", "scalars&_smoothingWeight=0&_ignoreYOutliers=false&tagFilter=gradguard%2F", (1280, 1100)),
    ("histograms", "histograms&tagFilter=gradguard%2F(update_ratio%7Clayer_grad_norms)%24", (1280, 900)),
    ("images", "images&tagFilter=gradient_flow", (1280, 900)),
    ("text", "text&tagFilter=events", (1280, 800)),
]


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


#: the dashboards' local-storage settings: what the README recommends (TensorBoard's default ignores outliers)
LOCAL_SETTINGS = {"_ignoreYOutliers": "false"}


def _proxy(target: str) -> http.server.ThreadingHTTPServer:
    """A same-origin front for ``target``: ``/__settings?to=FRAGMENT`` stores :data:`LOCAL_SETTINGS`, then opens it."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            return

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _forward(self, data: bytes | None) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
            req = urllib.request.Request(target + self.path, data=data, headers=headers, method=self.command)
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    self._send(r.status, r.read(), r.headers.get("Content-Type", "application/octet-stream"))
            except urllib.error.HTTPError as e:
                self._send(e.code, e.read(), e.headers.get("Content-Type", "text/plain"))

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path.startswith("/__settings?to="):
                fragment = self.path.split("=", 1)[1]
                sets = "".join(f"localStorage.setItem({k!r},{v!r});" for k, v in LOCAL_SETTINGS.items())
                page = f"<script>{sets}location.replace('/#' + {json.dumps(fragment)});</script>"
                self._send(200, page.encode(), "text/html")
            else:
                self._forward(None)

        def do_POST(self) -> None:  # noqa: N802
            self._forward(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _wait_for_runs(base: str, timeout: float = 90.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/data/runs", timeout=5) as r:
                runs = json.loads(r.read())
            if runs:
                return runs
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"tensorboard at {base} served no runs within {timeout:.0f} s")


def _shrink(path: Path) -> None:
    """Palette PNG (what a screenshot of flat UI colours compresses best as), smaller if still too big."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        for scale in (1.0, 0.85, 0.7, 0.55):
            size = (int(img.width * scale), int(img.height * scale))
            small = img if scale == 1.0 else img.resize(size, Image.LANCZOS)
            small.quantize(colors=96, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
            if path.stat().st_size <= MAX_BYTES:
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", help="TensorBoard log directory with gradguard runs (e.g. from gradguard demo)")
    parser.add_argument("--out", default=str(OUT), help=f"folder for the PNGs ({OUT})")
    parser.add_argument("--wait", type=int, default=20000, help="ms of page time before each screenshot (20000)")
    parser.add_argument("--views", default=",".join(v[0] for v in VIEWS), help="which views (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chromium = _chromium()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    tb = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = None
    try:
        print("runs:", ", ".join(_wait_for_runs(base)))
        proxy = _proxy(base)
        front = f"http://127.0.0.1:{proxy.server_address[1]}"
        with tempfile.TemporaryDirectory() as profile:
            for stem, fragment, (width, height) in (v for v in VIEWS if v[0] in args.views.split(",")):
                path = out / f"tensorboard_{stem}.png"
                cmd = [
                    chromium,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    f"--user-data-dir={profile}",
                    f"--window-size={width},{height}",
                    f"--virtual-time-budget={args.wait}",
                    f"--screenshot={path}",
                    f"{front}/__settings?to={fragment}",
                ]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
                _shrink(path)
                print(f"{path} ({path.stat().st_size // 1000} KB)")
    finally:
        if proxy is not None:
            proxy.shutdown()
        tb.terminate()
        tb.wait(timeout=30)


if __name__ == "__main__":
    main()
