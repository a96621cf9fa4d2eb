"""The `cna` command: a thin layer over the library. Bad input exits with code 2 and writes nothing."""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import textwrap
import time
import warnings
from typing import Sequence

from .batching import LONG_PROMPT_POLICIES
from .errors import CNAError
from .evaluate import BEHAVIORS, DEFAULT_STRENGTHS, METHODS
from .gguf_export import GGUF_TYPES
from .models.loading import COMPUTE_DTYPES
from .settings import MOE_MODES
from .tune import DEFAULT_KL_BUDGET, DEFAULT_QUALITY_FLOOR, GOALS
from .failures import EXIT_BAD_INPUT, EXIT_INTERRUPTED, check_command_paths, classify_failure
from .validation import printable

__all__ = ["EXIT_BAD_INPUT", "main"]


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated layer numbers like 0,1; got {text!r}") from None


def _add_discovery_options(parser: argparse.ArgumentParser) -> None:
    from .attribution import DEFAULT_TOP_FRAC, SCORES
    from .settings import DEFAULT_BATCH_SIZE, REDUCTIONS

    size = parser.add_mutually_exclusive_group()
    size.add_argument("--top-k", type=int, help="number of neurons in the circuit")
    size.add_argument("--top-frac", type=float, default=DEFAULT_TOP_FRAC,
                      help=f"fraction of all MLP neurons (default {DEFAULT_TOP_FRAC:g} = {DEFAULT_TOP_FRAC * 100:g}%%)")
    parser.add_argument("--exclude-layers", type=_layer_list, default=[], metavar="0,1",
                        help="layers never selected (the reference implementation skips 0,1)")
    parser.add_argument("--reduction", "--position", dest="reduction", choices=REDUCTIONS, default="last",
                        help="how a prompt's tokens become samples: last prompt token (default), all tokens, or "
                             "per-prompt mean (--position is the old name)")
    parser.add_argument("--score", choices=SCORES, default="diff",
                        help="mean difference (default), Welch t, or Cohen's d")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="most prompts per forward pass (length buckets may use fewer)")
    parser.add_argument("--dtype", choices=COMPUTE_DTYPES,
                        help="compute dtype (default float32 on CPU, bfloat16 on CUDA); statistics are float64")
    parser.add_argument("--universal-filter", action="store_true",
                        help="drop neurons that fire for everything (bundled diverse prompts)")
    parser.add_argument("--moe-mode", choices=MOE_MODES, default="effective",
                        help="mixture-of-experts models: routed-neuron statistics of router weight x activation "
                             "(0 when not routed; default) or over routed tokens only")
    parser.add_argument("--no-chat-template", action="store_true", help="feed prompts as raw text")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _finite_list(text: str) -> list[float]:
    values = [_finite(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give comma-separated multipliers like 0,0.5,1,2")
    return values


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    from .steering import POSITION_MODES

    parser.add_argument("--model",
                        help="model folder, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--positions", choices=POSITION_MODES, default="all",
                        help="which tokens are steered (default: prompt and generated)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=COMPUTE_DTYPES)
    parser.add_argument("--no-chat-template", action="store_true", help="feed prompts as raw text")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_judge_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--behavior", choices=sorted(BEHAVIORS), default="refusal",
                        help="what counts as the behavior in an answer (refusal: the rule judge, unless --judge)")
    parser.add_argument("--judge", metavar="MODEL_OR_PATH",
                        help="grade refusal with a local chat model (rubric prompt, yes/no next-token probabilities)")
    parser.add_argument("--judge-labels", metavar="JSONL",
                        help="human-labeled answers (prompt, request, answer, label): print the judges' agreement")


def _add_discover_parser(commands) -> None:
    discover = commands.add_parser("discover", help="find the neurons that separate two prompt sets")
    discover.add_argument("--positive", required=True, help="prompts that show the behavior (.txt/.jsonl/.csv)")
    discover.add_argument("--negative", required=True, help="prompts that do not (.txt/.jsonl/.csv)")
    discover.add_argument("--model",
                          help="model folder, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    discover.add_argument("--out", required=True, help="circuit file to write (.safetensors)")
    discover.add_argument("--json", help="also write the circuit as JSON")
    discover.add_argument("--csv", help="also write the circuit's neurons as CSV")
    discover.add_argument("--distributed", action="store_true",
                          help="run under torchrun: every rank streams a shard, rank 0 writes the circuit")
    discover.add_argument("--skip-bad", action="store_true",
                          help="skip bad records (missing field, empty text, undecodable line) and report them")
    discover.add_argument("--max-length", type=int, help="token limit per prompt (default: the model's context)")
    discover.add_argument("--on-long", choices=LONG_PROMPT_POLICIES, default="truncate",
                          help="what to do with longer prompts (truncate keeps the template prefix and the end)")
    discover.add_argument("--checkpoint-every", type=int, metavar="N",
                          help="save statistics and stream position to --checkpoint at the end of a tokenization "
                               "window, i.e. every max(N, 32 x batch size) prompts")
    discover.add_argument("--checkpoint", help="checkpoint file (default: OUT.checkpoint)")
    discover.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    discover.add_argument("--save-stats", metavar="PATH",
                          help="also write the contrast statistics (.safetensors) for `cna tune --stats`")
    _add_discovery_options(discover)


def _add_inspect_parser(commands) -> None:
    inspect = commands.add_parser("inspect", help="summarize a circuit file")
    inspect.add_argument("circuit")
    inspect.add_argument("--top", type=int, default=20, help="how many top neurons to list")
    inspect.add_argument("--plot", help="write a PNG of the layer distribution and score magnitudes")


def _add_generate_parser(commands) -> None:
    generate = commands.add_parser("generate", help="generate with a circuit's neurons scaled")
    generate.add_argument("--circuit", required=True, action="append", metavar="[NAME=]PATH",
                          help="circuit file; with --out, repeat as NAME=PATH so records can pick one by name "
                               "(the first is the default)")
    generate.add_argument("--multiplier", type=_finite,
                          help="0 ablates, 1 is the identity, 2 doubles (default: the circuit's tuned one, else 0)")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", help="prompt file (.txt/.jsonl/.csv)")
    generate.add_argument("--compare", action="store_true", help="also generate unsteered, side by side")
    generate.add_argument("--out", help="stream results to this JSONL file, one line per record; a rerun with the "
                                        "same settings resumes it (default: print to stdout)")
    generate.add_argument("--skip-bad", action="store_true", help="with --out: skip bad records and report them")
    generate.add_argument("--top-p", type=float, default=1.0, help="with --sample: nucleus sampling mass")
    generate.add_argument("--server", metavar="URL",
                          help="with --out: generate on this llama-server (GGUF LoRA adapters, lora scale per record) "
                               "or vLLM server (LoRA modules named CIRCUIT@MULTIPLIER) instead of in-process")
    generate.add_argument("--concurrency", type=int, default=8, help="with --server: requests in flight")
    _add_generation_options(generate)


def _add_sweep_parser(commands) -> None:
    sweep = commands.add_parser("sweep", help="generate at several multipliers in one batched run")
    sweep.add_argument("--circuit", required=True)
    sweep.add_argument("--multipliers", type=_finite_list, default=list(DEFAULT_STRENGTHS), metavar="0,0.5,1,2")
    sweep.add_argument("--prompts", required=True, help="prompt file (.txt/.jsonl/.csv)")
    sweep.add_argument("--out", help="CSV of every generation with its behavior, quality and answer perplexity")
    sweep.add_argument("--plot", help="PNG of behavior rate and quality against the multiplier")
    _add_judge_options(sweep)
    _add_generation_options(sweep)


def _add_export_parser(commands) -> None:
    export = commands.add_parser("export", help="write a steered model for serving (folded weights, LoRA or GGUF)")
    export.add_argument("--circuit", required=True)
    export.add_argument("--multiplier", type=_finite, help="default: the multiplier the circuit records (cna tune)")
    export.add_argument("--format", choices=("folded", "lora", "gguf", "gguf-lora"), required=True,
                        help="folded checkpoint (any engine), PEFT LoRA (vLLM per request), GGUF (llama.cpp, "
                             "Ollama; the model must be loaded from a .gguf file), or GGUF LoRA (llama-server with "
                             "a per-request scale s: multiplier 1 + s(m - 1))")
    export.add_argument("--out", required=True,
                        help="output folder: new or empty (or a previous export with --force); for gguf and "
                             "gguf-lora, a .gguf file")
    export.add_argument("--model",
                        help="model folder, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    export.add_argument("--gguf-type", choices=GGUF_TYPES,
                        help="type of the rewritten ffn_down tensors (default: the source's when it is one of "
                             "these, else F16)")
    export.add_argument("--force", action="store_true",
                        help="replace a previous export (a folder holding cna_fast_steering.json, or a .gguf file "
                             "with --format gguf); never other folders")
    export.add_argument("--no-vllm-check", action="store_true",
                        help="lora: allow ranks above vLLM's maximum (512) and skip vLLM's adapter checks (PEFT only)")


def _add_evaluate_parser(commands) -> None:
    evaluate = commands.add_parser("eval", help="behavior, quality, KL, perplexity per strength: CNA vs baselines")
    evaluate.add_argument("--circuit", required=True)
    evaluate.add_argument("--prompts", required=True, help="prompts whose answers show the behavior")
    evaluate.add_argument("--multipliers", type=_finite_list, metavar="0,0.5,1,2",
                          help="strengths (default: 1 and the circuit's tuned multiplier, else 0,0.5,1,2)")
    evaluate.add_argument("--baseline", default="caa,random", help="comma-separated: caa, random (or 'none')")
    evaluate.add_argument("--no-capability", action="store_true",
                          help="skip the KL, perplexity and multiple-choice pass (one forward pass per setting)")
    evaluate.add_argument("--csv", help="metrics per method and strength as CSV")
    evaluate.add_argument("--json", help="metrics and every generation as JSON")
    evaluate.add_argument("--plot", help="PNG: behavior, quality and KL against strength, and the layer distribution")
    evaluate.add_argument("--html", help="an HTML report with the plot, the table and sample generations")
    _add_judge_options(evaluate)
    _add_generation_options(evaluate)


def _add_demo_parser(commands) -> None:
    demo = commands.add_parser("demo", help="French-vs-English discovery on the embedded default model")
    demo.add_argument("--out", help="also save the circuit here")
    demo.add_argument("--held-out", type=int, default=16, help="held-out French questions to steer")
    demo.add_argument("--skip-steering", action="store_true", help="discovery only, no generation")
    demo.add_argument("--evaluate", action="store_true",
                      help="also sweep multipliers 0,0.5,1,2 on the held-out questions: CNA vs CAA vs random")
    demo.add_argument("--plot", help="with --evaluate: PNG of French-answer rate, quality and KL against strength")
    demo.add_argument("--csv", help="with --evaluate: the metrics as CSV")
    _add_discovery_options(demo)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cna", description="Contrastive Neuron Attribution, fast.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_discover_parser(commands)
    _add_inspect_parser(commands)
    _add_generate_parser(commands)
    _add_sweep_parser(commands)
    _add_export_parser(commands)
    _add_evaluate_parser(commands)
    _add_demo_parser(commands)
    _add_tune_parser(commands)
    return parser


def _capture_settings(args):
    """The CaptureSettings the discovery options describe (validated before any model loads)."""
    from .settings import CaptureSettings

    if args.batch_size < 1:
        raise CNAError(f"--batch-size must be at least 1, got {args.batch_size}")
    max_length = getattr(args, "max_length", None)
    if max_length is not None and max_length < 1:
        raise CNAError(f"--max-length must be at least 1, got {max_length}")
    return CaptureSettings(reduction=args.reduction, chat_template=False if args.no_chat_template else None,
                           batch_size=args.batch_size, max_length=max_length,
                           on_long=getattr(args, "on_long", "truncate"),
                           moe_mode=getattr(args, "moe_mode", "effective"))


def _discover(args, model_name: str | None, positive: list[str], negative: list[str], *,
              device_map: dict | None = None, distributed: bool = False, verbose: bool = True):
    from .models import load_model
    from .models.fused import check_backend_setting
    from .pipeline import discover

    settings = _capture_settings(args)
    if args.top_k is not None and args.top_k < 1:
        raise CNAError(f"--top-k must be at least 1, got {args.top_k}")
    if not 0 < args.top_frac <= 1:
        raise CNAError(f"--top-frac must be in (0, 1], got {args.top_frac}")
    check_backend_setting()
    model, tokenizer = load_model(model_name, dtype=args.dtype, device_map=device_map)
    started = time.perf_counter()
    circuit = discover(model, tokenizer, positive, negative, settings, top_k=args.top_k, top_frac=args.top_frac,
                       score=args.score, exclude_layers=args.exclude_layers, universal_filter=args.universal_filter,
                       progress=verbose and not args.quiet, distributed=distributed,
                       save_stats=getattr(args, "save_stats", None), **_checkpoint_options(args))
    elapsed = time.perf_counter() - started
    if verbose:
        total = circuit.meta["n_positive"] + circuit.meta["n_negative"]
        print(f"discovered {len(circuit)} neurons from {circuit.meta['n_positive']} + {circuit.meta['n_negative']} "
              f"prompts in {elapsed:.1f} s ({total / elapsed:.1f} prompts/s)")
    return circuit, model, tokenizer


def _save(circuit, out: str | None, as_json: str | None = None, as_csv: str | None = None) -> None:
    """Write the circuit file and, if asked, its JSON and CSV views: all of them or none."""
    from ._io import atomic_outputs

    with atomic_outputs((out, as_json, as_csv)) as temporary:
        for path, writer in ((out, circuit.save), (as_json, circuit.to_json), (as_csv, circuit.to_csv)):
            if path:
                writer(temporary[str(path)])
    for path in (out, as_json, as_csv):
        if path:
            print(f"wrote {path}")


def _init_distributed() -> tuple[int, dict | None]:
    """Join the torchrun process group (NCCL with GPUs, gloo without); returns rank and device map."""
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise CNAError("--distributed needs torchrun: torchrun --nproc_per_node=N -m cna_fast discover "
                       "--distributed ...")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), {"": local_rank}
    return dist.get_rank(), None


def _checkpoint_options(args) -> dict:
    """Checkpointing options of `cna discover` (absent for `cna demo`)."""
    from .pipeline import DEFAULT_CHECKPOINT_EVERY

    if getattr(args, "checkpoint_every", None) is None and not getattr(args, "resume", False):
        return {}
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise CNAError(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    options = {"checkpoint": args.checkpoint or f"{args.out}.checkpoint",
               "checkpoint_every": args.checkpoint_every or DEFAULT_CHECKPOINT_EVERY, "resume": args.resume}
    if args.resume and not args.distributed and not os.path.exists(options["checkpoint"]):
        raise CNAError(f"--resume: no checkpoint at {options['checkpoint']!r}")
    return options


def _open_prompt_sets(args):
    """Both prompt files as lazy sources, checked now: each must hold at least one usable prompt."""
    from .prompts import PromptSource

    sources = []
    for spec in (args.positive, args.negative):
        source = PromptSource(spec, skip_bad=args.skip_bad)
        if next(iter(source), None) is None:
            raise CNAError(f"prompt file {spec!r} contains no prompts")
        sources.append(source)
    return sources


def _report_bad_records(sources) -> None:
    for source in sources:
        if source.bad:
            first = source.bad[0]
            print(f"skipped {len(source.bad)} bad records in {source.spec} (first: line {first.line}, {first.reason})",
                  file=sys.stderr)


def run_discover(args) -> None:
    positive, negative = _open_prompt_sets(args)
    if not args.distributed:
        circuit, _, _ = _discover(args, args.model, positive, negative)
        _report_bad_records((positive, negative))
        print(circuit.summary(top=10))
        _save(circuit, args.out, args.json, args.csv)
        return
    import torch.distributed as dist

    rank, device_map = _init_distributed()
    try:
        circuit, _, _ = _discover(args, args.model, positive, negative, device_map=device_map, distributed=True,
                                  verbose=rank == 0)
        if rank == 0:
            _report_bad_records((positive, negative))
            print(circuit.summary(top=10))
            _save(circuit, args.out, args.json, args.csv)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_inspect(args) -> None:
    from .circuit import Circuit

    circuit = Circuit.load(args.circuit)
    print(circuit.summary(top=args.top))
    if args.plot:
        from .plotting import plot_circuit

        plot_circuit(circuit, args.plot)
        print(f"wrote {args.plot}")


def _check_circuit_model(circuit, path: str, model_arg: str | None) -> None:
    """Before any model loads: name the model a circuit was found on, and ask for --model when it is not
    the default."""
    from .models import DEFAULT_MODEL_NAME

    found_on = circuit.meta.get("model")
    if not found_on:
        return
    if model_arg is None and found_on != DEFAULT_MODEL_NAME:
        raise CNAError(f"circuit {path!r} was found on model {found_on!r}, not on the default {DEFAULT_MODEL_NAME}: "
                       f"pass --model {found_on}")
    if model_arg is not None and str(model_arg) != found_on:
        print(f"note: circuit {path!r} was found on model {found_on!r}; applying it to {model_arg!r}", file=sys.stderr)


def _load_with_circuit(args):
    from .circuit import Circuit
    from .models import load_model

    from .models.fused import check_backend_setting

    circuit = Circuit.load(args.circuit)
    _check_circuit_model(circuit, args.circuit, args.model)
    check_backend_setting()
    model, tokenizer = load_model(args.model, dtype=getattr(args, "dtype", None))
    circuit.validate(model)
    return circuit, model, tokenizer


def _generation_settings(args) -> dict:
    if args.max_new_tokens < 1:
        raise CNAError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise CNAError(f"--batch-size must be at least 1, got {args.batch_size}")
    settings = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, positions=args.positions,
                    chat_template=False if args.no_chat_template else None, do_sample=args.sample,
                    progress=not args.quiet)
    if args.sample:
        if not (0 < args.temperature < float("inf")):
            raise CNAError(f"--temperature must be a positive number with --sample, got {args.temperature}; for "
                           "greedy decoding leave out --sample")
        settings["temperature"] = args.temperature
    return settings


def _side_by_side(left_title: str, left: str, right_title: str, right: str) -> str:
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)
    left_lines = [left_title, "-" * len(left_title)] + textwrap.wrap(printable(left), width)
    right_lines = [right_title, "-" * len(right_title)] + textwrap.wrap(printable(right), width)
    rows = itertools.zip_longest(left_lines, right_lines, fillvalue="")
    return "\n".join(f"{a:<{width}} | {b}" for a, b in rows)


def _generate_pairs(model, tokenizer, circuit, prompts: list[str], multiplier: float, settings: dict):
    """Baseline and steered completions of `prompts` in one batched run (per-row multipliers)."""
    import torch

    from .steering import generate

    multipliers = torch.tensor([[1.0]] * len(prompts) + [[multiplier]] * len(prompts), dtype=torch.float64)
    texts = generate(model, tokenizer, prompts + prompts, circuits=circuit, multipliers=multipliers, **settings)
    return texts[:len(prompts)], texts[len(prompts):]


def _run_in_process(args, source, circuits, multiplier: float, settings: dict):
    from .batch_job import generate_to_file
    from .models import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    return generate_to_file(
        model, tokenizer, source, args.out, circuits=circuits, multiplier=multiplier,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, do_sample=args.sample,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, chat_template=settings["chat_template"],
        positions=args.positions, progress=not args.quiet)


def _run_generate_job(args, named: dict[str, str]) -> None:
    """`cna generate --out FILE`: the streaming, resumable batch job (cna_fast.batch_job), in process or on a
    server (--server, cna_fast.server_jobs)."""
    from .circuit import Circuit
    from .prompts import PromptSource

    if args.prompts is None:
        raise CNAError("--out needs --prompts FILE (a prompt file, or hf:NAME:SPLIT:COLUMN)")
    if args.compare:
        raise CNAError("--compare prints baseline and steered side by side; it does not combine with --out")
    settings = _generation_settings(args)
    source = PromptSource(args.prompts, skip_bad=args.skip_bad)
    if next(iter(source), None) is None:
        raise CNAError(f"prompt file {args.prompts!r} contains no prompts")
    circuits = {name: Circuit.load(path) for name, path in named.items()}
    for name, circuit in circuits.items():
        _check_circuit_model(circuit, named[name], args.model)
    multiplier = recorded_multiplier(args.multiplier, next(iter(circuits.values())), 0.0)
    if args.server is not None:
        from .server_jobs import run_server_job

        summary = run_server_job(args, source, circuits, multiplier)
    else:
        summary = _run_in_process(args, source, circuits, multiplier, settings)
    if summary.bad:
        print(f"skipped {len(summary.bad)} bad records (first: {summary.bad[0]})", file=sys.stderr)
    print(f"wrote {summary.written} records ({summary.new_tokens} new tokens) to {args.out} in {summary.seconds:.1f}s; "
          f"{summary.resumed} were already there", file=sys.stderr)


def run_generate(args) -> None:
    import torch

    from .paths import named_circuit_paths

    from .prompts import read_prompts
    from .steering import generate

    named = named_circuit_paths(args.circuit)
    if args.server is not None and args.out is None:
        raise CNAError("--server needs --prompts FILE and --out FILE (a batch job)")
    if args.out is not None:
        _run_generate_job(args, named)
        return
    if len(named) > 1:
        raise CNAError("several --circuit need --out (a batch job whose records pick a circuit by name)")
    args.circuit = next(iter(named.values()))
    if args.prompt is not None and not args.prompt.strip():
        raise CNAError("--prompt is empty")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts, skip_bad=args.skip_bad)
    settings = _generation_settings(args)
    if args.sample:
        settings["top_p"] = args.top_p
    circuit, model, tokenizer = _load_with_circuit(args)
    args.multiplier = recorded_multiplier(args.multiplier, circuit, 0.0)
    torch.manual_seed(args.seed)
    if args.compare:
        baseline, steered = _generate_pairs(model, tokenizer, circuit, prompts, args.multiplier, settings)
        for prompt, base, new in zip(prompts, baseline, steered):
            print(f"\n>>> {printable(prompt)}")
            print(_side_by_side("baseline", base, f"steered (x{args.multiplier:g})", new))
        return
    texts = generate(model, tokenizer, prompts, circuits=circuit, multiplier=args.multiplier, **settings)
    for prompt, text in zip(prompts, texts):
        print(f"\n>>> {printable(prompt)}\n{printable(text, keep_newlines=True)}")


