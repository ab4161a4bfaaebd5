#!/usr/bin/env python
"""Make reinforced webdataset shards: source + teacher + recipe -> shards + manifest.

Also installed as ``wdsr-make-shards``.
The command lives in ``wds_reinforce.cli.make_shards``; see ``--help``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wds_reinforce.cli.make_shards import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
