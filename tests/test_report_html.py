"""The HTML report: structure, self-containment, best-cell marks, details.json handling, and a real render.

The results come from one tiny real study (module fixture); ``details.json`` is synthetic, written
here in the study's format, and each test varies it (complete, absent, malformed, partial). The
render test drives Debian's headless chromium when it is installed and is skipped otherwise.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from unlearn_fast.report import REPORT_FILES, build_report, summarize
from unlearn_fast.report.summary import best_cells, best_rule, group_rows

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
SECTIONS = ("setup", "findings", "residual-influence", "accuracy", "mia-roc", "ulira", "targets", "results", "notes")
SHAPE = [1, 8, 8]


class PageParser(HTMLParser):
    """Collects the tag structure, attributes and text of a page, and any unbalanced tag."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.best: list[str] = []  # text of cells marked best
        self.text: list[str] = []
        self._in_best = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "td":
            self._in_best = a.get("class") == "best"
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()
        if tag == "td":
            self._in_best = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_best and data.strip():
            self.best.append(data.strip())


def parse(page: str) -> PageParser:
    p = PageParser()
    p.feed(page)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    assert page.startswith("<!DOCTYPE html>")
    return p


def check_self_contained(p: PageParser) -> int:
    """Every image is a data: URI, nothing points outside the page; returns the number of images."""
    imgs = [a for t, a in p.tags if t == "img"]
    assert all((a.get("src") or "").startswith("data:image/png;base64,") for a in imgs)
    assert all(a.get("alt") for a in imgs)
    assert not [t for t, _ in p.tags if t in ("script", "link", "iframe", "object")]
    for _, attrs in p.tags:
        for key in ("href", "src", "action", "poster"):
            value = attrs.get(key)
            if value is None:
                continue
            assert not re.match(r"\s*(https?:)?//", value), value
            if key == "href":
                assert value.startswith("#"), value
    return len(imgs)


def _image(rng: np.random.Generator) -> list:
    return rng.random(SHAPE).tolist()


def make_details(records: list[dict], *, n: int = 3) -> dict:
    """A details.json in the study's format, with every part present, for each (dataset, C) of ``records``."""
    rng = np.random.default_rng(0)
    methods = list(dict.fromkeys(r["method"] for r in records))
    conditions = []
    for c in dict.fromkeys(r["similar"] for r in records):
        conditions.append({
            "dataset": records[0]["dataset"], "similar": c, "seed": 0, "image_shape": SHAPE,
            "target_ids": list(range(100, 100 + n)), "targets": [_image(rng) for _ in range(n)],
            "near_duplicates": [[_image(rng) for _ in range(min(c, 3))] for _ in range(n)],
            "reconstructions": {m: [_image(rng) for _ in range(n)] for m in methods},
            "mia_scores": {m: {"members": (-rng.exponential(0.2, n)).tolist(),
                               "nonmembers": (-rng.exponential(0.4, 20)).tolist()} for m in methods},
            "ulira_accuracy": {m: rng.uniform(0.4, 0.9, n).tolist() for m in methods if m != "original"},
        })
    return {"schema_version": 1, "conditions": conditions}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unlearn_fast.study import run_study

    out = tmp_path_factory.mktemp("study")
    run_study(methods=["finetune"], seeds=2, quick=True, dataset_options={"targets": 6}, progress=False, out=out)
    return out


@pytest.fixture
def results_dir(study_dir: Path, tmp_path: Path) -> Path:
    shutil.copy(study_dir / "results.json", tmp_path / "results.json")
    return tmp_path


def _records(folder: Path) -> list[dict]:
    return json.loads((folder / "results.json").read_text(encoding="utf-8"))


def _build(folder: Path, details: dict | str | None) -> tuple[str, str, PageParser]:
    if details is not None:
        text = details if isinstance(details, str) else json.dumps(details)
        (folder / "details.json").write_text(text, encoding="utf-8")
    md = build_report(folder).read_text(encoding="utf-8")
    page = (folder / "report.html").read_text(encoding="utf-8")
    return md, page, parse(page)


