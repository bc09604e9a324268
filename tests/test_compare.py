"""The comparison: scoreboard, best-model rule, answers before/after, plots, the report and its findings."""

from __future__ import annotations

import json

import pandas as pd
from fakes import model_result

from pipeline_lib.compare import (
    BEST_RULE,
    CompareJob,
    answers_table,
    best_model,
    compare_stage,
    curves,
    findings,
    scoreboard,
)


def _results(tmp_path):
    # "a" has the lower training loss but the worse question score: the rule must not pick it.
    a = model_result(tmp_path, "a", 1.0, score_before=0.0, score=0.2, bpb_before=3.0, bpb=1.5)
    b = model_result(tmp_path, "b", 2.0, score_before=0.1, score=0.5, bpb_before=3.2, bpb=1.9)
    c = model_result(tmp_path, "c", 3.0, score_before=0.0, score=0.5, bpb_before=3.1, bpb=1.7)
    return [a, b, c]


def test_scoreboard_has_the_before_and_after_of_every_model(tmp_path):
    results = _results(tmp_path)
    board = scoreboard(results)
    assert list(board["model"]) == ["a", "b", "c"]
    row = board.set_index("model").loc["b"]
    assert (row["question_score_before"], row["question_score"]) == (0.1, 0.5)
    assert (row["bits_per_byte_before"], row["bits_per_byte"]) == (3.2, 1.9)
    assert row["train_time_s"] == results[1].train.metrics.train_runtime_s
    assert row["trainable_params"] == results[1].train.trainable_params


def test_best_model_is_chosen_on_question_score_then_bits_per_byte_never_training_loss(tmp_path):
    board = scoreboard(_results(tmp_path))
    assert board.sort_values("final_train_loss").iloc[0]["model"] == "a"  # lowest training loss...
    assert best_model(board) == "c"  # ...but c ties b on score and has fewer bits per byte
    assert "never by training loss" in BEST_RULE


def test_answers_table_puts_before_and_after_side_by_side(tmp_path):
    table = answers_table(_results(tmp_path))
    assert len(table) == 15 * 3
    row = table[(table["id"] == 1) & (table["model"] == "b")].iloc[0]
    assert row["answer_before"] == "b before says 1" and row["answer_after"] == "b says 1"
    assert {"score_before", "score_after", "matched_after"} <= set(table.columns)


def test_findings_cite_their_numbers(tmp_path):
    text = "\n".join(findings(scoreboard(_results(tmp_path))))
    assert "**c** is the best model" in text and "0.000 → 0.500" in text and "3.100 → 1.700" in text
    assert "lowered a's held-out bits per byte by 50%" in text  # (3.0 - 1.5) / 3.0
    assert "The lowest final training loss (a" in text and "does not make the best model" in text


def test_compare_stage_writes_every_artifact_and_a_report_from_the_numbers(tmp_path):
    results = _results(tmp_path)
    out = compare_stage(
        CompareJob(results=results, out_dir=str(tmp_path / "out"), title="t", data="smoke rows")
    )
    names = {
        "scoreboard.csv",
        "answers.csv",
        "curves.csv",
        "report.md",
        "curves.png",
        "heldout.png",
        "system.png",
    }
    assert names | {"speed.png"} == set(out.files)
    for name in names:
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    report = (tmp_path / "out" / "report.md").read_text()
    for section in (
        "## Setup",
        "## Training",
        "## Evaluation",
        "## Comparison",
        "## Resource use",
        "## Findings",
    ):
        assert section in report, section
    assert "Best model: **c**" in report and out.best_model == "c"
    board = pd.read_csv(tmp_path / "out" / "scoreboard.csv")
    # the report's figures are the results' own
    for r in results:
        m = r.train.metrics
        assert f"{m.bits_per_byte_before:.3f} → {m.bits_per_byte:.3f}" in report
        assert board.set_index("model").loc[r.model_name, "bits_per_byte"] == m.bits_per_byte
    assert json.loads(json.dumps(out.scoreboard))[0]["model"] == "a"


def test_curves_long_table():
    df = curves({"m": [{"step": 1, "loss": 2.0, "learning_rate": 0.1}, {"step": 2, "eval_loss": 1.0}]})
    assert list(df["step"]) == [1] and df.iloc[0]["loss"] == 2.0
