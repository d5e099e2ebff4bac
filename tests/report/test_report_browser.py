"""The lab report in a real headless browser (Debian's chromium), with networking off.

Three checks, none of which needs the Chrome DevTools protocol:

1. a screenshot of the page is not blank;
2. ``--dump-dom`` of a probe copy of the page (the report plus a small script that writes each image's
   ``naturalWidth`` and the resources the page fetched into the DOM) shows that every figure decoded and
   that nothing but the page itself was loaded;
3. the browser's console log (``--enable-logging=stderr``) holds no message from the page.

A canary page first proves that checks 2 and 3 can fail (a broken image and a console error are seen).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gradsentry.lab import LabConfig, run_lab, write_outputs

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("chromium is not on PATH (CI installs Debian's chromium)", allow_module_level=True)

PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    img.setAttribute("data-natural-width", String(img.naturalWidth));
    img.setAttribute("data-complete", String(img.complete));
  }
  const names = performance.getEntriesByType("resource").map((e) => e.name);
  document.body.setAttribute("data-resources", JSON.stringify(names));
  document.body.setAttribute("data-probed", "yes");
});
</script>"""


def _chromium(tmp: Path, url: str, *extra: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-extensions",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        f"--user-data-dir={tmp / 'profile'}",
        # networking off: every host name fails to resolve and any proxied request goes nowhere
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=http://127.0.0.1:9",
        "--enable-logging=stderr",
        "--log-level=0",
        "--virtual-time-budget=10000",
        *extra,
        url,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def _probe(tmp: Path, html: str) -> str:
    page = tmp / "probe.html"
    page.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    res = _chromium(tmp, page.as_uri(), "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'data-probed="yes"' in res.stdout, "the probe script did not run"
    return res.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lab")
    # every variant, tiny and fast; gain 4 makes the depth-4 oversized net diverge so the NaN markers render
    result = run_lab(LabConfig(depth=4, width=8, epochs=1, log_every=2, oversized_gain=4.0), out_dir=out)
    return write_outputs(result, out)["report"]


def test_canary_page_is_caught(tmp_path: Path) -> None:
    html = (
        '<!DOCTYPE html><html><body><img src="https://example.com/x.png"><img src="missing.png">'
        '<script>console.error("canary-error")</script></body></html>'
    )
    dom = _probe(tmp_path, html)
    assert re.findall(r'data-natural-width="(\d+)"', dom) == ["0", "0"]
    page = tmp_path / "canary.html"
    page.write_text(html)
    assert any("canary-error" in line for line in _console(_chromium(tmp_path, page.as_uri()).stderr))


def test_every_figure_renders_offline(report: Path, tmp_path: Path) -> None:
    html = report.read_text(encoding="utf-8")
    n_img = html.count("<img ")
    assert n_img == 7
    assert "<svg" not in html  # figures are <img> data URIs, none inline
    dom = _probe(tmp_path, html)
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == n_img and all(w > 300 for w in widths), widths
    assert re.findall(r'data-complete="(\w+)"', dom) == ["true"] * n_img
    fetched = re.search(r'data-resources="([^"]*)"', dom)
    assert fetched is not None and fetched.group(1) == "[]", fetched and fetched.group(1)


def test_no_console_messages_and_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    from matplotlib.image import imread

    shot = tmp_path / "report.png"
    res = _chromium(
        tmp_path, report.as_uri(), f"--screenshot={shot}", "--window-size=1100,3500", "--hide-scrollbars"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert _console(res.stderr) == []
    img = imread(shot)[..., :3]
    assert img.shape[:2] == (3500, 1100)
    ink = (img < 0.9).any(axis=2).mean()
    colours = len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3)[::7], axis=0))
    assert ink > 0.05 and colours > 200, (ink, colours)
