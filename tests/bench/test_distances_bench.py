import json

from tokenmover.bench.distances import BenchConfig, format_table, run_benchmark, write_outputs
from tokenmover.cli import main


def test_tiny_benchmark_writes_every_row_and_ratio(tmp_path):
    config = BenchConfig(sizes=(150,), positions=8, repeats=1, external_positions=1, out_dir=str(tmp_path))
    result = run_benchmark(config, log=lambda _: None)
    methods = {r["method"] for r in result["rows"]}
    for name in ["kl (plain torch)", "kl", "k3", "tree", "hybrid (top-16)", "forest (4 trees)", "sliced (16 dirs)",
                 "sinkhorn (top-32)", "POT emd2 (exact, fwd only)", "POT sliced (16 dirs, fwd+bwd)"]:
        assert name in methods
    kl_row = next(r for r in result["rows"] if r["method"] == "kl (plain torch)")
    assert kl_row["x_kl"] == 1.0
    assert all(r["ms_per_1k_positions"] > 0 for r in result["rows"] if r["ms_per_1k_positions"] is not None)
    paths = write_outputs(result, tmp_path)
    assert json.loads(paths["json"].read_text())["builds"][0]["vocab_size"] == 150
    assert paths["png"].stat().st_size > 1000
    assert "| 150 | tree |" in format_table(result)


def test_infeasible_baselines_say_why(tmp_path):
    config = BenchConfig(sizes=(120,), positions=4, repeats=1, dense_limit_bytes=10.0, out_dir=str(tmp_path))
    result = run_benchmark(config, log=lambda _: None)
    emd = next(r for r in result["rows"] if r["method"].startswith("POT emd2"))
    assert emd["ms_per_1k_positions"] is None and "infeasible: dense V x V" in emd["note"]


def test_cli_bench_runs(tmp_path, capsys):
    code = main(["bench", "--sizes", "100", "--positions", "4", "--repeats", "1", "--no-external",
                 "--out", str(tmp_path)])
    assert code == 0
    assert (tmp_path / "distances.json").is_file()
    assert "wrote" in capsys.readouterr().out
