"""Prepared for a GPU machine: the French circuit's PEFT LoRA served by vLLM, checked and timed.

Not run yet (no GPU so far). Steps, each printed:
1. `cna export --format lora` of docs/french.safetensors at x0 on the embedded default model's
   Hugging Face folder, checked by vLLM's own loader code (PEFTHelper / LoRAModel) when vllm imports;
2. `vllm serve <default model folder> --enable-lora --lora-modules french@0=<adapter>`;
3. `cna generate --server` (cna_fast.jobs.server, vLLM backend) over the French held-out questions,
   records at x0 (module french@0) and x1 (base model), greedy;
4. the same records through the hook path (torch, same GPU): agreement of answers, French rates;
5. time: the job with the adapter (every record x0) vs without (every record x1), new tokens/s.

    python -m benchmarks.vllm_server [--repeat 16] [--tokens 64] [--concurrency 64]

Writes benchmarks/results/vllm_server.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def vllm_loader_check(adapter: Path) -> str:
    """Load the adapter with vLLM's own code (through check_vllm_adapter); the outcome as a line."""
    from cna_fast.export import check_vllm_adapter

    problems = check_vllm_adapter(adapter).problems
    return "vLLM's loader and the restated checks accept it" if not problems else "; ".join(problems)


def wait_ready(url: str, process, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"vllm serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(2)
    sys.exit("vllm serve did not become ready")


def main() -> None:
    import torch

    import cna_fast
    from cna_fast.circuit import Circuit
    from cna_fast.evaluation import detect_language
    from cna_fast.export import export_lora
    from cna_fast.models import default_model_dir
    from cna_fast.prompts import bundled_prompts
    from cna_fast.jobs import generate_on_server, load_tokenizer
    from cna_fast.steering import generate

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=16, help="copies of the 40 held-out questions in the timed job")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/vllm_server.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cna-vllm-"))
    model, tokenizer = cna_fast.load_model()
    circuit = Circuit.load(ROOT / "docs/french.safetensors")
    adapter = export_lora(model, circuit, 0.0, work / "french_x0")
    result = {"loader": vllm_loader_check(adapter)}
    print(result["loader"], flush=True)

    base = default_model_dir()
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(["vllm", "serve", str(base), "--port", str(args.port), "--enable-lora",
                               "--max-lora-rank", "8", "--lora-modules", f"french@0={adapter}",
                               "--dtype", "float32", "--max-model-len", "2048", "--seed", "0"])
    try:
        wait_ready(url, server)
        questions = bundled_prompts("french_heldout")
        tok = load_tokenizer(None)
        check = work / "check.jsonl"
        check.write_text("".join(json.dumps({"id": f"{m:g}-{i}", "prompt": q, "multiplier": m},
                                            ensure_ascii=False) + "\n"
                                 for m in (0.0, 1.0) for i, q in enumerate(questions)))
        out = work / "check_out.jsonl"
        generate_on_server(url, tok, check, out, circuits={"french": circuit}, max_new_tokens=args.tokens,
                           concurrency=args.concurrency, progress=False)
        served = {line["id"]: line["output"] for line in map(json.loads, out.read_text().splitlines())}
        model = model.to("cuda") if torch.cuda.is_available() else model
        for multiplier in (0.0, 1.0):
            hook = generate(model, tokenizer, questions, circuits=circuit, multiplier=multiplier,
                            max_new_tokens=args.tokens, batch_size=1, progress=False)
            mine = [served[f"{multiplier:g}-{i}"] for i in range(len(questions))]
            result[f"x{multiplier:g}"] = {
                "exact_agreement": sum(a == b for a, b in zip(mine, hook)) / len(hook),
                "french_vllm": sum(detect_language(t) == "fr" for t in mine) / len(mine),
                "french_hook": sum(detect_language(t) == "fr" for t in hook) / len(hook)}
            print(f"x{multiplier:g}", result[f"x{multiplier:g}"], flush=True)
        for label, multiplier in (("without adapter", 1.0), ("with adapter", 0.0)):
            job = work / f"time-{multiplier:g}.jsonl"
            job.write_text("".join(json.dumps({"prompt": q}, ensure_ascii=False) + "\n"
                                   for _ in range(args.repeat) for q in questions))
            summary = generate_on_server(url, tok, job, work / f"time-{multiplier:g}-out.jsonl",
                                         circuits={"french": circuit}, multiplier=multiplier,
                                         max_new_tokens=args.tokens, concurrency=args.concurrency, progress=False)
            result[label] = {"new_tokens": summary.new_tokens, "seconds": summary.seconds,
                             "new_tokens_per_s": summary.new_tokens / summary.seconds}
            print(label, result[label], flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    result["gpu"] = os.environ.get("CUDA_VISIBLE_DEVICES", "default")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
