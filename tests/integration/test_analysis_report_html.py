"""report.html opened in headless Chromium (Debian's ``chromium``): it renders, every image loads.

Skipped when chromium is not installed (CI installs it: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HAND = Path(__file__).resolve().parents[1] / "data" / "analysis" / "hand"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")

# Appended to a copy of the report (test only): after load, write into the page whether every
# <img> decoded, so --dump-dom shows the browser's own verdict.
IMAGE_PROBE = """
<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0));
  const p = document.createElement('p');
  p.id = 'image-probe';
  p.textContent = 'images=' + imgs.length + ' broken=' + broken.length;
  document.body.appendChild(p);
});
</script>
"""


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    flags = [
        "--headless",
        "--no-sandbox",  # tests run as root in CI containers
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    proc = subprocess.run(
        [sys.executable, "-m", "multitenant.analysis.cli", str(HAND / "pair"), "--out", str(out), "--slo", "ttft=50ms"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return out / "report.html"


def test_report_is_self_contained(report: Path) -> None:
    html = report.read_text()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]+)"', html)
    # 6 per-run plots (the pair has telemetry) + NP and slowdown across runs.
    assert len(sources) == 8
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    # Nothing to fetch: no external stylesheet, script or image.
    assert not re.search(r'(href|src)="(?!data:)', html)


def test_report_renders_in_chromium(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    proc = chromium([f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri()], tmp_path / "profile1")
    assert shot.is_file(), proc.stderr
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1280)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50, "the screenshot is (nearly) one colour: the page did not render"
    # Dark text/plot pixels cover a real part of the page, not a stray line.
    dark = (pixels.sum(axis=2) < 300).mean()
    assert dark > 0.002

    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("</body>", IMAGE_PROBE + "</body>"))
    proc = chromium(["--dump-dom", "--virtual-time-budget=5000", probed.as_uri()], tmp_path / "profile2")
    match = re.search(r'<p id="image-probe">images=(\d+) broken=(\d+)</p>', proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (int(match.group(1)), int(match.group(2))) == (8, 0)
