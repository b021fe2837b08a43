"""lab.compiled_cache_write: scatter_ leaves two whole-cache copies in the compiled graph, index_put_ none, and
both decode alike."""
import pytest

torch = pytest.importorskip("torch")

from lab.compiled_cache_write import main  # noqa: E402


def test_index_put_writes_in_place_where_scatter_copies_the_cache(tmp_path):
    df = main(["--batch", "2", "--budgets", "64", "--heads", "8", "--kv-heads", "2", "--head-dim", "16",
               "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "w.csv")])
    copies = dict(zip(df["write"], df["whole_copies"]))
    assert copies == {"scatter_": 2, "index_put_": 0}  # K and V each copied back, or neither
    assert df["out_sum"].nunique() == 1
    assert (tmp_path / "w.csv").exists()
