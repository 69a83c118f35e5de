"""The house: docs/design.rst's map equals the tree, and imports only go down."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "milter" / "popauth"
DESIGN = REPO / "docs" / "design.rst"
MAP_LINE = re.compile(r"^(?P<indent>(?:  )*)- ``(?P<name>[\w.]+/?)``: \S")


def tree_paths() -> set[str]:
    """Every folder (``a/b/``) and module (``a/b.py``) below the package, not ``__init__``."""
    paths: set[str] = set()
    for path in PACKAGE.rglob("*"):
        if "__pycache__" in path.parts:
            continue
        relative = path.relative_to(PACKAGE).as_posix()
        if path.is_dir():
            paths.add(relative + "/")
        elif path.suffix == ".py" and path.name != "__init__.py":
            paths.add(relative)
    return paths


def map_entries() -> list[str]:
    """The paths the map in docs/design.rst names, in its order."""
    text = DESIGN.read_text(encoding="utf-8")
    section = text[text.index("\nThe house\n=========\n") :]
    entries: list[str] = []
    parents: list[str] = []
    for line in section.splitlines():
        found = MAP_LINE.match(line)
        if found is None:
            continue
        depth = len(found["indent"]) // 2
        assert depth <= len(parents), f"map line nested too deep: {line!r}"
        parents = parents[:depth]
        path = "".join(parents) + found["name"]
        entries.append(path)
        if path.endswith("/"):
            parents.append(found["name"])
    return entries


def top_level_order() -> list[str]:
    """The map's top-level folders and modules, bottom layer first."""
    return [
        entry.rstrip("/").removesuffix(".py")
        for entry in map_entries()
        if "/" not in entry.rstrip("/")
    ]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every popauth module (or package) ``path`` imports, at any depth of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            if node.module == "popauth":
                names.update(f"popauth.{alias.name}" for alias in node.names)
            elif node.module.startswith("popauth."):
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("popauth"))
    return names


def third_party_imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
    return names


def layer_of(module: str) -> str:
    """``popauth.doors.ingest.server`` -> ``doors``."""
    return module.split(".")[1] if module.count(".") else module


def test_the_map_names_every_folder_and_module_once() -> None:
    entries = map_entries()
    duplicates = sorted({entry for entry in entries if entries.count(entry) > 1})
    assert duplicates == []
    named = set(entries)
    assert sorted(tree_paths() - named) == [], "in the tree, not in docs/design.rst's map"
    assert sorted(named - tree_paths()) == [], "in docs/design.rst's map, not in the tree"


def test_the_map_is_read_with_its_nesting() -> None:
    # A module listed under the wrong folder is another path, so the check above sees it.
    assert "doors/ingest/wire.py" in map_entries()
    assert "ingest/wire.py" not in map_entries()
    assert top_level_order().index("basics") < top_level_order().index("relay")


def test_imports_only_go_down_the_layers() -> None:
    order = top_level_order()
    rank = {name: position for position, name in enumerate(order)}
    upward: list[str] = []
    for path in PACKAGE.rglob("*.py"):
        module = module_name(path)
        if module == "popauth":
            continue
        own = layer_of(module)
        for imported in imports_of(path):
            target = layer_of(imported)
            if target == "popauth":
                continue
            if rank[target] > rank[own]:
                upward.append(f"{module} imports {imported}")
    assert upward == []


def test_no_door_imports_another_door() -> None:
    doors = PACKAGE / "doors"
    crossings: list[str] = []
    for path in doors.rglob("*.py"):
        module = module_name(path)
        own = module.split(".")[2] if module.count(".") >= 3 else None
        for imported in imports_of(path):
            parts = imported.split(".")
            is_a_door = len(parts) >= 3 and parts[1] == "doors"
            if is_a_door and (PACKAGE / "doors" / parts[2]).is_dir() and parts[2] != own:
                crossings.append(f"{module} imports {imported}")
    assert crossings == []


def test_the_relay_decision_knows_no_mta_library_and_no_backend() -> None:
    offending: list[str] = []
    for path in (PACKAGE / "relay").rglob("*.py"):
        third = third_party_imports_of(path) & {"Milter", "milter", "redis"}
        backends = {
            name
            for name in imports_of(path)
            if name.startswith(("popauth.store.memory", "popauth.store.redis", "popauth.doors"))
        }
        if third or backends:
            offending.append(f"{module_name(path)}: {sorted(third | backends)}")
    assert offending == []