def _behavior_judge(args):
    """The behavior: a name for the rule judges, or a model judge loaded from --judge. With --judge-labels,
    print the refusal judges' agreement with the human labels first."""
    from .judges import ModelJudge, agreement_line, is_refusal, judge_agreement

    judge = None
    if args.judge:
        from .models import load_model

        judge_model, judge_tokenizer = load_model(args.judge)
        judge = ModelJudge(judge_model, judge_tokenizer, batch_size=args.batch_size, progress=not args.quiet)
    if args.judge_labels:
        print(f"rule judge (is_refusal) on {args.judge_labels}: "
              f"{agreement_line(judge_agreement(is_refusal, args.judge_labels))}")
        if judge is not None:
            print(f"model judge ({args.judge}) on {args.judge_labels}: "
                  f"{agreement_line(judge_agreement(judge, args.judge_labels))}")
    return judge if judge is not None else args.behavior


def _check_judge_inputs(args) -> None:
    """Fail before any model loads on a missing labels file or a judge for another behavior."""
    from .judges import read_labeled_answers

    if args.judge and args.behavior != "refusal":
        raise CNAError(f"--judge grades refusal, not {args.behavior}: use it with --behavior refusal")
    if args.judge_labels:
        read_labeled_answers(args.judge_labels)


def run_sweep(args) -> None:
    import torch

    from .evaluate import compare_methods
    from .prompts import read_prompts

    prompts = read_prompts(args.prompts)
    settings = _generation_settings(args)
    _check_judge_inputs(args)
    circuit, model, tokenizer = _load_with_circuit(args)
    behavior = _behavior_judge(args)
    torch.manual_seed(args.seed)
    result = compare_methods(model, tokenizer, circuit, prompts, args.multipliers, methods=["cna"], behavior=behavior,
                             capability=False, **settings)
    rows = [{"multiplier": item["strength"], "prompt_index": index % len(prompts), "prompt": item["prompt"],
             "output": item["output"], "behavior": item["behavior"], "quality": item["quality"],
             "answer_ppl": item["answer_ppl"]} for index, item in enumerate(result.generations)]
    for metrics in result.metrics:
        print(f"\n=== multiplier {metrics['strength']:g}: {args.behavior} {metrics['behavior_rate']:.0%}, "
              f"quality {metrics['quality']:.3f}, answer perplexity {metrics['answer_ppl']:.2f}")
        for row in rows:
            if row["multiplier"] == metrics["strength"]:
                print(f"  [{'yes' if row['behavior'] >= 0.5 else 'no':>3}] {printable(row['prompt'][:40]):<40} -> "
                      f"{row['output'][:70]!r}")
    from ._io import atomic_outputs
    from .plotting import plot_sweep

    with atomic_outputs((args.out, args.plot)) as temporary:  # both files or neither
        if args.out:
            _write_rows(temporary[args.out], rows)
        if args.plot:
            plot_sweep(rows, temporary[args.plot], behavior=args.behavior)
    for path in (args.out, args.plot):
        if path:
            print(f"wrote {path}")


