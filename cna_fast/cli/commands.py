"""The `cna` command: a thin layer over the library. Each subcommand parses, calls the library, prints.

Bad input exits with code 2 and writes nothing; every output is checked before any model loads.
"""
from __future__ import annotations

import itertools
import os
import shutil
import sys
import textwrap
import time
import warnings
from typing import Sequence

from .._io import atomic_outputs, printable
from ..errors import CNAError
from .failures import EXIT_BAD_INPUT, EXIT_INTERRUPTED, check_command_paths, classify_failure, named_circuit_paths
from .parser import build_parser

__all__ = ["EXIT_BAD_INPUT", "main"]


def _capture_settings(args):
    """The CaptureSettings the capture options describe (validated before any model loads)."""
    from ..settings import CaptureSettings

    return CaptureSettings(reduction=args.reduction, chat_template=False if args.no_chat_template else None,
                           batch_size=args.batch_size, max_length=getattr(args, "max_length", None),
                           on_long=getattr(args, "on_long", "truncate"), moe_mode=args.moe_mode)


def _generation_settings(args):
    """The GenerationSettings the generation options describe (validated before any model loads)."""
    from ..steering import GenerationSettings

    return GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              positions=args.positions, chat_template=False if args.no_chat_template else None,
                              do_sample=args.sample, temperature=args.temperature,
                              top_p=getattr(args, "top_p", 1.0), seed=args.seed)


def _load_model(args, device_map: dict | None = None):
    from ..models import load_model
    from ..models.fused import check_backend_setting

    check_backend_setting()
    return load_model(getattr(args, "model", None), dtype=getattr(args, "dtype", None), device_map=device_map)


def _load_circuit(path: str, model: str | None):
    """A circuit file, checked against --model before any model loads."""
    from ..circuit import Circuit

    circuit = Circuit.load(path)
    note = circuit.check_found_on(model, f"circuit {path!r}")
    if note:
        print(f"note: {note}", file=sys.stderr)
    return circuit


def _discover(args, positive, negative, *, device_map: dict | None = None, distributed: bool = False,
              verbose: bool = True):
    from ..attribution import Selection
    from ..capture import DEFAULT_EVERY, Checkpoint
    from ..pipeline import discover

    settings = _capture_settings(args)
    selection = Selection(top_k=args.top_k, top_frac=args.top_frac, score=args.score,
                          exclude_layers=args.exclude_layers)
    checkpoint = None
    if getattr(args, "checkpoint_every", None) is not None or getattr(args, "resume", False):
        checkpoint = Checkpoint(args.checkpoint or f"{args.out}.checkpoint", args.checkpoint_every or DEFAULT_EVERY,
                                resume=args.resume)
        if args.resume and not args.distributed and not checkpoint.path.exists():
            raise CNAError(f"--resume: no checkpoint at {str(checkpoint.path)!r}")
    model, tokenizer = _load_model(args, device_map)
    started = time.perf_counter()
    circuit = discover(model, tokenizer, positive, negative, settings, selection=selection,
                       universal_filter=args.universal_filter, checkpoint=checkpoint, distributed=distributed,
                       save_stats=getattr(args, "save_stats", None), progress=verbose and not args.quiet)
    elapsed = time.perf_counter() - started
    if verbose:
        total = circuit.meta["n_positive"] + circuit.meta["n_negative"]
        print(f"discovered {len(circuit)} neurons from {circuit.meta['n_positive']} + {circuit.meta['n_negative']} "
              f"prompts in {elapsed:.1f} s ({total / elapsed:.1f} prompts/s)")
    return circuit, model, tokenizer


def _save(circuit, out: str | None, as_json: str | None = None, as_csv: str | None = None) -> None:
    """Write the circuit file and, if asked, its JSON and CSV views: all of them or none."""
    _write_all([(out, circuit.save), (as_json, circuit.to_json), (as_csv, circuit.to_csv)])


