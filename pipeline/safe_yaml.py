"""YAML a job is given (a job file, a `--set` value): safe types only, and a bounded size.

yaml.safe_load already refuses Python tags, but it expands aliases: a few hundred bytes of nested
aliases ("billion laughs") grow into millions of values. The document's size is counted on the
composed nodes, aliases followed but never expanded, before anything is constructed.
"""
from __future__ import annotations

from typing import Any, Dict

import yaml

MAX_YAML_NODES = 100_000  # a job file is a few hundred; aliases nested to expand further are refused


class UnsafeYAML(ValueError):
    """Not valid YAML, a Python tag, or an expansion past MAX_YAML_NODES; the message says which."""


def load_yaml(text: str, what: str) -> Any:
    """Safe YAML whose expansion, aliases followed, stays under MAX_YAML_NODES; `what` names the
    file or key in the message."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_YAML_NODES:
            raise UnsafeYAML(f"{what}: its aliases expand to more than {MAX_YAML_NODES} values; refused")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise UnsafeYAML(f"{what}: not valid YAML ({_one_line(e)})") from None
    except RecursionError:
        raise UnsafeYAML(f"{what}: nested too deeply") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: Dict[int, int], open_: set) -> int:
    """Values in the document once every alias is expanded, without expanding them (memoised per node)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise yaml.YAMLError("an alias refers to a value that contains it")
    open_.add(id(node))
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, open_)
        if total > MAX_YAML_NODES:  # stop counting: already too big
            break
    open_.discard(id(node))
    sizes[id(node)] = total
    return total


def _one_line(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
        context = f"{e.context}: " if e.context else ""
        return " ".join(f"{context}{e.problem}{where}".split())
    return " ".join(str(e).split())
