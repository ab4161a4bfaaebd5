"""Streaming reader of reinforced shards: webdataset stages and a ``ReinforcedDataset``.

The stages are plain generators over webdataset sample dicts (each public stage is curried
with ``webdataset.filters.pipelinefilter``, so ``stage(**options)`` is a callable taking the
sample iterator), usable in ``wds.DataPipeline(...)`` and ``WebDataset(...).compose(...)``:

``check_counts`` -> ``decode_sidecars`` -> ``pick_rounds`` -> ``replay_images`` -> ``make_targets``

(``reinforce_stages(manifest, ...)`` builds that list.) ``ReinforcedDataset`` wires them to a
shard list read from the manifest, with node/worker splitting, shuffling and a shared epoch.

Importing this module registers an ``s3://`` scheme (boto3 streaming) in webdataset's
``gopen`` table; ``http(s)://`` goes through webdataset's curl handler; local paths and brace
patterns work as in webdataset. This module never imports the teacher.
"""

from __future__ import annotations

import os
import random
import tempfile
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from webdataset import filters as wds_filters
from webdataset.gopen import gopen as _gopen
from webdataset.gopen import gopen_schemes as _gopen_schemes
from webdataset.cache import StreamingOpen
from webdataset.compat import FluidInterface
from webdataset.handlers import reraise_exception
from webdataset.pipeline import DataPipeline
from webdataset.shardlists import ResampledShards, expand_urls, split_by_node, split_by_worker
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.utils import pytorch_worker_info

from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDAUGMENT_SPACE,
    DecodeError,
    Recipe,
    SourceImage,
    key_word,
    normalize,
    replay,
)
from .format import FORMAT_VERSION, SIDECAR_EXT, FormatError, Manifest, VersionError, check_topk, decode_sidecar
from .targets import sparse_one_hot

__all__ = [
    "IMAGE_EXTS",
    "MismatchError",
    "SampleError",
    "SkipCounter",
    "SharedEpoch",
    "round_for",
    "read_url",
    "read_manifest",
    "manifest_url",
    "shard_urls",
    "gopen_s3",
    "register_s3_scheme",
    "check_counts",
    "decode_sidecars",
    "pick_rounds",
    "replay_images",
    "make_targets",
    "reinforce_stages",
    "ReinforcedDataset",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TARGET_MODES = ("smooth", "zeros", "sparse")
OUTPUT_MODES = ("uint8", "float")
_SCHEDULE_TAG = 0x5343484544  # "SCHED": keeps the schedule's stream apart from round_rng's
_ORIGINAL_TAG = 0x4F524947  # "ORIG": the coin and parameters of a non-reinforced epoch
_U64 = 0xFFFFFFFFFFFFFFFF
# Errors that bad bytes can provoke in decoding and replay; anything else (TypeError above all)
# is a bug and propagates without going through the handler.
_DATA_ERRORS = (FormatError, DecodeError, ValueError, OSError, RuntimeError, EOFError)


# ----------------------------------------------------------------------------------------
# Errors and handlers


class SampleError(ValueError):
    """Bad data in one sample (or shard): carries the sample key and the shard URL.

    Attributes:
        key: the sample key, or None for a shard-level problem.
        url: the shard URL.
        samples: how many samples the problem cost (a truncated shard can lose several).
    """

    def __init__(self, message: str, key: str | None = None, url: str | None = None, samples: int = 1):
        self.key, self.url, self.samples = key, url, samples
        where = f"{url}: " if url else ""
        where += f"sample {key!r}: " if key is not None else ""
        super().__init__(where + message)

    @classmethod
    def of(cls, exc: BaseException, sample: Mapping[str, Any]) -> SampleError:
        if isinstance(exc, SampleError):
            return exc
        message = exc.args[0] if isinstance(exc, FormatError) and exc.args else f"{type(exc).__name__}: {exc}"
        err = cls(str(message), sample.get("__key__"), sample.get("__url__"))
        err.__cause__ = exc
        return err


class MismatchError(SampleError):
    """Shards made with a format version or recipe other than this reader's or the manifest's.

    Raised at the first sample a stage sees, whatever the ``handler``: it means the whole data
    set is not what the manifest describes, not that one sample is damaged.
    """


class SkipCounter:
    """A ``handler=`` that skips bad samples and counts them, across DataLoader workers.

    It returns True (skip and continue) for data errors, and re-raises ``TypeError``, which is
    a bug rather than bad data. ``count`` is the number of errors handled; ``samples`` adds up
    ``SampleError.samples`` (so a shard truncated by n samples counts n) and 1 for other errors.
    Counts live in shared memory (one slot per worker, so no locks), and work with forked,
    spawned and persistent workers; each rank counts its own. ``last`` (the last message) is
    per process.
    """

    _SLOTS = 256

    def __init__(self, warn: bool = False):
        self.warn = warn
        self._counts = torch.zeros(self._SLOTS, 2, dtype=torch.int64).share_memory_()
        self.last: str | None = None

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, TypeError):
            raise exn
        info = torch.utils.data.get_worker_info()
        slot = (info.id + 1) % self._SLOTS if info is not None else 0
        self._counts[slot, 0] += 1
        self._counts[slot, 1] += getattr(exn, "samples", 1)
        self.last = f"{type(exn).__name__}: {exn}"[:1000]
        if self.warn:
            warnings.warn(f"skipping bad data: {self.last}", stacklevel=2)
        return True

    @property
    def count(self) -> int:
        return int(self._counts[:, 0].sum())

    @property
    def samples(self) -> int:
        return int(self._counts[:, 1].sum())


