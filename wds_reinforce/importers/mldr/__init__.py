"""apple/ml-dr's released reinforcements (ImageNet+, CIFAR-100+, Flowers-102+, Food-101+), imported.

``metadata`` streams their archive, ``unpickle`` reads its pickles without running them,
``config`` turns their config into a recipe, ``convert`` maps one image's rounds to sidecar
columns, and ``importer`` (``import_mldr``) is the importer the shared import job runs.
"""

from wds_reinforce.importers import IndexMismatchError, MetadataError
from wds_reinforce.importers.mldr.config import MldrConfig
from wds_reinforce.importers.mldr.convert import convert_rounds
from wds_reinforce.importers.mldr.importer import MldrImporter, import_mldr
from wds_reinforce.importers.mldr.unpickle import load_torch_save, restricted_loads

__all__ = [
    "IndexMismatchError",
    "MetadataError",
    "MldrConfig",
    "MldrImporter",
    "convert_rounds",
    "import_mldr",
    "load_torch_save",
    "restricted_loads",
]
