"""Peak RSS and speed of one batched `generate` on the embedded SmolLM2 in bf16, the way self-generation
samples its calibration data, with the LM head's input made contiguous (`models.fold_head_input`, what
`load_model` gives) and without it (the same model loaded by plain transformers), both with frozen
parameters as every eqat pass has them: torch's CPU matmul then broadcasts the head weight over the batch
during the prefill (with trainable weights it folds the strided input instead).

    python benchmarks/generate_memory.py --batch 64 --tokens 32
"""
from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch

from transformers import AutoModelForCausalLM

from eqat_train import models, selfgen


def peak_rss_during(fn) -> tuple[float, float]:
    """(peak RSS in GB sampled every 5 ms while `fn` runs, seconds)."""
    proc, peak, running = psutil.Process(), [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.time()
    fn()
    seconds = time.time() - t0
    running[0] = False
    thread.join()
    return peak[0] / 1e9, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    source = models.resolve_source(None)
    start = torch.randint(100, 1000, (args.batch, 4), generator=torch.Generator().manual_seed(0))

    def run(lm):
        with torch.no_grad():
            lm.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=args.tokens,
                        min_new_tokens=args.tokens, do_sample=True, top_k=50, pad_token_id=0,
                        cache_implementation=selfgen.STATIC)

    loaders = {
        "contiguous (eqat load_model)": lambda: models.load_model(None)[0],
        "strided (plain transformers)": lambda: AutoModelForCausalLM.from_pretrained(
            source.location, gguf_file=source.gguf_file, dtype=torch.float32),
    }
    rows = []
    for name, load in loaders.items():  # one model in memory at a time
        lm = load().to(torch.bfloat16).requires_grad_(False)
        run(lm)  # warm-up: first-call allocations are not what a long sampling run sees
        rows.append((name, *peak_rss_during(lambda: run(lm))))
        del lm
    print(f"batch {args.batch}, {args.tokens} new tokens, bf16, {torch.get_num_threads()} threads")
    print("| head input | peak RSS GB | seconds | tokens/s |\n|---|---|---|---|")
    for name, gb, seconds in rows:
        print(f"| {name} | {gb:.2f} | {seconds:.1f} | {args.batch * args.tokens / seconds:.0f} |")


if __name__ == "__main__":
    main()
