"""The `cna` command: a thin layer over the library. Bad input exits with code 2 and writes nothing."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

from .errors import CNAError

EXIT_BAD_INPUT = 2


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated layer numbers like 0,1; got {text!r}") from None


def _check_output(path: str) -> None:
    """Fail before any model work if the output cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CNAError(f"output folder {folder!r} does not exist: create it first")
    if os.path.isdir(path):
        raise CNAError(f"output {path!r} is a folder: give a file name such as circuit.safetensors")


def _add_discovery_options(parser: argparse.ArgumentParser) -> None:
    from .attribution import SCORES
    from .capture import POSITIONS

    size = parser.add_mutually_exclusive_group()
    size.add_argument("--top-k", type=int, help="number of neurons in the circuit")
    size.add_argument("--top-frac", type=float, help="fraction of all MLP neurons (default 0.001 = 0.1%%)")
    parser.add_argument("--exclude-layers", type=_layer_list, default=[], metavar="0,1",
                        help="layers never selected (the reference implementation skips 0,1)")
    parser.add_argument("--position", choices=POSITIONS, default="last",
                        help="last prompt token (default), all tokens, or per-prompt mean")
    parser.add_argument("--score", choices=SCORES, default="diff",
                        help="mean difference (default), Welch t, or Cohen's d")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="compute dtype (default float32 on CPU, bfloat16 on CUDA); statistics are float64")
    parser.add_argument("--universal-filter", action="store_true",
                        help="drop neurons that fire for everything (bundled diverse prompts)")
    parser.add_argument("--no-chat-template", action="store_true", help="feed prompts as raw text")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cna", description="Contrastive Neuron Attribution, fast.")
    commands = parser.add_subparsers(dest="command", required=True)

    discover = commands.add_parser("discover", help="find the neurons that separate two prompt sets")
    discover.add_argument("--positive", required=True, help="prompts that show the behavior (.txt/.jsonl/.csv)")
    discover.add_argument("--negative", required=True, help="prompts that do not (.txt/.jsonl/.csv)")
    discover.add_argument("--model", help="model folder or hub id (default: embedded SmolLM2-135M-Instruct)")
    discover.add_argument("--out", required=True, help="circuit file to write (.safetensors)")
    discover.add_argument("--json", help="also write the circuit as JSON")
    discover.add_argument("--csv", help="also write the circuit's neurons as CSV")
    _add_discovery_options(discover)

    inspect = commands.add_parser("inspect", help="summarize a circuit file")
    inspect.add_argument("circuit")
    inspect.add_argument("--top", type=int, default=20, help="how many top neurons to list")
    inspect.add_argument("--plot", help="write a PNG of the layer distribution and score magnitudes")

    demo = commands.add_parser("demo", help="French-vs-English discovery on the embedded default model")
    demo.add_argument("--out", help="also save the circuit here")
    _add_discovery_options(demo)
    return parser


def _discover(args, model_name: str | None, positive: list[str], negative: list[str]):
    from .attribution import discover
    from .models import load_model

    if args.batch_size < 1:
        raise CNAError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.top_k is not None and args.top_k < 1:
        raise CNAError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_frac is not None and not 0 < args.top_frac <= 1:
        raise CNAError(f"--top-frac must be in (0, 1], got {args.top_frac}")
    for path in (getattr(args, "out", None), getattr(args, "json", None), getattr(args, "csv", None)):
        if path:
            _check_output(path)
    model, tokenizer = load_model(model_name, dtype=args.dtype)
    started = time.perf_counter()
    circuit = discover(
        model, tokenizer, positive, negative, top_k=args.top_k,
        top_frac=args.top_frac if args.top_frac is not None else 0.001, position=args.position, score=args.score,
        exclude_layers=args.exclude_layers, chat_template=False if args.no_chat_template else None,
        batch_size=args.batch_size, universal_filter=args.universal_filter, progress=not args.quiet,
    )
    elapsed = time.perf_counter() - started
    print(f"discovered {len(circuit)} neurons from {len(positive)} + {len(negative)} prompts in {elapsed:.1f} s "
          f"({(len(positive) + len(negative)) / elapsed:.1f} prompts/s)")
    return circuit


def _save(circuit, args) -> None:
    if getattr(args, "out", None):
        circuit.save(args.out)
        print(f"wrote {args.out}")
    for path, writer in ((getattr(args, "json", None), circuit.to_json), (getattr(args, "csv", None), circuit.to_csv)):
        if path:
            writer(path)
            print(f"wrote {path}")


def run_discover(args) -> None:
    from .prompts import read_prompts

    positive, negative = read_prompts(args.positive), read_prompts(args.negative)
    circuit = _discover(args, args.model, positive, negative)
    print(circuit.summary(top=10))
    _save(circuit, args)


def run_inspect(args) -> None:
    from .circuit import Circuit

    circuit = Circuit.load(args.circuit)
    if args.plot:
        _check_output(args.plot)
    print(circuit.summary(top=args.top))
    if args.plot:
        from .plotting import plot_circuit

        plot_circuit(circuit, args.plot)
        print(f"wrote {args.plot}")


def run_demo(args) -> None:
    from .prompts import bundled_prompts

    french, english = bundled_prompts("french_questions"), bundled_prompts("english_questions")
    print(f"French-vs-English discovery on the embedded default model ({len(french)} + {len(english)} "
          "bundled questions)")
    circuit = _discover(args, None, french, english)
    print(circuit.summary(top=15))
    print("\npositive deltas fire more on French questions; negative ones more on English questions.")
    _save(circuit, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `cna`; returns the exit code."""
    args = _parser().parse_args(argv)
    handlers = {"discover": run_discover, "inspect": run_inspect, "demo": run_demo}
    try:
        handlers[args.command](args)
    except CNAError as error:
        print(f"cna {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
