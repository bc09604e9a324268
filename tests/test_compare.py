from __future__ import annotations

from fakes import model_result

from pipeline_lib.compare import answers_table, build_report, curves


def test_report_has_every_question_and_model(tmp_path):
    results = [model_result(tmp_path, "a", 2.0), model_result(tmp_path, "b", 1.0)]
    files = build_report(results, tmp_path / "out", title="t")
    table = answers_table({r.model_name: r.answers.answers_path for r in results})
    assert len(table) == 15 and {"a", "b", "score:a", "score:b"} <= set(table.columns)
    assert table.iloc[0]["a"] == "a says 1"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Lowest training loss: **b**" in report
    assert "What is the capital city of Australia?" in report
    assert (tmp_path / "out" / "curves.png").stat().st_size > 5000
    assert set(files) == {"answers.csv", "curves.csv", "curves.png", "costs.csv", "report.md"}


def test_curves_long_table():
    df = curves({"m": [{"step": 1, "loss": 2.0, "learning_rate": 0.1}, {"step": 2, "eval_loss": 1.0}]})
    assert list(df["step"]) == [1] and df.iloc[0]["loss"] == 2.0