def test_study_writes_the_html_report(study_dir: Path) -> None:
    page = (study_dir / "report.html").read_text(encoding="utf-8")
    parse(page)
    assert "report.html" in REPORT_FILES and not list(study_dir.glob(".staging-*"))


def test_full_details(results_dir: Path) -> None:
    before = {p.name for p in results_dir.iterdir()}
    md, page, p = _build(results_dir, make_details(_records(results_dir)))
    written = {p.name for p in results_dir.iterdir()} - before - {"details.json"}
    assert written <= set(REPORT_FILES) and {"report.html", "mia_roc.png", "ulira.png", "targets.png"} <= written
    assert check_self_contained(p) == 5  # residual influence, accuracy, ROC, U-LiRA, grids
    ids = {a.get("id") for _, a in p.tags}
    assert set(SECTIONS) <= ids and "missing-rows" not in ids
    for name in ("mia_roc.png", "ulira.png", "targets.png"):
        assert f"({name})" in md
    text = "".join(p.text)
    assert "Finding (digits-blockmask)" in text and "Not shown" not in page and "ignored" not in text
    # the marked cells are exactly the ones best_cells picks, in the results and the RI tables
    summary = summarize(_records(results_dir))
    marked = sum(len(best_cells(rows, list(rows[0]["metrics"]))) for rows in group_rows(summary).values())
    ri_marked = sum(len(best_cells(rows, ["residual_influence"])) for rows in group_rows(summary).values())
    assert marked > 0 and len(p.best) == marked + ri_marked
    assert page.count('<td class="best"><strong>') == len(p.best)
    assert "**" in md.split("## Results", 1)[1]


def test_best_rules() -> None:
    assert best_rule("residual_influence_median") == best_rule("mia_loss_auc_targets") == "oracle"
    assert best_rule("test_acc") == "max" and best_rule("seconds") == "min" and best_rule("relearn_steps") == "oracle"
    assert best_rule("ri_targets_used") is best_rule("added_recall") is best_rule("something_new") is None

    def row(method: str, **metrics: float) -> dict:
        return {"dataset": "d", "similar": 1, "method": method,
                "metrics": {k: {"mean": v, "ci95": 0.0, "n": 2} for k, v in metrics.items()}}

    rows = [row("original", x=1.0, test_acc=0.99, mia_auc=0.5, unknown=1.0),
            row("oracle", x=0.2, test_acc=0.9, mia_auc=0.5, unknown=2.0),
            row("a", x=0.5, test_acc=0.95, mia_auc=0.5, unknown=3.0), row("b", x=0.1, test_acc=0.95, mia_auc=0.5, unknown=4.0),
            row("c", x=0.3, test_acc=0.8, mia_auc=0.5, unknown=5.0)]
    for r in rows:
        r["metrics"]["target_loss"] = r["metrics"].pop("x")
    # A mark needs the best to be distinguishable from the runner-up: b and c are both 0.1 from the oracle, a and
    # b tie on the highest test_acc (original's 0.99 does not compete), every method ties on mia_auc: no mark;
    # a metric with no rule, or absent everywhere: no mark
    assert best_cells(rows, ["target_loss", "test_acc", "mia_auc", "unknown", "residual_influence"]) == set()
    rows[2]["metrics"]["test_acc"]["mean"] = 0.97  # a now above b and c, CIs of zero width: distinguishable
    rows[4]["metrics"]["target_loss"]["mean"] = 0.22  # c now 0.02 from the oracle, b 0.1
    assert best_cells(rows, ["target_loss", "test_acc"]) == {("c", "target_loss"), ("a", "test_acc")}
    rows[3]["metrics"]["test_acc"]["ci95"] = 0.05  # b's CI reaches a's value: no longer distinguishable
    assert best_cells(rows, ["test_acc"]) == set()
    no_oracle = [r for r in rows if r["method"] != "oracle"]
    assert best_cells(no_oracle, ["target_loss"]) == set()  # nothing to be close to


