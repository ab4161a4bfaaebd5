from __future__ import annotations

import subprocess
import sys


def test_import_loads_no_teacher_code():
    """A training job reads reinforced shards without importing the producer or timm."""
    code = (
        "import sys, wds_reinforce as w; "
        "producer = ('wds_reinforce.produce.teacher', 'wds_reinforce.produce.self_contained', "
        "'wds_reinforce.produce.make', 'timm'); "
        "bad = [m for m in producer if m in sys.modules]; "
        "assert not bad, bad; "
        "w.load_teacher; assert 'wds_reinforce.produce.teacher' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_resolve():
    import wds_reinforce

    for name in wds_reinforce.__all__:
        assert getattr(wds_reinforce, name) is not None, name
