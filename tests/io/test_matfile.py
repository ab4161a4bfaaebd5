"""io.matfile: dimensions that do not describe the values are refused, never a raw ValueError."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from tests.mldr_plus import _element
from wds_reinforce.core.errors import MetadataError
from wds_reinforce.io.matfile import read_mat


def write_matrix(path, dims: list[int], values: np.ndarray) -> None:
    """A Level 5 MAT-file of one uncompressed double matrix with ``dims`` as written, whatever the values."""
    out = bytearray(b"MATLAB 5.0 MAT-file, tests/io/test_matfile.py".ljust(116, b" "))
    out += b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    body = _element(6, struct.pack("<II", 6, 0))  # array flags: mxDOUBLE_CLASS
    body += _element(5, struct.pack(f"<{len(dims)}i", *dims))
    body += _element(1, b"m")
    body += _element(9, np.asarray(values, "<f8").tobytes())
    path.write_bytes(bytes(out + _element(14, body)))


@pytest.mark.parametrize(
    "dims, count",
    [
        ([-1, -3], 3),  # numpy's product is 3; reshape: "can only specify one unknown dimension"
        ([-1, 3], 3),
        ([65536, 65536, 65536, 65536], 0),  # int64 product 2**64 wraps round to 0
    ],
)
def test_bad_dimensions_are_refused(tmp_path, dims, count):
    write_matrix(tmp_path / "m.mat", dims, np.arange(count))
    with pytest.raises(MetadataError, match=rf"m\.mat: m: {count} values for dimensions \["):
        read_mat(tmp_path / "m.mat")


def test_good_dimensions_read_in_column_order(tmp_path):
    write_matrix(tmp_path / "m.mat", [2, 3], np.arange(6))
    assert read_mat(tmp_path / "m.mat")["m"].tolist() == [[0, 2, 4], [1, 3, 5]]
    write_matrix(tmp_path / "e.mat", [0, 4], np.arange(0))
    assert read_mat(tmp_path / "e.mat")["m"].shape == (0, 4)
