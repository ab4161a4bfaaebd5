#!/usr/bin/env python
"""Import apple/ml-dr's released reinforcements into reinforced webdataset shards.

Also installed as ``wdsr-import-mldr``.
The command lives in ``wds_reinforce.cli.import_mldr``; see ``--help``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wds_reinforce.cli.import_mldr import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
