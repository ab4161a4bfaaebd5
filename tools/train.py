#!/usr/bin/env python
"""Reference training on reinforced shards: a timm model, soft-target cross entropy, cosine LR.

Also installed as ``wdsr-train``.
The command lives in ``wds_reinforce.cli.train``; see ``--help``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wds_reinforce.cli.train import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
