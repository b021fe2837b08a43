"""kfsim report writes every figure, a Markdown page and an HTML page with the figures embedded."""
from click.testing import CliRunner

from kfsim.cli import cli

FIGURES = ["roofline", "latency_vs_context", "max_batch", "frontier", "speedup", "serving", "bytes"]


def test_report_files(tmp_path):
    r = CliRunner().invoke(cli, ["report", "--model", "llama-3-8b", "--gpus", "h100,l4", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "report.html").read_text()
    md = (tmp_path / "report.md").read_text()
    for name in FIGURES:
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
        assert f"({name}.png)" in md
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert "http" not in page  # opens with no network


def test_report_bad_gpu(tmp_path):
    r = CliRunner().invoke(cli, ["report", "--gpus", "h100,h999", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown gpu 'h999'" in r.output