_INTERRUPTED = "interrupted; no partial output was written"
_interrupt_note: list[str] = []  # what a Ctrl-C leaves behind, when it is not "nothing" (set by the handlers)


def _write_all(writers) -> None:
    """Write every (path, writer) whose path is given, all of them or none; then say so."""
    done: list[str] = []
    try:
        with atomic_outputs((path for path, _ in writers), done) as temporary:
            for path, write in writers:
                if path:
                    write(temporary[str(path)])
    except KeyboardInterrupt:
        if done:
            _interrupt_note.append(f"interrupted just after writing all of its outputs ({', '.join(done)}); they are "
                                   "complete")
        raise
    for path, _ in writers:
        if path:
            print(f"wrote {path}")


def _report_bad_records(sources) -> None:
    for source in sources:
        if source.bad:
            first = source.bad[0]
            print(f"skipped {len(source.bad)} bad records in {source.spec} (first: line {first.line}, {first.reason})",
                  file=sys.stderr)


def run_discover(args) -> None:
    from ..prompts import open_prompt_source

    positive, negative = (open_prompt_source(spec, skip_bad=args.skip_bad) for spec in (args.positive, args.negative))
    if not args.distributed:
        circuit, _, _ = _discover(args, positive, negative)
        _report_bad_records((positive, negative))
        print(circuit.summary(top=10))
        _save(circuit, args.out, args.json, args.csv)
        return
    import torch.distributed as dist

    from ..capture import init_distributed

    rank, device_map = init_distributed()
    try:
        circuit, _, _ = _discover(args, positive, negative, device_map=device_map, distributed=True,
                                  verbose=rank == 0)
        if rank == 0:
            _report_bad_records((positive, negative))
            print(circuit.summary(top=10))
            _save(circuit, args.out, args.json, args.csv)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_inspect(args) -> None:
    from ..circuit import Circuit

    circuit = Circuit.load(args.circuit)
    print(circuit.summary(top=args.top))
    if args.plot:
        from .plotting import plot_circuit

        _write_all([(args.plot, lambda path: plot_circuit(circuit, path))])


def _side_by_side(left_title: str, left: str, right_title: str, right: str) -> str:
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)
    left_lines = [left_title, "-" * len(left_title)] + textwrap.wrap(printable(left), width)
    right_lines = [right_title, "-" * len(right_title)] + textwrap.wrap(printable(right), width)
    rows = itertools.zip_longest(left_lines, right_lines, fillvalue="")
    return "\n".join(f"{a:<{width}} | {b}" for a, b in rows)


def _run_generate_job(args, named: dict[str, str]) -> None:
    """`cna generate --out FILE`: the streaming, resumable batch job (cna_fast.jobs), in process or on a
    server (--server)."""
    from ..jobs import generate_on_server, generate_to_file, load_tokenizer
    from ..prompts import open_prompt_source

    if args.prompts is None:
        raise CNAError("--out needs --prompts FILE (a prompt file, or hf:NAME:SPLIT:COLUMN)")
    if args.compare:
        raise CNAError("--compare prints baseline and steered side by side; it does not combine with --out")
    generation = _generation_settings(args)
    source = open_prompt_source(args.prompts, skip_bad=args.skip_bad)
    circuits = {name: _load_circuit(path, args.model) for name, path in named.items()}
    multiplier = next(iter(circuits.values())).recorded_multiplier(args.multiplier, 0.0)
    try:
        if args.server is not None:
            summary = generate_on_server(args.server, load_tokenizer(args.model), source, args.out,
                                         circuits=circuits, multiplier=multiplier, generation=generation,
                                         concurrency=args.concurrency, progress=not args.quiet)
        else:
            model, tokenizer = _load_model(args)
            summary = generate_to_file(model, tokenizer, source, args.out, circuits=circuits, multiplier=multiplier,
                                       generation=generation, progress=not args.quiet)
    except KeyboardInterrupt:
        _interrupt_note.append(_job_interrupted(args.out))
        raise
    if summary.bad:
        print(f"skipped {len(summary.bad)} bad records (first: {summary.bad[0]})", file=sys.stderr)
    print(f"wrote {summary.written} records ({summary.new_tokens} new tokens) to {args.out} in {summary.seconds:.1f}s; "
          f"{summary.resumed} were already there", file=sys.stderr)


