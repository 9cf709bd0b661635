"""Parity with the book's own code (PyPI ``llms-from-scratch``, pinned in run.sh): same weights, same inputs,
same numbers.

Each test builds the book's object (``GPTModel``, ``create_dataloader_v1``, ``custom_collate_fn``, …) and
gptlab's counterpart over identical inputs and compares the results with tolerances. The book's code calls
``tiktoken.get_encoding("gpt2")``, which reads GPT-2's ``vocab.bpe``/``encoder.json``: the fixture below puts
the copies from ``../shared/tokenizers`` into a private tiktoken cache, so that runs offline too.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gptlab.batches import ListBatches, WindowLoader
from gptlab.classify import (
    accuracy,
    balance,
    classification_loss,
    encode_padded,
    parse_labeled_tsv,
    split,
    to_classifier,
)
from gptlab.config import GPTConfig
from gptlab.data import ShardWriter, TokenStream
from gptlab.dpo import dpo_loss, sequence_logprobs
from gptlab.formats.book_pth import (
    config_from_book,
    from_book_state_dict,
    load_book_model,
    to_book_state_dict,
)
from gptlab.generate import SamplingConfig, generate
from gptlab.instruct import collate_sft
from gptlab.lora import LoRALinear
from gptlab.model import GPT
from gptlab.prompts import encode_record, format_input
from gptlab.tokenizer import EOT_ID, encode
from gptlab.train import evaluate, lm_loss

book_ch02 = pytest.importorskip("llms_from_scratch.ch02")
book_ch04 = pytest.importorskip("llms_from_scratch.ch04")
book_ch05 = pytest.importorskip("llms_from_scratch.ch05")
book_ch06 = pytest.importorskip("llms_from_scratch.ch06")
book_ch07 = pytest.importorskip("llms_from_scratch.ch07")
book_appendix_e = pytest.importorskip("llms_from_scratch.appendix_e")

TIKTOKEN_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


@pytest.fixture(scope="module", autouse=True)
def book_tiktoken(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """tiktoken's "gpt2" encoding (what the book's code asks for) from ../shared, through tiktoken's cache."""
    import tiktoken.registry

    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((TIKTOKEN_GPT2 + name).encode()).hexdigest()
        shutil.copy(shared_dir / "tokenizers" / name, cache / key)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        mp.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)
        yield tiktoken.get_encoding("gpt2")


def book_cfg(qkv_bias: bool = False, **kw) -> dict:
    cfg = dict(vocab_size=50257, context_length=32, emb_dim=48, n_heads=4, n_layers=2, drop_rate=0.0)
    return {**cfg, "qkv_bias": qkv_bias, **kw}


def book_model(qkv_bias: bool = False, seed: int = 123, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return book_ch04.GPTModel(book_cfg(qkv_bias, **kw)).eval()


def gptlab_config(cfg: dict) -> GPTConfig:
    return GPTConfig(
        vocab_size=cfg["vocab_size"],
        context_length=cfg["context_length"],
        n_layer=cfg["n_layers"],
        n_head=cfg["n_heads"],
        n_embd=cfg["emb_dim"],
        dropout=cfg["drop_rate"],
        qkv_bias=cfg["qkv_bias"],
        tie_weights=False,
    )


def ids(text: str) -> torch.Tensor:
    return torch.tensor([encode(text)])


# --- ch. 4: the model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_torch_default_init_is_the_books_initialisation_bit_for_bit(qkv_bias: bool) -> None:
    book = book_model(qkv_bias, drop_rate=0.1)
    after_book = torch.rand(4)  # where the book leaves the RNG: the next draw (dropout, shuffling)
    torch.manual_seed(123)
    ours = GPT(gptlab_config(book_cfg(qkv_bias, drop_rate=0.1)), init="torch_default")
    assert torch.equal(torch.rand(4), after_book)
    converted = from_book_state_dict(book.state_dict())
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, converted[name]), name


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_gptmodel_logits_equal_gptlab_logits(qkv_bias: bool) -> None:
    book = book_model(qkv_bias, seed=7)
    ours = load_book_model(book.state_dict(), n_head=4).eval()
    x = ids("Every effort moves you toward the light, said Gisburn, and smiled.")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), book(x), atol=1e-5, rtol=1e-5)
    # And back: gptlab's weights load strictly into the book's GPTModel and give the same logits.
    again = book_ch04.GPTModel(book_cfg(qkv_bias)).eval()
    again.load_state_dict(to_book_state_dict(ours))
    with torch.no_grad():
        torch.testing.assert_close(again(x), book(x), atol=0, rtol=0)


