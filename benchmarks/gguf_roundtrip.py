"""Measure the GGUF export on the embedded default model (numbers for the README's Serving section).

Discovers the French circuit (the demo's), ablates it (multiplier 0), exports a GGUF, reads the file
back through transformers' GGUF loader, and compares with the steered source model: logits, greedy
answers to held-out French questions, their language, file sizes and timings.
Run: python -m benchmarks.gguf_roundtrip OUT_FOLDER
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from cna_fast import discover, load_model
from cna_fast.evaluation import language_rate
from cna_fast.export import export_gguf
from cna_fast.models import gguf_source
from cna_fast.prompts import bundled_prompts
from cna_fast.steering import generate, steer


def main(out_folder: str) -> None:
    out = Path(out_folder) / "french-ablated.gguf"
    model, tokenizer = load_model()
    circuit = discover(model, tokenizer, bundled_prompts("french_questions"), bundled_prompts("english_questions"),
                       top_frac=0.001, progress=False)
    started = time.perf_counter()
    export_gguf(model, circuit, 0.0, out, force=True)
    print(f"export: {len(circuit)} neurons in {len(circuit.by_layer())} layers, {time.perf_counter() - started:.1f} s; "
          f"source {gguf_source(model).stat().st_size / 1e6:.1f} MB, export {out.stat().st_size / 1e6:.1f} MB")
    started = time.perf_counter()
    served = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32).eval()
    print(f"read back through transformers' GGUF loader in {time.perf_counter() - started:.1f} s")
    held_out = bundled_prompts("french_heldout")[:16]
    batch = tokenizer([tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                     add_generation_prompt=True) for q in held_out],
                      return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        base = model(**batch).logits[real]
        with steer(model, circuit, 0.0):
            steered = model(**batch).logits[real]
        exported = served(**batch).logits[real]
    print(f"logits over {int(real.sum())} tokens: max |exported - steered| = {(exported - steered).abs().max():.4f}, "
          f"max |base - steered| = {(base - steered).abs().max():.4f}")
    settings = {"max_new_tokens": 40, "batch_size": 16, "progress": False}
    hooked = generate(model, tokenizer, held_out, circuits=circuit, multiplier=0.0, **settings)
    unsteered = generate(model, tokenizer, held_out, **settings)
    from_file = generate(served, tokenizer, held_out, **settings)
    same = sum(a == b for a, b in zip(hooked, from_file))
    print(f"greedy answers to {len(held_out)} held-out French questions: exported GGUF == steered model on {same}; "
          f"French: unsteered {language_rate(unsteered, 'fr'):.0%}, steered {language_rate(hooked, 'fr'):.0%}, "
          f"exported {language_rate(from_file, 'fr'):.0%}")


if __name__ == "__main__":
    main(sys.argv[1])
