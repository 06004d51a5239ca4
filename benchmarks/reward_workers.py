"""GRPO's reward off the critical path: a reward that takes 0.2 s per response, 64 responses, scored by 1 and by 8
worker processes (``--reward-workers``), measured in one run.

Two shapes of a step:
- all at once: the 64 responses are submitted together (the vLLM engine returns a rollout whole), and the
  time is from the first submission to the last score;
- during a rollout: the responses finish one every 50 ms (3.2 s of generation, as the embedded generator
  hands each to the reward when it ends), and the time is what the step waits after the last one ends.

Prints each figure and the 8-worker / 1-worker ratio.

  python benchmarks/reward_workers.py [--sequences 64] [--seconds 0.2] [--workers 1 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from megatron_patch.rl.reward_worker import Scorer

SLEEPY_REWARD = """
import time

def sleepy(prompt, response, label):
    time.sleep({seconds})
    return float(len(response))
"""


def measure(spec: str, workers: int, sequences: int, gap: float) -> float:
    """Seconds from the last submission (``gap`` s apart) until every score is in."""
    scorer = Scorer(spec, workers=workers)
    try:
        for index in range(sequences):
            scorer.submit(index, "prompt", "x" * (index + 1), "label", where=f"bench sample {index + 1}")
            time.sleep(gap)
        last = time.perf_counter()
        scores = scorer.collect()
        waited = time.perf_counter() - last
    finally:
        scorer.close()
    assert [scores[i].value for i in range(sequences)] == [float(i + 1) for i in range(sequences)]
    return waited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=0.2, help="each call's time")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between responses ending in a rollout")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sleepy.py"
        path.write_text(SLEEPY_REWARD.format(seconds=args.seconds))
        spec = f"custom:{path}:sleepy"
        rows = {}
        for workers in args.workers:
            rows[workers] = (measure(spec, workers, args.sequences, 0.0),
                             measure(spec, workers, args.sequences, args.gap))
    base = rows[args.workers[0]]
    print(f"{args.sequences} responses, {args.seconds} s per reward call; 'during a rollout': one ends every "
          f"{args.gap * 1000:.0f} ms and the figure is the wait after the last")
    print("| workers | all at once | during a rollout | ratio (all at once) | ratio (during) |")
    print("|---|---|---|---|---|")
    for workers, (together, during) in rows.items():
        print(f"| {workers} | {together:.2f} s | {during:.2f} s | {base[0] / together:.2f}x | "
              f"{base[1] / max(during, 1e-3):.2f}x |")


if __name__ == "__main__":
    main()