def test_book_checkpoint_config_is_read_from_the_weights() -> None:
    state = book_model(True).state_dict()
    config = config_from_book(state, n_head=4)
    assert (config.vocab_size, config.context_length, config.n_layer, config.n_embd) == (50257, 32, 2, 48)
    assert config.qkv_bias and not config.tie_weights and config.num_classes is None


# --- ch. 5: data, loss, training loop, generation --------------------------------------------------------


def token_dir(tmp_path: Path, tokens: list[int], name: str = "tokens") -> Path:
    with ShardWriter(tmp_path / name, vocab_size=50257, tokenizer="gpt2", shard_size=1000) as w:
        w.add(np.asarray(tokens))
        w.finish(val_fraction=0.0)
    return tmp_path / name


@pytest.mark.parametrize(("max_length", "stride"), [(16, 16), (8, 4)])
def test_create_dataloader_v1_windows_equal_window_loader(shared_dir, tmp_path, max_length, stride) -> None:
    text = (shared_dir / "datasets" / "the-verdict.txt").read_text(encoding="utf-8")[:3000]
    book = book_ch02.create_dataloader_v1(
        text, batch_size=3, max_length=max_length, stride=stride, shuffle=False, drop_last=False
    )
    ours = WindowLoader(
        TokenStream(token_dir(tmp_path, encode(text)), "train"),
        context_length=max_length,
        batch_size=3,
        stride=stride,
        shuffle=False,
        drop_last=False,
    )
    pairs = list(zip(book, ours, strict=True))
    assert len(pairs) == len(book) > 10
    for (bx, by), (x, y) in pairs:
        assert torch.equal(bx, x) and torch.equal(by, y)


def test_torch_order_draws_the_dataloaders_batches_and_rng(shared_dir, tmp_path) -> None:
    """``order="torch"`` is DataLoader(shuffle=True): same batches, epoch after epoch, same RNG afterwards."""
    text = (shared_dir / "datasets" / "the-verdict.txt").read_text(encoding="utf-8")
    book = book_ch02.create_dataloader_v1(text, batch_size=2, max_length=64, stride=64, drop_last=True)
    ours = WindowLoader(
        TokenStream(token_dir(tmp_path, encode(text)), "train"),
        context_length=64,
        batch_size=2,
        order="torch",
    )
    torch.manual_seed(5)
    expected = [x for _ in range(3) for x, _ in book]
    book_rng = torch.rand(3)
    torch.manual_seed(5)
    got = [x for _ in range(3) for x, _ in ours]
    assert len(got) == len(expected) == 3 * len(book)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert torch.equal(torch.rand(3), book_rng)


def test_torch_order_resumes_mid_epoch(shared_dir, tmp_path) -> None:
    text = (shared_dir / "datasets" / "the-verdict.txt").read_text(encoding="utf-8")
    stream = TokenStream(token_dir(tmp_path, encode(text)), "train")
    make = lambda: WindowLoader(stream, context_length=64, batch_size=2, order="torch")  # noqa: E731
    torch.manual_seed(9)
    reference = make()
    it = iter(reference)
    first = [next(it)[0] for _ in range(4)]
    state, rng = reference.state_dict(), torch.get_rng_state()
    rest = [x for x, _ in it] + [x for x, _ in reference]
    resumed = make()
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    again = [x for x, _ in resumed] + [x for x, _ in resumed]
    assert len(first) == 4 and all(torch.equal(a, b) for a, b in zip(rest, again, strict=True))


