"""The merged model as an MLflow pyfunc: questions in, answers out, with the training prompt template.

Logged as code (MLflow's models-from-code: `Tracker.log_model` points MLflow at this file and attaches the
`pipeline_lib` package), never as a pickle, so what loads is this source and the merged weights in the
`model_dir` artifact. Input: a DataFrame with a `question` column (and an optional `input` column, the
Alpaca input field), or a list of questions; params: generation settings (`InferenceSettings`).
"""

from __future__ import annotations

from typing import Any

from mlflow.pyfunc import PythonModel

import mlflow


class QABotModel(PythonModel):
    def load_context(self, context) -> None:
        from pipeline_lib.devices import resolve_device
        from pipeline_lib.inference import load_for_inference

        self.device = resolve_device("auto")
        self.model, self.tokenizer = load_for_inference(context.artifacts["model_dir"], self.device)

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        from pipeline_lib.config import InferenceSettings
        from pipeline_lib.inference import generate_answers
        from pipeline_lib.prompts import build_prompt

        prompts = [build_prompt(q, x) for q, x in _questions(model_input)]
        settings = InferenceSettings(**{k: v for k, v in (params or {}).items() if v is not None})
        answers = generate_answers(self.model, self.tokenizer, prompts, settings, self.device)
        return [a["answer"] for a in answers]


def _questions(model_input: Any) -> list[tuple[str, str]]:
    """(question, input) pairs from a DataFrame with a `question` column (optional `input`), a list of
    questions, or a list of {"question", "input"} mappings."""
    if hasattr(model_input, "to_dict"):
        if "question" not in getattr(model_input, "columns", []):
            raise ValueError("the model input needs a 'question' column")
        rows = model_input.to_dict(orient="records")
    else:
        rows = [r if isinstance(r, dict) else {"question": r} for r in model_input]
    return [(str(r["question"]), _text(r.get("input"))) for r in rows]


def _text(value: Any) -> str:
    """A cell as text: missing (None, NaN) is ''."""
    return "" if value is None or value != value else str(value)


mlflow.models.set_model(QABotModel())
