"""reports/keyformer-paper/headline.md is a claim: its tables must be what make_paper_context.py computes from the
shipped engines and the committed data today (a refit that moves them fails here, not in a reader's hands)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = (ROOT / "reports" / "keyformer-paper" / "headline.md").read_text()


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_paper_context", ROOT / "reports" / "make_paper_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("table", ["request_rows", "transformers_rows"])
def test_headline_tables_are_what_the_engines_predict_today(script, table):
    rows = getattr(script, table)()
    for values in rows.itertuples(index=False):
        line = "| " + " | ".join(str(v) for v in values) + " |"
        assert line in HEADLINE, f"reports/keyformer-paper/headline.md lacks {line}: run reports/make_paper_context.py"
