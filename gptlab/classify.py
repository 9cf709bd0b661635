"""Text classification with a GPT (book ch. 6: finetuning for spam classification).

The recipe of the chapter: balance the classes by undersampling the majority class (``create_balanced_dataset``),
split 70/10/20 after a seeded shuffle (``random_split``), pad every message with ``<|endoftext|>`` to the longest
training message (``SpamDataset``), replace the LM head by a ``num_classes`` head and classify from the last
position's logits (``calc_loss_batch`` / ``calc_accuracy_loader``). Which parameters train is a choice: the
head only, the last block + final norm + head (the book's default), everything, or LoRA adapters (appendix E).
No file I/O here: the stage reads the TSV and hands the text in.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gptlab.batches import Splits
from gptlab.errors import UserError
from gptlab.model import GPT

TRAINABLE = ("head", "last_block", "all", "lora")


def _tab_fields(text: str, quoting: bool, source: str) -> Iterable[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank record."""
    if not quoting:
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                label, sep, message = line.partition("\t")
                yield n, [label, message] if sep else [line]
        return
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    start = last = 1
    for fields in reader:
        if any(f.strip() for f in fields):
            yield start, fields
            last = start
        start = reader.line_num + 1
    # A quote that never closes runs to the end of the file; pandas refuses that ("EOF inside string"), and
    # so do we rather than read the rest of the file as one message. strict parsing finds it.
    tail = "".join(text.splitlines(keepends=True)[last - 1 :])
    try:
        list(csv.reader(io.StringIO(tail, newline=""), delimiter="\t", strict=True))
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise UserError(f"{source}: line {last}: a quote opened here is never closed") from None


def parse_labeled_tsv(
    text: str, *, labels: Sequence[str], source: str = "data", quoting: bool = False
) -> list[tuple[int, str]]:
    """``label<TAB>message`` lines (the UCI SMS Spam Collection layout) to (class index, message).

    ``quoting`` reads the file as the book does, with ``pd.read_csv(sep="\\t")``'s CSV quote rules: a field
    that starts with ``"`` runs to its closing quote, across line breaks, and loses the quotes. In the UCI file
    that merges two pairs of lines and unquotes 534 messages; without it each line is one message, as written.
    """
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for n, fields in _tab_fields(text, quoting, source):
        label, message = fields[0], "\t".join(fields[1:])
        if len(fields) < 2:
            raise UserError(f"{source}: line {n}: expected 'label<TAB>text', found no tab")
        if not message.strip():
            raise UserError(
                f"{source}: line {n}: empty message after label {label!r}; expected 'label<TAB>text'"
            )
        if label not in index:
            raise UserError(
                f"{source}: line {n}: unknown label {label!r}; expected one of {', '.join(labels)}"
            )
        out.append((index[label], message))
    if not out:
        raise UserError(f"{source}: no labelled lines")
    return out


def _sample_order(n: int, seed: int) -> np.ndarray:
    # pandas' DataFrame.sample(k, random_state=seed) takes RandomState(seed).choice(n, k, replace=False),
    # which is the first k of RandomState(seed).permutation(n).
    return np.random.RandomState(seed).permutation(n)


def balance(examples: Sequence[tuple[int, str]], *, seed: int) -> list[tuple[int, str]]:
    """Undersample every class to the size of the smallest one, as the book's ``create_balanced_dataset``.

    Classes in label order; a larger class contributes ``df.sample(smallest, random_state=seed)`` of its
    examples (in that sampled order), the smallest class all of its own in file order — for the book's two
    classes, ``pd.concat([ham.sample(len(spam), random_state=123), spam])``.
    """
    by_class: dict[int, list[int]] = {}
    for i, (label, _) in enumerate(examples):
        by_class.setdefault(label, []).append(i)
    smallest = min(len(ix) for ix in by_class.values())
    keep = []
    for label in sorted(by_class):
        ix = by_class[label]
        keep += ix if len(ix) == smallest else [ix[j] for j in _sample_order(len(ix), seed)[:smallest]]
    return [examples[i] for i in keep]


def split(examples: Sequence, *, seed: int, train_frac: float = 0.7, val_frac: float = 0.1) -> Splits:
    """The book's ``random_split``: shuffle as ``df.sample(frac=1, random_state=seed)``, then
    train/validation/test = the first ``int(n * 0.7)`` / the next ``int(n * 0.1)`` / the rest."""
    if not (0 < train_frac < 1 and 0 <= val_frac < 1 and train_frac + val_frac < 1):
        raise UserError(f"train_frac ({train_frac}) and val_frac ({val_frac}) must leave a test split")
    items = [examples[i] for i in _sample_order(len(examples), seed)]
    train_end = int(len(items) * train_frac)
    val_end = train_end + int(len(items) * val_frac)
    return Splits(train=items[:train_end], val=items[train_end:val_end], test=items[val_end:])