def _write_rows(path: str, rows: list[dict]) -> None:
    import csv
    import io

    from ._io import write_text_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def run_eval(args) -> None:

    from .evaluate import compare_methods
    from .prompts import read_prompts

    baselines = [] if args.baseline.strip() == "none" else [b.strip() for b in args.baseline.split(",") if b.strip()]
    unknown = [b for b in baselines if b not in METHODS or b == "cna"]
    if unknown:
        raise CNAError(f"unknown baseline(s) {unknown}: choose caa, random, or none")
    prompts = read_prompts(args.prompts)
    settings = _generation_settings(args)
    _check_judge_inputs(args)
    circuit, model, tokenizer = _load_with_circuit(args)
    behavior = _behavior_judge(args)
    if args.multipliers is None:
        tuned = circuit.meta.get("multiplier")
        args.multipliers = list(DEFAULT_STRENGTHS) if tuned is None else sorted({1.0, float(tuned)})
    import torch

    torch.manual_seed(args.seed)
    result = compare_methods(model, tokenizer, circuit, prompts, args.multipliers, methods=["cna", *baselines],
                             behavior=behavior, capability=not args.no_capability, seed=args.seed, **settings)
    judged_by = f"model judge {args.judge}" if args.judge else "rule judge"
    print(f"behavior: {args.behavior} ({judged_by}); {len(prompts)} prompts; strength = multiplier for CNA and "
          "random, alpha = strength - 1 for CAA; answer_ppl = answer perplexity under the unsteered model")
    print(result.table())
    _write_eval_outputs(args, result, circuit)


