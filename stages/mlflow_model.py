"""MLflow pyfunc wrapper around a gptlab checkpoint ("models from code", MLflow 3).

Logged by :func:`stages.registry.log_model` with the checkpoint directory as the ``checkpoint`` artifact and the
``gptlab`` package as code, so ``mlflow.pyfunc.load_model("models:/gptlab-sft/1")`` works anywhere torch and
tiktoken are installed. Input: a list of strings (or a DataFrame whose first column holds them).
Output: for a classifier, ``[{"label", "probability"}]``; for a language model, ``[{"response"}]`` generated from
the prompt style the checkpoint was trained with (Alpaca or the model's chat template; greedy).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class GptlabModel(PythonModel):
    def load_context(self, context) -> None:
        from gptlab.load import load_checkpoint, load_tokenizer

        self.model, self.config = load_checkpoint(context.artifacts["checkpoint"])
        self.tokenizer = load_tokenizer(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params: dict | None = None) -> list[dict]:
        from gptlab.classify import encode_padded, predict
        from gptlab.instruct import generate_responses
        from gptlab.prompts import Prompter

        texts = list(model_input.iloc[:, 0]) if hasattr(model_input, "iloc") else list(model_input)
        meta = self.config.get("meta", {})
        if self.model.config.num_classes is not None:
            tok = self.tokenizer
            ids = encode_padded(texts, tok.encode, max_length=meta["max_length"], pad_id=tok.pad_id)
            probs = predict(self.model, ids)
            labels = meta["labels"]
            return [{"label": labels[int(p.argmax())], "probability": float(p.max())} for p in probs]
        max_new = int((params or {}).get("max_new_tokens", 128))
        entries = [{"instruction": t, "input": ""} for t in texts]
        prompter = Prompter(meta.get("prompt_format", "alpaca"), self.tokenizer)
        answers = generate_responses(self.model, entries, prompter, max_new_tokens=max_new, progress=False)
        return [{"response": answer} for answer in answers]


mlflow.models.set_model(GptlabModel())
