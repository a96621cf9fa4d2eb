"""The `cna` command line: one argument parser per subcommand, with defaults and choices read from the
library, and value types that refuse a bad number before any work (argparse exits 2)."""
from __future__ import annotations

import argparse
import math

from ..attribution import DEFAULT_TOP_FRAC, SCORES
from ..batching import LONG_PROMPT_POLICIES
from ..evaluation import BEHAVIORS, DEFAULT_STRENGTHS
from ..export import GGUF_TYPES
from ..models.loading import COMPUTE_DTYPES
from ..search import DEFAULT_KL_BUDGET, DEFAULT_QUALITY_FLOOR, GOALS, STRATEGIES
from ..settings import DEFAULT_BATCH_SIZE, MOE_MODES, REDUCTIONS
from ..steering import POSITION_MODES

_MODEL_HELP = "model folder, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)"


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated layer numbers like 0,1; got {text!r}") from None


def _whole_number(text: str, least: int, meaning: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {meaning}, got {value}")
    return value


def _positive(text: str) -> int:
    return _whole_number(text, 1, "at least 1")


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _layer_number(text: str) -> int:
    return _whole_number(text, 0, "0 (the embedding output) or more")


def _positive_number(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}: 0.001 selects the top 0.1%")
    return value


def _finite_list(text: str) -> list[float]:
    values = [_finite(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give comma-separated numbers like 0,0.5,1,2")
    return values


def _add_model_options(parser: argparse.ArgumentParser, batch_size: int, model: bool = True) -> None:
    """Options every command that runs the model takes (`cna demo` always runs the embedded default)."""
    if model:
        parser.add_argument("--model", help=_MODEL_HELP)
    parser.add_argument("--batch-size", type=_positive, default=batch_size,
                        help=f"most prompts per forward pass (default {batch_size})")
    parser.add_argument("--dtype", choices=COMPUTE_DTYPES,
                        help="compute dtype (default float32 on CPU, bfloat16 on CUDA); statistics are float64")
    parser.add_argument("--no-chat-template", action="store_true", help="feed prompts as raw text")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_capture_options(parser: argparse.ArgumentParser, model: bool = True) -> None:
    """How prompts become samples (discover, demo, tune)."""
    _add_model_options(parser, DEFAULT_BATCH_SIZE, model)
    parser.add_argument("--reduction", choices=REDUCTIONS, default="last",
                        help="how a prompt's tokens become samples: last prompt token (default), all tokens, or "
                             "per-prompt mean")
    parser.add_argument("--exclude-layers", type=_layer_list, default=[], metavar="0,1",
                        help="layers never selected (the reference implementation skips 0,1)")
    parser.add_argument("--moe-mode", choices=MOE_MODES, default="effective",
                        help="mixture-of-experts models: routed-neuron statistics of router weight x activation "
                             "(0 when not routed; default) or over routed tokens only")


def _add_selection_options(parser: argparse.ArgumentParser) -> None:
    """Which neurons become the circuit (discover, demo)."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--top-k", type=_positive, help="number of neurons in the circuit")
    size.add_argument("--top-frac", type=_fraction, default=DEFAULT_TOP_FRAC,
                      help=f"fraction of all MLP neurons (default {DEFAULT_TOP_FRAC:g} = {DEFAULT_TOP_FRAC * 100:g}%%)")
    parser.add_argument("--score", choices=SCORES, default="diff",
                        help="mean difference (default), Welch t, or Cohen's d")
    parser.add_argument("--universal-filter", action="store_true",
                        help="drop neurons that fire for everything (bundled diverse prompts)")


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    _add_model_options(parser, 16)
    parser.add_argument("--max-new-tokens", type=_positive, default=64,
                        help="new tokens per answer (default 64); a prompt whose tokens plus these exceed the "
                             "model's context is refused with exit 2 (a batch job with --skip-bad skips it), never "
                             "truncated")
    parser.add_argument("--positions", choices=POSITION_MODES, default="all",
                        help="which tokens are steered (default: prompt and generated)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=_positive_number, default=0.7, help="with --sample (default 0.7)")
    parser.add_argument("--seed", type=int, default=0)


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
    discover.add_argument("--out", required=True, help="circuit file to write (.safetensors)")
    discover.add_argument("--json", help="also write the circuit as JSON")
    discover.add_argument("--csv", help="also write the circuit's neurons as CSV")
    discover.add_argument("--distributed", action="store_true",
                          help="run under torchrun: every rank streams a shard, rank 0 writes the circuit")
    discover.add_argument("--skip-bad", action="store_true",
                          help="skip bad records (missing field, empty text, undecodable line) and report them")
    discover.add_argument("--max-length", type=_positive, help="token limit per prompt (default: the model's context)")
    discover.add_argument("--on-long", choices=LONG_PROMPT_POLICIES, default="truncate",
                          help="what to do with longer prompts (truncate keeps the template prefix and the end)")
    discover.add_argument("--checkpoint-every", type=_positive, metavar="N",
                          help="save statistics and stream position to --checkpoint at the end of a tokenization "
                               "window, i.e. every max(N, 32 x batch size) prompts")
    discover.add_argument("--checkpoint", help="checkpoint file (default: OUT.checkpoint)")
    discover.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    discover.add_argument("--save-stats", metavar="PATH",
                          help="also write the contrast statistics (.safetensors) for `cna tune --stats`")
    _add_capture_options(discover)
    _add_selection_options(discover)


def _add_inspect_parser(commands) -> None:
    inspect = commands.add_parser("inspect", help="summarize a circuit file")
    inspect.add_argument("circuit")
    inspect.add_argument("--top", type=_positive, default=20, help="how many top neurons to list")
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
    generate.add_argument("--concurrency", type=_positive, default=8, help="with --server: requests in flight")
    _add_generation_options(generate)


def _add_evaluation_options(parser: argparse.ArgumentParser, multipliers: list[float] | None, strengths: str) -> None:
    """A circuit, prompts whose answers show the behavior, the strengths, the judge and the generations."""
    parser.add_argument("--circuit", required=True)
    parser.add_argument("--prompts", required=True, help="prompts whose answers show the behavior (.txt/.jsonl/.csv)")
    parser.add_argument("--multipliers", type=_finite_list, default=multipliers, metavar="0,0.5,1,2", help=strengths)
    _add_judge_options(parser)
    _add_generation_options(parser)


def _add_sweep_parser(commands) -> None:
    sweep = commands.add_parser("sweep", help="generate at several multipliers in one batched run")
    _add_evaluation_options(sweep, list(DEFAULT_STRENGTHS), "multipliers of the circuit (default 0,0.5,1,2)")
    sweep.add_argument("--out", help="CSV of every generation with its behavior, quality and answer perplexity")
    sweep.add_argument("--plot", help="PNG of behavior rate and quality against the multiplier")


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
    export.add_argument("--model", help=_MODEL_HELP)
    export.add_argument("--gguf-type", choices=GGUF_TYPES,
                        help="type of the rewritten ffn_down tensors (default: the source's when it is one of "
                             "these, else F16)")
    export.add_argument("--force", action="store_true",
                        help="replace a previous export (a folder holding cna_fast_steering.json, or a .gguf file "
                             "this tool wrote, with --format gguf or gguf-lora); never other folders or files")
    export.add_argument("--no-vllm-check", action="store_true",
                        help="lora: allow ranks above vLLM's maximum (512) and skip vLLM's adapter checks (PEFT only)")


def _add_evaluate_parser(commands) -> None:
    evaluate = commands.add_parser("eval", help="behavior, quality, KL, perplexity per strength: CNA vs baselines")
    _add_evaluation_options(evaluate, None, "strengths (default: 1 and the circuit's tuned multiplier, else 0,0.5,1,2)")
    evaluate.add_argument("--baseline", default="caa,random",
                          help="comma-separated: caa, random, ablation (or 'none'); ablation needs --positive and "
                               "--negative")
    evaluate.add_argument("--positive", help="with --baseline ablation: prompts that show the behavior (e.g. "
                                             "harmful requests), for the residual direction it projects out")
    evaluate.add_argument("--negative", help="with --baseline ablation: prompts that do not (e.g. harmless requests)")
    evaluate.add_argument("--direction-layer", type=_layer_number, metavar="N",
                          help="with --baseline ablation: the residual layer of the direction (0 = embedding output, "
                               "i = output of decoder layer i-1; default: the middle layer, 20-80%% of the depth, "
                               "whose direction separates the two sets best, by Cohen's d)")
    evaluate.add_argument("--no-capability", action="store_true",
                          help="skip the KL, perplexity and multiple-choice pass (one forward pass per setting)")
    evaluate.add_argument("--csv", help="metrics per method and strength as CSV")
    evaluate.add_argument("--json", help="metrics and every generation as JSON")
    evaluate.add_argument("--plot", help="PNG: behavior, quality and KL against strength, and the layer distribution")
    evaluate.add_argument("--html", help="an HTML report with the plot, the table and sample generations")


def _add_demo_parser(commands) -> None:
    demo = commands.add_parser("demo", help="French-vs-English discovery on the embedded default model")
    demo.add_argument("--out", help="also save the circuit here")
    demo.add_argument("--held-out", type=_positive, default=16, help="held-out French questions to steer")
    demo.add_argument("--skip-steering", action="store_true", help="discovery only, no generation")
    demo.add_argument("--evaluate", action="store_true",
                      help="also sweep multipliers 0,0.5,1,2 on the held-out questions: CNA vs CAA vs random")
    demo.add_argument("--plot", help="with --evaluate: PNG of French-answer rate, quality and KL against strength")
    demo.add_argument("--csv", help="with --evaluate: the metrics as CSV")
    _add_capture_options(demo, model=False)
    _add_selection_options(demo)


def _add_tune_parser(commands) -> None:
    tune = commands.add_parser("tune", help="search circuit size x multiplier x score under a KL budget")
    tune.add_argument("--positive", help="discovery prompts that show the behavior (or --stats)")
    tune.add_argument("--negative", help="discovery prompts that do not (or --stats)")
    tune.add_argument("--stats", help="saved statistics (cna discover --save-stats) instead of discovering again")
    tune.add_argument("--eval-prompts", required=True, help="held-out prompts whose answers show the behavior")
    tune.add_argument("--behavior", default="refusal", help="what counts as the behavior in an answer: "
                      "refusal, french, english, ... (a name in cna_fast.evaluation.BEHAVIORS)")
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
    tune.add_argument("--max-new-tokens", type=_positive, default=40)
    tune.add_argument("--time-budget", type=_positive_number, metavar="MINUTES",
                      help="spend at most this long after discovery: later stages are cut to fit, and the result "
                           "says what was left unmeasured (default: no limit)")
    tune.add_argument("--strategy", choices=STRATEGIES, default="frontier",
                      help="frontier: bisect on KL and generate only the settings nothing stronger dominates "
                           "(default); full: measure and generate every setting (slow; the yardstick)")
    tune.add_argument("--out", required=True, help="the chosen circuit (.safetensors), its multiplier recorded")
    tune.add_argument("--csv", help="every setting measured, as CSV")
    tune.add_argument("--json", help="table, Pareto front, choice and answers as JSON")
    tune.add_argument("--plot", help="PNG: behavior rate against KL, Pareto front and choice marked")
    _add_capture_options(tune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cna", description="Contrastive Neuron Attribution, fast.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_discover_parser, _add_inspect_parser, _add_generate_parser, _add_sweep_parser,
                _add_export_parser, _add_evaluate_parser, _add_demo_parser, _add_tune_parser):
        add(commands)
    return parser
