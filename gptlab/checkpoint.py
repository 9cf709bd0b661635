"""Checkpoint directories: ``model.safetensors`` + ``config.json``, plus resumable training state.

Layout (one directory per checkpoint, as Hugging Face and litgpt do)::

    model.safetensors     weights (GPT-2 or Hugging Face parameter names); a tied head is stored once
    config.json           {"format", "architecture": "gpt" | "decoder", "model": its config's fields,
                           "tokenizer": "gpt2" | "hf", "vocab_size", "meta": {...}}
    tokenizer.json …      the model's own tokenizer and chat template (``"tokenizer": "hf"``; see
                          :mod:`gptlab.hf_tokenizer`); GPT-2 models use tiktoken's and store none
    training_state.pt     optimizer, step, RNG states, data position (only for training checkpoints)

Writing, validating and resuming live here; building a model or tokenizer from a directory is
:mod:`gptlab.load`, which imports every architecture (so a stage that only writes GPT checkpoints, like
pretraining, does not depend on the decoder or LoRA code).

Every write goes to a temporary sibling and is renamed into place, so a crash never leaves a half-written
checkpoint where a reader would find it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gptlab.config import DecoderConfig, GPTConfig
from gptlab.errors import UserError
from gptlab.fileio import make_temp, replace_dir, sweep_temps

CONFIGS: dict[str, type] = {"gpt": GPTConfig, "decoder": DecoderConfig}
"""``config.json``'s ``architecture`` -> its config class (absent means ``gpt``); the model classes are
:data:`gptlab.load.ARCHITECTURES`'."""

FORMAT = "gptlab-checkpoint/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINING_STATE = "training_state.pt"


class CheckpointError(UserError):
    """A checkpoint directory that cannot be read as asked; the message names the file and the problem."""


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the duplicate tied head, contiguous and on CPU (safetensors needs both)."""
    state = model.state_dict()
    if model.config.tied:
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def architecture(model: torch.nn.Module) -> str:
    """``config.json``'s name for ``model``'s architecture, told by its config's type."""
    for name, cls in CONFIGS.items():
        if isinstance(getattr(model, "config", None), cls):
            return name
    raise TypeError(f"not a gptlab model: {type(model).__name__}")


def save_checkpoint(
    model: torch.nn.Module,
    directory: str | Path,
    *,
    tokenizer: Any = "gpt2",
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a checkpoint directory, replacing any previous one atomically.

    ``tokenizer``: ``"gpt2"`` (tiktoken's, nothing stored) or a tokenizer object with ``save(directory)``
    (:class:`gptlab.hf_tokenizer.HFTokenizer`), whose files are stored beside the weights.
    """
    directory = Path(directory)
    tmp = make_temp(directory, directory=True)
    try:
        save_file(model_state(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        kind = tokenizer if isinstance(tokenizer, str) else tokenizer.name
        if kind == "hf":
            tokenizer.save(tmp)
        config = {
            "format": FORMAT,
            "architecture": architecture(model),
            "model": model.config.to_dict(),
            "tokenizer": kind,
            "vocab_size": model.config.vocab_size,
            "meta": meta or {},
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        # Keep an existing training state (it belongs to the same run) unless the caller replaces it.
        if (directory / TRAINING_STATE).exists():
            shutil.copy2(directory / TRAINING_STATE, tmp / TRAINING_STATE)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory (validated)."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {directory} a gptlab checkpoint directory?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path}: expected a {FORMAT!r} config with a 'model' section")
    arch = data.get("architecture", "gpt")
    if arch not in CONFIGS:
        raise CheckpointError(f"{path}: architecture {arch!r}; expected one of {', '.join(CONFIGS)}")
    try:
        CONFIGS[arch].from_dict(data["model"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return data


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy ``state`` into ``model`` after checking names and shapes, naming any mismatch."""
    expected = model.state_dict()
    if model.config.tied:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' …' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{source}: tensors do not match the config ({'; '.join(parts)})")
    for name, tensor in state.items():
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, but the config expects {want}"
            )
    on_meta = next(iter(expected.values())).is_meta
    # A model built on the meta device takes the tensors as they are (no second copy of the weights).
    model.load_state_dict(state, strict=not model.config.tied, assign=on_meta)
    if on_meta:
        model.finish_loading()


class Checkpointer:
    """Saves/loads a training run's checkpoint directory; handed to :func:`gptlab.train.train`.

    The training loop stays free of file I/O: it calls :meth:`save` with the model and a plain dict of
    training state, and :meth:`load_state` when resuming.
    """

    def __init__(self, directory: str | Path, *, tokenizer: str = "gpt2", meta: dict[str, Any] | None = None):
        self.directory = Path(directory)
        self.tokenizer = tokenizer
        self.meta = meta or {}

    def save(self, model: torch.nn.Module, training_state: dict[str, Any]) -> None:
        directory = self.directory
        tmp = make_temp(directory, directory=True)
        try:
            save_checkpoint(model, tmp / "ckpt", tokenizer=self.tokenizer, meta=self.meta)
            torch.save(training_state, tmp / "ckpt" / TRAINING_STATE)
            replace_dir(tmp / "ckpt", directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_state(self) -> dict[str, Any] | None:
        """Training state of the last checkpoint, or None when there is nothing to resume."""
        sweep_temps(self.directory)  # a run killed mid-swap left its previous checkpoint as `.old`
        path = self.directory / TRAINING_STATE
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several unrelated types for a corrupt pickle
            raise CheckpointError(f"{path}: unreadable training state ({exc})") from None

    def load_weights(self, model: torch.nn.Module) -> None:
        state = load_file(str(self.directory / WEIGHTS))
        load_state(model, state, source=str(self.directory / WEIGHTS))
