"""Where the samples of a ``py-spy record -f raw`` profile went: by stage (onnxruntime, image
decoding, the event loop's Python) and by the hottest leaf frames.

    python tools/profile_summary.py PROFILE.txt [--top 15]
    python tools/profile_summary.py PROFILE.txt --event-loop   # that thread's frames alone

Used for docs/benchmarks.md with tools/profile_serve.sh, which records the profile of a
running ``resnet-serve`` under ``resnet-bench`` load."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

# First match wins, in this order: a decode thread's stack never holds Worker.run, and the
# event loop's never holds preprocess.
STAGES = (
    ("onnxruntime (Worker.run)", ("Worker.run (service/sessions.py", "InferenceSession.run")),
    ("decode + preprocess (Pillow)", ("preprocess (contract/preprocess.py",)),
    ("JSON / answer building", ("orjson", "postprocess.py", "responses.py")),
    ("batcher", ("service/batcher.py",)),
    (
        "HTTP + framework (uvicorn, starlette, fastapi)",
        ("uvicorn/", "starlette/", "fastapi/", "h11", "httptools"),
    ),
    ("asyncio event loop itself", ("asyncio/", "uvloop")),
)


# Judged by the leaf frame first: py-spy's non-blocking mode cannot always tell a thread
# waiting (for work, or in the loop's select) from one running.
WAITING = (
    ("waiting: a pool thread for work", ("_worker (concurrent/futures/thread.py",)),
    (
        "event loop: asyncio's own frames, select included",
        ("asyncio/runners.py", "selectors.py", "asyncio/base_events.py"),
    ),
)


def stage_of(frames: list[str]) -> str:
    leaf = frames[-1] if frames else ""
    for name, needles in WAITING:
        if any(n in leaf for n in needles):
            return name
    for name, needles in STAGES:
        if any(n in f for f in frames for n in needles):
            return name
    return "other"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=15)
    p.add_argument(
        "--event-loop", action="store_true",
        help="only the event loop thread's samples (its stacks start at the resnet-serve "
        "script), by frame: self time, and total time (the frame anywhere in the stack)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.event_loop:
        return event_loop(args.profile, args.top)
    stages: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in args.profile.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")[1:]  # the first is the process
        total += n
        stages[stage_of(frames)] += n
        leaves[frames[-1] if frames else "?"] += n
    print(f"{total} samples")
    print("\n| stage | share of samples |\n|---|---:|")
    for name, n in stages.most_common():
        print(f"| {name} | {100 * n / total:.1f}% |")
    print("\n| leaf frame (self time) | share |\n|---|---:|")
    for name, n in leaves.most_common(args.top):
        print(f"| `{name}` | {100 * n / total:.1f}% |")
    return 0


def event_loop(profile: Path, top: int) -> int:
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    total = 0
    for line in profile.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        # The main thread runs the loop; with py-spy's --subprocesses a worker's stacks
        # start with its process line, then the same frames.
        if not any("service/cli.py" in f or "(resnet-serve:" in f for f in frames[:3]):
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            anywhere[f] += n
    print(f"{total} samples of the event loop thread")
    print("\n| frame | self | total |\n|---|---:|---:|")
    for name, n in own.most_common(top):
        print(f"| `{name}` | {100 * n / total:.1f}% | {100 * anywhere[name] / total:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
