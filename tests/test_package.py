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


def _imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in it, lazy imports included)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    modules = {}
    for path in (root / "wds_reinforce").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("wds_reinforce"):
                found |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                }
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("wds_reinforce")}
        edges[name] = found & modules.keys()
    return edges


# Which floors each floor may import: core <- io <- layouts <- read / produce <- importers (<- cli, the package).
_FLOORS = {
    "core": {"core"},
    "io": {"core", "io"},
    "layouts": {"core", "io", "layouts"},
    "read": {"core", "io", "layouts", "read"},
    "produce": {"core", "io", "layouts", "produce"},
    "importers": {"core", "io", "layouts", "produce", "importers"},
}


def test_imports_point_one_way_and_never_in_a_circle():
    edges = _imports()
    floor = lambda module: module.split(".")[1] if "." in module else "package"  # noqa: E731
    wrong = sorted(
        (m, t)
        for m, targets in edges.items()
        for t in targets
        if floor(m) in _FLOORS and floor(t) not in _FLOORS[floor(m)]
    )
    assert not wrong, f"imports against the floors: {wrong}"
    assert "wds_reinforce.read.dataset" in edges["wds_reinforce"]  # (the check sees the package's own imports)
    # No cycle: every module can be ordered after all it imports (packages' __init__ re-exports aside).
    graph = {m: {t for t in ts if t != m and not m.startswith(t + ".")} for m, ts in edges.items()}
    done: set[str] = set()
    while len(done) < len(graph):
        ready = {m for m, ts in graph.items() if m not in done and ts <= done}
        assert ready, f"an import cycle among {sorted(set(graph) - done)}"
        done |= ready


def test_the_readme_architecture_lists_every_module():
    """The README's tree names every module of the package (one line each), and nothing that is not there."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    block = text[text.index("## Architecture") :].split("```")[1]
    listed, stack = set(), []
    for line in block.splitlines():
        match = re.match(r"^( *)(\S+)", line)
        if not match or not (match.group(2).endswith("/") or match.group(2).endswith(".py")):
            continue  # a continuation of the line above
        depth = len(match.group(1)) // 2
        stack[depth:] = [match.group(2)]
        if match.group(2).endswith(".py") and stack[0] == "wds_reinforce/":
            listed.add("".join(stack))
    modules = {
        str(p.relative_to(root))
        for p in (root / "wds_reinforce").rglob("*.py")
        if p.name != "__init__.py" or p.parent.name in ("wds_reinforce", "importers")
    }
    assert listed == modules, f"missing: {sorted(modules - listed)}; not in the code: {sorted(listed - modules)}"
