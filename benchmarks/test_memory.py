"""Peak memory of discovery does not grow with the number of prompts (1,000 vs 10,000).

Each size runs in a fresh process on the embedded default model; the difference of the peak
resident set sizes is the growth. Target: under 50 MB. Takes several minutes on 2 CPU cores.

    python -m pytest benchmarks/test_memory.py -s
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _probe(total: int) -> dict:
    output = subprocess.run([sys.executable, "-m", "benchmarks.memory_probe", str(total)], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def test_peak_memory_flat_in_prompt_count(benchmark):
    small, large = _probe(1_000), _probe(10_000)
    growth = large["peak_rss_mb"] - small["peak_rss_mb"]
    benchmark.extra_info.update(peak_rss_mb_1k=small["peak_rss_mb"], peak_rss_mb_10k=large["peak_rss_mb"],
                                growth_mb=round(growth, 1), prompts_per_s_10k=round(10_000 / large["seconds"], 1))
    benchmark.pedantic(lambda: None, rounds=1)
    print(json.dumps(benchmark.extra_info))
    assert growth < 50, f"peak memory grew by {growth:.1f} MB from 1k to 10k prompts"