def _job_interrupted(out: str) -> str:
    """What an interrupted batch job kept: its whole records, and how to resume."""
    try:
        with open(out, "rb") as handle:
            kept = sum(1 for line in handle if line.endswith(b"\n"))
    except OSError:
        kept = 0
    if not kept:
        return "interrupted; no record was written"
    return (f"interrupted; the {kept} records already in {out} are kept (each is whole); rerun the same command to "
            "resume where it stopped")


def run_generate(args) -> None:
    from ..prompts import read_prompts
    from ..steering import generate, generate_with_baseline

    named = named_circuit_paths(args.circuit)
    if args.server is not None and args.out is None:
        raise CNAError("--server needs --prompts FILE and --out FILE (a batch job)")
    if args.out is not None:
        _run_generate_job(args, named)
        return
    if len(named) > 1:
        raise CNAError("several --circuit need --out (a batch job whose records pick a circuit by name)")
    if args.prompt is not None and not args.prompt.strip():
        raise CNAError("--prompt is empty")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts, skip_bad=args.skip_bad)
    generation = _generation_settings(args)
    circuit = _load_circuit(next(iter(named.values())), args.model)
    multiplier = circuit.recorded_multiplier(args.multiplier, 0.0)
    model, tokenizer = _load_model(args)
    progress = not args.quiet
    if args.compare:
        baseline, steered = generate_with_baseline(model, tokenizer, circuit, prompts, multiplier, generation,
                                                   progress=progress)
        for prompt, base, new in zip(prompts, baseline, steered):
            print(f"\n>>> {printable(prompt)}")
            print(_side_by_side("baseline", base, f"steered (x{multiplier:g})", new))
        return
    texts = generate(model, tokenizer, prompts, circuits=circuit, multiplier=multiplier, generation=generation,
                     progress=progress)
    for prompt, text in zip(prompts, texts):
        print(f"\n>>> {printable(prompt)}\n{printable(text, keep_newlines=True)}")


def _behavior_judge(args):
    """The behavior: a name for the rule judges, or a model judge loaded from --judge. With --judge-labels,
    print the refusal judges' agreement with the human labels first."""
    from ..evaluation import ModelJudge, agreement_line, is_refusal, judge_agreement

    judge = None
    if args.judge:
        from ..models import load_model

        judge_model, judge_tokenizer = load_model(args.judge)
        judge = ModelJudge(judge_model, judge_tokenizer, batch_size=args.batch_size, progress=not args.quiet)
    if args.judge_labels:
        print(f"rule judge (is_refusal) on {args.judge_labels}: "
              f"{agreement_line(judge_agreement(is_refusal, args.judge_labels))}")
        if judge is not None:
            print(f"model judge ({args.judge}) on {args.judge_labels}: "
                  f"{agreement_line(judge_agreement(judge, args.judge_labels))}")
    return judge if judge is not None else args.behavior


def _load_for_evaluation(args):
    """Prompts, generation settings, circuit, model and judge of `cna sweep` / `cna eval`; inputs checked first."""
    from ..evaluation import read_labeled_answers
    from ..prompts import read_prompts

    prompts = read_prompts(args.prompts)
    generation = _generation_settings(args)
    if args.judge and args.behavior != "refusal":
        raise CNAError(f"--judge grades refusal, not {args.behavior}: use it with --behavior refusal")
    if args.judge_labels:
        read_labeled_answers(args.judge_labels)
    circuit = _load_circuit(args.circuit, args.model)
    model, tokenizer = _load_model(args)
    circuit.validate(model)
    return prompts, generation, circuit, model, tokenizer, _behavior_judge(args)


