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
        write_record(res, opt="adamw", seed=s, metrics={"test_acc": a}, total_s=10.0, label=EVIL)
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
    assert labels[0] == EVIL  # shown as literal text, best first
    assert set(labels) == {EVIL, "sgd+cosine (baseline)", "lion+cosine"}
    failed = [t for k, t in dom.tables.items() if any("boom" in c[0] for r in t for c in r)]
    assert failed and failed[0][0][3][0] == f"boom {EVIL}"

    # #sort=<column>[:desc] sorts on load: wall time ascending puts adamw (10 s) first, lion (20 s) second
    dom = Dom()
    dom.feed(dump_dom(page, "#sort=total_s", tmp_path / "profile"))
    rows = dom.tables["t-net-data_3ep"]
    assert [r[1][0] for r in rows] == [EVIL, "lion+cosine", "sgd+cosine (baseline)"]
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
