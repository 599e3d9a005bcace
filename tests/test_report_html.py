"""The HTML leaderboard in a real browser: headless Chromium loads the page, runs its inline script and
dumps the DOM. Skips when /usr/bin/chromium is missing (CI installs the Debian package ``chromium``)."""

import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_leaderboard import write_record  # tests/ is on sys.path under pytest

from harness.analysis import command

CHROMIUM = Path("/usr/bin/chromium")
EVIL = "<script>alert(1)</script>"
EVIL_LABEL = f"adamw+cosine+{EVIL}"  # a technique choice with markup in its name


class Dom(HTMLParser):
    """Script elements, and per table (by id) the rows as lists of (text, data-v) cells."""

    def __init__(self):
        super().__init__()
        self.scripts, self.tables, self._table, self._row, self._cell = 0, {}, None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("id", f"anon{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = ["", a.get("data-v")]

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append(tuple(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data


def dump_dom(page: Path, fragment: str, profile: Path) -> str:
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--dump-dom",
        page.resolve().as_uri() + fragment,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (Debian package `chromium`)")
def test_html_page_in_headless_chromium(tmp_path):
    res = tmp_path / "results"
    for s, a in enumerate([0.90, 0.91, 0.92]):
        write_record(res, opt="sgd", seed=s, metrics={"test_acc": a}, total_s=30.0)
    for s, a in enumerate([0.95, 0.96, 0.97]):
        write_record(res, opt="adamw", seed=s, metrics={"test_acc": a}, total_s=10.0, extra={"regularization": EVIL})
    for s, a in enumerate([0.80, 0.82, 0.81]):
        write_record(res, opt="lion", seed=s, metrics={"test_acc": a}, total_s=20.0)
    write_record(res, opt="lion", seed=9, status="failed", error=f"boom {EVIL}")
    out = tmp_path / "lb"
    assert command.cli(["--results", str(res), "--out", str(out), "--format", "html", "--quiet"]) == 0
    page = out / "index.html"
    assert EVIL not in page.read_text()  # escaped at the source too

    dom = Dom()
    dom.feed(dump_dom(page, "", tmp_path / "profile"))
    assert dom.scripts == 1  # only the page's own sorting script: the record's <script> is text
    rows = dom.tables["t-net-data_3ep"]
    labels = [r[1][0] for r in rows]
    assert labels[0] == EVIL_LABEL  # shown as literal text, best first
    assert set(labels) == {EVIL_LABEL, "sgd+cosine (baseline)", "lion+cosine"}
    failed = [t for k, t in dom.tables.items() if any("boom" in c[0] for r in t for c in r)]
    assert failed and failed[0][0][3][0] == f"boom {EVIL}"

    # #sort=<column>[:desc] sorts on load: wall time ascending puts adamw (10 s) first, lion (20 s) second
    dom = Dom()
    dom.feed(dump_dom(page, "#sort=total_s", tmp_path / "profile"))
    rows = dom.tables["t-net-data_3ep"]
    assert [r[1][0] for r in rows] == [EVIL_LABEL, "lion+cosine", "sgd+cosine (baseline)"]
    dom = Dom()
    dom.feed(dump_dom(page, "#sort=mean:asc", tmp_path / "profile"))
    rows = dom.tables["t-net-data_3ep"]
    means = [float(r[2][1]) for r in rows]
    assert means == sorted(means) and [r[1][0] for r in rows][0] == "lion+cosine"


def test_html_is_self_contained(tmp_path):
    res = tmp_path / "results"
    for s, a in enumerate([0.90, 0.91, 0.92]):
        write_record(res, opt="sgd", seed=s, metrics={"test_acc": a})
    out = tmp_path / "lb"
    assert command.cli(["--results", str(res), "--out", str(out), "--format", "html", "--quiet"]) == 0
    text = (out / "index.html").read_text()
    assert 'src="data:image/png;base64,' in text and "http://" not in text and "https://" not in text
    assert "<span id='records'>3</span> records" in text and "harness leaderboard --results" in text


MEASURE = """<script>
(() => {
  const vw = window.innerWidth, out = {viewport: vw, page: document.documentElement.scrollWidth, tables: []};
  document.querySelectorAll('table').forEach(t => {
    const box = t.closest('.scroll'), r = (box || t).getBoundingClientRect();
    out.tables.push({id: t.id, width: t.scrollWidth, boxRight: r.right, boxed: !!box,
      scrolls: box ? getComputedStyle(box).overflowX : null, boxClient: box ? box.clientWidth : null});
  });
  const pre = document.createElement('pre'); pre.id = 'layout'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script></body>"""


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (Debian package `chromium`)")
def test_html_tables_fit_or_scroll_in_their_box_at_1400px(tmp_path):
    """A wide leaderboard (long labels, many metrics, links) at a 1,400 px viewport: the page never scrolls
    sideways; every table fits or scrolls inside its own box. A screenshot is produced."""
    import json
    import re

    res = tmp_path / "results"
    metrics = {"test_acc": 0.9, "test_top5": 0.99, "test_ece": 0.05, "test_nll": 0.4, "test_brier": 0.1,
               "test_aurc": 0.02, "val_acc": 0.91, "test_ece_after_temperature": 0.02}  # fmt: skip
    for i, opt in enumerate(["sgd", "adamw", "adam", "lion", "radam", "nadam"]):
        for s in range(3):
            m = {k: v + (i + s) / 1000 for k, v in metrics.items()}
            write_record(res, opt=opt, seed=s, metrics=m, lr=0.0123456 + i, ttt=5.0 + i,
                         extra={"clip": "norm", "regularization": "label_smoothing"})  # fmt: skip
    out = tmp_path / "lb"
    assert command.cli(["--results", str(res), "--out", str(out), "--format", "html", "--quiet"]) == 0
    page = out / "index.html"
    text = page.read_text()
    probe = out / "measure.html"  # same directory: the same relative links and images
    probe.write_text(text.replace("</body>", MEASURE))
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000", "--hide-scrollbars"]  # fmt: skip
    dom = subprocess.run([*cmd, "--dump-dom", probe.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    layout = json.loads(html_unescape(re.search(r'<pre id="layout">(.*?)</pre>', dom.stdout, re.S).group(1)))
    assert layout["viewport"] == 1400
    assert layout["page"] <= 1400, layout  # no sideways scrolling of the page
    main = [t for t in layout["tables"] if t["id"].startswith("t-")]
    assert main and main[0]["width"] > 1400  # this table is wider than the window ...
    for t in layout["tables"]:  # ... yet each table sits in its own box inside the viewport, which scrolls
        assert t["boxed"] and t["boxRight"] <= 1400, t
        assert t["width"] <= t["boxClient"] or t["scrolls"] == "auto", t
    shot = tmp_path / "page.png"
    p = subprocess.run([*cmd, f"--screenshot={shot}", page.resolve().as_uri()], capture_output=True, timeout=120)
    assert p.returncode == 0 and shot.read_bytes()[:4] == b"\x89PNG"
    assert int.from_bytes(shot.read_bytes()[16:20], "big") == 1400  # PNG width

    # each row links to its run directories and resolved configs (the record when Hydra wrote no config)
    links = re.findall(r'<a href="([^"#]+)"', text)
    assert links and all((out / h).resolve().exists() for h in links)
    assert sum(h.endswith("result.json") for h in links) == 18


def html_unescape(s: str) -> str:
    import html

    return html.unescape(s)
