#!/usr/bin/env python
"""Verify reinforced shards against their manifest (and the teacher), or draw one sample's rounds.

Also installed as ``wdsr-inspect``.
The command lives in ``wds_reinforce.cli.inspect_shards``; see ``--help``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wds_reinforce.cli.inspect_shards import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
