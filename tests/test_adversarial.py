"""Issue 18: no data loss, no wrong result on the newer surfaces (batch jobs, tune, GGUF, MoE circuits, adapter
checks). One test per listed case; each failed on the code before the fix."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cna_fast import get_adapter, load_model
from cna_fast.circuit import Circuit
from cna_fast.cli import main
from cna_fast.errors import CNAError
from cna_fast.jobs import generate_to_file, sidecar_path
from tests.tiny import build_tiny_model

PROMPTS = ["zebra", "what is the capital of france", "bread and salt", "the quick brown fox"]


pytestmark = pytest.mark.usefixtures("private_cache")  # conversions never go to the user's cache


def make_circuit(model, layers=(1, 2), neurons=(3, 5), **extra) -> Circuit:
    n = len(layers)
    values = torch.linspace(1.0, 0.1, n, dtype=torch.float64)
    return Circuit(layers=list(layers), neurons=list(neurons), scores=values.clone(), deltas=values.clone(),
                   mean_positive=values.clone(), mean_negative=torch.zeros(n), std_positive=torch.ones(n),
                   std_negative=torch.ones(n), meta={"architecture": get_adapter(model).architecture()}, **extra)


@pytest.fixture
def job(tokenizer, tmp_path):
    """A tiny model, its circuit and a jsonl prompt file, for batch jobs."""
    model = build_tiny_model("llama", len(tokenizer))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": text}) + "\n" for i, text in enumerate(PROMPTS)))
    return model, make_circuit(model), prompts


def run_job(job, tokenizer, out, **options):
    model, circuit, prompts = job
    return generate_to_file(model, tokenizer, options.pop("prompts", prompts), out, circuits={"c": circuit},
                            max_new_tokens=3, batch_size=2, progress=False, **options)


# ------------------------------------------------------------------ 1. nothing the user did not ask for is replaced


def test_job_resumed_after_the_hf_dataset_folder_was_rewritten_is_refused(job, tokenizer, tmp_path):
    """An `hf:` source is hashed by its content, not its spec: a rewritten save_to_disk folder is a new input."""
    from datasets import Dataset

    folder = tmp_path / "dataset"
    Dataset.from_dict({"prompt": PROMPTS}).save_to_disk(str(folder))
    spec, out = f"hf:{folder}:train:prompt", tmp_path / "r.jsonl"
    assert run_job(job, tokenizer, out, prompts=spec).written == len(PROMPTS)
    shutil.rmtree(folder)
    Dataset.from_dict({"prompt": ["other " + text for text in PROMPTS]}).save_to_disk(str(folder))
    with pytest.raises(CNAError, match="prompts_sha256"):
        run_job(job, tokenizer, out, prompts=spec)
    assert len(out.read_text().splitlines()) == len(PROMPTS)  # nothing mixed in


@pytest.mark.parametrize("top", ["-5", "0"])
def test_inspect_top_must_be_positive(top, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", str(tmp_path / "any.safetensors"), "--top", top])
    assert exit_.value.code == 2 and "argument --top: must be at least 1" in capsys.readouterr().err



def test_cli_job_sidecar_is_never_an_input(model_dir, tmp_path, capsys):
    """`--circuit c=r.jsonl.job.json --out r.jsonl`: refused before any work, the circuit file kept."""
    model, _ = load_model(model_dir)
    circuit_file = tmp_path / "r.jsonl.job.json"
    make_circuit(model).save(circuit_file)
    before = circuit_file.read_bytes()
    prompts = tmp_path / "p.txt"
    prompts.write_text("zebra\n")
    code = main(["generate", "--model", str(model_dir), "--circuit", f"c={circuit_file}", "--prompts", str(prompts),
                 "--out", str(tmp_path / "r.jsonl"), "--max-new-tokens", "2", "--quiet"])
    assert code == 2 and "is the input --circuit c" in capsys.readouterr().err
    assert circuit_file.read_bytes() == before


def test_job_never_replaces_a_sidecar_it_did_not_write(job, tokenizer, tmp_path):
    out = tmp_path / "r.jsonl"
    sidecar_path(out).write_text("my notes\n")
    with pytest.raises(CNAError, match="not written by `cna generate --out`"):
        run_job(job, tokenizer, out)
    assert sidecar_path(out).read_text() == "my notes\n"


# ------------------------------------------------------------------ 2. resume judged by content


def test_job_refuses_a_hand_edited_record(job, tokenizer, tmp_path):
    out = tmp_path / "r.jsonl"
    run_job(job, tokenizer, out)
    lines = out.read_text().splitlines()
    for edit in ({"id": 0}, {**json.loads(lines[0]), "finish_reason": "done"},
                 {**json.loads(lines[0]), "circuit": "other"}, {**json.loads(lines[0]), "output_tokens": "3"}):
        out.write_text("\n".join([json.dumps(edit), *lines[1:]]) + "\n")
        with pytest.raises(CNAError, match="not a record of this job"):
            run_job(job, tokenizer, out)
    other = {**json.loads(lines[0]), "prompt": "a prompt of another job"}
    out.write_text("\n".join([json.dumps(other), *lines[1:]]) + "\n")
    with pytest.raises(CNAError, match="another prompt"):
        run_job(job, tokenizer, out)


def test_job_sidecar_with_settings_of_the_wrong_type(job, tokenizer, tmp_path, model_dir, capsys):
    out = tmp_path / "r.jsonl"
    run_job(job, tokenizer, out)
    sidecar_path(out).write_text(json.dumps({"cna_fast_job": 1, "settings": []}))
    with pytest.raises(CNAError, match="settings of type list"):
        run_job(job, tokenizer, out)


# ------------------------------------------------------------------ 4. overflow caught where applied


def test_record_multiplier_overflow_names_line_and_dtype_and_is_skippable(job, tokenizer, tmp_path):
    model, circuit, _ = job
    prompts = tmp_path / "q.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": text, **({"multiplier": 1e39} if i == 2 else {})})
                               + "\n" for i, text in enumerate(PROMPTS)))
    out = tmp_path / "r.jsonl"
    with pytest.raises(CNAError, match=r"q.jsonl:3: multiplier 1e\+39 overflows the model's dtype float32"):
        run_job(job, tokenizer, out, prompts=prompts)
    summary = run_job(job, tokenizer, out, prompts=prompts, skip_bad=True)
    assert summary.written + summary.resumed == 3 and "float32" in summary.bad[0]
    again = run_job(job, tokenizer, out, prompts=prompts, skip_bad=True)  # the resume is not blocked
    assert again.written == 0 and again.resumed == 3


# ------------------------------------------------------------------ 5. messages


def test_job_circuit_field_that_is_a_list(job, tokenizer, tmp_path):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"prompt": "zebra", "circuit": ["c"]}) + "\n")
    with pytest.raises(CNAError, match="field circuit must be the name of one of the job's circuits"):
        run_job(job, tokenizer, tmp_path / "r.jsonl", prompts=prompts)


def test_generate_to_file_circuits_as_a_list(job, tokenizer, tmp_path):
    model, circuit, prompts = job
    with pytest.raises(CNAError, match="circuits must be a Circuit or a dict"):
        generate_to_file(model, tokenizer, prompts, tmp_path / "r.jsonl", circuits=[circuit], progress=False)


@pytest.fixture(scope="module")
def gguf_path(tiny_gguf):
    return tiny_gguf[0]


def test_gguf_force_replaces_only_a_previous_export(gguf_path, tmp_path):
    from cna_fast.export import export_gguf

    model, _ = load_model(gguf_path)
    circuit = make_circuit(model)
    other = tmp_path / "other_model.gguf"
    shutil.copy(gguf_path, other)  # a GGUF this tool did not write
    before = other.read_bytes()
    with pytest.raises(CNAError, match="not a GGUF export of cna_fast"):
        export_gguf(model, circuit, 0.0, other, force=True)
    assert other.read_bytes() == before
    mine = tmp_path / "steered.gguf"
    export_gguf(model, circuit, 0.0, mine)
    export_gguf(model, circuit, 0.5, mine, force=True)  # a previous export is replaced
    circuit.save(tmp_path / "c.safetensors")
    assert main(["export", "--model", str(gguf_path), "--circuit", str(tmp_path / "c.safetensors"), "--multiplier",
                 "0", "--format", "gguf", "--out", str(other), "--force"]) == 2
    assert other.read_bytes() == before


def test_new_output_inside_the_model_folder_is_refused(model_dir, tmp_path, capsys):
    model, _ = load_model(model_dir)
    make_circuit(model).save(tmp_path / "c.safetensors")
    target = Path(model_dir) / "new-results.jsonl"
    code = main(["generate", "--model", str(model_dir), "--circuit", str(tmp_path / "c.safetensors"), "--prompt",
                 "zebra", "--out", str(target)])
    assert code == 2 and "inside the --model folder" in capsys.readouterr().err and not target.exists()


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_judge_that_is_not_a_model_folder(command, model_dir, tmp_path, capsys):
    model, _ = load_model(model_dir)
    make_circuit(model).save(tmp_path / "c.safetensors")
    (tmp_path / "p.txt").write_text("zebra\n")
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "notes.txt").write_text("not a model")
    code = main([command, "--model", str(model_dir), "--circuit", str(tmp_path / "c.safetensors"), "--prompts",
                 str(tmp_path / "p.txt"), "--judge", str(tmp_path / "judge"), "--quiet"])
    assert code == 2 and "--judge" in capsys.readouterr().err


# ------------------------------------------------------------------ tune: inputs, statistics, messages

TUNE = {"sizes": [4], "multipliers": [0.0], "scores": ["diff"], "max_new_tokens": 2, "progress": False}
NEUTRAL = ["the history of rome began with a small village", "explain photosynthesis to a child in simple words"]


@pytest.fixture
def saved_stats(plain_tokenizer, tmp_path):
    """Statistics saved by discover on tiny model A (seed 0)."""
    from cna_fast import discover

    model = build_tiny_model("llama", len(plain_tokenizer), seed=0)
    path = tmp_path / "stats.safetensors"
    discover(model, plain_tokenizer, ["zebra zebra", "a zebra and a fox"], ["bake bread", "the quick brown fox"],
             top_k=4, save_stats=path, progress=False)
    return path


def test_tune_warns_on_statistics_of_other_weights(saved_stats, plain_tokenizer):
    from cna_fast import tune
    from cna_fast.errors import CircuitWeightsWarning
    from cna_fast.stats import load_stats

    other = build_tiny_model("llama", len(plain_tokenizer), seed=1)  # same shape, other weights
    with pytest.warns(CircuitWeightsWarning, match="statistics were captured on"):
        result = tune(other, plain_tokenizer, stats=load_stats(saved_stats), eval_prompts=["zebra"], neutral=NEUTRAL,
                      **TUNE)
    assert "statistics_model" in result.circuit.meta


def test_tune_python_api_types_name_the_parameter(saved_stats, plain_tokenizer):
    from cna_fast import tune
    from cna_fast.stats import load_stats

    model = build_tiny_model("llama", len(plain_tokenizer), seed=0)
    stats = load_stats(saved_stats)
    base = {**TUNE, "neutral": NEUTRAL}
    for wrong, name in (({"scores": "diff"}, "scores"), ({"kl_budget": "0.1"}, "kl_budget"),
                        ({"neutral": "some text"}, "neutral"), ({"multipliers": "0"}, "multipliers"),
                        ({"sizes": 4}, "sizes"), ({"quality_floor": "0.9"}, "quality_floor")):
        with pytest.raises(CNAError, match=rf"^{name} must be"):
            tune(model, plain_tokenizer, stats=stats, eval_prompts=["zebra"], **{**base, **wrong})
    with pytest.raises(CNAError, match="eval_prompts must be a list of strings"):
        tune(model, plain_tokenizer, stats=stats, eval_prompts="zebra", **base)
    with pytest.raises(CNAError, match="positive must be a list of strings"):
        tune(model, plain_tokenizer, "zebra", ["fox"], eval_prompts=["zebra"], **base)


def test_tune_single_token_neutral_texts_and_overflowing_multipliers(saved_stats, plain_tokenizer):
    from cna_fast import tune
    from cna_fast.stats import load_stats

    model = build_tiny_model("llama", len(plain_tokenizer), seed=0)
    stats = load_stats(saved_stats)
    with pytest.raises(CNAError, match="single token"):
        tune(model, plain_tokenizer, stats=stats, eval_prompts=["zebra"], **{**TUNE, "neutral": ["zebra", "fox"]})
    with pytest.raises(CNAError, match=r"not finite in float32 \(its largest value is 3.403e\+38\)"):
        tune(model, plain_tokenizer, stats=stats, eval_prompts=["zebra"], **{**TUNE, "neutral": NEUTRAL,
                                                                             "multipliers": [1e39]})


def test_cli_tune_messages(saved_stats, model_dir, tmp_path, capsys):
    (tmp_path / "e.txt").write_text("zebra\n")
    base = ["tune", "--model", str(model_dir), "--eval-prompts", str(tmp_path / "e.txt"), "--out",
            str(tmp_path / "c.safetensors"), "--quiet"]
    (tmp_path / "folder").mkdir()
    assert main([*base, "--stats", str(tmp_path / "folder")]) == 2
    err = capsys.readouterr().err
    assert "statistics file" in err and "is a folder" in err
    assert main([*base, "--stats", str(saved_stats), "--multipliers", "1e39"]) == 2
    assert "float32" in capsys.readouterr().err


def test_discover_excluding_every_layer(model_dir, prompt_files, tmp_path, capsys):
    positive, negative = prompt_files
    code = main(["discover", "--model", str(model_dir), "--positive", str(positive), "--negative", str(negative),
                 "--out", str(tmp_path / "c.safetensors"), "--exclude-layers", "0,1,2,3", "--quiet"])
    assert code == 2 and "every layer" in capsys.readouterr().err


def test_moe_statistics_load_as_moe(plain_tokenizer, tmp_path):
    """A --save-stats file of an MoE model is read back as MoE statistics (tune takes it; a dense model refuses it
    by kind, not as 'not a statistics file')."""
    from cna_fast import discover, tune
    from cna_fast.stats import MoEStats, load_stats
    from tests.tiny_moe import build_tiny_moe

    moe = build_tiny_moe("qwen2_moe", len(plain_tokenizer))
    path = tmp_path / "moe.safetensors"
    discover(moe, plain_tokenizer, ["zebra zebra", "a zebra"], ["bake bread", "the fox"], top_k=4, save_stats=path,
             progress=False)
    stats = load_stats(path)
    assert isinstance(stats, MoEStats)
    dense = build_tiny_model("llama", len(plain_tokenizer))
    with pytest.raises(CNAError, match="captured on|mixture-of-experts"):
        tune(dense, plain_tokenizer, stats=stats, eval_prompts=["zebra"], neutral=NEUTRAL, **TUNE)


# ------------------------------------------------------------------ 3. bounded reads: circuit indices, experts


@pytest.mark.parametrize("expert, message", [(1 << 40, "expert 1099511627776"), (-5, "expert -5"),
                                              (999, "out of range")])
def test_circuit_file_expert_indices_checked_on_load(plain_tokenizer, tmp_path, capsys, expert, message):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tests.tiny_moe import build_tiny_moe

    moe = build_tiny_moe("qwen2_moe", len(plain_tokenizer))
    architecture = get_adapter(moe).architecture()
    layer = architecture["experts"]["layers"][0]
    good = tmp_path / "good.safetensors"
    make_circuit(moe, layers=[layer, layer], neurons=[1, 2], experts=torch.tensor([0, -1])).save(good)
    with safe_open(str(good), framework="pt") as handle:
        tensors, header = {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()
    tensors["experts"] = torch.tensor([expert, -1])
    crafted = tmp_path / "crafted.safetensors"
    save_file(tensors, str(crafted), metadata=header)
    with pytest.raises(CNAError, match=message):
        Circuit.load(crafted)
    assert main(["inspect", str(crafted)]) == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------ 3. GGUF metadata against the tensor table


def rewritten_gguf(source: Path, target: Path, keys: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of `source` with some metadata keys (name -> int) and tensors (name -> float32 array) replaced."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    writer = GGUFWriter(target, arch=str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if keys and field.name in keys:
            writer.add_uint32(field.name, keys[field.name])
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        if tensors and tensor.name in tensors:
            writer.add_tensor(tensor.name, tensors[tensor.name])
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


@pytest.mark.parametrize("keys, tensors, message", [
    ({"llama.block_count": 100000}, None, "block_count"),
    ({"llama.embedding_length": 80}, None, "embedding_length"),
    ({"llama.feed_forward_length": 128}, None, "ffn_down"),
    (None, {"blk.1.ffn_down.weight": np.zeros((64, 80), dtype=np.float32)}, "ffn_down"),
])
def test_gguf_metadata_that_disagrees_with_the_tensors(gguf_path, tmp_path, keys, tensors, message):
    import time

    from cna_fast.models.gguf_files import cache_dir

    crafted = rewritten_gguf(gguf_path, tmp_path / "crafted.gguf", keys, tensors)
    started = time.monotonic()
    with pytest.raises(CNAError, match=message):
        load_model(crafted)
    assert time.monotonic() - started < 5
    assert not [p for p in cache_dir().glob("gguf-*") if p.is_dir()]  # nothing converted, nothing cached


# ------------------------------------------------------------------ 4. overflow in the GGUF export


def test_gguf_export_overflow_checks_the_written_type(gguf_path, tmp_path):
    from gguf import GGUFReader, quants

    from cna_fast.export import export_gguf

    model, _ = load_model(gguf_path)
    circuit = make_circuit(model)
    with pytest.raises(CNAError, match="use --gguf-type F32 or BF16"):
        export_gguf(model, circuit, 1e39, tmp_path / "a.gguf", gguf_type="F16")
    for kind in ("F16", "F32", "BF16", "Q8_0"):
        with pytest.raises(CNAError, match="no GGUF type holds them"):
            export_gguf(model, circuit, 1e50, tmp_path / "a.gguf", gguf_type=kind)
    for kind in ("F32", "BF16"):  # what the old message suggested for 1e39: they wrote infinities
        export_gguf(model, circuit, 1e39, tmp_path / f"{kind}.gguf", gguf_type=kind)
        for tensor in GGUFReader(tmp_path / f"{kind}.gguf").tensors:
            if tensor.name.endswith("ffn_down.weight"):
                values = quants.dequantize(tensor.data, tensor.tensor_type)
                assert np.isfinite(np.asarray(values, dtype=np.float32)).all()
    assert not (tmp_path / "a.gguf").exists()
    assert not (tmp_path / "b.gguf").exists()


# ------------------------------------------------------------------ 5. messages tell the truth


def test_ctrl_c_in_a_batch_job_says_what_was_kept(model_dir, tmp_path, capsys):
    import _thread
    import signal
    import threading
    import time

    model, _ = load_model(model_dir)
    make_circuit(model).save(tmp_path / "c.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i} about zebras\n" for i in range(400)))
    out = tmp_path / "r.jsonl"
    finished = threading.Event()
    # Ctrl-C as at a terminal: a suite started in the background inherits SIGINT ignored, and then
    # interrupt_main() does nothing.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def interrupt_after_two_records():  # waits on a condition, not a time budget
        while not finished.is_set():
            if out.exists() and out.read_bytes().count(b"\n") >= 2:
                _thread.interrupt_main()
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=interrupt_after_two_records, daemon=True)
    watcher.start()
    try:
        code = main(["generate", "--model", str(model_dir), "--circuit", str(tmp_path / "c.safetensors"),
                     "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "8", "--batch-size", "1",
                     "--quiet"])
    finally:
        finished.set()
        signal.signal(signal.SIGINT, previous)
    watcher.join()
    err = capsys.readouterr().err
    kept = out.read_bytes().count(b"\n")
    assert code == 130 and "no partial output" not in err
    assert f"the {kept} records already in {out} are kept" in err and "rerun the same command to resume" in err


def test_outputs_all_or_none_when_the_plot_is_interrupted(tmp_path):
    from cna_fast.cli.commands import _write_all

    def plot(path):
        raise KeyboardInterrupt

    paths = [tmp_path / name for name in ("c.safetensors", "t.csv", "t.json", "t.png")]
    with pytest.raises(KeyboardInterrupt):
        _write_all([(paths[0], lambda p: Path(p).write_text("c")), (paths[1], lambda p: Path(p).write_text("csv")),
                    (paths[2], lambda p: Path(p).write_text("{}")), (paths[3], plot)])
    assert not any(path.exists() for path in paths) and list(tmp_path.iterdir()) == []


def test_check_vllm_adapter_returns_problems_never_raises(tmp_path):
    from safetensors.torch import save_file

    from cna_fast.export import check_vllm_adapter

    folder = tmp_path / "adapter"
    folder.mkdir()
    base = {"r": 2, "lora_alpha": 2, "target_modules": ["down_proj"], "peft_type": "LORA"}
    weights = {"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": torch.zeros(2, 8),
               "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": torch.zeros(4, 2)}
    save_file(weights, str(folder / "adapter_model.safetensors"))
    cases = [({**base, "rank_pattern": [3]}, "rank_pattern"), ({**base, "rank_pattern": {"x": "4"}}, "rank_pattern"),
             ([base], "not an object"), ({**base, "lora_alpha": float("nan")}, "lora_alpha")]
    for config, problem in cases:
        (folder / "adapter_config.json").write_text(json.dumps(config))
        result = check_vllm_adapter(folder)
        assert any(problem in text for text in result.problems), (config, result.problems)
    (folder / "adapter_config.json").write_text(json.dumps(base))
    assert check_vllm_adapter(folder).problems == []
    (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{corrupt")
    assert any("cannot be read" in text for text in check_vllm_adapter(folder).problems)


# ------------------------------------------------------------------ 3. generation within the model's context


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from tests.tiny import build_tokenizer

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = build_tokenizer()
    build_tiny_model("gpt2", len(tokenizer)).save_pretrained(folder)  # n_positions 256
    tokenizer.save_pretrained(folder)
    return folder


def test_generate_past_the_context_is_refused(gpt2_dir, tmp_path, capsys):
    model, _ = load_model(gpt2_dir)
    make_circuit(model).save(tmp_path / "c.safetensors")
    base = ["generate", "--model", str(gpt2_dir), "--circuit", str(tmp_path / "c.safetensors"), "--quiet"]
    assert main([*base, "--prompt", "zebra", "--max-new-tokens", "300"]) == 2
    assert "context of 256 tokens" in capsys.readouterr().err
    long_line = "zebra stripes " * 150_000  # 2 MB
    (tmp_path / "p.txt").write_text(f"{long_line}\nzebra\n")
    assert main([*base, "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "4"]) == 2
    assert "context of 256 tokens" in capsys.readouterr().err
    out = tmp_path / "r.jsonl"
    assert main([*base, "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "4", "--out", str(out)]) == 2
    assert main([*base, "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "4", "--out", str(out),
                 "--skip-bad"]) == 0
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["zebra"]


@pytest.mark.parametrize("entry", ["generate", "compare_methods", "discover"])
def test_one_string_where_prompts_belong_names_the_parameter(entry, tokenizer):
    """Every public entry point that takes prompts refuses one string (read as single characters) by name."""
    from cna_fast import discover
    from cna_fast.evaluation import compare_methods
    from cna_fast.steering import generate

    model = build_tiny_model("llama", len(tokenizer))
    calls = {"generate": lambda: generate(model, tokenizer, "Bonjour", progress=False),
             "compare_methods": lambda: compare_methods(model, tokenizer, make_circuit(model), "Bonjour",
                                                        progress=False),
             "discover": lambda: discover(model, tokenizer, "Bonjour", ["Hello"], progress=False)}
    with pytest.raises(CNAError, match="(prompts|positive).*(list of strings|wrap a single prompt)"):
        calls[entry]()
