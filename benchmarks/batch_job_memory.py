"""Peak memory of the streaming batch job for 1,000 vs 10,000 prompts (it should not grow with the count).

Each size runs in its own process (peak RSS is per process): a tiny random Llama from tests/tiny.py,
4 new tokens per prompt, batch 16, prompts from a generated .txt file.

    python -m benchmarks.batch_job_memory            # both sizes, prints a table
    python -m benchmarks.batch_job_memory --one 1000 # one size (what the table runs)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = (1_000, 10_000)
WORDS = ["zebra", "bread", "rome", "fox", "savanna", "python", "photosynthesis", "capital", "france", "history",
         "salt", "flour", "water"]


def run_one(count: int) -> dict:
    """Generate `count` records into a temporary file; report peak RSS and throughput."""
    import torch

    from cna_fast.jobs import generate_to_file
    from tests.tiny import build_tiny_model, build_tokenizer

    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    model = build_tiny_model("llama", len(tokenizer))
    with tempfile.TemporaryDirectory() as folder:
        prompts = Path(folder, "prompts.txt")
        with open(prompts, "w") as handle:
            for index in range(count):
                length = 1 + index % 9
                handle.write(" ".join(WORDS[(index + k) % len(WORDS)] for k in range(length)) + f" {index}\n")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        summary = generate_to_file(model, tokenizer, prompts, Path(folder, "out.jsonl"), max_new_tokens=4,
                                   batch_size=16, progress=False)
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"prompts": count, "written": summary.written, "peak_rss_mib": round(peak / 1024, 1),
            "peak_before_job_mib": round(before / 1024, 1), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", type=int, help="run one size in this process and print its JSON")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    for count in SIZES:
        # -m, not the file's path: a script's folder goes first on sys.path, and benchmarks/kernels.py would
        # then hide the `kernels` package that transformers imports
        result = subprocess.run([sys.executable, "-m", "benchmarks.batch_job_memory", "--one", str(count)], env=env,
                                check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        print(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
