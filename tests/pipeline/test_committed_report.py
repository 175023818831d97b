"""The committed pipeline report is what the code produces now (issue 16 item 12): rerun the pipeline at the
settings in docs/results/pipeline/config.json and compare the summary table line by line. Slow (the default
run: minutes); run with ``python -m pytest -m slow``. It fails until the committed report is regenerated
after a change that moves its numbers."""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path

import pytest
from rich.console import Console

from ggprior.pipeline import PipelineConfig, run_pipeline

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "results" / "pipeline"


def summary_table(report: str) -> list[str]:
    """The lines of the report's summary table: the first run of ``|`` lines after ``## Summary``."""
    lines = report.splitlines()
    table: list[str] = []
    for ln in lines[lines.index("## Summary") + 1:]:
        if ln.startswith("|"):
            table.append(ln)
        elif table:
            break
    return table


def test_summary_table_reads_the_table_only():
    text = "# r\n\n## Summary\n\n| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n\n## Next\n\n| x |\n|---|\n| 9 |\n"
    assert summary_table(text) == ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |"]


@pytest.mark.slow
def test_committed_pipeline_report_matches_a_fresh_run(tmp_path):
    config = json.loads((COMMITTED / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(PipelineConfig)}
    cfg = PipelineConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields})
    run_pipeline(cfg, tmp_path, console=Console(quiet=True), progress=False)
    want = summary_table((COMMITTED / "report.md").read_text())
    got = summary_table((tmp_path / "report.md").read_text())
    assert len(want) > 2
    assert got == want, "committed report differs from a fresh run:\n" + "\n".join(
        difflib.unified_diff(want, got, "committed", "fresh", lineterm=""))
