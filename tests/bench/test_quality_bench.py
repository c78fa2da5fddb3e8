"""bench/quality.py --quick: the quality pass on a generated file finds what was planted (a few seconds)."""

from bench.quality import generate, main, quality_alone


def test_quick_run_reports_the_planted_duplicates(capsys):
    main(["--quick", "--tokenizer", "none", "--mb", "0.1"])
    out = capsys.readouterr().out
    assert "quality pass alone:" in out and "MB/s" in out
    _, _, summary = quality_alone(generate(100_000), None)
    assert summary["exact_duplicates"]["count"] > 0 and summary["near_duplicates"]["count"] > 0
    assert summary["languages"].keys() >= {"en", "de", "fr"}
