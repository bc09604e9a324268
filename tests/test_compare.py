from __future__ import annotations

import json

from pipeline_lib.compare import answers_table, build_report, curves
from pipeline_lib.questions import load_questions


def _fake_model(tmp_path, name, loss0):
    d = tmp_path / name
    (d / "adapter").mkdir(parents=True)
    hist = [
        {"step": s, "loss": loss0 / s, "learning_rate": 0.001 * (10 - s) / 10, "epoch": s / 10}
        for s in range(1, 10)
    ]
    (d / "log_history.json").write_text(json.dumps(hist))
    answers = d / "answers.jsonl"
    answers.write_text(
        "".join(
            json.dumps(
                {
                    "model": name,
                    "id": q.id,
                    "question": q.question,
                    "kind": q.kind,
                    "answer": f"{name} says {q.id}",
                    "score": 0.5 if q.kind == "fact" else None,
                }
            )
            + "\n"
            for q in load_questions()
        )
    )
    return {
        "model_name": name,
        "base_model": f"tiny:{name}",
        "train": {
            "adapter_dir": str(d / "adapter"),
            "run_id": name,
            "metrics": {
                "train_loss": loss0,
                "eval_loss": loss0 + 0.1,
                "steps": 9,
                "train_runtime_s": 3.0,
                "real_tokens_per_s": 100.0,
                "peak_memory_gib": 0.5,
            },
            "quantization": {"share_4bit": 1.0, "footprint_bytes": 1024**2},
        },
        "answers": {"answers_path": str(answers), "fact_accuracy": 0.5, "mean_score": 0.5, "seconds": 1.0},
    }


def test_report_has_every_question_and_model(tmp_path):
    results = [_fake_model(tmp_path, "a", 2.0), _fake_model(tmp_path, "b", 1.0)]
    files = build_report(results, tmp_path / "out", title="t")
    table = answers_table({r["model_name"]: r["answers"]["answers_path"] for r in results})
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