def run_sweep(args) -> None:
    from ..evaluation import compare_methods

    prompts, generation, circuit, model, tokenizer, behavior = _load_for_evaluation(args)
    result = compare_methods(model, tokenizer, circuit, prompts, args.multipliers, methods=["cna"], behavior=behavior,
                             capability=False, generation=generation, progress=not args.quiet)
    rows = result.sweep_rows()
    for metrics in result.metrics:
        print(f"\n=== multiplier {metrics['strength']:g}: {args.behavior} {metrics['behavior_rate']:.0%}, "
              f"quality {metrics['quality']:.3f}, answer perplexity {metrics['answer_ppl']:.2f}")
        for row in rows:
            if row["multiplier"] == metrics["strength"]:
                print(f"  [{'yes' if row['behavior'] >= 0.5 else 'no':>3}] {printable(row['prompt'][:40]):<40} -> "
                      f"{row['output'][:70]!r}")
    from .._io import csv_text, write_text_atomic
    from .plotting import plot_sweep

    _write_all([(args.out, lambda path: write_text_atomic(path, csv_text(rows))),
                (args.plot, lambda path: plot_sweep(rows, path, behavior=args.behavior))])


def _direction_prompts(args, baselines: list[str]) -> tuple[list[str], list[str]] | None:
    """The ablation baseline's positive and negative prompts, read before any model loads (None without ablation)."""
    from ..prompts import read_prompts

    if "ablation" not in baselines:
        if args.positive or args.negative or args.direction_layer is not None:
            raise CNAError("--positive, --negative and --direction-layer define the ablation baseline's direction: "
                           "add ablation to --baseline (e.g. --baseline caa,random,ablation)")
        return None
    if not (args.positive and args.negative):
        raise CNAError("--baseline ablation needs the two prompt sets of its residual direction: pass --positive "
                       "HARMFUL.txt (prompts that show the behavior) and --negative HARMLESS.txt (prompts that do not)")
    return read_prompts(args.positive), read_prompts(args.negative)


def _ablation_direction(args, model, tokenizer, generation, direction_prompts):
    """The unit direction of the ablation baseline (None without it), with a line saying which layer it is."""
    from ..capture import residual_directions

    if direction_prompts is None:
        return None
    directions = residual_directions(model, tokenizer, *direction_prompts, chat_template=generation.chat_template,
                                     batch_size=args.batch_size, progress=not args.quiet)
    layer = directions.best_layer() if args.direction_layer is None else args.direction_layer
    direction = directions.direction(layer)
    chosen = "chosen" if args.direction_layer is None else "given"
    print(f"ablation direction: residual layer {layer} of 0..{directions.num_layers} ({chosen}; Cohen's d "
          f"{float(directions.cohens_d[layer]):.2f}) from {len(direction_prompts[0])} positive and "
          f"{len(direction_prompts[1])} negative prompts")
    return direction