def _handle(handler: Callable[[BaseException], bool], exc: BaseException, sample: Mapping[str, Any]) -> bool:
    """True: skip this sample and go on; False: stop the stream. A reraising handler raises."""
    return bool(handler(SampleError.of(exc, sample)))


# ----------------------------------------------------------------------------------------
# Epoch and schedule


class SharedEpoch:
    """An epoch number in shared memory: set in the main process, read by DataLoader workers.

    Works with forked, spawned and persistent workers: workers read it each time they start
    iterating, so call ``set`` (or ``ReinforcedDataset.set_epoch``) before iterating the loader.
    """

    def __init__(self, epoch: int = 0):
        # A tensor in shared memory, not multiprocessing.Value: its lock is bound to one start
        # method, and DataLoader workers may be forked or spawned.
        self._value = torch.tensor([_check_epoch(epoch)], dtype=torch.int64).share_memory_()

    def set(self, epoch: int) -> None:
        self._value[0] = _check_epoch(epoch)

    def get(self) -> int:
        return int(self._value[0])

    def __repr__(self) -> str:
        return f"SharedEpoch({self.get()})"


def _check_epoch(epoch: Any) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"expected epoch a non-negative int, got {epoch!r}")
    return int(epoch)


def _epoch_value(epoch: int | SharedEpoch | Callable[[], int]) -> int:
    if isinstance(epoch, SharedEpoch):
        return epoch.get()
    if callable(epoch):
        return _check_epoch(epoch())
    return _check_epoch(epoch)


