"""The static HTML leaderboard: self-contained, and sortable in a real headless Chromium.

The browser tests drive Debian's `chromium` with `--dump-dom` (after `--virtual-time-budget`,
so the page's scripts have run): a probe script appended to a copy of the page clicks column
headers through the DOM (`th.click()`, a real click event into the page's own handler) and
records the row order after each click. A screenshot step checks that the page renders.
Skipped, with the reason, where `chromium` is not installed (CI installs it).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html import unescape

import pytest

from nlbench.report import build_report
from test_report import make_results, write_throughput

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian package 'chromium' is not installed (apt-get install -y chromium); CI installs it"
)
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars",
]
TABLE = "stream-split-digits-accuracy"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    out = make_results(root / "OUT")
    write_throughput(out, "cpu:x86_64:2threads", "float32", [("hope", "tiny", 64, "train", 1000.0)], "cpu")
    build_report([out], out_dir=root / "rep", formats=("html",))
    return root / "rep" / "leaderboard.html"


def _chromium(args, tmp_path, timeout=120):
    profile = tmp_path / "profile"  # a fresh profile per call: no state leaks between runs
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"chromium failed ({r.returncode}): {r.stderr[-2000:]}"
    return r.stdout


def _entries(dom: str, table_id: str) -> list[str]:
    """Second-column text of each body row of one table, in DOM order."""
    m = re.search(rf'<table class="sortable" id="{table_id}">(.*?)</table>', dom, re.S)
    assert m, f"table {table_id} not in the page"
    body = m.group(1).split("<tbody>", 1)[1]
    return [unescape(re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)[1]) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)]


# ----------------------------------------------------------------------------- without a browser


def test_page_is_self_contained(page):
    html = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html), "the page loads something from the network"
    assert "<link" not in html and "@import" not in html
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(imgs) >= 5 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    assert "<script>" in html and 'class="sortable"' in html
    # numbers carry their raw value for sorting; a missing value has an empty key
    assert 'data-sort="0.8' in html and '<td data-sort="">—</td>' in html


def test_page_leads_with_the_verdict_then_headline_figures_then_details(page):
    html = page.read_text()
    order = [html.index(x) for x in ("<h2>Verdict: Hope vs the best baseline</h2>", 'id="verdict"',
                                     "<h2>Headline figures</h2>", "final score vs forgetting</figcaption>",
                                     "<h2>Details</h2>", "<h2>Forgetting streams</h2>", f'id="{TABLE}"',
                                     'id="paired-split-digits-accuracy"', "<h2>Figures</h2>")]
    assert order == sorted(order), order
    assert "better" in html[html.index('id="verdict"'):html.index("<h2>Headline figures</h2>")]


# ----------------------------------------------------------------------------- in Chromium


PROBE = """<script>
(function () {
  var log = [];
  PLAN.forEach(function (p) {
    var t = document.getElementById(p[0]);
    var th = Array.prototype.find.call(t.tHead.rows[0].cells, function (h) { return h.textContent === p[1]; });
    th.click();
    log.push([th.getAttribute('aria-sort'),
              Array.prototype.map.call(t.tBodies[0].rows, function (r) { return r.cells[1].textContent; })]);
  });
  var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(log);
  document.body.appendChild(pre);
})();
</script>"""


@needs_chromium
def test_page_loads_in_chromium_with_its_tables(page, tmp_path):
    dom = _chromium(["--virtual-time-budget=3000", "--dump-dom", page.as_uri()], tmp_path)
    assert _entries(dom, TABLE) == ["hope/tiny/finetune/naive", "transformer/tiny/finetune/naive", "titans/tiny/finetune/naive"]
    assert _entries(dom, "verdict") == ["hope/tiny/finetune/naive", "hope/tiny/finetune/naive"]  # split-digits, markov-lm
    assert "<h2>Throughput</h2>" in dom and 'id="throughput"' in dom


@needs_chromium
def test_clicking_headers_reorders_rows_in_chromium(page, tmp_path):
    hope, tr, ti = "hope/tiny/finetune/naive", "transformer/tiny/finetune/naive", "titans/tiny/finetune/naive"
    plan = [[TABLE, "acc_final"], [TABLE, "acc_final"], [TABLE, "rank"], [TABLE, "rank"], [TABLE, "entry"],
            ["verdict", "Δ acc_final"]]
    probed = tmp_path / "probed.html"
    html = page.read_text()
    probed.write_text(html.replace("</body>", PROBE.replace("PLAN", json.dumps(plan)) + "</body>"))
    dom = _chromium(["--virtual-time-budget=3000", "--dump-dom", probed.as_uri()], tmp_path)
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert m, "the probe did not run: " + dom[-500:]
    log = json.loads(unescape(m.group(1)))
    assert log == [
        ["ascending", [ti, tr, hope]],    # acc_final 0.21 < 0.5 < 0.8
        ["descending", [hope, tr, ti]],   # second click reverses
        ["ascending", [hope, tr, ti]],    # rank 1, 2, then the unranked one ("—")
        ["descending", [tr, hope, ti]],   # missing values stay last in both directions
        ["ascending", [hope, ti, tr]],    # text columns sort as text
        ["ascending", [hope, hope]],      # verdict rows: Hope entries (markov-lm +0.1 < split-digits +0.3)
    ]
    assert _entries(dom, TABLE) == [hope, ti, tr]  # the DOM itself was reordered


@needs_chromium
def test_screenshot_renders(page, tmp_path):
    shot = tmp_path / "shot.png"
    _chromium([f"--screenshot={shot}", "--window-size=1200,1600", "--virtual-time-budget=3000", page.as_uri()], tmp_path)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[:2] == (1600, 1200)
    assert img[..., :3].std() > 0.02, "the screenshot is a blank page"
