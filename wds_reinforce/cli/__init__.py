"""Command-line entry points: ``wdsr-make-shards``, ``wdsr-inspect``, ``wdsr-train``.

The same commands run as ``python tools/make_shards.py``, ``tools/inspect_shards.py`` and
``tools/train.py`` from a checkout. Each module parses arguments and calls the library; only
here do messages speak of command-line flags.
"""
