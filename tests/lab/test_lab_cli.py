"""lab/'s benchmarks check their arguments on the CPU and refuse to run without a GPU."""
import pytest

torch = pytest.importorskip("torch")

from measure import campaign  # noqa: E402


def test_gpu_benchmarks_check_their_arguments_and_need_a_gpu(capsys):
    from lab import bench_attention, profile_step

    assert bench_attention.parse_config("64x4x3r168") == (64, 4, 3, 168)
    assert bench_attention.parse_config("default") == (0, 4, 3, None)
    for argv in (["--out", "x", "--configs", "3x4"], ["--out", "x", "--batch", "0"],
                 ["--out", "x", "--programs-per-sm", "2,0"], ["--out", "x", "--models", "gpt-j-6b,bert"]):
        with pytest.raises(SystemExit) as e:
            bench_attention.main(argv)
        assert e.value.code == 2
    assert "expected" in capsys.readouterr().err
    assert profile_step.parse_point("gpt-j-6b,64,1024,keyformer,0.2") == campaign.Point(
        "gpt-j-6b", "decode", 64, 1024, 0.2, "keyformer")
    with pytest.raises(SystemExit):
        profile_step.main(["--point", "gpt-j-6b,1"])
    from lab import ablate_keyformer, bench_gemm_small

    for main, argv in ((bench_gemm_small.main, ["--out", "x", "--match", "("]),
                       (ablate_keyformer.main, ["--out", "x", "--ablations", "z_store,nope"]),
                       (ablate_keyformer.main, ["--out", "x", "--l2-persist", "half"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "not a regular expression" in capsys.readouterr().err
    from lab import bench_gemv

    # GPT-J-6B's stacked products: QKV (3 x 4096 rows) with MLP-up (16384), output (4096 wide) with MLP-down (16384)
    gptj = {p["name"]: p["shapes"] for p in bench_gemv.products("gpt-j-6b")}
    assert gptj == {"qkv+up": [(12288, 4096), (16384, 4096)], "out+down": [(4096, 4096), (4096, 16384)],
                    "lm_head": [(50400, 4096)]}
    if not torch.cuda.is_available():
        assert bench_gemv.main(["--out", "x"]) == 2
        assert bench_attention.main(["--out", "x"]) == 2
        assert profile_step.main(["--point", "gpt-j-6b,1,1024,full,1"]) == 2
