"""Fixtures for apple/ml-dr's CIFAR-100+, Flowers-102+ and Food-101+ archives, built byte by byte.

- ``Pickled``: pickle opcodes written by hand (pickletools' names in the comments), so no pickle
  is ever produced by pickling an object: plain values, Python 2 strings (CIFAR's batches are
  Python 2 pickles), numpy arrays the way numpy reduces them (``_reconstruct`` + a BUILD of
  (version, shape, dtype, fortran, bytes)) and the way ``joblib.dump`` stores them (a
  ``NumpyArrayWrapper`` record, then an alignment byte, padding and the raw bytes, frames
  committed before them as joblib does).
- ``joblib_file``: what ``joblib.dump(obj, "{i}.pth.tar", compress=True)`` writes (no known
  extension: zlib) for their records, which hold only plain values.
- ``write_mat``: MATLAB Level 5 MAT-files of real double matrices (compressed or not).
- ``cifar_root`` / ``flowers_root`` / ``food_root``: tiny train splits in torchvision's on-disk layout.
- ``plus_config`` and ``draw_plus``: their saved config and rounds drawn as their reinforce.py draws them.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T

from tests.conftest import encode, photo_like
from tests.mldr_archive import RA_OPS


class Pickled:
    """A pickle written opcode by opcode (protocol 2, or 4 with frames)."""

    def __init__(self, protocol: int = 2, py2_strings: bool = False):
        self.protocol, self.py2 = protocol, py2_strings
        self.out = bytearray()
        self.frame = bytearray()
        self.out += b"\x80" + bytes([protocol])  # PROTO

    def _w(self, data: bytes) -> None:
        (self.frame if self.protocol >= 4 else self.out).extend(data)

    def commit(self) -> None:
        """End the current frame (FRAME + 8-byte length, then its opcodes), as joblib forces before array bytes."""
        if self.protocol >= 4 and self.frame:
            self.out += b"\x95" + struct.pack("<Q", len(self.frame)) + self.frame
            self.frame = bytearray()

    def raw(self, data: bytes) -> None:
        self.commit()
        self.out += data

    def finish(self) -> bytes:
        self._w(b".")  # STOP
        self.commit()
        return bytes(self.out)

    def global_(self, module: str, name: str) -> None:
        self._w(b"c" + module.encode() + b"\n" + name.encode() + b"\n")  # GLOBAL

    def value(self, v: Any) -> None:  # long: one branch per kind of value
        if v is None:
            self._w(b"N")  # NONE
        elif v is True or v is False:
            self._w(b"\x88" if v else b"\x89")  # NEWTRUE / NEWFALSE
        elif isinstance(v, int):
            if -(2**31) <= v < 2**31:
                self._w(b"J" + struct.pack("<i", v))  # BININT
            else:
                n = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
                self._w(b"\x8a" + bytes([len(n)]) + n)  # LONG1
        elif isinstance(v, float):
            self._w(b"G" + struct.pack(">d", v))  # BINFLOAT
        elif isinstance(v, str) and self.py2:
            data = v.encode("latin1")
            self._w((b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))) + data)
        elif isinstance(v, str):
            data = v.encode()
            self._w(b"X" + struct.pack("<I", len(data)) + data)  # BINUNICODE
        elif isinstance(v, bytes) and self.py2:  # a Python 2 str holding bytes (SHORT_BINSTRING / BINSTRING)
            self._w((b"U" + bytes([len(v)]) if len(v) < 256 else b"T" + struct.pack("<i", len(v))) + v)
        elif isinstance(v, bytes):
            self._w(b"B" + struct.pack("<I", len(v)) + v)  # BINBYTES
        elif isinstance(v, list):
            self._w(b"](")  # EMPTY_LIST, MARK
            for x in v:
                self.value(x)
            self._w(b"e")  # APPENDS
        elif isinstance(v, tuple):
            self._w(b"(")  # MARK
            for x in v:
                self.value(x)
            self._w(b"t")  # TUPLE
        elif isinstance(v, dict):
            self._w(b"}(")  # EMPTY_DICT, MARK
            for k, x in v.items():
                self.value(k)
                self.value(x)
            self._w(b"u")  # SETITEMS
        elif isinstance(v, NumpyArray):
            v.write(self)
        else:
            raise TypeError(type(v))

    def dtype(self, dt: np.dtype) -> None:
        self.global_("numpy", "dtype")
        self.value((dt.str[1:], False, True))
        self._w(b"R")  # REDUCE
        self.value((3, dt.str[0], None, None, None, -1, -1, 0))
        self._w(b"b")  # BUILD


class NumpyArray:
    """An array to pickle: ``style`` "numpy" (numpy's own reduce) or "joblib" (a NumpyArrayWrapper record)."""

    def __init__(self, array: np.ndarray, style: str = "numpy"):
        self.array, self.style = np.ascontiguousarray(array), style

    def write(self, p: Pickled) -> None:
        a = self.array
        if self.style == "numpy":
            p.global_("numpy.core.multiarray", "_reconstruct")
            p.global_("numpy", "ndarray")
            p.value((0,))
            p.value(b"b")
            p._w(b"\x87R")  # TUPLE3, REDUCE
            p._w(b"(J\x01\x00\x00\x00")  # MARK, version 1
            p.value(tuple(a.shape))
            p.dtype(a.dtype)
            p.value(False)
            p.value(a.tobytes())
            p._w(b"tb")  # TUPLE, BUILD
            return
        p.global_("joblib.numpy_pickle", "NumpyArrayWrapper")
        p._w(b")\x81")  # EMPTY_TUPLE, NEWOBJ
        p._w(b"}(")
        for key, val in (("subclass", None), ("shape", tuple(a.shape)), ("order", "C")):
            p.value(key)
            if key == "subclass":
                p.global_("numpy", "ndarray")
            else:
                p.value(val)
        p.value("dtype")
        p.dtype(a.dtype)
        for key, val in (("allow_mmap", False), ("numpy_array_alignment_bytes", 16)):
            p.value(key)
            p.value(val)
        p._w(b"ub")  # SETITEMS, BUILD
        p.commit()
        pos = len(p.out)  # joblib pads from the stream position after the padding byte to 16
        pad = 16 - ((pos + 1) % 16)
        p.raw(bytes([pad]) + b"\xff" * pad + a.tobytes())


def pickled(obj: Any, protocol: int = 2, py2_strings: bool = False) -> bytes:
    p = Pickled(protocol, py2_strings)
    p.value(obj)
    return p.finish()


def joblib_file(obj: Any, gzip: bool = False) -> bytes:
    """``joblib.dump(obj, name, compress=True)``: protocol 4, zlib (or gzip for a ``.gz`` name)."""
    data = pickled(obj, protocol=4)
    if gzip:
        c = zlib.compressobj(3, zlib.DEFLATED, 31)
    else:
        c = zlib.compressobj(3)
    return c.compress(data) + c.flush()


# ----------------------------------------------------------------------------------------
# MAT-files and the three datasets' layouts


def _element(kind: int, payload: bytes) -> bytes:
    return struct.pack("<II", kind, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def write_mat(path: Path, arrays: dict[str, np.ndarray], compress: bool = True) -> None:
    """A Level 5 MAT-file of real double row vectors, as MATLAB saves them (``-v7``: compressed)."""
    out = bytearray(b"MATLAB 5.0 MAT-file, written by tests/mldr_plus.py".ljust(116, b" "))
    out += b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    for name, values in arrays.items():
        v = np.asarray(values, np.float64).reshape(1, -1)
        body = _element(6, struct.pack("<II", 6, 0))  # array flags: mxDOUBLE_CLASS
        body += _element(5, struct.pack("<ii", *v.shape))
        body += _element(1, name.encode())
        body += _element(9, v.tobytes(order="F"))
        matrix = _element(14, body)
        out += _element(15, zlib.compress(matrix)) if compress else matrix
    path.write_bytes(bytes(out))


def cifar_root(root: Path, count: int, classes: int = 100, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """``root/cifar-100-python/{train,meta,test}`` as Python 2 pickles; returns (images HWC, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, classes, count)]
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    data = images.transpose(0, 3, 1, 2).reshape(count, 3072)  # their rows: R, G, B planes
    train = {
        "filenames": [f"img_{i}.png" for i in range(count)],
        "batch_label": "training batch 1 of 1",
        "fine_labels": labels,
        "coarse_labels": [v // 5 for v in labels],
        "data": NumpyArray(data),
    }
    (base / "train").write_bytes(pickled(train, py2_strings=True))
    (base / "test").write_bytes(pickled({"data": NumpyArray(data[:1]), "fine_labels": labels[:1]}, py2_strings=True))
    meta = {"fine_label_names": [f"class_{c}" for c in range(classes)], "coarse_label_names": ["x"]}
    (base / "meta").write_bytes(pickled(meta, py2_strings=True))
    return images, labels


def flowers_root(root: Path, sizes: list[tuple[int, int]], trnid: list[int], labels: list[int]) -> Path:
    """``root/flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat (compressed), setid.mat (not)}``."""
    base = root / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    for i, (h, w) in enumerate(sizes, 1):
        (base / "jpg" / f"image_{i:05d}.jpg").write_bytes(encode(photo_like(h, w, seed=i), quality=90))
    write_mat(base / "imagelabels.mat", {"labels": labels}, compress=True)
    rest = [i for i in range(1, len(sizes) + 1) if i not in trnid]
    write_mat(base / "setid.mat", {"trnid": trnid, "valid": rest[:1], "tstid": rest[1:]}, compress=False)
    return base


def food_root(root: Path, files: dict[str, list[tuple[str, tuple[int, int]]]]) -> Path:
    """``root/food-101/{images/CLASS/ID.jpg, meta/{train,test}.{json,txt}, meta/classes.txt}``."""
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    meta = {}
    for n, (cls, items) in enumerate(files.items()):
        (base / "images" / cls).mkdir(parents=True)
        for k, (stem, (h, w)) in enumerate(items):
            (base / "images" / cls / f"{stem}.jpg").write_bytes(encode(photo_like(h, w, seed=10 * n + k), quality=90))
        meta[cls] = [f"{cls}/{stem}" for stem, _ in items]
    (base / "meta" / "train.json").write_text(json.dumps(meta))
    (base / "meta" / "train.txt").write_text("".join(f"{p}\n" for ps in meta.values() for p in ps))
    (base / "meta" / "test.json").write_text(json.dumps({c: [] for c in meta}))
    (base / "meta" / "classes.txt").write_text("".join(f"{c}\n" for c in sorted(meta)))
    return base


# ----------------------------------------------------------------------------------------
# Their configs and rounds


def plus_config(dataset: str, rounds: int = 4, topk: int = 3, crop: str = "random_resized_crop", p_ra: float = 1.0):
    """reinforce.py's saved config for ``cifar100`` (resize [224], random_crop 224 pad 16), ``flowers102``
    or ``food101`` (their yaml spells the crop ``random_resize_crop``; ``crop`` picks the spelling)."""
    aug: dict[str, Any] = {"uint8": {"enable": True}}
    if dataset == "cifar100":
        aug["resize"] = {"size": [224]}  # their Resize's size goes through tensor.tolist(): a list round-trips
        aug["random_crop"] = {"size": 224, "padding": 16}
        mean, std = [0.507075159237, 0.4865488733149, 0.440917843367], [0.267334285879, 0.256438462917, 0.276150471325]
    else:
        aug[crop] = {"enable": True, "size": 224}
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    aug["random_horizontal_flip"] = {"enable": True, "p": 0.5}
    aug["rand_augment"] = {"enable": True, "p": p_ra}
    aug["to_tensor"] = {"enable": True}
    aug["normalize"] = {"mean": mean, "std": std}
    aug["random_erase"] = {"enable": True, "p": 0.25}
    classes = {"cifar100": 100, "flowers102": 102, "food101": 101}[dataset]
    return {
        "dataset": dataset,
        "teacher": {"ensemble": True},
        "batch_size": 32,
        "seed": None,
        "num_classes": classes,
        "download_data": False,
        "data_path": "",
        "reinforce": {
            "num_samples": rounds,
            "num_candidates": None,
            "topk": topk,
            "compress": True,
            "joblib": False,
            "gzip": True,
            "image_augmentation": aug,
        },
    }


@functools.cache
def _magnitude(op: str, height: int, width: int) -> tuple[float, bool]:
    magnitudes, signed = T.RandAugment()._augmentation_space(31, (height, width))[op]
    return (float(magnitudes[9].item()) if magnitudes.ndim > 0 else 0.0), signed


def _ra(size: tuple[int, int], p: float) -> list | None:
    if torch.rand(1) > p:
        return None  # their RandAugment skipped the round
    ops = []
    for _ in range(2):
        op_index = int(torch.randint(14, (1,)).item())
        magnitude, signed = _magnitude(RA_OPS[op_index], *size)
        if signed and torch.randint(2, (1,)):
            magnitude *= -1.0
        ops.append((op_index, magnitude))
    return ops


def draw_plus(index: int, image_size: tuple[int, int], label: int, config: dict, seed: int = 0) -> tuple[int, list]:
    """``(index, rounds)`` of one image, params in their compressed order for ``plus_config``'s transforms."""
    rein, aug = config["reinforce"], config["reinforce"]["image_augmentation"]
    torch.manual_seed(seed * 100_003 + index)
    rng = np.random.default_rng([seed, index])
    size = image_size
    rounds = []
    for _ in range(rein["num_samples"]):
        params: list[Any] = []
        if "resize" in aug:
            params.append(tuple(aug["resize"]["size"]))
            size = (224, 224)
        if "random_crop" in aug:
            pad = aug["random_crop"]["padding"]
            top, left, _, _ = T.RandomCrop.get_params(torch.empty(3, size[0] + 2 * pad, size[1] + 2 * pad), (224, 224))
            params.append((top, left))
            size = (224, 224)
        if "random_resized_crop" in aug:
            params.append(
                tuple(T.RandomResizedCrop.get_params(torch.empty(3, *image_size), [0.08, 1.0], [3 / 4, 4 / 3]))
            )
            size = (224, 224)
        params.append(torch.rand(1).item() < 0.5)
        params.append(_ra(size, aug["rand_augment"]["p"]))
        if torch.rand(1) > 0.25:
            params.append(None)
        else:
            x, y, h, w, _ = T.RandomErasing.get_params(torch.empty(3, *size), (0.02, 0.33), (0.3, 3.3), [0])
            params.append((x, y, h, w))
        logits = rng.normal(0, 1.0, config["num_classes"]).astype(np.float32)
        logits[label] += 6
        prob = np.exp(logits - logits.max())
        prob = (prob / prob.sum()).astype(np.float32)
        ids = np.argpartition(prob, -rein["topk"])[-rein["topk"] :]
        rounds.append({"params": params, "prob": (prob[ids].tolist(), ids.tolist())})
    return index, rounds


def expected_columns(obj: tuple, columns: list[str]) -> dict[str, np.ndarray]:
    """Our columns for their ``(index, rounds)`` of ``plus_config``, worked out here independently."""
    rows: dict[str, list] = {c: [] for c in columns}
    idx, prob = [], []
    for rnd in obj[1]:
        p = list(rnd["params"])
        if "random_crop" in columns:
            p = p[1:]  # resize's size: no column
            rows["random_crop"].append(list(p.pop(0)))
        if "rrc" in columns:
            rows["rrc"].append(list(p.pop(0)))
        rows["flip"].append([int(p.pop(0))])
        ra = p.pop(0)
        rows["ra"].append([0, 0, 0, 0] if ra is None else [v for op, m in ra for v in (op, -9 if m < 0 else 9)])
        erase = p.pop(0)
        rows["re"].append([0, 0, 0, 0] if erase is None else list(erase))
        values, ids = rnd["prob"]
        order = sorted(range(len(ids)), key=lambda j: (-values[j], ids[j]))
        idx.append([ids[j] for j in order])
        prob.append([values[j] for j in order])
    out = {c: np.array(v, np.int64) for c, v in rows.items()}
    out["idx"] = np.array(idx)
    out["prob"] = np.array(prob, np.float64).astype(np.float16)
    return out


def torch_saved(obj: Any, name: str) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_protocol=4)  # their files: torch.save(..., pickle_protocol=4)
    return buf.getvalue()