def run_eval(args) -> None:
    from ..evaluation import METHODS, compare_methods, default_strengths
    from ..steering import ablation_changed_parameters, circuit_changed_parameters
    from .plotting import plot_evaluation, write_html_report

    baselines = [] if args.baseline.strip() == "none" else [b.strip() for b in args.baseline.split(",") if b.strip()]
    unknown = [b for b in baselines if b not in METHODS or b == "cna"]
    if unknown:
        raise CNAError(f"unknown baseline(s) {unknown}: choose caa, random, ablation, or none")
    direction_prompts = _direction_prompts(args, baselines)
    prompts, generation, circuit, model, tokenizer, behavior = _load_for_evaluation(args)
    direction = _ablation_direction(args, model, tokenizer, generation, direction_prompts)
    strengths = args.multipliers if args.multipliers is not None else default_strengths(circuit)
    result = compare_methods(model, tokenizer, circuit, prompts, strengths, methods=["cna", *baselines],
                             behavior=behavior, capability=not args.no_capability, generation=generation,
                             control_seed=args.seed, direction=direction, progress=not args.quiet)
    judged_by = f"model judge {args.judge}" if args.judge else "rule judge"
    print(f"behavior: {args.behavior} ({judged_by}); {len(prompts)} prompts; strength = multiplier for CNA and "
          "random, alpha = strength - 1 for CAA, kept fraction of the direction for ablation; answer_ppl = answer "
          "perplexity under the unsteered model")
    print(result.table())
    header = {"behavior": args.behavior, "judge": args.judge or "rule"}
    if direction is not None:
        header["changed_parameters"] = {"cna": circuit_changed_parameters(model, circuit),
                                        "ablation": ablation_changed_parameters(model)}
        print(f"weights changed by the weight-edit form: cna {header['changed_parameters']['cna']:,} (one "
              f"down-projection column per neuron), ablation {header['changed_parameters']['ablation']:,}")
    _write_all([(args.csv, result.to_csv), (args.json, lambda path: result.to_json(path, **header)),
                (args.plot, lambda path: plot_evaluation(result, circuit, path, behavior=args.behavior)),
                (args.html, lambda path: write_html_report(result, circuit, path, behavior=args.behavior))])


def run_export(args) -> None:
    from ..export import check_gguf_lora_output, check_gguf_output, export_folded, export_gguf, export_gguf_lora
    from ..export import export_lora, gguf_lora_instructions, gguf_serving_instructions, lora_serving_note
    from ..models import gguf_source
    from ..paths import check_export_folder

    circuit = _load_circuit(args.circuit, args.model)
    multiplier = circuit.recorded_multiplier(args.multiplier)
    if args.format == "gguf":
        check_gguf_output(args.out, args.force)  # before the model loads
    elif args.gguf_type is not None:
        raise CNAError("--gguf-type applies to --format gguf only")
    elif args.format == "gguf-lora":
        check_gguf_lora_output(args.out, args.force)
    else:
        check_export_folder(args.out, args.force, inputs=[args.circuit, args.model])  # before the model loads
    model, tokenizer = _load_model(args)
    if args.format == "gguf":
        export_gguf(model, circuit, multiplier, args.out, gguf_type=args.gguf_type, force=args.force, progress=True)
    elif args.format == "gguf-lora":
        export_gguf_lora(model, circuit, multiplier, args.out, force=args.force)
    elif args.format == "folded":
        export_folded(model, circuit, multiplier, args.out, tokenizer=tokenizer, force=args.force)
    else:
        export_lora(model, circuit, multiplier, args.out, force=args.force, check_vllm=not args.no_vllm_check)
    print(f"wrote {args.format} export of {len(circuit)} neurons at multiplier {multiplier:g} to {args.out}")
    if args.format == "gguf":
        print(gguf_serving_instructions(args.out))
    elif args.format == "gguf-lora":
        print(gguf_lora_instructions(args.out, gguf_source(model), multiplier))
    elif args.format == "lora":
        print(lora_serving_note(model, args.out))