def encode_padded(
    texts: Iterable[str], encode: Callable[[str], list[int]], *, max_length: int, pad_id: int
) -> torch.Tensor:
    """Token ids truncated/padded on the right with ``pad_id`` to ``max_length``: (N, max_length) int64."""
    rows = [encode(t)[:max_length] for t in texts]
    return torch.tensor([r + [pad_id] * (max_length - len(r)) for r in rows], dtype=torch.long)


HEAD_INITS = ("gpt2", "torch_default")


def to_classifier(model: GPT, num_classes: int, *, head_init: str = "gpt2") -> GPT:
    """A copy of ``model`` whose head predicts ``num_classes`` classes, the new head drawn from the global RNG.

    ``head_init``: ``gpt2`` draws it as part of a freshly initialised GPT-2 (N(0, 0.02), zero bias);
    ``torch_default`` is the book's ``torch.manual_seed(123); model.out_head = nn.Linear(768, 2)``: PyTorch's
    default init and the head's draws only, so after the same seed the head equals the book's.
    """
    if head_init not in HEAD_INITS:
        raise UserError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    config = model.config.replace(num_classes=num_classes)
    device = next(model.parameters()).device
    cls = type(model)  # GPT or Decoder
    if head_init == "gpt2":
        clf = cls(config)
        missing, unexpected = clf.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("lm_head.") for k in missing), (missing, unexpected)
        return clf.to(device)
    with torch.device("meta"):  # the body comes from ``model``: draw nothing for it
        clf = cls(config)
    clf.lm_head = nn.Linear(config.n_embd, num_classes, device=device)  # the book's new out_head
    missing, unexpected = clf.load_state_dict(
        {k: v.clone() for k, v in state.items()}, strict=False, assign=True
    )
    assert not unexpected and all(k.startswith("lm_head.") for k in missing), (missing, unexpected)
    clf.finish_loading()
    return clf.to(device)


def set_trainable(model: GPT, mode: str) -> None:
    """Freeze all but the chosen part: ``head``, ``last_block`` (+ final LayerNorm + head), or ``all``.

    (``lora`` is set up with :mod:`gptlab.lora` and ``mark_trainable(..., also=("lm_head",))``.)
    """
    if mode not in ("head", "last_block", "all"):
        raise UserError(f"trainable must be one of {', '.join(TRAINABLE)}, got {mode!r}")
    for p in model.parameters():
        p.requires_grad = mode == "all"
    parts: list[nn.Module] = [model.lm_head]
    if mode == "last_block":
        parts += [model.blocks[-1], model.final_norm]
    for part in parts:
        for p in part.parameters():
            p.requires_grad = True


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the last position's class logits (book ch. 6 ``calc_loss_batch``)."""
    x, y = batch
    return F.cross_entropy(model(x)[:, -1, :].float(), y)


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Class probabilities (N, num_classes) for padded ids (N, T)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs = [
        torch.softmax(model(inputs[i : i + batch_size].to(device))[:, -1, :].float(), dim=-1).cpu()
        for i in range(0, len(inputs), batch_size)
    ]
    model.train(was_training)
    return torch.cat(probs) if probs else torch.empty(0, model.config.num_classes)


def stack_examples(items: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate ``(ids, label)`` pairs of equal length into ``(ids (B, T), labels (B,))``."""
    ids, labels = zip(*items, strict=True)
    return torch.stack(ids), torch.stack(labels)


def majority_baseline(labels: torch.Tensor, num_classes: int) -> float:
    """The accuracy of always answering the most frequent class: what a classifier must beat."""
    return float(torch.bincount(labels, minlength=num_classes).max()) / max(len(labels), 1)


def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Fraction of ``(ids, labels)`` whose most likely class is the label (book ch. 6 ``calc_accuracy_loader``)."""
    ids, labels = data
    return float((predict(model, ids).argmax(-1) == labels).float().mean())


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (num_classes, num_classes): row = true class, column = predicted class."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_report(cm: torch.Tensor, labels: Sequence[str]) -> dict:
    """Accuracy plus per-class precision/recall/F1/support from a confusion matrix."""
    cm = cm.double()
    total = cm.sum().item()
    report: dict = {"accuracy": (cm.diag().sum().item() / total) if total else 0.0, "per_class": {}}
    for i, name in enumerate(labels):
        tp = cm[i, i].item()
        predicted, actual = cm[:, i].sum().item(), cm[i, :].sum().item()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report["per_class"][name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(actual),
        }
    return report
