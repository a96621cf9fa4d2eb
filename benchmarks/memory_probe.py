"""Peak resident memory of one discovery run over N prompts per side (run as a subprocess).

    python -m benchmarks.memory_probe 1000   # prints JSON: prompts, peak_rss_mb, seconds
"""
import json
import os
import resource
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def numbered_prompts(base: list[str], count: int) -> list[str]:
    """`count` distinct prompts cycled from `base`, each tagged with its number."""
    return [f"{base[i % len(base)]} (#{i})" for i in range(count)]


def main(total: int) -> None:
    import cna_fast
    from cna_fast.prompts import bundled_prompts

    model, tokenizer = cna_fast.load_model()
    positive = numbered_prompts(bundled_prompts("french_questions"), total // 2)
    negative = numbered_prompts(bundled_prompts("english_questions"), total - total // 2)
    started = time.perf_counter()
    circuit = cna_fast.discover(model, tokenizer, positive, negative, progress=False)
    elapsed = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"prompts": total, "peak_rss_mb": round(peak_mb, 1), "seconds": round(elapsed, 1),
                      "neurons": len(circuit)}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