def run_demo(args) -> None:
    from ..evaluation import DEFAULT_STRENGTHS, compare_methods, language_rate
    from ..prompts import bundled_prompts
    from ..steering import generate_with_baseline

    french, english = bundled_prompts("french_questions"), bundled_prompts("english_questions")
    print(f"French-vs-English discovery on the embedded default model ({len(french)} + {len(english)} "
          "bundled questions)")
    circuit, model, tokenizer = _discover(args, french, english)
    print(circuit.summary(top=15))
    print("\npositive deltas fire more on French questions; negative ones more on English questions.")
    _save(circuit, args.out)
    if args.skip_steering:
        return
    held_out = bundled_prompts("french_heldout")[:args.held_out]
    print(f"\nablating the circuit (multiplier 0) on {len(held_out)} held-out French questions, "
          "baseline and ablated in one batched generation:")
    baseline, ablated = generate_with_baseline(model, tokenizer, circuit, held_out, 0.0, max_new_tokens=40,
                                               batch_size=16, progress=not args.quiet)
    for prompt, base, new in list(zip(held_out, baseline, ablated))[:4]:
        print(f"\n>>> {prompt}")
        print(_side_by_side("baseline", base, "circuit ablated (x0)", new))
    print(f"\nanswers in French: baseline {language_rate(baseline, 'fr'):.0%}, "
          f"ablated {language_rate(ablated, 'fr'):.0%}"
          f"; in English: baseline {language_rate(baseline, 'en'):.0%}, ablated {language_rate(ablated, 'en'):.0%}")
    if not args.evaluate:
        return
    from .plotting import plot_evaluation

    held_out = bundled_prompts("french_heldout")
    print(f"\nevaluation on {len(held_out)} held-out French questions (behavior = answer in French), "
          "strength = multiplier for CNA and random, alpha = strength - 1 for CAA:")
    result = compare_methods(model, tokenizer, circuit, held_out, DEFAULT_STRENGTHS, behavior="french",
                             max_new_tokens=40, batch_size=32, progress=not args.quiet)
    print(result.table())
    _write_all([(args.csv, result.to_csv),
                (args.plot, lambda path: plot_evaluation(result, circuit, path, behavior="French-answer"))])


def run_tune(args) -> None:
    from ..prompts import read_prompts
    from ..search import Judging, SearchBudget, SearchSpace, tune
    from ..stats import load_stats
    from ..steering import GenerationSettings

    if args.stats is None and (args.positive is None or args.negative is None):
        raise CNAError("give --positive and --negative discovery prompts, or --stats from cna discover --save-stats")
    space = SearchSpace(sizes=args.sizes, multipliers=args.multipliers, goal=args.goal, iterative=args.iterative,
                        scores=[score.strip() for score in args.scores.split(",") if score.strip()],
                        exclude_layers=args.exclude_layers)
    budget = SearchBudget(kl_budget=args.kl_budget, minutes=args.time_budget, strategy=args.strategy,
                          neutral=read_prompts(args.neutral) if args.neutral else None)
    judging = Judging(behavior=args.behavior, quality_floor=args.quality_floor)
    capture = _capture_settings(args)
    generation = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                    chat_template=capture.chat_template)
    stats = load_stats(args.stats) if args.stats else None
    positive = read_prompts(args.positive) if args.positive else None
    negative = read_prompts(args.negative) if args.negative else None
    model, tokenizer = _load_model(args)
    result = tune(model, tokenizer, positive, negative, read_prompts(args.eval_prompts), space=space, budget=budget,
                  judging=judging, capture=capture, generation=generation, stats=stats, progress=not args.quiet)
    print(result.summary())
    circuit = result.require_circuit()
    from .plotting import plot_tune

    _write_all([(args.out, circuit.save), (args.csv, result.to_csv), (args.json, result.to_json),
                (args.plot, lambda path: plot_tune(result, path))])
    print(f"the chosen circuit records its multiplier ({result.multiplier:g})")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `cna`; returns the exit code: 0 done, 2 bad input or environment, 1 a bug, 130 Ctrl-C."""
    args = build_parser().parse_args(argv)
    handlers = {"discover": run_discover, "inspect": run_inspect, "generate": run_generate, "sweep": run_sweep,
                "export": run_export, "eval": run_eval, "demo": run_demo, "tune": run_tune}
    code, message = 0, None
    _interrupt_note.clear()
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            check_command_paths(args)
            handlers[args.command](args)
        except KeyboardInterrupt:
            code, message = EXIT_INTERRUPTED, (_interrupt_note[-1] if _interrupt_note else _INTERRUPTED)
        except Exception as error:  # the exit policy: every failure becomes one line and an exit code
            if os.environ.get("CNA_FAST_DEBUG"):
                raise
            code, message = classify_failure(error)
    if message is not None:  # printed once the traceback is released, so progress bars have closed
        print(f"cna {args.command}: {message}", file=sys.stderr)
    return code


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"cna: warning: {message}", file=sys.stderr)
