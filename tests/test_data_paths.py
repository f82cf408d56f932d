"""The data path of each result (memory, stream, subsample), as the terminals and the HTML report show it."""

from __future__ import annotations

from leakaudit.data_paths import records, summary_lines
from leakaudit.html_report import render

RESULTS = {
    "attack:decoder": {"data_path": {"attacker-train": {"data_path": "stream", "reason": "too big <for> memory"},
                                     "test": {"data_path": "memory", "reason": "fits"}}},
    "metric:dcor": {"metric": "dcor", "details": {"data_path": {"data_path": "stream", "reason": "block by block"}}},
    "metric:mi": {"metric": "mi", "details": {"data_path": {"data_path": "subsample", "reason": "5.0 % of rows"}}},
    "metric:old": {"metric": "old", "details": {}},  # a result from before data paths were recorded
    "baseline": {"subject": {}},
}


def test_records_find_attack_and_metric_paths_in_order():
    found = [(r.result, r.part, r.path) for r in records(RESULTS)]
    assert found == [("attack:decoder", "attacker-train", "stream"), ("attack:decoder", "test", "memory"),
                     ("metric:dcor", "", "stream"), ("metric:mi", "", "subsample")]


def test_summary_shows_what_did_not_read_into_memory():
    assert summary_lines(RESULTS) == [
        "data: attack:decoder attacker-train stream (too big <for> memory)",
        "data: metric:dcor stream (block by block)",
        "data: metric:mi subsample (5.0 % of rows)",
    ]
    in_memory = {"attack:x": {"data_path": {"test": {"data_path": "memory", "reason": "fits"}}}}
    assert summary_lines(in_memory) == ["data: every attack and metric read its rows into memory (within the memory budget)"]
    assert summary_lines({"metric:old": {"details": {}}}) == []


def test_html_report_lists_the_paths_escaped():
    page = render({"subject": {}, "metrics": {}, "results": RESULTS})
    assert "<h2>How the rows were read</h2>" in page
    assert "too big &lt;for&gt; memory" in page and "too big <for>" not in page
    assert "subsample" in page and "all rows" in page
    assert "How the rows were read" not in render({"subject": {}, "metrics": {}, "results": {"metric:old": {"details": {}}}})
