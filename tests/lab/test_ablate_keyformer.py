"""lab.ablate_keyformer: its edits still match the kernel, an ablated copy runs, the gap shares add up."""
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from measure import fused_attention  # noqa: E402
from lab.ablate_keyformer import EDITS, ablated_module, ablated_source, gap_shares, main, table  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("ablation", list(EDITS))
def test_every_ablation_edits_the_kernel_as_it_is(ablation):
    with open(fused_attention.__file__) as f:
        source = f.read()
    out = ablated_source(source, ablation)
    assert out != source
    compile(out, ablation, "exec")


def test_an_edit_that_no_longer_matches_names_the_ablation():
    with pytest.raises(ValueError, match="'noise'.*matches 0 places"):
        ablated_source("def f():\n    pass\n", "noise")
    with pytest.raises(ValueError, match="ablation 'nope': expected z_store"):
        ablated_source("", "nope")


def test_gap_shares_are_of_keyformer_extra_time():
    rows = [{"model": "m", "batch": 16, "tokens": 100, "ablation": a, "us_per_layer": us}
            for a, us in (("full", 100.0), ("keyformer", 120.0), ("z_store", 115.0), ("all", 100.0))]
    shares = {s["ablation"]: s["gap_share"] for s in gap_shares(rows)}
    assert shares == {"z_store": 0.25, "all": 1.0}
    assert "115.0 (+0.25)" in table(rows)


def test_an_ablated_copy_runs_in_place_of_the_kernel_and_is_put_back(tmp_path):
    from measure.kv_policies import EvictingCache

    real = sys.modules["measure.fused_attention"]
    with ablated_module("finish", str(tmp_path)):
        from measure.fused_attention import FusedKeyformerCache
        assert sys.modules["measure.fused_attention"] is not real
        torch.manual_seed(0)
        plain = EvictingCache("keyformer", 1, 2, 150, 30, 16, torch.float32, DEVICE)
        plain.fill_random(300)
        fused = FusedKeyformerCache(plain)
        q = torch.randn(1, 8, 1, 16, device=DEVICE)
        k, v = torch.randn(1, 2, 1, 16, device=DEVICE), torch.randn(1, 2, 1, 16, device=DEVICE)
        score = plain.score.clone()
        out = fused.decode(q, k, v, 300)
        assert out.shape == (1, 8, 1, 16) and torch.isfinite(out).all()
        # no finish kernel: no score changes but the new token's (its slot's score set to 0, one per KV head)
        changed = plain.score != score
        assert fused.fused.NSPLIT > 1 and int(changed.sum()) == 2 and (plain.score[changed] == 0).all()
    assert sys.modules["measure.fused_attention"] is real


def test_cli_refuses_an_unknown_ablation(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--out", "x.csv", "--ablations", "z_store,nope"])
    assert exc.value.code == 2 and "'nope': expected z_store" in capsys.readouterr().err


def test_l2_settings_are_named_or_whole_mib():
    from lab.ablate_keyformer import _l2_settings

    assert _l2_settings("default,off,on,12") == ["default", "off", "on", "12"]
    with pytest.raises(Exception, match="'1.5': expected default, off, on or MiB"):
        _l2_settings("off,1.5")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the L2 set-aside is a CUDA context's")
def test_the_l2_set_aside_is_set_and_read_back():
    from measure.l2_persist import l2_sizes, set_persisting_l2

    before = l2_sizes()["persisting_bytes"]
    try:
        assert set_persisting_l2(0) == 0
        assert 0 < set_persisting_l2(None) <= l2_sizes()["l2_bytes"]
    finally:
        set_persisting_l2(before)