def test_calc_loss_batch_and_loader_equal_gptlab_loss(shared_dir, tmp_path) -> None:
    book = book_model(seed=3)
    ours = load_book_model(book.state_dict(), n_head=4).eval()
    text = (shared_dir / "datasets" / "the-verdict.txt").read_text(encoding="utf-8")[:4000]
    loader = book_ch02.create_dataloader_v1(text, batch_size=2, max_length=32, stride=32, shuffle=False)
    x, y = next(iter(loader))
    with torch.no_grad():
        assert lm_loss(ours, (x, y)).item() == pytest.approx(
            book_ch05.calc_loss_batch(x, y, book, "cpu").item(), abs=1e-5
        )
        book_loss = book_ch05.calc_loss_loader(loader, book, "cpu", num_batches=5)
    windows = WindowLoader(
        TokenStream(token_dir(tmp_path, encode(text)), "train"),
        context_length=32,
        batch_size=2,
        shuffle=False,
    )
    assert evaluate(ours, windows, max_batches=5) == pytest.approx(book_loss, abs=1e-5)


def test_greedy_generation_equals_the_books_generate() -> None:
    book = book_model(seed=11)
    ours = load_book_model(book.state_dict(), n_head=4).eval()
    prompt = ids("Every effort moves you")
    expected = book_ch05.generate(book, prompt, max_new_tokens=20, context_size=32)[0, prompt.size(1) :]
    got = generate(ours, [prompt[0].tolist()], max_new_tokens=20)[0]  # KV cache, sliding past the context
    assert got == expected.tolist()


def test_temperature_top_k_sampling_equals_the_books_generate_for_a_seed() -> None:
    # The book filters top-k, divides by the temperature and draws with torch.multinomial from the global RNG;
    # gptlab divides first (the same kept set and probabilities) and draws from the same RNG when given none.
    book = book_model(seed=11)
    ours = load_book_model(book.state_dict(), n_head=4).eval()
    prompt = ids("Every effort moves you")
    torch.manual_seed(123)
    expected = book_ch05.generate(book, prompt, max_new_tokens=15, context_size=32, temperature=1.4, top_k=25)
    torch.manual_seed(123)
    got = generate(ours, [prompt[0].tolist()], max_new_tokens=15, sampling=SamplingConfig(1.4, top_k=25))
    assert got[0] == expected[0, prompt.size(1) :].tolist()


# --- ch. 6: classification -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sms_tsv(shared_dir: Path) -> str:
    with zipfile.ZipFile(shared_dir / "datasets" / "sms+spam+collection.zip") as zf:
        return zf.read("SMSSpamCollection").decode("utf-8")


def test_reading_the_tsv_with_csv_quoting_equals_pandas_read_csv(sms_tsv: str) -> None:
    book = pd.read_csv(io.StringIO(sms_tsv), sep="\t", header=None, names=["Label", "Text"])
    ours = parse_labeled_tsv(sms_tsv, labels=("ham", "spam"), quoting=True)
    assert len(ours) == len(book) == 5572  # the book's count: two pairs of lines merge at stray quotes
    assert [t for _, t in ours] == book["Text"].tolist()
    assert [("ham", "spam")[y] for y, _ in ours] == book["Label"].tolist()
    assert len(parse_labeled_tsv(sms_tsv, labels=("ham", "spam"))) == 5574  # one message per line


def test_balance_and_split_equal_the_books_for_its_seed(sms_tsv: str) -> None:
    examples = parse_labeled_tsv(sms_tsv, labels=("ham", "spam"), quoting=True)
    df = pd.DataFrame({"Label": [("ham", "spam")[y] for y, _ in examples], "Text": [t for _, t in examples]})
    balanced = book_ch06.create_balanced_dataset(df)
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    book_splits = book_ch06.random_split(balanced, 0.7, 0.1)
    ours = balance(examples, seed=123)
    assert [(y, t) for y, t in zip(balanced["Label"], balanced["Text"], strict=True)] == ours
    for book_df, rows in zip(book_splits, split(ours, seed=123), strict=True):
        assert list(zip(book_df["Label"], book_df["Text"], strict=True)) == rows
    assert [len(s) for s in book_splits] == [1045, 149, 300]


