"""Stage ``export``: the pipeline's final model out of the pipeline — a Hugging Face ``transformers`` directory
(:mod:`gptlab.formats.hf_write`) and a GGUF file with an Ollama ``Modelfile`` beside it (:mod:`gptlab.formats.gguf_write`), for
``AutoModelForCausalLM.from_pretrained``, llama.cpp and ``ollama create``.

Each export is read back with gptlab's own importers (:mod:`gptlab.formats.pretrained`) and compared with the checkpoint
on fixed prompts: the largest logit difference and whether greedy continuations agree are the stage's metrics,
so a broken export shows in ``dvc metrics show``, not at the user's ``ollama run``. The files are logged to the
stage's MLflow run and tagged onto the registered version of the DPO model whose weights they are.

A model GGUF cannot carry (a SentencePiece vocabulary such as Gemma 3's) gets the Hugging Face export alone, and
a GGUF gptlab cannot read back (Llama 3.1+'s ``rope_freqs``) goes unchecked: the metrics say which, and why.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptlab.errors import UserError
from gptlab.fileio import write_json
from gptlab.formats.gguf_read import GGUFImportError
from gptlab.formats.gguf_write import QTYPES, GGUFExportError, export_gguf, modelfile_path
from gptlab.formats.hf_write import DTYPES, export_hf
from gptlab.formats.pretrained import load_pretrained
from gptlab.generate import generate
from gptlab.load import load_checkpoint, load_tokenizer
from stages import registry, tracking
from stages.entry import stage_main
from stages.params import load_section

REGISTERED_NAME = "gptlab-dpo"
"""The registered model the exports belong to (:mod:`stages.dpo`'s)."""


@dataclass
class ExportParams:
    gguf_type: str = "q8_0"
    """GGUF tensor type (``f16``, ``q8_0``, …: :data:`gptlab.formats.gguf_write.QTYPES`)."""
    hf_dtype: str | None = None
    """Weights' dtype in the Hugging Face directory (``float32``, ``bfloat16``, ``float16``); None: as trained."""
    check_prompts: list[str] = field(
        default_factory=lambda: ["Give three tips for staying healthy.", "The sky"]
    )
    """Prompts the exports are compared with the checkpoint on."""
    check_new_tokens: int = 16
    """Greedy tokens generated per check prompt."""

    def __post_init__(self) -> None:  # checked before anything is written
        if self.gguf_type not in QTYPES:
            raise UserError(f"export.gguf_type must be one of {', '.join(QTYPES)}, got {self.gguf_type!r}")
        if self.hf_dtype is not None and self.hf_dtype not in DTYPES:
            raise UserError(
                f"export.hf_dtype must be null or one of {', '.join(DTYPES)}, got {self.hf_dtype!r}"
            )
        if not self.check_prompts or self.check_new_tokens < 1:
            raise UserError("export.check_prompts must not be empty and export.check_new_tokens must be >= 1")


def compare(reference, exported, tokenizer, prompts: list[str], new_tokens: int) -> dict[str, float]:
    """The largest absolute logit difference over the prompts' positions, and the fraction of prompts whose
    greedy continuations are identical."""
    reference.eval()
    exported.eval()
    worst, same = 0.0, 0
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        x = torch.tensor([ids])
        with torch.no_grad():
            a, b = reference(x).float(), exported(x).float()
        vocab = min(a.size(-1), b.size(-1))  # a padded vocabulary's extra rows never produce a token
        worst = max(worst, float((a[..., :vocab] - b[..., :vocab]).abs().max()))
        outs = [
            generate(m, [ids], max_new_tokens=new_tokens, eos_id=tokenizer.stop_ids)[0]
            for m in (reference, exported)
        ]
        same += outs[0] == outs[1]
    return {"max_abs_logit_diff": worst, "greedy_match": same / len(prompts)}


def export_model(params: ExportParams, checkpoint: Path, hf_out: Path, gguf_out: Path) -> dict:
    """Write both exports of ``checkpoint`` and check them against it; returns the stage's metrics."""
    export_hf(checkpoint, hf_out, dtype=params.hf_dtype)
    metrics: dict = {"hf_dtype": params.hf_dtype or "float32", "gguf_type": params.gguf_type}
    exports = [("hf", hf_out)]
    try:
        export_gguf(checkpoint, gguf_out, qtype=params.gguf_type, modelfile=True)
        exports.append(("gguf", gguf_out))
    except GGUFExportError as exc:  # the HF export stands on its own
        metrics["gguf"] = f"not exported: {exc}"
    reference, _ = load_checkpoint(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    for kind, path in exports:
        try:
            exported, _, _ = load_pretrained(path, progress=False)
        except GGUFImportError as exc:
            metrics["gguf"] = f"exported, not checked: gptlab cannot read it back ({exc})"
            continue
        checked = compare(
            reference, exported.float(), tokenizer, params.check_prompts, params.check_new_tokens
        )
        metrics.update({f"{kind}_{k}": v for k, v in checked.items()})
    metrics["hf_bytes"] = sum(f.stat().st_size for f in hf_out.iterdir() if f.is_file())
    if gguf_out.is_file():
        metrics["gguf_bytes"] = gguf_out.stat().st_size
    return metrics


def tag_registered_version(checkpoint: Path, run_id: str, gguf_name: str | None) -> None:
    """Point the registered DPO model version of ``checkpoint``'s weights at this run's exports."""
    version = registry.registered_version(REGISTERED_NAME, checkpoint)
    if version is None:
        return  # the DPO stage did not register these weights (e.g. run outside the pipeline)
    tags = {"gptlab.export.run_id": run_id, "gptlab.export.hf": f"runs:/{run_id}/hf"}
    if gguf_name is not None:
        tags["gptlab.export.gguf"] = f"runs:/{run_id}/gguf/{gguf_name}"
    client = tracking.mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(REGISTERED_NAME, version.version, key, value)


@stage_main("export")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint to export (the DPO model)")
    parser.add_argument("--hf", type=Path, required=True, help="output Hugging Face model directory")
    parser.add_argument(
        "--gguf", type=Path, required=True, help="output .gguf file (its Modelfile beside it)"
    )
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    params = load_section("export", ExportParams)
    with tracking.stage_run("export", params) as run:
        metrics = export_model(params, args.model, args.hf, args.gguf)
        write_json(args.metrics, metrics)
        tracking.log_metrics(metrics)
        tracking.mlflow.log_artifacts(str(args.hf), artifact_path="hf")
        written = args.gguf.is_file()
        if written:
            tracking.mlflow.log_artifact(str(args.gguf), artifact_path="gguf")
            tracking.mlflow.log_artifact(str(modelfile_path(args.gguf)), artifact_path="gguf")
        tag_registered_version(args.model, run.info.run_id, args.gguf.name if written else None)
    if "gguf" in metrics:
        print(f"export: GGUF {metrics['gguf']}")
    gguf = f"{metrics['gguf_greedy_match']:.2f}" if "gguf_greedy_match" in metrics else "-"
    print(
        f"export: HF + GGUF {params.gguf_type} (greedy match {metrics['hf_greedy_match']:.2f} / {gguf}) "
        f"-> {args.gguf.parent}/"
    )


if __name__ == "__main__":
    main()
