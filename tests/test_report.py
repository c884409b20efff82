"""report.html: self-contained, every section, data escaped; rendered in headless Chromium when present."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from evoray.plots import failure_rate_plot, score_histogram, wtl_bar_chart
from evoray.report import SECTIONS, find_stages, write_report
from evoray.schema import RESULT_SCHEMA

SECTION_IDS = [sid for sid, _, _ in SECTIONS]
EVIL = "<script>alert('x')</script>"


def _row(i: int, **kw) -> dict:
    base = {"id": f"id{i}", "instruction": f"instruction {i}", "input": "", "output": f"output {i}",
            "source": "toy", "meta": "{}", "parent_id": None, "round": None, "method_id": None,
            "status": None, "score": None, "explanation": None, "provider": "main", "model": "m",
            "reason": None, "rule": None, "attempts": 1, "raw": None}
    base.update(kw)
    return base


def _table(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), path)


LEDGER = {"providers": {"main": {"requests": 40, "succeeded": 38, "retries": 3, "rate_limited": 2, "errors": 2,
                                 "cache_hits": 5, "input_tokens": 12000, "output_tokens": 3400, "dollars": 0.0123,
                                 "model": "gpt-4o-mini"}},
          "total": {"requests": 40, "succeeded": 38, "retries": 3, "rate_limited": 2, "errors": 2, "cache_hits": 5,
                    "input_tokens": 12000, "output_tokens": 3400, "dollars": 0.0123}}
SUMMARY = {"test_sets": {"vicuna": {"win": 5, "tie": 2, "lose": 1, "failed": 0, "n": 8, "total": 8, "winning_score": 1.5},
                         "koala": {"win": 1, "tie": 1, "lose": 2, "failed": 1, "n": 4, "total": 5, "winning_score": 0.75}},
           "overall": {"win": 6, "tie": 3, "lose": 3, "failed": 1, "n": 12, "total": 13, "winning_score": 1.25}}


def _history() -> dict:
    steps = [{"step": 1, "candidates": [{"index": 0, "method_id": "c0", "failure_rate": 0.3, "text": "m0"},
                                        {"index": 1, "method_id": "c1", "failure_rate": 0.2, "text": "m1"}],
              "feedback": [f"feedback with {EVIL}"], "failed_proposals": [], "chosen": "c1",
              "chosen_failure_rate": 0.2, "improved": True, "adopted": "c1", "best_failure_rate": 0.2,
              "baseline_failure_rate": 0.4},
             {"step": 2, "candidates": [{"index": 0, "method_id": "c2", "failure_rate": 0.25, "text": "m2"}],
              "feedback": ["ok"], "failed_proposals": [{"index": 1, "feedback": "", "error": "ParseError"}],
              "chosen": "c2", "chosen_failure_rate": 0.25, "improved": False, "adopted": "c1",
              "best_failure_rate": 0.2, "baseline_failure_rate": 0.2}]
    return {"initial_method": {"name": "initial", "id": "init", "text": "x"}, "baseline_failure_rate": 0.4,
            "best_method": {"name": "step1-candidate-1", "id": "c1", "text": "best"}, "best_failure_rate": 0.2,
            "stopped": "no_improvement", "steps_run": 2, "dev_size": 6, "dev_ids": [], "dev_disjoint": True,
            "steps": steps}


def make_run(out: Path, with_pngs: bool = True, judge: bool = True) -> Path:
    # optimize/
    opt = out / "optimize"
    opt.mkdir(parents=True)
    hist = _history()
    (opt / "history.json").write_text(json.dumps(hist))
    (opt / "best_method.txt").write_text(f"Rewrite the instruction. {EVIL}\n{{instruction}}\n")
    (opt / "ledger.json").write_text(json.dumps(LEDGER))
    # evolve/
    ev = out / "evolve"
    _table(ev / "evolved.parquet", [_row(i, status="evolved", parent_id=f"p{i}", round=1, method_id="c1",
                                         meta=json.dumps({"trajectory": [f"evolved {i} {EVIL}"]})) for i in range(4)])
    _table(ev / "failed.parquet", [_row(10, status="failed", rule="sorry_short", parent_id="p10", round=1),
                                   _row(11, status="failed", rule="sorry_short"),
                                   _row(12, status="failed", rule=None, reason="provider error: 500")])
    (ev / "ledger.json").write_text(json.dumps(LEDGER))
    # rate/
    rate = out / "rate"
    buckets = {"<3": 1, "3": 0, "3.5": 1, "4": 1, "4.5": 2, "5": 1, "unparsed": 1}
    (rate).mkdir(parents=True)
    (rate / "scores.json").write_text(json.dumps({"buckets": buckets, "kept": 3, "rejected": 3, "failed": 1,
                                                  "threshold": 4.5, "top_k": None, "dimension": "accuracy"}))
    _table(rate / "kept.parquet", [_row(0, status="kept", score=5.0, explanation="fine"),
                                   _row(1, status="kept", score=4.5, instruction=EVIL, explanation=f"says {EVIL}")])
    _table(rate / "rejected.parquet", [_row(2, status="rejected", score=2.0, explanation="wrong & <bad>")])
    _table(rate / "failed.parquet", [_row(3, status="failed", reason="unparseable reply")])
    _table(rate / "random_baseline.parquet", [_row(2, status="random")])
    (rate / "ledger.json").write_text(json.dumps(LEDGER))
    (rate / "_SUCCESS.json").write_text("{}")
    if with_pngs:
        score_histogram(buckets, rate / "score_histogram.png")
        failure_rate_plot(hist["steps"], opt / "failure_rate.png")
    if judge:
        j = out / "judge"
        j.mkdir()
        (j / "summary.json").write_text(json.dumps(SUMMARY))
        if with_pngs:
            wtl_bar_chart(SUMMARY, j / "wtl.png")
    (out / "ledger.json").write_text(json.dumps(LEDGER))
    return out


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.section_ids: list[str] = []
        self.headed: set[str] = set()
        self._open: list[str] = []
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section_ids.append(a.get("id"))
            self._open.append(a.get("id"))
        if tag in ("h2", "h3") and self._open:
            self.headed.add(self._open[-1])
        if tag == "script":
            self.scripts += 1
        if "src" in a:
            self.srcs.append(a["src"])
        if "href" in a:
            self.hrefs.append(a["href"])

    def handle_endtag(self, tag):
        if tag == "section" and self._open:
            self._open.pop()


def _parse(text: str) -> _Collector:
    c = _Collector()
    c.feed(text)
    return c


def _check_self_contained(text: str) -> _Collector:
    c = _parse(text)
    assert c.scripts == 0, "no scripts in the report (data must be escaped)"
    assert c.srcs and all(s.startswith("data:image/png;base64,") for s in c.srcs), c.srcs[:3]
    assert all(h.startswith("#") for h in c.hrefs), [h for h in c.hrefs if not h.startswith("#")]
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<link" not in text.lower()
    return c


def test_run_report_is_self_contained_with_every_section(tmp_path):
    out = make_run(tmp_path / "run")
    path = write_report(out)
    assert path == out / "report.html"
    text = path.read_text(encoding="utf-8")
    c = _check_self_contained(text)
    assert c.section_ids == SECTION_IDS
    assert c.headed >= set(SECTION_IDS)
    # histogram, failure rate, wtl charts
    assert text.count("data:image/png;base64,") == 3
    # counts and content
    assert "sorry_short" in text and "provider error" in text
    assert "Win" in text and "vicuna" in text and "koala" in text
    assert "12,000" in text and "0.0123" in text
    assert "Rewrite the instruction." in text
    assert "did not run" not in text


def test_data_is_escaped(tmp_path):
    text = write_report(make_run(tmp_path / "run")).read_text(encoding="utf-8")
    assert "<script>" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "wrong &amp; &lt;bad&gt;" in text


def test_missing_pngs_are_drawn_from_the_json(tmp_path):
    out = make_run(tmp_path / "run", with_pngs=False)
    text = write_report(out).read_text(encoding="utf-8")
    _check_self_contained(text)
    assert text.count("data:image/png;base64,") == 3
    assert not (out / "rate" / "score_histogram.png").exists(), "the report does not write into stage folders"


def test_judge_not_run_and_single_stage_outdir(tmp_path):
    out = make_run(tmp_path / "run", judge=False)
    text = write_report(out).read_text(encoding="utf-8")
    judge = re.search(r'<section id="judge">(.*?)</section>', text, re.S).group(1)
    assert "did not run" in judge
    # a single-stage outdir: the rate folder on its own
    single = write_report(out / "rate").read_text(encoding="utf-8")
    c = _check_self_contained(single)
    assert c.section_ids == SECTION_IDS
    assert set(find_stages(out / "rate")) == {"rate"}
    for sid in ("optimization", "evolution", "judge"):
        body = re.search(rf'<section id="{sid}">(.*?)</section>', single, re.S).group(1)
        assert "did not run" in body, sid
    assert "kept" in single


def test_empty_folder_says_not_run(tmp_path):
    text = write_report(tmp_path).read_text(encoding="utf-8")
    c = _parse(text)
    assert c.section_ids == SECTION_IDS
    assert "No stage outputs were found" in text


def test_unreadable_file_does_not_lose_the_report(tmp_path):
    out = make_run(tmp_path / "run")
    (out / "judge" / "summary.json").write_text("{not json")
    text = write_report(out).read_text(encoding="utf-8")
    assert _parse(text).section_ids == SECTION_IDS
    assert "could not be built" in text


def _chromium_dom(html_path: Path, profile: Path) -> str:
    exe = shutil.which("chromium")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--dump-dom", html_path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_report_renders(tmp_path, capsys):
    """Rendered by headless Chromium when installed; otherwise parsed, and the reason printed."""
    out = make_run(tmp_path / "run")
    path = write_report(out)
    if shutil.which("chromium"):
        dom = _chromium_dom(path, tmp_path / "chromium-profile")
        how = "chromium"
    else:
        dom = path.read_text(encoding="utf-8")
        how = "html.parser"
        reason = "chromium absent (shutil.which('chromium') is None): parsed the HTML with html.parser instead"
        with capsys.disabled():
            print("\n" + reason)
        warnings.warn(reason)  # also listed in pytest's warnings summary
    c = _parse(dom)
    for sid in SECTION_IDS:
        assert sid in c.section_ids, f"section {sid} missing after {how}"
    assert c.headed >= set(SECTION_IDS)
    assert c.scripts == 0
    assert len([s for s in c.srcs if s.startswith("data:image/png;base64,")]) == 3