def test_spam_dataset_padding_equals_encode_padded(sms_tsv: str, tmp_path: Path, book_tiktoken) -> None:
    examples = parse_labeled_tsv(sms_tsv, labels=("ham", "spam"), quoting=True)[:200]
    path = tmp_path / "train.csv"
    pd.DataFrame({"Label": [y for y, _ in examples], "Text": [t for _, t in examples]}).to_csv(
        path, index=False
    )
    book = book_ch06.SpamDataset(path, book_tiktoken)
    longest = max(len(encode(t)) for _, t in examples)
    ours = encode_padded([t for _, t in examples], encode, max_length=longest, pad_id=EOT_ID)
    assert book.max_length == longest
    assert torch.equal(torch.stack([book[i][0] for i in range(len(book))]), ours)


def test_classifier_head_init_is_the_books_new_out_head() -> None:
    book = book_model(qkv_bias=True, seed=5)
    ours = load_book_model(book.state_dict(), n_head=4)
    torch.manual_seed(123)
    book.out_head = torch.nn.Linear(48, 2)  # ch. 6, verbatim
    torch.manual_seed(123)
    clf = to_classifier(ours, 2, head_init="torch_default")
    assert torch.equal(clf.lm_head.weight, book.out_head.weight) and torch.equal(
        clf.lm_head.bias, book.out_head.bias
    )
    x = encode_padded(["see you at 8?", "WIN a prize"], encode, max_length=8, pad_id=EOT_ID)
    with torch.no_grad():
        torch.testing.assert_close(clf.eval()(x)[:, -1, :], book.eval()(x)[:, -1, :], atol=1e-5, rtol=1e-5)
    assert (
        clf.transformer.wte.weight is not ours.transformer.wte.weight
    )  # a copy: the base model is untouched


def test_classifier_logits_loss_and_accuracy_equal_the_books() -> None:
    book = book_model(qkv_bias=True, seed=5)
    torch.manual_seed(123)
    book.out_head = torch.nn.Linear(48, 2)  # ch. 6: a new 2-class head
    ours = load_book_model(book.state_dict(), n_head=4).eval()
    assert ours.config.num_classes == 2
    texts = ["WINNER!! claim your prize now", "see you at 8?", "Free entry in 2 a wkly comp", "ok lar"] * 3
    x = encode_padded(texts, encode, max_length=12, pad_id=EOT_ID)
    y = torch.tensor([1, 0, 1, 0] * 3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[:, -1, :], book(x)[:, -1, :], atol=1e-5, rtol=1e-5)
        assert classification_loss(ours, (x, y)).item() == pytest.approx(
            book_ch06.calc_loss_batch(x, y, book, "cpu").item(), abs=1e-6
        )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    assert accuracy(ours, (x, y)) == book_ch06.calc_accuracy_loader(loader, book, "cpu")


# --- ch. 7: instruction finetuning -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def instruction_records(shared_dir: Path) -> list[dict]:
    return json.loads((shared_dir / "datasets" / "instruction-data.json").read_text(encoding="utf-8"))


def test_format_input_is_the_books(instruction_records) -> None:
    for entry in instruction_records[:50]:
        assert format_input(entry) == book_ch07.format_input(entry)


@pytest.mark.parametrize("allowed_max_length", [None, 40])
def test_custom_collate_fn_equals_collate_sft(instruction_records, allowed_max_length) -> None:
    records = instruction_records[:8]
    book_items = [encode(book_ch07.format_input(e) + f"\n\n### Response:\n{e['output']}") for e in records]
    ours = [encode_record(e, encode) for e in records]
    assert [i for i, _ in ours] == book_items
    bx, by = book_ch07.custom_collate_fn(book_items, allowed_max_length=allowed_max_length)
    x, y = collate_sft(ours, allowed_max_length=allowed_max_length)
    assert torch.equal(bx, x) and torch.equal(by, y)
    if allowed_max_length is None:
        assert (y == -100).any()  # padding targets after the first end-of-text are ignored, as in the book


