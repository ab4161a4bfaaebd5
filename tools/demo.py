#!/usr/bin/env python
"""The offline demo: demo images, a teacher trained here, reinforced shards (``--quick``, ``--epochs N``).

``python tools/make_shards.py`` with no arguments runs the same demo with its defaults.
The command lives in ``wds_reinforce.cli.demo``; see ``--help``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wds_reinforce.cli.demo import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
