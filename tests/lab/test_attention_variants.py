"""lab.attention_variants: the comparison of bench_attention's kernel variants (plain CSV, no GPU)."""
import csv

from lab import attention_variants


def _row(variant, policy, us, block_n=0, fraction=""):
    return {"model": "gpt-j-6b", "batch": "1", "tokens": "820", "policy": policy, "block_n": block_n,
            "us_per_layer": str(us), "variant": variant, "fraction": fraction}


def test_ratio_takes_the_fastest_configuration_per_policy():
    rows = [_row("shipped", "full", 10.0, fraction="0.5"), _row("shipped", "keyformer", 14.0),
            _row("shipped", "keyformer", 12.0, block_n=16, fraction="0.4"),
            _row("write_first", "full", 8.0), _row("write_first", "keyformer", 8.4)]
    out = attention_variants.compare(rows)
    assert out["shipped"]["points"][("gpt-j-6b", 1, 820)] == {"full": 10.0, "keyformer": 12.0, "ratio": 1.2}
    assert out["shipped"]["median_ratio"] == 1.2 and out["shipped"]["worst_ratio"] == 1.2
    assert out["shipped"]["median_keyformer_fraction"] == 0.4  # the fraction of the fastest row
    assert out["write_first"]["median_ratio"] == 1.05
    assert out["write_first"]["median_full_fraction"] is None  # no ceiling given
    text = attention_variants.table(out)
    assert "1.20" in text and "write_first: Keyformer/full median 1.05" in text


def test_cli_errors_name_the_file(tmp_path, capsys):
    assert attention_variants.main([str(tmp_path / "missing.csv")]) == 2
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert attention_variants.main([str(bad)]) == 2
    assert "not a bench_attention CSV" in capsys.readouterr().err
    good = tmp_path / "good.csv"
    with open(good, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(_row("shipped", "full", 1.0)))
        w.writeheader()
        w.writerows([_row("shipped", "full", 10.0), _row("shipped", "keyformer", 11.0)])
    assert attention_variants.main([str(good), "--json"]) == 0
    assert '"ratio": 1.1' in capsys.readouterr().out


def test_keyformer_only_variants_borrow_the_full_cache_time_of_their_base():
    # bench_attention times the full cache once for variants that differ only in Keyformer-only options
    rows = [_row("write_first", "full", 8.0), _row("write_first", "keyformer", 10.0),
            _row("write_first+pos32+lane_partials", "keyformer", 9.0)]
    out = attention_variants.compare(rows)
    assert out["write_first+pos32+lane_partials"]["points"][("gpt-j-6b", 1, 820)] == {
        "full": 8.0, "keyformer": 9.0, "ratio": 1.125}
    # the full cache may have run under a variant that has Keyformer-only options too
    rows = [_row("write_first+pos32", "full", 8.0), _row("write_first+pos32+lane_partials", "keyformer", 9.0)]
    assert attention_variants.compare(rows)["write_first+pos32+lane_partials"]["points"][
        ("gpt-j-6b", 1, 820)]["full"] == 8.0
    assert attention_variants.full_cache_variant("pos32+short_finish") == "shipped"
    assert attention_variants.full_cache_variant("write_first+pos32+l2_hints") == "write_first+l2_hints"
