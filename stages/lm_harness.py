"""gptlab checkpoints as an lm-evaluation-harness model (EleutherAI's ``lm-eval`` 0.4: Gao et al., "The Language
Model Evaluation Harness", 2024), registered as ``gptlab``::

    lm_eval --model gptlab --model_args checkpoint=models/dpo --tasks hellaswag     # (import stages.lm_harness)

Any checkpoint :func:`gptlab.load.load_checkpoint` reads — GPT-2 and the book's GPT, Llama, Qwen, Gemma,
SmolLM2, LoRA-finetuned models (merged, or with their adapters kept apart) — with its own tokenizer.

The three request types of lm-eval's ``LM`` interface:

* ``loglikelihood(context, continuation)``: the harness's ``TemplateLM`` splits the pair into tokens exactly as
  its ``hf`` model does (trailing spaces of the context move to the continuation; the whole string is encoded
  and the context's tokens cut off; an empty context is the prefix token, BOS or else EOS); here the windows
  ``(context + continuation)[-(max_length + 1):-1]`` run through the model in batches, longest first, right-padded
  (causal attention never sees the padding), and the continuation's log-probabilities are summed in float32.
* ``loglikelihood_rolling(text)``: the text's tokens in the harness's disjoint rolling windows of the model's
  context length (each window after the first conditioned on the token before it), summed.
* ``generate_until(context, {until, max_gen_toks})``: greedy decoding with the KV cache, a batch of
  left-padded prompts at a time (:func:`gptlab.generate.generate`), cut at the first stop string.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from gptlab.errors import UserError
from gptlab.generate import generate
from gptlab.load import load_checkpoint, load_tokenizer


@register_model("gptlab")
class GptlabLM(TemplateLM):
    """A gptlab checkpoint directory behind lm-eval's model interface."""

    def __init__(
        self,
        checkpoint: str | Path,
        batch_size: int | str = 8,
        device: str = "cpu",
        max_length: int | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's command line asks for CUDA unless told otherwise
        self.model, _config = load_checkpoint(checkpoint, device=device)
        self.tokenizer = load_tokenizer(checkpoint)
        self._device = device
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = max_length or self.model.config.context_length

    @property
    def device(self) -> str:
        return self._device

    # --- tokens ---------------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_id", None)
        return bos if bos is not None else self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # --- scoring --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per request."""
        windows = []
        for _, context_enc, continuation_enc in requests:
            if not continuation_enc:
                raise UserError("lm-eval asked for the log-likelihood of an empty continuation")
            window = (context_enc + continuation_enc)[-(self.max_length + 1) :][:-1]
            windows.append((window, continuation_enc))
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(windows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            longest = len(windows[chunk[0]][0])
            pad = self.tokenizer.pad_id
            ids = torch.tensor(
                [windows[i][0] + [pad] * (longest - len(windows[i][0])) for i in chunk], device=self.device
            )  # (B, T)
            logprobs = F.log_softmax(self.model(ids).float(), dim=-1)  # (B, T, V)
            for row, i in enumerate(chunk):
                window, continuation = windows[i]
                n = len(continuation)
                scores = logprobs[row, len(window) - n : len(window)]  # (n, V)
                target = torch.tensor(continuation, device=self.device)
                total = scores.gather(-1, target[:, None]).sum().item()
                results[i] = (total, bool((scores.argmax(-1) == target).all()))
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pieces, owner = [], []
        for k, req in enumerate(requests):
            (text,) = req.args
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                pieces.append((None, context, continuation))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self._loglikelihood_tokens(pieces), strict=True):
            totals[k] += ll
        return totals

    # --- generation -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            if kwargs.get("do_sample") or (kwargs.get("temperature") or 0) > 0:
                raise UserError(
                    "the gptlab lm-eval model decodes greedily: set do_sample false, temperature 0"
                )
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            keep = max(self.max_length - max_new, 1)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in chunk]
                generated = generate(
                    self.model, prompts, max_new_tokens=max_new, eos_id=list(self.tokenizer.stop_ids)
                )
                for i, tokens in zip(chunk, generated, strict=True):
                    text = self.tok_decode(tokens)
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    out[i] = text
        return out  # type: ignore[return-value]
