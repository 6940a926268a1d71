"""Sum the sampling profiler's files (`benchmarks/profile_hook/sitecustomize.py`) per process role.

For each role (file name prefix: superlink_launcher, supernode_launcher, client.long_lived, flwr-serverapp, ...)
prints the samples per thread and state (R = runnable: on a CPU or waiting for one; S = sleeping/blocked) and
the functions with the most runnable samples, inclusive (the function or anything it called) and by leaf.

    .venv/bin/python benchmarks/profile_report.py DIR [--top 25] [--match SUBSTRING] [--role ROLE]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path


def read(dir_: Path) -> dict[str, Counter[str]]:
    """Role -> collapsed stack -> samples, summed over the role's processes."""
    roles: dict[str, Counter[str]] = defaultdict(Counter)
    for path in sorted(dir_.glob("*.folded")):
        role = re.sub(r"-\d+$", "", path.stem)
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            roles[role][stack] += int(n)
    return roles


def main() -> None:
    """Print per-role tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="", help="only stacks containing this substring")
    parser.add_argument("--role", default="", help="only roles containing this substring")
    parser.add_argument("--state", default="R", help="R (runnable), S (sleeping) or '' for all")
    args = parser.parse_args()
    for role, stacks in read(args.dir).items():
        if args.role not in role:
            continue
        per_thread: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        leaf: Counter[str] = Counter()
        total = 0
        for stack, n in stacks.items():
            state, thread, *frames = stack.split(";")
            per_thread[f"{state} {thread}"] += n
            if (args.state and state != args.state) or args.match not in stack:
                continue
            total += n
            for frame in set(frames):
                inclusive[frame] += n
            if frames:
                leaf[frames[-1]] += n
        print(f"\n=== {role}: {sum(stacks.values())} samples; selected {total}")
        print("  threads:", ", ".join(f"{k}={v}" for k, v in per_thread.most_common(12)))
        print("  inclusive:")
        for frame, n in inclusive.most_common(args.top):
            print(f"    {n:7d} {100 * n / max(total, 1):5.1f}%  {frame}")
        print("  leaf:")
        for frame, n in leaf.most_common(args.top):
            print(f"    {n:7d} {100 * n / max(total, 1):5.1f}%  {frame}")


if __name__ == "__main__":
    main()
