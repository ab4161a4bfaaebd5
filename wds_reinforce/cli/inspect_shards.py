"""Verify reinforced shards against their manifest (and the teacher), or draw one sample's rounds.

Checks every shard's byte count and sha256, sample counts and first/last keys, that keys are
unique, that every sidecar decodes with all its rounds and top-k entries, and that every image
decodes. With --teacher it replays random (sample, round) pairs, reruns the teacher and reports
the largest probability difference and the top-1 agreement with the stored outputs. Exit status
0 when all is well, 1 with a line per problem (shard and key), 2 for bad arguments.

With --teacher-checkpoint alone, the teacher's models are the ones the manifest names. Weights
other than the ones the shards were made with (the manifest keeps their sha256) are refused
with a line saying so, rather than failing every round.

    python tools/inspect_shards.py shards/demo
    python tools/inspect_shards.py shards/demo --teacher-checkpoint shards/demo/teacher_resnet10t.pt --checks 64
    python tools/inspect_shards.py shards/demo --grid rounds.png --key circle_00000
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inspect_shards.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "location", help="shard folder, http(s):// or s3:// prefix holding manifest.json, or the manifest's URL"
    )
    p.add_argument(
        "--teacher",
        action="append",
        help="timm:NAME (repeat or comma-separate for an ensemble) to recheck outputs "
        "(default with --teacher-checkpoint: the manifest's members)",
    )
    p.add_argument(
        "--teacher-checkpoint", action="append", help="checkpoint per teacher member (loaded with weights_only=True)"
    )
    p.add_argument(
        "--checks", type=int, default=32, help="(sample, round) pairs to replay through the teacher (default 32)"
    )
    p.add_argument(
        "--tolerance", type=float, default=0.02, help="largest allowed probability difference (default 0.02)"
    )
    p.add_argument("--device", default="auto", help="teacher device: auto (default), cpu, cuda")
    p.add_argument("--seed", type=int, default=0, help="picks the pairs to check (default 0)")
    p.add_argument("--no-decode", action="store_true", help="skip decoding every image (faster)")
    p.add_argument("--grid", metavar="PNG", help="draw one sample's rounds with the stored top-3 into PNG, then stop")
    p.add_argument("--key", help="with --grid: the sample to draw (default: the first)")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress report (a bar on a terminal, else a line per shard on stderr)",
    )
    return p


def _load_teacher(args: argparse.Namespace):
    """The teacher to recheck with, refused (ValueError) when its weights are not the shards' teacher's."""
    from wds_reinforce.layouts import load_manifest
    from wds_reinforce.produce.teacher import Teacher

    stored = load_manifest(args.location)[1].teacher.get("members", [])
    members = args.teacher or [f"{m.get('kind', 'timm')}:{m.get('name')}" for m in stored]
    teacher = Teacher(members, args.teacher_checkpoint, device=args.device)
    if stored and len(teacher.members) != len(stored):
        raise ValueError(f"expected a teacher of {len(stored)} member(s) as the manifest's, got {len(teacher.members)}")
    for i, (ours, theirs) in enumerate(zip(teacher.weights, stored)):
        made = theirs.get("weights_sha256")
        if made and ours != made:
            given = teacher.checkpoints[i] or "random or pretrained weights"
            wanted = theirs.get("checkpoint") or ("timm's pretrained weights" if theirs.get("pretrained") else "?")
            raise ValueError(
                f"the teacher's weights differ from the ones the shards were made with (member {i} "
                f"{theirs.get('kind', 'timm')}:{theirs.get('name')}: sha256 {ours} from {given}, the manifest has "
                f"{made} from {wanted}); pass that checkpoint with --teacher-checkpoint"
            )
    return teacher


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from wds_reinforce.core.format import FormatError
    from wds_reinforce.read.picture import draw_rounds
    from wds_reinforce.read.verify import verify_shards

    try:
        if args.grid:
            key = draw_rounds(args.location, args.grid, key=args.key)
            print(f"wrote {args.grid}: the rounds of sample {key}")
            return 0
        teacher = None
        if args.teacher or args.teacher_checkpoint:
            if args.checks < 1:
                raise ValueError(f"expected --checks >= 1, got {args.checks}")
            teacher = _load_teacher(args)
        report = verify_shards(
            args.location,
            teacher=teacher,
            checks=args.checks,
            tolerance=args.tolerance,
            seed=args.seed,
            decode_images=not args.no_decode,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, FormatError, ValueError) as exc:
        print(f"inspect_shards.py: error: {exc}", file=sys.stderr)
        return 2
    for problem in report.problems:
        print(f"FAIL {problem}")
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
