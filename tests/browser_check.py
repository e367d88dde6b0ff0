"""Render an HTML report in headless Chromium (Debian's ``chromium``) and list what overflows.

Importable by tests (kept out of ``conftest.py`` like ``fake_backend``). ``overflow(path)``
copies the report, appends a script that measures the laid-out page at the given width, loads
it with ``chromium --headless --dump-dom`` and returns one line per problem: the page scrolls
sideways, an element ends past the viewport's right edge, or a box clips or scrolls its
content (a table cut off inside a ``<pre>``). ``chromium_or_skip()`` skips, saying why, where
no Chromium is installed (``apt-get install chromium``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

__all__ = ["chromium_or_skip", "overflow"]

# Flags from the project's tooling notes: no sandbox (root in a container), nothing that
# reaches the network.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")

_MEASURE = """
<script>
(() => {
  const root = document.documentElement, vw = root.clientWidth, problems = [];
  if (root.scrollWidth > vw) problems.push(`page is ${root.scrollWidth}px wide in a ${vw}px window`);
  for (const el of document.body.querySelectorAll('*')) {
    if (el.closest('svg') && el.tagName.toLowerCase() !== 'svg') continue;
    const name = el.tagName.toLowerCase() + (el.id ? '#' + el.id : '');
    const right = el.getBoundingClientRect().right;
    if (right > vw + 1) problems.push(`${name} ends at ${Math.round(right)}px, past ${vw}px`);
    if (el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1)
      problems.push(`${name} clips or scrolls its content (${el.scrollWidth}px in ${el.clientWidth}px)`);
  }
  const out = document.createElement('pre');
  out.id = 'overflow-check';
  out.textContent = JSON.stringify(problems);
  document.body.appendChild(out);
})();
</script>
"""


def chromium_or_skip() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium to render the report (apt-get install chromium)")


def overflow(report: Path, width_px: int = 1400, height_px: int = 900) -> list[str]:
    chromium = chromium_or_skip()
    with tempfile.TemporaryDirectory(prefix="kvrouter-report-check-") as tmp:
        page = Path(tmp) / "report.html"
        text = report.read_text(encoding="utf-8")
        page.write_text(text.replace("</body>", _MEASURE + "</body>"), encoding="utf-8")
        proc = subprocess.run(
            [chromium, *FLAGS, f"--window-size={width_px},{height_px}",
             f"--user-data-dir={tmp}/profile", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120)
    marker = "<pre id=\"overflow-check\">"
    if marker not in proc.stdout:
        raise AssertionError(f"chromium did not render {report}: {proc.stderr[-1000:]}")
    found = proc.stdout.split(marker, 1)[1].split("</pre>", 1)[0]
    problems: list[str] = json.loads(found.replace("&gt;", ">").replace("&lt;", "<")
                                     .replace("&quot;", '"').replace("&amp;", "&"))
    return problems
