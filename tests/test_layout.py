"""The shape of the code base: no import circle (module-level or lazy), no file over ~450 lines
without a stated reason, and the README's layout table naming what is really there."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450
# Files allowed over MAX_LINES, and why. An entry for a file that is no longer long fails.
LONG_FILES = {
    "visioncoach/grounding.py": "the output grammar's Python reference in one piece: "
                                "csrc/grounding.cpp mirrors it function by function and the fuzz "
                                "tests compare the two field by field",
    "csrc/grounding.cpp": "the C++ twin of visioncoach/grounding.py (same functions, same order)",
    "kernels/linear_logprob.py": "one op per file (Liger-Kernel's convention): the chunked autograd "
                                 "path, the Triton row kernels, their launchers, the custom-op "
                                 "registrations and both references belong together",
    "visioncoach/rewards/batched.py": "the batched score of eq. 4: each component's native loop "
                                      "(csrc/rewards.cpp, csrc/gt_pack.cpp) beside the tensor "
                                      "version it falls back to and is tested against",
    "tests/test_rewards.py": "one test module per source module: every reward component's "
                             "hand-computed cases plus the batched path against the reference",
}


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (``kernels/`` is ``visioncoach.kernels``)."""
    out = {}
    for folder, pkg in (("visioncoach", "visioncoach"), ("kernels", "visioncoach.kernels")):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def _import_graph() -> dict[str, set[str]]:
    """module -> modules it imports anywhere (top level or inside functions), including the
    packages whose ``__init__`` such an import runs (not its own parents: those are already
    being imported)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[:None if is_pkg else -1]
                    base = base[:len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                while t:
                    if t != name and not name.startswith(t + "."):
                        graph[name].add(t)
                    t = t.rpartition(".")[0]
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_import_graph_has_no_circle():
    graph = _import_graph()
    assert "visioncoach.rollout.generate" in graph["visioncoach.trainer.rl"]   # the walk sees imports
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _source_files():
    for folder in ("visioncoach", "kernels", "bench", "csrc", "tests", "scripts"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".cpp", ".cu", ".h", ".sh") and path.is_file():
                yield path.relative_to(ROOT).as_posix(), len(path.read_text().splitlines())


def test_no_file_is_long_without_a_stated_reason():
    lengths = dict(_source_files())
    long = {p: n for p, n in lengths.items() if n > MAX_LINES}
    assert not set(long) - set(LONG_FILES), f"over {MAX_LINES} lines, no reason given: {long}"
    stale = {p for p in LONG_FILES if lengths.get(p, 0) <= MAX_LINES}
    assert not stale, f"listed as long but no longer are (or are gone): {stale}"


def _layout_table() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return [p for row in re.findall(r"^\| (.+?) \|", section, re.M) for p in re.findall(r"`([^`]+)`", row)]


def test_readme_layout_table_matches_the_folders():
    paths = _layout_table()
    assert paths, "README has no layout table"
    for p in paths:
        assert (ROOT / p.rstrip("/")).exists() or list(ROOT.glob(p)), f"README layout names {p}, which is not there"
    named = {p.rstrip("/") for p in paths}
    pkg = ROOT / "visioncoach"
    everything = [p for p in pkg.iterdir() if (p.is_dir() and (p / "__init__.py").exists())
                  or (p.suffix == ".py" and p.name != "__init__.py")]
    everything += [ROOT / d for d in ("kernels", "csrc", "bench", "tests", "scripts")]
    for p in everything:
        rel = p.relative_to(ROOT).as_posix()
        assert any(n == rel or n.startswith(rel + "/") for n in named), \
            f"{rel} is missing from the README's layout table"