def round_for(seed: int, key: str, epoch: int, rounds: int) -> int:
    """The round a sample uses in an epoch: a function of (seed, key, epoch) only.

    Epochs ``c*R .. c*R + R-1`` use a permutation of ``range(R)`` seeded by (seed, key, c), so
    every round is used once before any repeats, whatever the world size, worker count,
    shuffling or restarts.
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"expected rounds a positive int, got {rounds!r}")
    cycle, pos = divmod(_check_epoch(epoch), rounds)
    if rounds == 1:
        return 0
    rng = np.random.default_rng([seed & _U64, key_word(key), cycle, _SCHEDULE_TAG])
    return int(rng.permutation(rounds)[pos])


def _original_rng(seed: int, key: str, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed & _U64, key_word(key), epoch, _ORIGINAL_TAG])


# ----------------------------------------------------------------------------------------
# URLs: s3 scheme, reading small files


_S3_CLIENTS: dict[tuple[int, str | None], Any] = {}


def _s3_client() -> Any:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    slot = (os.getpid(), endpoint)  # clients are not shared across fork
    client = _S3_CLIENTS.get(slot)
    if client is None:
        import boto3

        client = boto3.session.Session().client("s3", endpoint_url=endpoint)
        _S3_CLIENTS.clear()
        _S3_CLIENTS[slot] = client
    return client


def _s3_location(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if parsed.scheme != "s3" or not bucket or not key:
        raise ValueError(f"expected an s3://bucket/key URL, got {url!r}")
    return bucket, key


class _S3Reader:
    """A readable stream over one S3 object's body (botocore's StreamingBody)."""

    def __init__(self, body: Any, url: str):
        self._body, self.url = body, url

    def read(self, size: int = -1) -> bytes:
        return self._body.read() if size is None or size < 0 else self._body.read(size)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _S3Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __str__(self) -> str:
        return f"<s3 stream {self.url}>"


class _S3Writer:
    """A writable stream that uploads to S3 on close (spooled to disk past 64 MiB)."""

    def __init__(self, url: str):
        self.url = url
        self._bucket, self._key = _s3_location(url)
        self._buf = tempfile.SpooledTemporaryFile(max_size=64 << 20)

    def write(self, data: bytes) -> int:
        return self._buf.write(data)

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self._buf.flush()

    def close(self) -> None:
        if self._buf.closed:
            return
        self._buf.seek(0)
        try:
            _s3_client().upload_fileobj(self._buf, self._bucket, self._key)
        finally:
            self._buf.close()

    def __enter__(self) -> _S3Writer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> _S3Reader | _S3Writer:
    """webdataset ``gopen`` handler for ``s3://bucket/key``: boto3 streaming GET, or PUT on close.

    Uses boto3's standard credential chain and region; the endpoint comes from
    ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` when set (MinIO, Ceph, moto, ...).

    Raises:
        FileNotFoundError: no such bucket or key.
        ValueError: a malformed URL or mode.
    """
    bucket, key = _s3_location(url)
    if mode.startswith("w"):
        return _S3Writer(url)
    if not mode.startswith("r"):
        raise ValueError(f"expected mode 'rb' or 'wb', got {mode!r}")
    from botocore.exceptions import ClientError

    try:
        body = _s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "NoSuchBucket", "404"):
            raise FileNotFoundError(f"{url}: {code}") from None
        raise OSError(f"{url}: {exc}") from None
    return _S3Reader(body, url)


def register_s3_scheme(force: bool = False) -> None:
    """Put ``gopen_s3`` in webdataset's scheme table (kept if the user mapped s3 elsewhere, e.g. AIS)."""
    if force or "s3" not in _gopen_schemes:
        _gopen_schemes["s3"] = gopen_s3


register_s3_scheme()


def read_url(url: str) -> bytes:
    """All bytes of a local path, ``file:``, ``http(s)://`` or ``s3://`` URL (via webdataset's gopen).

    Raises:
        FileNotFoundError: the URL cannot be read (missing, refused, HTTP error).
    """
    try:
        with _gopen(url, "rb") as stream:
            data = stream.read()
    except Exception as exc:  # gopen backends raise OSError, ValueError or pipe errors
        raise FileNotFoundError(f"cannot read {url}: {type(exc).__name__}: {exc}") from None
    return data


def read_manifest(url: str) -> Manifest:
    """Read and parse ``manifest.json`` from any URL kind ``read_url`` supports."""
    data = read_url(url)
    if not data:
        raise FileNotFoundError(f"cannot read {url}: empty response")
    return Manifest.from_json(data, url)


def _join(base: str, name: str) -> str:
    return name if not base else base.rstrip("/") + "/" + name


def _dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else ""


def manifest_url(location: str) -> str:
    """``manifest.json`` of a shard directory or URL prefix, or ``location`` itself if it names a .json."""
    return location if location.endswith(".json") else _join(location, "manifest.json")


def shard_urls(manifest_location: str, manifest: Manifest) -> list[str]:
    """The URLs of a manifest's shards, which lie beside it."""
    return [_join(_dirname(manifest_location), s.name) for s in manifest.shards]


def _resolve(source: str | Sequence[str], manifest: Manifest | str | None) -> tuple[list[str], Manifest]:
    """Shard URLs and the manifest from a manifest URL, a directory, a brace pattern or a list."""
    if isinstance(source, str) and (source.endswith((".json", "/")) or os.path.isdir(source)):
        manifest_url_, urls = manifest_url(source), None
    else:
        urls = expand_urls(source) if isinstance(source, str) else [str(u) for u in source]
        if not urls:
            raise ValueError(f"expected shard URLs, got none from {source!r}")
        manifest_url_ = _join(_dirname(urls[0]), "manifest.json")
    if isinstance(manifest, Manifest):
        found = manifest
    else:
        manifest_url_ = manifest or manifest_url_
        found = read_manifest(manifest_url_)
    if urls is None:
        urls = shard_urls(manifest_url_, found)
        if not urls:
            raise ValueError(f"manifest {manifest_url_} lists no shards")
    return urls, found


def _expected_counts(urls: Sequence[str], manifest: Manifest) -> dict[str, tuple[int, str]]:
    """url -> (samples, first key) for the URLs the manifest lists (matched by trailing path)."""
    by_name = {s.name: s for s in manifest.shards}
    out = {}
    for url in urls:
        parts = url.split("/")
        for i in range(len(parts)):
            shard = by_name.get("/".join(parts[i:]))
            if shard is not None:
                out[url] = (shard.samples, shard.first_key)
                break
    return out


# ----------------------------------------------------------------------------------------
# Stages


def _check_counts(
    src: Iterable[dict], expected: Mapping[str, tuple[int, str]], handler: Callable = reraise_exception
) -> Iterator[dict]:
    """Compare each run of samples from one shard with the manifest's count (truncation check).

    A run starts when ``__url__`` changes or the shard's first key comes round again (a
    resampled shard drawn twice in a row). Shards the manifest does not list are not checked.
    """
    url, count = None, 0

    def short() -> SampleError | None:
        want = expected.get(url)
        if want is None or count == want[0]:
            return None
        return SampleError(
            f"expected {want[0]} samples (per the manifest), got {count}: the shard is truncated or damaged",
            url=url,
            samples=abs(want[0] - count),
        )

    for sample in src:
        u = sample.get("__url__")
        if u != url or (count and u in expected and sample.get("__key__") == expected[u][1]):
            err = short()
            if err is not None and not handler(err):
                return
            url, count = u, 0
        count += 1
        yield sample
    err = short()
    if err is not None:
        handler(err)


def _decode_sidecars(
    src: Iterable[dict],
    fingerprint: bytes,
    rounds: int | None = None,
    topk: int | None = None,
    recipe: Recipe | None = None,
    handler: Callable = reraise_exception,
) -> Iterator[dict]:
    """Decode ``{key}.dr.mp`` into ``sample["sidecar"]`` and check it against the manifest.

    Rounds, top-k and the op columns (names and widths, from ``recipe``) must be the manifest's.
    A version or fingerprint mismatch at the first sample raises ``MismatchError`` whatever the
    handler; later ones, and corrupt sidecars, go through ``handler``.
    """
    first = True
    for sample in src:
        try:
            raw = sample.get(SIDECAR_EXT)
            if raw is None:
                raise FormatError(f"no '{SIDECAR_EXT}' member (members: {sorted(k for k in sample if not k.startswith('__'))})")
            key = sample.get("__key__")
            try:
                sidecar = decode_sidecar(raw, key)
            except VersionError as exc:
                if not first or not isinstance(exc.version, int):
                    raise  # one odd sample, or garbage without a version: bad data, not a mismatch
                raise MismatchError(
                    f"sidecar format version {exc.version!r}, this reader knows {FORMAT_VERSION}: "
                    "upgrade wds_reinforce or remake the shards",
                    key,
                    sample.get("__url__"),
                ) from exc
            if sidecar.fingerprint != fingerprint:
                cls = MismatchError if first else SampleError
                raise cls(
                    f"recipe fingerprint {sidecar.fingerprint.hex()} differs from the manifest's {fingerprint.hex()}: "
                    "the shards were made with another recipe (or another manifest)",
                    key,
                    sample.get("__url__"),
                )
            if rounds is not None and sidecar.rounds != rounds:
                raise FormatError(f"sidecar has {sidecar.rounds} rounds, the manifest says {rounds}")
            if topk is not None and sidecar.topk != topk:
                raise FormatError(f"sidecar has top-{sidecar.topk}, the manifest says top-{topk}")
            if recipe is not None:
                recipe.check_columns(sidecar.ops)
        except MismatchError:
            raise
        except _DATA_ERRORS as exc:
            if _handle(handler, exc, sample):
                continue
            return
        first = False
        sample["sidecar"] = sidecar
        yield sample


def _pick_rounds(
    src: Iterable[dict],
    seed: int = 0,
    epoch: int | SharedEpoch | Callable[[], int] = 0,
    p: float = 1.0,
) -> Iterator[dict]:
    """Set ``sample["round"]`` to this epoch's round (``round_for``), or -1 for the original image.

    With probability ``1 - p`` (a coin seeded by (seed, key, epoch)) a sample uses the original
    image with a standard augmentation and a one-hot target; ``sample["__rng__"]`` then holds
    the seeded generator that ``replay_images`` samples that augmentation from.
    """
    e = _epoch_value(epoch)  # read once per iteration: workers see the epoch set before iter()
    for sample in src:
        key = sample["__key__"]
        sample["epoch"] = e
        if p < 1.0:
            rng = _original_rng(seed, key, e)
            if rng.random() >= p:
                sample["round"] = -1
                sample["__rng__"] = rng
                yield sample
                continue
        sample["round"] = round_for(seed, key, e, sample["sidecar"].rounds)
        yield sample


def _image_bytes(sample: Mapping[str, Any]) -> bytes:
    for ext in IMAGE_EXTS:
        data = sample.get(ext)
        if data is not None:
            return data
    raise FormatError(f"no image member ({'/'.join(IMAGE_EXTS)}); members: {sorted(k for k in sample if not k.startswith('__'))}")


def _check_params(params: Mapping[str, np.ndarray], recipe: Recipe, size: tuple[int, int]) -> None:
    """Cheap range checks of one round's parameters, so flipped bytes fail loudly, not silently."""
    box = params.get("rrc")
    if box is not None:
        top, left, h, w = (int(v) for v in box)
        if h < 1 or w < 1 or top + h > size[0] or left + w > size[1]:
            raise FormatError(f"crop box {(top, left, h, w)} does not fit the {size[0]}x{size[1]} image")
    flip = params.get("flip")
    if flip is not None and int(flip[0]) > 1:
        raise FormatError(f"flip bit {int(flip[0])} is not 0 or 1")
    ra = params.get("ra")
    if ra is not None and ra.size and (int(ra[0::2].min()) < 0 or int(ra[0::2].max()) >= len(RANDAUGMENT_SPACE)):
        raise FormatError(f"RandAugment op id out of range in {ra.tolist()}")
    erase = params.get("re")
    if erase is not None and int(erase[2]) and (int(erase[0]) + int(erase[2]) > recipe.size[0] or int(erase[1]) + int(erase[3]) > recipe.size[1]):
        raise FormatError(f"erase box {erase.tolist()} does not fit the output size {recipe.size}")


def _replay_images(
    src: Iterable[dict],
    recipe: Recipe,
    fallback: Recipe | None = None,
    output: str = "uint8",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    handler: Callable = reraise_exception,
) -> Iterator[dict]:
    """Decode the image and replay this epoch's round into ``sample["image"]`` (``augment.replay``).

    Round -1 (see ``pick_rounds``) replays ``fallback`` (default: RRC + flip at the recipe's
    size and decode mode) with parameters from ``sample["__rng__"]``.
    """
    if output not in OUTPUT_MODES:
        raise ValueError(f"expected output in {list(OUTPUT_MODES)}, got {output!r}")
    fallback = fallback or Recipe.from_spec("rrc", size=recipe.size, decode=recipe.decode)
    for sample in src:
        r, sidecar = sample["round"], sample["sidecar"]  # set by earlier stages: missing = a bug, not data
        try:
            image = SourceImage(_image_bytes(sample))
            if r >= 0:
                params = sidecar.round_params(r)
                _check_params(params, recipe, image.size)
                img = replay(image, params, recipe)
            else:
                img = replay(image, fallback.sample(sample.pop("__rng__"), image.size), fallback)
        except _DATA_ERRORS as exc:
            if _handle(handler, exc, sample):
                continue
            return
        sample["image"] = normalize(img, mean, std) if output == "float" else img
        yield sample


def _dense_row(idx: np.ndarray, prob: np.ndarray, num_classes: int, method: str) -> torch.Tensor:
    """One row's dense target in numpy (cheaper per sample than torch); equals ``targets.densify``."""
    p = prob.astype(np.float32)
    if method == "smooth" and idx.size < num_classes:
        fill = max(0.0, 1.0 - float(p.sum())) / max(num_classes - idx.size, 1)
        out = np.full(num_classes, fill, np.float32)
        out[idx] = p
    else:
        out = np.zeros(num_classes, np.float32)
        out[idx] = p / max(float(p.sum()), np.finfo(np.float32).tiny)
    return torch.from_numpy(out)


def _make_targets(
    src: Iterable[dict],
    num_classes: int,
    densify: str = "smooth",
    label_smoothing: float = 0.0,
    handler: Callable = reraise_exception,
) -> Iterator[dict]:
    """Set the target of this epoch's round.

    ``densify="smooth"|"zeros"``: ``sample["target"]``, float32 (C,). ``"sparse"``:
    ``sample["idx"]`` int64 (k,) and ``sample["prob"]`` float32 (k,), to densify on the GPU with
    ``targets.densify`` (one-hot rows are padded with the label at probability 0, so the
    ``smooth`` method reproduces label smoothing). Round -1 (original image) gets a one-hot of
    ``{key}.cls``, smoothed by ``label_smoothing``.
    """
    if densify not in TARGET_MODES:
        raise ValueError(f"expected densify in {list(TARGET_MODES)}, got {densify!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"expected label_smoothing in [0, 1), got {label_smoothing!r}")
    for sample in src:
        r, sidecar = sample["round"], sample["sidecar"]  # set by earlier stages: missing = a bug, not data
        try:
            if r >= 0:
                idx, prob = sidecar.idx[r], sidecar.prob[r]
                check_topk(idx, prob, num_classes)
            else:
                label = int(sample["cls"])
                if not 0 <= label < num_classes:
                    raise FormatError(f"label {label} is not in [0, {num_classes})")
                idx, prob = sparse_one_hot(label, num_classes, sidecar.topk, label_smoothing)
            if densify == "sparse":
                sample["idx"] = torch.from_numpy(idx.astype(np.int64))
                sample["prob"] = torch.from_numpy(prob.astype(np.float32))
            elif r >= 0 or densify == "smooth":
                sample["target"] = _dense_row(idx[:1] if r < 0 else idx, prob[:1] if r < 0 else prob, num_classes, densify)
            else:  # zeros would renormalise the smoothing away; a one-hot keeps it
                out = np.full(num_classes, label_smoothing / num_classes, np.float32)
                out[idx[0]] = prob[0]
                sample["target"] = torch.from_numpy(out)
        except _DATA_ERRORS as exc:
            if _handle(handler, exc, sample):
                continue
            return
        yield sample


check_counts = wds_filters.pipelinefilter(_check_counts)
decode_sidecars = wds_filters.pipelinefilter(_decode_sidecars)
pick_rounds = wds_filters.pipelinefilter(_pick_rounds)
replay_images = wds_filters.pipelinefilter(_replay_images)
make_targets = wds_filters.pipelinefilter(_make_targets)


def _manifest_recipe(manifest: Manifest) -> tuple[Recipe, bytes]:
    """The manifest's recipe and fingerprint, refusing a recipe this library would replay differently."""
    recipe = Recipe.from_dict(manifest.recipe)
    try:
        fingerprint = bytes.fromhex(manifest.fingerprint)
    except (TypeError, ValueError):
        raise FormatError(f"fingerprint must be 16 hex digits, got {manifest.fingerprint!r}", "manifest") from None
    if recipe.fingerprint != fingerprint:
        raise FormatError(
            f"the manifest's recipe has fingerprint {recipe.fingerprint.hex()} under this wds_reinforce version, "
            f"but the manifest records {manifest.fingerprint}: replay would not match the teacher's view",
            "manifest",
        )
    return recipe, fingerprint


def reinforce_stages(
    manifest: Manifest,
    *,
    seed: int = 0,
    epoch: int | SharedEpoch | Callable[[], int] = 0,
    p: float = 1.0,
    densify: str = "smooth",
    label_smoothing: float = 0.0,
    output: str = "uint8",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    fallback_recipe: Recipe | None = None,
    handler: Callable = reraise_exception,
) -> list[Callable[[Iterable[dict]], Iterator[dict]]]:
    """The stages that turn raw sample dicts into ``image`` + ``target`` (or ``idx``/``prob``).

    Example::

        ds = wds.WebDataset(urls, shardshuffle=False).compose(*reinforce_stages(manifest, epoch=shared))

    Args are as for ``ReinforcedDataset``.
    """
    recipe, fingerprint = _manifest_recipe(manifest)
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"expected p a probability in [0, 1], got {p!r}")
    if output not in OUTPUT_MODES:
        raise ValueError(f"expected output in {list(OUTPUT_MODES)}, got {output!r}")
    if densify not in TARGET_MODES:
        raise ValueError(f"expected densify in {list(TARGET_MODES)}, got {densify!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"expected label_smoothing in [0, 1), got {label_smoothing!r}")
    return [
        decode_sidecars(fingerprint=fingerprint, rounds=manifest.rounds, topk=manifest.topk, recipe=recipe, handler=handler),
        pick_rounds(seed=seed, epoch=epoch, p=float(p)),
        replay_images(recipe=recipe, fallback=fallback_recipe, output=output, mean=mean, std=std, handler=handler),
        make_targets(num_classes=manifest.num_classes, densify=densify, label_smoothing=label_smoothing, handler=handler),
    ]


# ----------------------------------------------------------------------------------------
# Dataset


class _ShardList(torch.utils.data.IterableDataset):
    """The shard URLs, shuffled identically on every rank per (seed, epoch), checked for splitting."""

    def __init__(self, urls: Sequence[str], shuffle: bool, seed: int, epoch: SharedEpoch, splits_nodes: bool, splits_workers: bool):
        super().__init__()
        self.urls, self.shuffle, self.seed, self.epoch = list(urls), shuffle, seed, epoch
        self.splits_nodes, self.splits_workers = splits_nodes, splits_workers

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, workers = pytorch_worker_info()
        parts = (world if self.splits_nodes else 1) * (workers if self.splits_workers else 1)
        if len(self.urls) < parts:
            raise ValueError(
                f"expected at least {parts} shards for {world} rank(s) x {workers} worker(s), got {len(self.urls)}: "
                "use fewer workers, more shards, or resampled=True with with_epoch(n)"
            )
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch.get()}:shards").shuffle(urls)
        for url in urls:
            yield {"url": url}


def _shuffle_samples(src: Iterable[dict], bufsize: int, seed: int, epoch: SharedEpoch) -> Iterator[dict]:
    rank, _, worker, _ = pytorch_worker_info()
    rng = random.Random(f"{seed}:{epoch.get()}:{rank}:{worker}:samples")
    yield from wds_filters._shuffle(iter(src), bufsize, min(bufsize, 100), rng=rng)


class ReinforcedDataset(DataPipeline, FluidInterface):
    """A webdataset pipeline over reinforced shards that yields ``(image, target)`` tuples.

    Args:
        source: the manifest (``.../manifest.json``), the shards' directory (a path or a URL
            ending in ``/``), a brace pattern (``.../shard-{000000..000099}.tar``) or a list of
            shard URLs; local paths, ``file:``, ``http(s)://`` and ``s3://`` all work.
        manifest: a ``Manifest`` or its URL, when it is not ``manifest.json`` beside the shards.
        seed: seeds the round schedule, the original-image coin and augmentation, and shuffling.
        epoch: the starting epoch; change it with ``set_epoch`` before each epoch.
        p: probability of a reinforced round; otherwise the original image with RRC + flip and a
            one-hot target (the paper uses 0.99 for some recipes; default 1.0).
        densify: ``smooth`` (paper), ``zeros``, or ``sparse`` (yield ``(image, idx, prob)`` and
            densify on the GPU with ``targets.densify``).
        label_smoothing: smoothing of the one-hot targets of original-image epochs.
        output: ``uint8`` (3, H, W) images (normalise on the GPU) or ``float`` (normalised here).
        mean, std: for ``output="float"``.
        shardshuffle: shuffle the shard order per epoch (the same order on every rank).
        shuffle: size of a sample shuffle buffer before decoding (0: none).
        resampled: draw shards with replacement forever (combine with ``with_epoch(n)``).
        nodesplitter, workersplitter: webdataset splitters (None to disable).
        handler: webdataset error policy for bad data; default raises with the key and URL;
            ``SkipCounter()`` skips bad samples and counts them.
        keys: sample fields of the output tuple; default ``("image", "target")``, or
            ``("image", "idx", "prob")`` for ``densify="sparse"``. Also available: ``__key__``,
            ``__url__``, ``cls``, ``round`` (-1 = original image), ``epoch``.
        fallback_recipe: the augmentation of original-image epochs.
        check_counts: compare per-shard sample counts with the manifest (detects truncation).

    Raises:
        ValueError: bad arguments. FormatError: an unreadable manifest, or a recipe this
            library version would replay differently. FileNotFoundError: no manifest.
    """

    def __init__(
        self,
        source: str | Sequence[str],
        *,
        manifest: Manifest | str | None = None,
        seed: int = 0,
        epoch: int = 0,
        p: float = 1.0,
        densify: str = "smooth",
        label_smoothing: float = 0.0,
        output: str = "uint8",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        shardshuffle: bool = False,
        shuffle: int = 0,
        resampled: bool = False,
        nodesplitter: Callable | None = split_by_node,
        workersplitter: Callable | None = split_by_worker,
        handler: Callable[[BaseException], bool] = reraise_exception,
        keys: Sequence[str] | None = None,
        fallback_recipe: Recipe | None = None,
        check_counts: bool = True,
    ):
        super().__init__()
        if not isinstance(seed, int):
            raise ValueError(f"expected seed an int, got {seed!r}")
        if not isinstance(shuffle, int) or shuffle < 0:
            raise ValueError(f"expected shuffle a buffer size >= 0, got {shuffle!r}")
        if densify not in TARGET_MODES:
            raise ValueError(f"expected densify in {list(TARGET_MODES)}, got {densify!r}")
        self.urls, self.manifest = _resolve(source, manifest)
        self.epoch = SharedEpoch(epoch)
        self.seed = seed
        stages = reinforce_stages(
            self.manifest,
            seed=seed,
            epoch=self.epoch,
            p=p,
            densify=densify,
            label_smoothing=label_smoothing,
            output=output,
            mean=mean,
            std=std,
            fallback_recipe=fallback_recipe,
            handler=handler,
        )
        self.recipe = Recipe.from_dict(self.manifest.recipe)
        if resampled:
            # deterministic: draws seeded by (seed, worker), not by pid and time
            self.append(ResampledShards(self.urls, seed=seed, deterministic=True))
        else:
            self.append(_ShardList(self.urls, shardshuffle, seed, self.epoch, nodesplitter is not None, workersplitter is not None))
            if nodesplitter is not None:
                self.append(nodesplitter)
            if workersplitter is not None:
                self.append(workersplitter)
            self._warn_uneven(nodesplitter)
        self.append(StreamingOpen(handler=handler))
        self.append(wds_filters.pipelinefilter(tar_file_expander)(handler=handler))
        self.append(wds_filters.pipelinefilter(group_by_keys)(handler=handler))
        if check_counts:
            self.append(wds_filters.pipelinefilter(_check_counts)(expected=_expected_counts(self.urls, self.manifest), handler=handler))
        if shuffle:
            self.append(wds_filters.pipelinefilter(_shuffle_samples)(bufsize=shuffle, seed=seed, epoch=self.epoch))
        for stage in stages:
            self.append(stage)
        if keys is None:
            keys = ("image", "idx", "prob") if densify == "sparse" else ("image", "target")
        self.append(wds_filters.to_tuple(*keys))

    def _warn_uneven(self, nodesplitter: Callable | None) -> None:
        rank, world, _, _ = pytorch_worker_info()
        if nodesplitter is None or world <= 1:
            return
        counts = _expected_counts(self.urls, self.manifest)
        per_rank = [sum(counts.get(u, (0,))[0] for u in self.urls[r::world]) for r in range(world)]
        if len(set(per_rank)) > 1:
            warnings.warn(
                f"ranks get unequal sample counts {per_rank}; DDP may hang at the end of an epoch: "
                "use a shard count divisible by the world size, or resampled=True with with_epoch(n)",
                stacklevel=3,
            )

    @property
    def num_samples(self) -> int:
        """Samples in the data set, per the manifest."""
        return self.manifest.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch for the round schedule and shuffling; visible to all DataLoader workers."""
        self.epoch.set(epoch)

