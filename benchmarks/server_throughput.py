"""Throughput side by side, one run, one machine: our torch engine vs llama-server, steered and unsteered.

The same batch job (`cna generate --out`; the prompts of benchmarks/test_batch_job.py: French held-out
and English questions, cycled) on the embedded default model, greedy, in new tokens per second:

- torch: `generate_to_file` (continuous batching, float32, the French circuit at x0 or no circuit);
- llama-server: the original Q4_1 GGUF plus the French GGUF LoRA (exported at x0, loaded at scale 0,
  --cache-ram 0: cna_fast.jobs.LlamaServer), N parallel slots, the same job through `generate_on_server` with
  concurrency N: steered = lora scale 1 (x0), unsteered = multiplier 1 (every lora scale 0).

    python -m benchmarks.server_throughput [--prompts 512] [--tokens 64] [--slots 16]
    python -m benchmarks.server_throughput --model X.gguf --random-circuit 1004 --out R.json  # another model

With --model (a GGUF file, loaded by load_model: dequantized to float32 for the torch engine, served as it
is by llama-server), the circuit is a random one of --random-circuit neurons: the throughput of a
circuit depends on its size, not on which neurons it holds.

Writes benchmarks/results/server_throughput.json. Needs scripts/build_llama_server.sh to have run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    import cna_fast
    from cna_fast.jobs import generate_to_file
    from cna_fast.circuit import Circuit
    from cna_fast.export import export_gguf_lora
    from cna_fast.models import gguf_source
    from cna_fast.prompts import bundled_prompts
    from cna_fast.jobs import LlamaServer, generate_on_server, llama_server_binary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16, help="llama-server --parallel and the job's concurrency")
    parser.add_argument("--batch-size", type=int, default=16, help="the torch engine's batch size")
    parser.add_argument("--server-threads", type=int, default=1,
                        help="llama-server --threads (1: on an oversubscribed CPU more threads spin-wait)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads (1 on an oversubscribed CPU)")
    parser.add_argument("--model", help="a GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--random-circuit", type=int, default=1004,
                        help="with --model: neurons in the random circuit (default 1004, 0.4%% of a 1.5B Qwen2)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/server_throughput.json"))
    args = parser.parse_args()
    binary = llama_server_binary()
    if binary is None:
        sys.exit("llama-server is not built: run scripts/build_llama_server.sh")

    torch.set_num_threads(args.torch_threads)
    model, tokenizer = cna_fast.load_model(args.model)
    if args.model is None:
        circuit = Circuit.load(ROOT / "docs/french.safetensors")
    else:
        circuit = random_circuit(model, args.random_circuit)
    pool = bundled_prompts("french_heldout") + bundled_prompts("english_questions")
    work = Path(tempfile.mkdtemp(prefix="cna-server-bench-"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": pool[i % len(pool)]}, ensure_ascii=False) + "\n"
                               for i in range(args.prompts)))
    adapter = export_gguf_lora(model, circuit, 0.0, work / "french.gguf")
    rows = []

    def record(engine, steered, summary, extra=None):
        rate = summary.new_tokens / summary.seconds
        rows.append({"engine": engine, "steered": steered, "new_tokens": summary.new_tokens,
                     "seconds": round(summary.seconds, 2), "new_tokens_per_s": round(rate, 1), **(extra or {})})
        print(f"{engine:28s} {'steered' if steered else 'unsteered':9s} {summary.new_tokens:6d} tokens "
              f"{summary.seconds:7.1f} s {rate:7.1f} tok/s", flush=True)

    for steered in (False, True):
        out = work / f"torch-{steered}.jsonl"
        summary = generate_to_file(model, tokenizer, prompts, out, circuits=circuit if steered else None,
                                   multiplier=0.0, max_new_tokens=args.tokens, batch_size=args.batch_size,
                                   progress=False)
        record("torch (float32)", steered, summary, {"batch_size": args.batch_size,
                                                     "torch_threads": torch.get_num_threads()})
    with LlamaServer(gguf_source(model), loras=[adapter], parallel=args.slots, threads=args.server_threads,
                     log=work / "server.log") as server:
        for steered in (False, True):
            out = work / f"server-{steered}.jsonl"
            summary = generate_on_server(server.url, tokenizer, prompts, out, circuits={"french": circuit},
                                         multiplier=0.0 if steered else 1.0, max_new_tokens=args.tokens,
                                         concurrency=args.slots, progress=False)
            record("llama-server (source GGUF + LoRA)", steered, summary, {"slots": args.slots,
                                                                    "server_threads": args.server_threads})
    name = Path(args.model).name if args.model else "SmolLM2-135M-Instruct (embedded)"
    result = {"prompts": args.prompts, "max_new_tokens": args.tokens, "model": name, "circuit_neurons": len(circuit),
              "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(), "machine": platform.machine(),
              "llama_server": str(binary), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def random_circuit(model, size: int, seed: int = 0):
    """`size` neurons drawn at random over all layers of `model` (no statistics), recording its architecture."""
    import torch

    from cna_fast import get_adapter
    from cna_fast.circuit import Circuit

    adapter = get_adapter(model)
    ends = torch.tensor(adapter.widths).cumsum(0)
    chosen = torch.randperm(int(ends[-1]), generator=torch.Generator().manual_seed(seed))[:size].sort().values
    layers = torch.searchsorted(ends, chosen, right=True)
    neurons = chosen - (ends - torch.tensor(adapter.widths))[layers]
    nan = torch.full((size,), float("nan"))
    return Circuit(layers=layers.tolist(), neurons=neurons.tolist(), scores=nan, deltas=nan, mean_positive=nan,
                   mean_negative=nan, std_positive=nan, std_negative=nan,
                   meta={"architecture": adapter.architecture(), "random_control": {"seed": seed}})


if __name__ == "__main__":
    main()
