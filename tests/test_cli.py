"""The ``gptlab`` console script: generate, info, and one-line errors."""

from __future__ import annotations

import json

import torch

from gptlab.checkpoint import save_checkpoint
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.generate import SamplingConfig, generate
from gptlab.model import GPT
from gptlab.tokenizer import decode, encode


def _checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt-micro", n_layer=1)).eval()
    save_checkpoint(model, tmp_path / "ck")
    return model, tmp_path / "ck"


def test_generate_prints_prompt_and_continuation(tmp_path, capsys) -> None:
    model, ck = _checkpoint(tmp_path)
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(ck),
                "--prompt",
                "Every effort moves",
                "--max-new-tokens",
                "6",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    expected = decode(generate(model, [encode("Every effort moves")], max_new_tokens=6, eos_id=50256)[0])
    assert capsys.readouterr().out == "Every effort moves" + expected + "\n"


def test_generate_sampling_is_seeded(tmp_path, capsys) -> None:
    model, ck = _checkpoint(tmp_path)
    args = [
        "generate",
        "--checkpoint",
        str(ck),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.5",
        "--top-k",
        "40",
        "--top-p",
        "0.95",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--only-new",
    ]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first
    gen = torch.Generator().manual_seed(3)
    ids = generate(
        model,
        [encode("Hi")],
        max_new_tokens=8,
        sampling=SamplingConfig(1.5, 40, 0.95),
        eos_id=50256,
        generator=gen,
    )[0]
    assert first == decode(ids) + "\n"


def test_info_reports_parameters(tmp_path, capsys) -> None:
    model, ck = _checkpoint(tmp_path)
    assert main(["info", "--checkpoint", str(ck)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_params"] == model.num_params() and info["model"]["n_layer"] == 1


def test_errors_are_one_line_exit_2(tmp_path, capsys) -> None:
    assert (
        main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x", "--device", "cpu"]) == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith("gptlab generate: error: ")
        and "config.json: not found" in err
        and err.count("\n") == 1
    )
    assert main(["import-gpt2", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "neither an existing directory nor a model name" in capsys.readouterr().err


def test_import_book_reads_the_books_saved_model(tmp_path, capsys) -> None:
    """A model saved by the book's ch. 5 code (its own layout and names) becomes a gptlab checkpoint."""
    from gptlab.formats.book_pth import to_book_state_dict
    from gptlab.load import load_checkpoint

    torch.manual_seed(0)
    config = GPTConfig.from_name("gpt-micro", n_layer=2, tie_weights=False, qkv_bias=False)
    original = GPT(config, init="torch_default").eval()
    state = to_book_state_dict(original)
    assert "trf_blocks.1.att.W_value.weight" in state and "trf_blocks.0.att.mask" in state
    # ch. 5 saves the model alone or together with the optimizer.
    torch.save({"model_state_dict": state, "optimizer_state_dict": {}}, tmp_path / "model_and_optimizer.pth")
    assert (
        main(
            ["import-book", str(tmp_path / "model_and_optimizer.pth"), str(tmp_path / "ck"), "--n-head", "2"]
        )
        == 0
    )
    model, _ = load_checkpoint(tmp_path / "ck")
    x = torch.tensor([encode("Every effort moves you")])
    with torch.no_grad():
        assert torch.equal(model.eval()(x), original(x))
    assert "imported" in capsys.readouterr().err


def test_import_book_refuses_pickled_code_and_other_files(tmp_path, capsys) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    assert main(["import-book", str(tmp_path / "evil.pth"), str(tmp_path / "ck"), "--n-head", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"gptlab import-book: error: {tmp_path / 'evil.pth'}: refused: unpickling it would run code"
    )
    assert "\n" not in err and not (tmp_path / "ck").exists()
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pth")
    assert main(["import-book", str(tmp_path / "other.pth"), str(tmp_path / "ck"), "--n-head", "2"]) == 2
    assert "not a state dict of the book's GPTModel" in capsys.readouterr().err


def test_import_book_classifier_runs_with_gptlab_classify(tmp_path, capsys) -> None:
    from gptlab.formats.book_pth import to_book_state_dict

    torch.manual_seed(0)
    config = GPTConfig.from_name("gpt-micro", n_layer=1, tie_weights=False, num_classes=2)
    torch.save(to_book_state_dict(GPT(config, init="torch_default")), tmp_path / "review_classifier.pth")
    args = ["import-book", str(tmp_path / "review_classifier.pth"), str(tmp_path / "clf"), "--n-head", "2"]
    assert main(args) == 2 and "give --labels" in capsys.readouterr().err
    assert main([*args, "--labels", "ham,spam", "--max-length", "16"]) == 0
    capsys.readouterr()
    assert main(["classify", "--checkpoint", str(tmp_path / "clf"), "Free entry! txt WIN"]) == 0
    label, prob, text = capsys.readouterr().out.strip().split("\t")
    assert label in ("ham", "spam") and 0.5 <= float(prob) <= 1 and text == "Free entry! txt WIN"
