"""Cached vs uncached caption generation on the CPU: time to write 20-token captions.

With the key/value cache each decoding step feeds only the newest token (self-attention reuses the
earlier keys/values, cross-attention the memory's); without it every step re-runs the decoder over
the whole prefix and re-projects the memory. The table times the decoding (``generate_from_memory``)
and, separately, the image encoder that both paths run once per batch; "end to end" adds the two
(what ``generate`` costs). The models are freshly initialised (timing does not depend on the
weights); the script checks that every caption runs the full 20 tokens and that both paths
produce the same tokens.

    python benchmarks/caption_generation.py [--tokens 20] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vit.models import create_model

CASES = [
    # (model, batch size, beam size); 128 is the engine's validation batch with --batch-size 64
    ("caption_mini_patch8_32", 1, 1),
    ("caption_mini_patch8_32", 128, 1),
    ("caption_mini_patch8_32", 32, 3),
    ("caption_tiny_patch4_32", 1, 1),
    ("caption_tiny_patch4_32", 128, 1),
    ("caption_tiny_patch4_32", 32, 3),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=20, help="caption length to generate")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per path (median)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--vocab-size", type=int, default=1000)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.tokens}-token captions")
    print(
        "| model | batch | beam | encoder (ms) | decode cached (ms) | decode uncached (ms) "
        "| decode speed-up | end-to-end speed-up |\n|---|---|---|---|---|---|---|---|"
    )
    for name, batch, beam in CASES:
        torch.manual_seed(0)
        model = create_model(name, vocab_size=args.vocab_size, max_len=args.tokens + 1).eval()
        # Make sure a fresh model never picks <eos>, so both paths run every step.
        with torch.no_grad():
            model.token_embed.weight[model.config.eos_id].fill_(-1.0)
        images = torch.randn(batch, 3, 32, 32)
        times: dict[str, list[float]] = {"encoder": [], "cached": [], "uncached": []}
        outputs = {}
        with torch.no_grad():
            for i in range(args.repeats + 1):  # the first round warms up
                t0 = time.perf_counter()
                memory = model.forward_memory(images)
                t1 = time.perf_counter()
                if i > 0:
                    times["encoder"].append(t1 - t0)
                for use_cache in (True, False):  # alternate, so background load hits both alike
                    t0 = time.perf_counter()
                    out = model.generate_from_memory(memory, args.tokens, beam, use_cache=use_cache)
                    key = "cached" if use_cache else "uncached"
                    if i > 0:
                        times[key].append(time.perf_counter() - t0)
                    outputs[key] = out
        if outputs["cached"].shape[1] != args.tokens or not torch.equal(
            outputs["cached"], outputs["uncached"]
        ):
            raise SystemExit(f"{name}: cached and uncached generation differ or stopped early")
        enc, cached, uncached = (statistics.median(times[k]) * 1e3 for k in times)
        print(
            f"| {name} | {batch} | {beam} | {enc:.1f} | {cached:.1f} | {uncached:.1f} | "
            f"{uncached / cached:.1f}x | {(enc + uncached) / (enc + cached):.1f}x |"
        )


if __name__ == "__main__":
    main()
