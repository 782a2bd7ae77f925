"""YAML files castlib reads (pipelines, the user's config): loaded with bounds (no alias
bombs, no nesting deep enough to overflow the stack), with the line of every key, so that
an error names the file, the line and the key."""
from __future__ import annotations

from typing import Any

from .errors import ConfigError


class KeyLines:
    """Builds ConfigErrors that name the file and the line of a key (a path of keys and
    list indices, as pydantic's error locations are)."""

    def __init__(self, source: str | None, lines: dict[tuple, int]):
        self.source, self.lines = source, lines

    def line(self, path: tuple) -> int | None:
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]

    def at(self, path: tuple, message: str, key: str | None = None) -> ConfigError:
        if self.source is None and not self.lines:
            # built in code from a command's or a function's arguments: name the argument
            return ConfigError(message, key=key.rsplit(".", 1)[-1] if key else None)
        return ConfigError(message, file=self.source or "<pipeline>", line=self.line(path), key=key)

    def invalid(self, exc, explain) -> ConfigError:
        """A ConfigError from a pydantic ValidationError: its first error, at the line of
        its key; explain(loc, type, message) may put the message in castlib's words."""
        # an unknown key first: it is often the misspelling of the key said to be missing
        first = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        loc = tuple(first["loc"])
        key = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")
        return self.at(loc, explain(loc, first["type"], first["msg"]) or first["msg"],
                       key=key or None)


# A pipeline is a few dozen lines; these bounds leave it room a hundred times over, and
# refuse a "billion laughs" (aliases of aliases, expanding exponentially), an alias inside
# its own anchor, and nesting deep enough to overflow the stack, before any Python object
# is built from them.
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000      # nodes once every alias is expanded
_SCALAR_NODE_BYTES = 1024     # a long string counts as one node per KiB


def _bounded_loader():
    import yaml

    class YAMLRefused(yaml.MarkedYAMLError):
        """Well-formed YAML that castlib will not expand."""

    class BoundedLoader(yaml.SafeLoader):
        """The safe loader, measuring while it composes: the depth of nesting, and each
        node's size with its aliases expanded (computed once per node, so a bomb costs
        what its text costs)."""

        Refused = YAMLRefused

        def __init__(self, stream):
            super().__init__(stream)
            self._depth = 0
            self._sizes: dict[int, int] = {}   # id(node) -> expanded size, once complete

        def fetch_flow_collection_start(self, TokenClass):
            # the scanner reads a run of '[' or '{' ahead, in time quadratic in its length:
            # stop it at the bound rather than after the whole run
            if self.flow_level >= MAX_YAML_DEPTH:
                raise YAMLRefused(None, None, f"nested more than {MAX_YAML_DEPTH} levels "
                                  "deep", self.get_mark())
            super().fetch_flow_collection_start(TokenClass)

        def add_indent(self, column):
            if len(self.indents) >= MAX_YAML_DEPTH:
                raise YAMLRefused(None, None, f"nested more than {MAX_YAML_DEPTH} levels "
                                  "deep", self.get_mark())
            return super().add_indent(column)

        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                target = self.anchors.get(event.anchor)
                if target is not None and id(target) not in self._sizes:
                    raise YAMLRefused(None, None, f"alias *{event.anchor} is inside the "
                                      "node it names (a recursive structure)", event.start_mark)
                return super().compose_node(parent, index)
            self._depth += 1
            try:
                if self._depth > MAX_YAML_DEPTH:
                    raise YAMLRefused(None, None, f"nested more than {MAX_YAML_DEPTH} levels "
                                      "deep", event.start_mark)
                node = super().compose_node(parent, index)
            finally:
                self._depth -= 1
            sizes = self._sizes
            if isinstance(node, yaml.ScalarNode):
                size = 1 + len(node.value) // _SCALAR_NODE_BYTES
            elif isinstance(node, yaml.SequenceNode):
                size = 1 + sum(sizes[id(n)] for n in node.value)
            else:
                size = 1 + sum(sizes[id(k)] + sizes[id(v)] for k, v in node.value)
            if size > MAX_YAML_NODES:
                raise YAMLRefused(None, None, f"aliases expand this to more than "
                                  f"{MAX_YAML_NODES} nodes (a YAML bomb?)", node.start_mark)
            sizes[id(node)] = size
            return node

    return BoundedLoader


def name_keys(value):
    """A mapping of names as YAML gives it, with every key a string (a name YAML reads as
    a number, `2017:`, is still a name); None (`key:` with nothing under it) is empty.
    Anything else is returned as it is, for the caller's check to refuse."""
    if value is None:
        return {}
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value


def load_with_lines(text: str, source: str | None) -> tuple[Any, dict[tuple, int]]:
    """The YAML data, and the 1-based line of every mapping key and list item by path."""
    import yaml

    Loader = _bounded_loader()
    loader = Loader(text)

    def load(step):
        try:
            return step()
        except Loader.Refused as exc:
            mark = exc.problem_mark
            raise ConfigError(f"refused YAML: {exc.problem}", file=source or "<pipeline>",
                              line=mark.line + 1 if mark else None) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"malformed YAML: {problem}", file=source or "<pipeline>",
                              line=mark.line + 1 if mark else None) from None

    try:
        node = load(loader.get_single_node)
        lines = _key_lines(node, source)   # before constructing: merge keys rewrite the nodes
        data = load(lambda: loader.construct_document(node)) if node is not None else None
    finally:
        loader.dispose()
    return data, lines


def _key_lines(node, source: str | None) -> dict[tuple, int]:
    import yaml

    lines: dict[tuple, int] = {}

    def walk(n, path):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                if not isinstance(k, yaml.ScalarNode):   # `? [a, b]`: no name to give it
                    raise ConfigError("a key must be a plain name, not a list or mapping",
                                      file=source or "<pipeline>", line=k.start_mark.line + 1)
                key = k.value
                if path + (key,) in lines:   # YAML keeps the last silently: a typo's mask
                    where = ".".join(str(p) for p in path + (key,))
                    raise ConfigError(f"duplicate key {key!r}", file=source or "<pipeline>",
                                      line=k.start_mark.line + 1, key=where)
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    if node is not None:
        lines[()] = node.start_mark.line + 1
        walk(node, ())
    return lines