def _write_eval_outputs(args, result, circuit) -> None:
    """The CSV, JSON, plot and HTML report asked for: all of them or none."""
    import json

    from ._io import atomic_outputs, write_text_atomic
    from .plotting import plot_evaluation, write_html_report

    document = {"behavior": args.behavior, "judge": args.judge or "rule", "metrics": result.metrics,
                "generations": result.generations}
    writers = [(args.csv, lambda path: _write_rows(path, result.metrics)),
               (args.json, lambda path: write_text_atomic(path, json.dumps(document, indent=2) + "\n")),
               (args.plot, lambda path: plot_evaluation(result, circuit, path, behavior=args.behavior)),
               (args.html, lambda path: write_html_report(result, circuit, path, behavior=args.behavior))]
    with atomic_outputs(path for path, _ in writers) as temporary:
        for path, write in writers:
            if path:
                write(temporary[str(path)])
    for path, _ in writers:
        if path:
            print(f"wrote {path}")


def run_export(args) -> None:
    from .circuit import Circuit
    from .export import export_folded, export_lora
    from .models import load_model
    from .paths import check_export_folder

    circuit = Circuit.load(args.circuit)
    _check_circuit_model(circuit, args.circuit, args.model)
    args.multiplier = recorded_multiplier(args.multiplier, circuit, None)
    from .models.fused import check_backend_setting

    check_backend_setting()
    if args.format == "gguf":
        _export_gguf(args, circuit)
        return
    if args.gguf_type is not None:
        raise CNAError("--gguf-type applies to --format gguf only")
    if args.format == "gguf-lora":
        from .gguf_lora import run_export_gguf_lora

        run_export_gguf_lora(args, circuit)
        return
    check_export_folder(args.out, args.force, inputs=[args.circuit, args.model])  # before the model loads
    model, tokenizer = load_model(args.model)
    if args.format == "folded":
        export_folded(model, circuit, args.multiplier, args.out, tokenizer=tokenizer, force=args.force)
    else:
        export_lora(model, circuit, args.multiplier, args.out, force=args.force, check_vllm=not args.no_vllm_check)
    print(f"wrote {args.format} export of {len(circuit)} neurons at multiplier {args.multiplier:g} to {args.out}")
    if args.format == "lora":
        from .serving import lora_serving_note

        print(lora_serving_note(model, args.out))