def test_details_absent(results_dir: Path) -> None:
    md, page, p = _build(results_dir, None)
    assert check_self_contained(p) == 2
    assert page.count("Not shown: there is no details.json") == 3 and md.count("Not shown: there is no details.json") == 3
    assert "No per-sample details" in " ".join(p.text)
    assert not (results_dir / "mia_roc.png").exists()


@pytest.mark.parametrize("content, why", [
    ("{not json", "not valid JSON"),
    (json.dumps({"schema_version": 99, "conditions": []}), "schema_version is 99"),
    (json.dumps([1, 2]), "JSON list"),
])
def test_details_malformed(results_dir: Path, content: str, why: str) -> None:
    md, _, p = _build(results_dir, content)
    assert check_self_contained(p) == 2
    warn = next(i for i, (t, a) in enumerate(p.tags) if a.get("class") == "warn")
    assert warn < [t for t, _ in p.tags].index("section")  # at the top of the page
    text = "".join(p.text)
    assert "details.json was ignored" in text and why in text and "Finding (digits-blockmask)" in text
    assert "**Warning.** details.json was ignored" in md and why in md


def test_details_partial(results_dir: Path) -> None:
    details = make_details(_records(results_dir))
    first, second = details["conditions"]
    second["image_shape"] = None  # non-image inputs: no grid for this condition
    for cond in details["conditions"]:
        cond.pop("ulira_accuracy")  # shadow models off
    first["reconstructions"]["finetune"] = first["reconstructions"]["finetune"][:1]  # malformed: 1 image for 3 targets
    first["mia_scores"]["oracle"] = {"members": []}
    _, page, p = _build(results_dir, details)
    assert check_self_contained(p) == 4
    assert "Not shown: details.json holds no U-LiRA accuracies" in page
    text = "".join(p.text)
    assert "reconstructions['finetune'] is not 3 images" in text and "mia_scores['oracle']" in text
    assert "2 malformed part(s) left out" in text


def test_partial_results_and_escaping(results_dir: Path) -> None:
    records = [r for r in _records(results_dir) if not (r["method"] == "finetune" and r["seed"] == 1 and r["similar"] == 10)]
    for r in records:
        r["dataset"] = "digits<b>&amp;"
    (results_dir / "results.json").write_text(json.dumps(records), encoding="utf-8")
    md, page, p = _build(results_dir, None)
    assert "<b>" not in page and "digits&lt;b&gt;&amp;amp;" in page
    assert "missing-rows" in {a.get("id") for _, a in p.tags}
    text = "".join(p.text)
    assert "1 (method, seed) row(s) are absent" in text and "digits<b>&amp;, C=10: finetune, seed 1" in text
    assert "## Missing rows" in md


CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || (e.target && e.target.tagName))), true);
window.addEventListener("load", () => {
  const imgs = [...document.images];
  document.body.setAttribute("data-render-check", JSON.stringify({errors: window.__errors, images: imgs.length,
    decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    headings: [...document.querySelectorAll("h2")].map(h => h.textContent)}));
});
</script>"""


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium); the headless render check needs it")
def test_renders_in_headless_chromium(results_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    _, page, _ = _build(results_dir, make_details(_records(results_dir)))
    # The page has no script of its own; a copy gets one that records load errors and image decoding.
    probe = results_dir / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + CHECK_SCRIPT, 1), encoding="utf-8")
    profile = tmp_path_factory.mktemp("chromium-profile")
    run = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=90, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    match = re.search(r'data-render-check="([^"]*)"', run.stdout)
    assert match, run.stdout[:2000]
    check = json.loads(html.unescape(match.group(1)))
    assert check["errors"] == [] and check["images"] == check["decoded"] == 5, check
    assert {"Setup", "Findings", "Membership inference: ROC curves", "Notes"} <= set(check["headings"])
    assert not [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
