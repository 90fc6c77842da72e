"""Reading small text inputs (YAML configs, data.yaml, classes.txt, split lists) safely.

Every failure is a one-line ``DplError`` naming the file: a missing or unreadable file,
bytes that are not UTF-8 (with the first bad byte and its offset), invalid YAML (with its
line and column), and YAML whose aliases would expand far beyond what is written (an
"alias bomb": a few hundred bytes of nested ``*a`` references that a reader walking the
result, e.g. ``str(names)``, blows up to gigabytes) or refer to themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dpl_tools.errors import DplError

# Nodes plus scalar characters that aliases may add beyond the document as written:
# ordinary anchors (a shared default block) add a few hundred, an alias bomb billions.
MAX_ALIAS_EXPANSION = 1_000_000


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's contents, or a one-line DplError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise DplError(f"{path}: is a directory, not a text file")
    if not path.is_file():
        raise DplError(f"{path}: file not found")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DplError(
            f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
        ) from None
    except OSError as e:
        raise DplError(f"{path}: cannot read ({e.strerror or e})") from None


class _AliasProblem(Exception):
    pass


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _own_size(node: yaml.Node) -> int:
    return 1 + (len(node.value) if isinstance(node, yaml.ScalarNode) else 0)


def _expanded_size(
    node: yaml.Node, sizes: dict[int, int], visiting: set[int], own: dict[int, int]
) -> int:
    """Nodes plus scalar characters of ``node`` with every alias written out (memoised in
    ``sizes``, so the walk is linear in the nodes written; ``own`` gets each distinct
    node's own size)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in visiting:
        raise _AliasProblem("a YAML alias refers to a node containing it (recursive), refused")
    visiting.add(key)
    own[key] = _own_size(node)
    total = own[key] + sum(_expanded_size(c, sizes, visiting, own) for c in _children(node))
    visiting.discard(key)
    sizes[key] = total
    return total


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing documents whose aliases expand them too far."""

    aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        # a key given twice is an error (PyYAML keeps the last silently); merge keys (<<)
        # may be overridden, as YAML specifies
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def compose_document(self):
        node = super().compose_document()
        if self.aliases and node is not None:
            own: dict[int, int] = {}
            expanded = _expanded_size(node, {}, set(), own)
            written = sum(own.values())
            if expanded - written > MAX_ALIAS_EXPANSION:
                raise _AliasProblem(
                    f"YAML aliases expand it by {expanded - written:,} nodes and characters "
                    f"(limit {MAX_ALIAS_EXPANSION:,}), refused as an alias bomb"
                )
        return node


def parse_yaml(text: str, source: str | Path) -> Any:
    """``text`` parsed as YAML (safe tags only, alias expansion bounded), or a one-line
    DplError naming ``source``."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _AliasProblem as e:
        raise DplError(f"{source}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = " ".join(str(e.problem or e.context or type(e).__name__).split())
        raise DplError(f"{source}: not valid YAML ({problem}{where})") from None
    except yaml.YAMLError as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DplError(f"{source}: not valid YAML ({first})") from None
    except RecursionError:
        raise DplError(f"{source}: YAML nested too deeply to read") from None
    finally:
        loader.dispose()


def read_yaml_file(path: str | Path) -> Any:
    """A UTF-8 YAML (or JSON) file parsed by ``parse_yaml``; every failure a one-line
    DplError naming the file."""
    return parse_yaml(read_text(path), path)
