"""The memory benchmarks, one harness: ``python -m bench.memory <what> [options]``.

    estimate       weights + states against the papers' published cells (estimate.py)
    states         optimizer-state bytes of every variant, measured (states.py)
    fused          fused (in-backward) against unfused updates: memory and step time (fused.py)
    fsdp           peak memory per rank under FSDP2, beside the planner (fsdp.py)
    build          host memory per rank while FSDP2 builds and loads a model (build.py)
    forward_only   MeZO/LOREN steps against an inference forward, exact bytes (forward_only.py)
    plan           the planner against measured peaks (plan.py)
    galore         LORENZA beside GaLore on bf16 weights, 8-bit states; the 7B plan (galore.py)
    loss           the chunked loss against whole-batch logits (loss.py)

Each writes its table to ``bench/RESULTS.md``; ``python -m bench.memory <what> --help`` lists
its options.
"""

import importlib
import sys

WHAT = ("estimate", "states", "fused", "fsdp", "build", "forward_only", "plan", "galore", "loss")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in WHAT:
        sys.exit(f"usage: python -m bench.memory {{{','.join(WHAT)}}} [options]\n\n{__doc__}")
    what = sys.argv.pop(1)
    sys.argv[0] = f"python -m bench.memory {what}"  # each benchmark reads its own options
    importlib.import_module(f"bench.memory.{what}").main()