def test_collated_batches_train_to_the_books_loss(instruction_records) -> None:
    book = book_model(seed=2, context_length=256)
    ours = load_book_model(book.state_dict(), n_head=4).eval()
    items = [encode_record(e, encode) for e in instruction_records[:4]]
    x, y = collate_sft(items, allowed_max_length=256)
    with torch.no_grad():
        assert lm_loss(ours, (x, y)).item() == pytest.approx(
            book_ch05.calc_loss_batch(x, y, book, "cpu").item(), abs=1e-5
        )


# --- ch. 7 bonus: DPO (the package has no DPO code: values computed by hand) --------------------------------


def test_dpo_mean_reduction_is_the_notebooks_per_token_average_hand_computed() -> None:
    # Vocabulary of 2 with logits (0, ln 3) at every position: p(token 0) = 1/4, p(token 1) = 3/4.
    logits = torch.tensor([0.0, math.log(3.0)]).expand(1, 4, 2)
    tokens = torch.tensor([[0, 1, 1, 0]])
    mask = torch.tensor([[False, False, True, True]])  # tokens 2 and 3 are the response
    lp1, lp0 = math.log(0.75), math.log(0.25)
    assert sequence_logprobs(logits, tokens, mask, "sum").item() == pytest.approx(lp1 + lp0)
    assert sequence_logprobs(logits, tokens, mask, "mean").item() == pytest.approx((lp1 + lp0) / 2)
    # The notebook's compute_dpo_loss on per-token means: policy (-1.0, -2.0) vs reference (-1.5, -1.5).
    loss, chosen, rejected = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.1
    )
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * 1.0))))  # 0.644397
    assert (chosen.item(), rejected.item()) == pytest.approx((0.05, -0.05))  # beta-scaled, as the paper


# --- appendix E: LoRA ----------------------------------------------------------------------------------------


def test_book_lora_layer_equals_lora_linear_with_alpha_scaling() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 20)
    book = book_appendix_e.LinearWithLoRA(linear, rank=4, alpha=8)
    torch.nn.init.normal_(book.lora.B)  # a trained adapter: B no longer zero
    ours = LoRALinear.from_linear(linear, rank=4, alpha=8, convention="book")
    with torch.no_grad():
        ours.lora_A.copy_(book.lora.A.T)  # the book stores A as (in, rank), B as (rank, out)
        ours.lora_B.copy_(book.lora.B.T)
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), book(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.merged()(x), book(x), atol=1e-5, rtol=1e-5)
    assert ours.scaling == 8  # the book's alpha, not alpha / rank


def test_book_lora_convention_draws_a_as_the_books_layer() -> None:
    """The book's A is (in, rank), so Kaiming's fan-in is the rank: A ~ U(±1/sqrt(rank)), not ±1/sqrt(in)."""
    torch.manual_seed(0)
    book = book_appendix_e.LoRALayer(768, 768, rank=16, alpha=16)
    torch.manual_seed(0)
    ours = LoRALinear(768, 768, rank=16, alpha=16, convention="book")
    peft = LoRALinear(768, 768, rank=16, alpha=16)
    book_max, ours_max = book.A.abs().max().item(), ours.lora_A.abs().max().item()
    assert 0.24 < book_max <= 0.25  # 1 / sqrt(16)
    assert ours_max == pytest.approx(book_max, rel=0.02)
    assert peft.lora_A.abs().max().item() <= 1 / math.sqrt(768)


def test_list_batches_torch_order_is_the_dataloaders() -> None:
    items = [torch.tensor([i]) for i in range(23)]
    book = torch.utils.data.DataLoader(items, batch_size=4, shuffle=True, drop_last=True)
    ours = ListBatches(items, batch_size=4, collate=torch.stack, drop_last=True, order="torch")
    torch.manual_seed(1)
    expected = [b for _ in range(2) for b in book]
    torch.manual_seed(1)
    got = [b for _ in range(2) for b in ours]
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True)) and len(got) == 10
