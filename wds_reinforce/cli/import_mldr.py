r"""Import apple/ml-dr's released reinforcements (ImageNet+ and others) into reinforced webdataset shards.

The paper's authors released their teacher's outputs and augmentation parameters (ImageNet+-RRC,
-RA/RE, -M*, -M*+R*: 400 rounds of top-10 from an IG-ResNeXt ensemble) as a .tar.gz each
(imagenet_plus_rrc.tar.gz, imagenet_plus_randaug.tar.gz, ...) with one pickle per image, keyed by
the image's position in torchvision's ImageFolder order of the train split. This reads that archive
as a stream (never extracted, never unpickled beyond plain values), pairs every file with its image,
and writes a manifest that ReinforcedDataset and tools/train.py read, with self-contained shards
(images copied in, sidecars beside them) for an ImageFolder, or a sidecar set (sidecars only,
aligned with the input shards) for webdataset shards.

    python tools/import_mldr.py --metadata imagenet_plus_randaug.tar.gz --images imagenet/train \
        --out shards/in1k-ra-re
    python tools/import_mldr.py --metadata imagenet_plus_randaug.tar.gz --images 'in1k/train-{0000..1023}.tar' \
        --out sets/in1k-ra-re --round-group 50   # a sidecar set beside your shards: 8 groups of 50 rounds
    python tools/import_mldr.py --metadata imagenet_plus_mixing.tar.gz --images imagenet/train --out shards/in1k-m \
        --drop-mixing                     # +M* variants: keep only the rounds without a partner image
    torchrun --nproc_per_node=8 tools/import_mldr.py ...   # rank r makes shards j % world == r; rank 0 the manifest

--images is the train split they reinforced: an ImageFolder directory (listed exactly as
torchvision's ImageFolder lists it), cifar100:ROOT, flowers102:ROOT or food101:ROOT
(torchvision's files, in torchvision's order, never downloaded; CIFAR-100+, Flowers-102+,
Food-101+), or plain webdataset shards (local .tar files, never rewritten;
--out then gets a sidecar set: sidecar shard j holds input shard j's keys in their order, the
manifest names the input shards by absolute path, and --index-rule says how a sample's index is
known; --copy-images writes self-contained shards instead). Every
rank reads the whole archive (gzip cannot seek); give --config (their config.pth.tar, extracted)
to save the pass that otherwise looks for it. A count, index or file mismatch between metadata and
images is an error before anything is written. Rerunning the same command resumes: finished
shards are verified and kept. Bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

__all__ = ["build_parser", "main"]

_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="import_mldr.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--metadata", required=True, help="their archive (.tar.gz or .tar), or its extracted folder")
    p.add_argument(
        "--images",
        required=True,
        help="the train split they reinforced: ImageFolder directory, cifar100:ROOT / flowers102:ROOT / food101:ROOT "
        "(torchvision's files, never downloaded), or webdataset shards (path, {a..b} or glob)",
    )
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--config", help="their config.pth.tar, if extracted: skips searching the archive for it")
    p.add_argument(
        "--drop-mixing",
        action="store_true",
        help="for mixing variants (+M*), import only the rounds without a mixing partner (refused otherwise)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        help="keep the first R rounds of each image (default all; with --drop-mixing the most every image has, "
        "which under torchrun must be given)",
    )
    p.add_argument(
        "--copy-images",
        action="store_true",
        help="for webdataset shards: write self-contained shards (images copied, keys sanitised) instead of a "
        "sidecar set beside them",
    )
    p.add_argument(
        "--round-group",
        "--group-rounds",
        dest="round_group",
        type=int,
        metavar="G",
        help="for a sidecar set: rounds per round group, a divisor of the rounds kept (default all in one group); "
        "an epoch reads one group's sidecars; --group-rounds is another name for it",
    )
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard for an ImageFolder (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the ImageFolder's shard order (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the ImageFolder's class-sorted order in the shards")
    p.add_argument(
        "--index-rule",
        choices=["imagefolder", "key"],
        default="imagefolder",
        help="for shards: 'imagefolder' sorts samples by (label, key + extension), ImageFolder's order when keys are "
        "file names; 'key' reads the index from the key (default imagefolder)",
    )
    p.add_argument("--split", default="train", help="split name; shards are SPLIT-000000.tar (default train)")
    p.add_argument("--name", default="reinforced", help="dataset name in the manifest (default reinforced)")
    p.add_argument("--spool", help="local folder for converted sidecars between reading and writing (default in --out)")
    p.add_argument("--no-progress", action="store_true", help="print no progress lines")
    return p


# The library's errors name its arguments; this command's name the flags that set them.
_FLAG_OF = {
    "group_rounds": "--round-group",
    "copy_images": "--copy-images",
    "drop_mixing": "--drop-mixing",
    "shard_size": "--shard-size",
    "index_rule": "--index-rule",
}
_ARGUMENT = re.compile(r"\b({})\b".format("|".join(_FLAG_OF)))


def _fail(message: str) -> int:
    message = _ARGUMENT.sub(lambda m: _FLAG_OF[m.group(1)], message)
    first = message.splitlines()[0] if message else "failed"
    print(f"import_mldr.py: error: {first}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from wds_reinforce.core.errors import DataError, UsageError
    from wds_reinforce.importers.mldr import import_mldr

    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    progress = None if args.no_progress else (lambda line: print(f"{prefix}{line}", file=sys.stderr, flush=True))
    try:
        summary = import_mldr(
            args.metadata,
            args.images,
            args.out,
            config=args.config,
            drop_mixing=args.drop_mixing,
            rounds=args.rounds,
            shard_size=args.shard_size,
            seed=args.seed,
            shuffle=not args.no_shuffle,
            index_rule=args.index_rule,
            split=args.split,
            name=args.name,
            spool=args.spool,
            progress=progress,
            copy_images=args.copy_images,
            group_rounds=args.round_group,
        )
    except (UsageError, DataError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print("import_mldr.py: interrupted; rerun the same command to resume", file=sys.stderr)
        return _INTERRUPTED
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