def _export_gguf(args, circuit) -> None:
    from .gguf_export import check_gguf_output, export_gguf, gguf_serving_instructions
    from .models import load_model

    check_gguf_output(args.out, args.force)  # before the model loads
    model, _ = load_model(args.model)
    export_gguf(model, circuit, args.multiplier, args.out, gguf_type=args.gguf_type, force=args.force, progress=True)
    print(f"wrote GGUF export of {len(circuit)} neurons at multiplier {args.multiplier:g} to {args.out}")
    print(gguf_serving_instructions(args.out))


def run_demo(args) -> None:
    from .evaluate import language_rate
    from .prompts import bundled_prompts

    french, english = bundled_prompts("french_questions"), bundled_prompts("english_questions")
    print(f"French-vs-English discovery on the embedded default model ({len(french)} + {len(english)} "
          "bundled questions)")
    circuit, model, tokenizer = _discover(args, None, french, english)
    print(circuit.summary(top=15))
    print("\npositive deltas fire more on French questions; negative ones more on English questions.")
    _save(circuit, args.out)
    if args.skip_steering:
        return
    held_out = bundled_prompts("french_heldout")[:args.held_out]
    print(f"\nablating the circuit (multiplier 0) on {len(held_out)} held-out French questions, "
          "baseline and ablated in one batched generation:")
    settings = dict(max_new_tokens=40, batch_size=16, progress=not args.quiet)
    baseline, ablated = _generate_pairs(model, tokenizer, circuit, held_out, 0.0, settings)
    for prompt, base, new in list(zip(held_out, baseline, ablated))[:4]:
        print(f"\n>>> {prompt}")
        print(_side_by_side("baseline", base, "circuit ablated (x0)", new))
    print(f"\nanswers in French: baseline {language_rate(baseline, 'fr'):.0%}, "
          f"ablated {language_rate(ablated, 'fr'):.0%}"
          f"; in English: baseline {language_rate(baseline, 'en'):.0%}, ablated {language_rate(ablated, 'en'):.0%}")
    if args.evaluate:
        _demo_evaluation(args, model, tokenizer, circuit)


