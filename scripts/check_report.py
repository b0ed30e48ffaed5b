"""Check the demo's HTML report as a person sees it: render it in headless Chromium, take a screenshot, and
check that every figure loaded (decoded, non-zero size) and every section holds numbers.

    python scripts/check_report.py runs/demo/report.html [--screenshot runs/demo/report.png]

Needs Chromium (Debian: ``apt-get install chromium``). Exit status 0 when every check passes; the last line
printed is JSON with what was checked.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """
<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const sections = [...document.querySelectorAll('section')].map(s => ({
    id: s.id,
    skipped: !!s.querySelector('.skipped'),
    numbers: (s.innerText.match(/\\d+\\.\\d+|\\d+/g) || []).length,
    images: s.querySelectorAll('img').length,
  }));
  const out = {
    images: imgs.length,
    loaded: imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length,
    sizes: imgs.map(i => [i.naturalWidth, i.naturalHeight]),
    sections: sections,
    title: document.title,
  };
  const pre = document.createElement('pre');
  pre.id = 'taskvec-check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found: apt-get install chromium")


def run(browser: str, args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--virtual-time-budget=10000", "--run-all-compositor-stages-before-draw"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=timeout)


def check(report: Path, screenshot: Path | None) -> dict:
    browser = chromium()
    with tempfile.TemporaryDirectory() as tmp:
        probed = Path(tmp) / "probed.html"
        probed.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
        dom = run(browser, ["--dump-dom", probed.as_uri()])
        m = re.search(r'<pre id="taskvec-check">(.*?)</pre>', dom.stdout, re.S)
        if m is None:
            raise SystemExit(f"Chromium gave no check result (rc {dom.returncode}): {dom.stderr[-500:]}")
        result = json.loads(html.unescape(m.group(1)))
    if screenshot is not None:
        shot = run(browser, [f"--screenshot={screenshot}", "--window-size=1200,2400", report.resolve().as_uri()])
        result["screenshot"] = str(screenshot) if screenshot.exists() else f"failed: {shot.stderr[-300:]}"
    problems = []
    if result["images"] == 0 or result["loaded"] != result["images"]:
        problems.append(f"{result['loaded']} of {result['images']} figures loaded")
    for s in result["sections"]:
        if not s["skipped"] and s["numbers"] < 3:
            problems.append(f"section {s['id']!r} holds {s['numbers']} numbers")
    result["problems"] = problems
    result["ok"] = not problems
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--screenshot", type=Path, default=None)
    args = ap.parse_args()
    if not args.report.is_file():
        raise SystemExit(f"no report at {args.report}")
    result = check(args.report, args.screenshot)
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
