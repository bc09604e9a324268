"""The merged model as an MLflow pyfunc: questions in, answers out, with the training prompt template."""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class QABotModel(mlflow.pyfunc.PythonModel):
    """Loads the merged transformers model from the `model_dir` artifact; `predict` takes a list of
    questions (or a DataFrame with a `question` column, optional `input`) and returns the answers."""

    def load_context(self, context) -> None:
        import torch

        from pipeline_lib.inference import load_for_inference

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_for_inference(context.artifacts["model_dir"], self.device)

    def predict(self, context, model_input: Any, params: dict | None = None) -> list[str]:
        from pipeline_lib.config import InferenceSettings
        from pipeline_lib.inference import generate_answers
        from pipeline_lib.prompts import build_prompt

        if hasattr(model_input, "to_dict"):
            rows = model_input.to_dict(orient="records")
            prompts = [build_prompt(r["question"], r.get("input") or "") for r in rows]
        else:
            prompts = [build_prompt(str(q)) for q in model_input]
        settings = InferenceSettings(**(params or {}))
        return [
            a["answer"] for a in generate_answers(self.model, self.tokenizer, prompts, settings, self.device)
        ]