def _demo_evaluation(args, model, tokenizer, circuit) -> None:
    from .evaluate import compare_methods
    from .prompts import bundled_prompts

    held_out = bundled_prompts("french_heldout")
    print(f"\nevaluation on {len(held_out)} held-out French questions (behavior = answer in French), "
          "strength = multiplier for CNA and random, alpha = strength - 1 for CAA:")
    result = compare_methods(model, tokenizer, circuit, held_out, DEFAULT_STRENGTHS, behavior="french",
                             max_new_tokens=40, batch_size=32, progress=not args.quiet)
    print(result.table())
    if args.csv:
        _write_rows(args.csv, result.metrics)
        print(f"wrote {args.csv}")
    if args.plot:
        from .plotting import plot_evaluation

        plot_evaluation(result, circuit, args.plot, behavior="French-answer")
        print(f"wrote {args.plot}")


def recorded_multiplier(given: float | None, circuit, fallback: float | None) -> float:
    """The multiplier to steer with: the one given, else the one the circuit records (cna tune), else `fallback`."""
    if given is not None:
        return given
    recorded = circuit.meta.get("multiplier")
    if recorded is not None:
        from .steering import as_multiplier

        return as_multiplier(recorded)
    if fallback is None:
        raise CNAError("this circuit records no multiplier (it was not made by cna tune): give --multiplier")
    return fallback


