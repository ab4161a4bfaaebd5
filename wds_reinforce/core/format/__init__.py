"""The byte layout of reinforced shards, and nothing else (no I/O): docs/FORMAT.md is the spec.

``codecs`` (how one column's values become bytes), ``columns`` (the one table of every column),
``sidecar`` (a sample's sidecar) and ``manifest`` (the data set's manifest).
"""

from wds_reinforce.core.errors import FormatError, VersionError
from wds_reinforce.core.format.codecs import CODECS, UINT_DTYPES, Codec, uint_width
from wds_reinforce.core.format.columns import COLUMNS, Column
from wds_reinforce.core.format.manifest import (
    Manifest,
    RoundGroup,
    ShardInfo,
    SkippedInput,
    TeacherSet,
)
from wds_reinforce.core.format.sidecar import (
    FINGERPRINT_BYTES,
    FORMAT_VERSION,
    MAX_SIDECAR_BYTES,
    SIDECAR_EXT,
    Sidecar,
    check_topk,
    crc32c,
    decode_sidecar,
    encode_sidecar,
    sidecar_place,
)

__all__ = [
    "FORMAT_VERSION",
    "SIDECAR_EXT",
    "MAX_SIDECAR_BYTES",
    "FINGERPRINT_BYTES",
    "CODECS",
    "Codec",
    "UINT_DTYPES",
    "uint_width",
    "COLUMNS",
    "Column",
    "FormatError",
    "VersionError",
    "Sidecar",
    "check_topk",
    "crc32c",
    "encode_sidecar",
    "decode_sidecar",
    "sidecar_place",
    "ShardInfo",
    "SkippedInput",
    "RoundGroup",
    "TeacherSet",
    "Manifest",
]