def _add_tune_parser(commands) -> None:
    from .attribution import SCORES
    from .settings import DEFAULT_BATCH_SIZE, REDUCTIONS

    tune = commands.add_parser("tune", help="search circuit size x multiplier x score under a KL budget")
    tune.add_argument("--model", help="model folder or hub id (default: embedded SmolLM2-135M-Instruct)")
    tune.add_argument("--positive", help="discovery prompts that show the behavior (or --stats)")
    tune.add_argument("--negative", help="discovery prompts that do not (or --stats)")
    tune.add_argument("--stats", help="saved statistics (cna discover --save-stats) instead of discovering again")
    tune.add_argument("--eval-prompts", required=True, help="held-out prompts whose answers show the behavior")
    tune.add_argument("--behavior", default="refusal", help="what counts as the behavior in an answer: "
                      "refusal, french, english, ... (a name in cna_fast.evaluate.BEHAVIORS)")
    tune.add_argument("--goal", choices=GOALS, default="remove",
                      help="remove the behavior (ablate: 0,0.5,-0.5,-1) or induce it (amplify: 1.5,2,3)")
    tune.add_argument("--kl-budget", type=_finite, default=DEFAULT_KL_BUDGET,
                      help=f"most KL on neutral text, nats (default {DEFAULT_KL_BUDGET:g})")
    tune.add_argument("--quality-floor", type=_finite, default=DEFAULT_QUALITY_FLOOR,
                      help=f"least answer quality (default {DEFAULT_QUALITY_FLOOR:g})")
    tune.add_argument("--sizes", type=_finite_list, metavar="0.0003,0.001,50",
                      help="circuit sizes: fractions of all neurons (< 1) or counts (default 0.03%% to 2%%)")
    tune.add_argument("--multipliers", type=_finite_list, metavar="0,-0.5", help="default: by --goal")
    tune.add_argument("--scores", default=",".join(SCORES), help="comma-separated: diff, t, d (default all)")
    tune.add_argument("--neutral", help="neutral text file for KL, one text per line (default: bundled paragraphs)")
    tune.add_argument("--iterative", type=int, default=0, metavar="ROUNDS",
                      help="rounds of re-discovery with the chosen circuit applied (default 0)")
    tune.add_argument("--max-new-tokens", type=int, default=40)
    tune.add_argument("--rungs", type=int, default=2, help="successive-halving rungs (the last one is full)")
    tune.add_argument("--reduction", "--position", dest="reduction", choices=REDUCTIONS, default="last",
                      help="how a prompt's tokens become samples (see cna discover)")
    tune.add_argument("--exclude-layers", type=_layer_list, default=[], metavar="0,1")
    tune.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    tune.add_argument("--dtype", choices=COMPUTE_DTYPES)
    tune.add_argument("--no-chat-template", action="store_true", help="feed prompts as raw text")
    tune.add_argument("--out", required=True, help="the chosen circuit (.safetensors), its multiplier recorded")
    tune.add_argument("--csv", help="every setting measured, as CSV")
    tune.add_argument("--json", help="table, Pareto front, choice and answers as JSON")
    tune.add_argument("--plot", help="PNG: behavior rate against KL, Pareto front and choice marked")
    tune.add_argument("--quiet", action="store_true", help="no progress bars")


def run_tune(args) -> None:
    from .models import load_model
    from .prompts import read_prompts
    from .stats import NeuronStats
    from .tune import tune

    if args.stats is None and (args.positive is None or args.negative is None):
        raise CNAError("give --positive and --negative discovery prompts, or --stats from cna discover --save-stats")
    stats = NeuronStats.load(args.stats) if args.stats else None
    positive = read_prompts(args.positive) if args.positive else None
    negative = read_prompts(args.negative) if args.negative else None
    neutral = read_prompts(args.neutral) if args.neutral else None
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    result = tune(model, tokenizer, positive, negative, read_prompts(args.eval_prompts), behavior=args.behavior,
                  goal=args.goal, kl_budget=args.kl_budget, quality_floor=args.quality_floor, sizes=args.sizes,
                  multipliers=args.multipliers, scores=[s.strip() for s in args.scores.split(",") if s.strip()],
                  neutral=neutral, stats=stats, iterative=args.iterative, max_new_tokens=args.max_new_tokens,
                  rungs=args.rungs, position=args.reduction, exclude_layers=args.exclude_layers,
                  chat_template=False if args.no_chat_template else None, batch_size=args.batch_size,
                  progress=not args.quiet)
    print(result.summary())
    circuit = result.require_circuit()
    circuit.save(args.out)
    print(f"wrote {args.out} (multiplier {result.multiplier:g} recorded)")
    for path, writer in ((args.csv, result.to_csv), (args.json, result.to_json)):
        if path:
            writer(path)
            print(f"wrote {path}")
    if args.plot:
        from .plotting import plot_tune

        plot_tune(result, args.plot)
        print(f"wrote {args.plot}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `cna`; returns the exit code: 0 done, 2 bad input or environment, 1 a bug, 130 Ctrl-C."""
    args = _parser().parse_args(argv)
    handlers = {"discover": run_discover, "inspect": run_inspect, "generate": run_generate, "sweep": run_sweep,
                "export": run_export, "eval": run_eval, "demo": run_demo, "tune": run_tune}
    code, message = 0, None
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            check_command_paths(args)
            handlers[args.command](args)
        except KeyboardInterrupt:
            code, message = EXIT_INTERRUPTED, "interrupted; no partial output was written"
        except Exception as error:  # the exit policy: every failure becomes one line and an exit code
            if os.environ.get("CNA_FAST_DEBUG"):
                raise
            code, message = classify_failure(error)
    if message is not None:  # printed once the traceback is released, so progress bars have closed
        print(f"cna {args.command}: {message}", file=sys.stderr)
    return code


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"cna: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
