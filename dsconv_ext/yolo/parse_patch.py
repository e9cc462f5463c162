"""Teach ultralytics' ``parse_model`` about dsconv_ext's modules without editing ultralytics.

``parse_model`` keeps its scaling rules in local sets (``base_modules`` / ``repeat_modules`` in
8.4, inline ``m in {...}`` literals in 8.3) and ``m is C3k2`` tests, so injecting names into
``ultralytics.nn.tasks`` is not enough: a ``C3k2_DSConv`` row would skip width scaling and the
repeat count. This module recompiles ``parse_model`` from its own source with two edits made on
the syntax tree:

1. Wherever ``parse_model`` tests a module type against a name we mirror (``Conv``, ``C3k2``,
   ``C3``, ``Bottleneck``), our alias is added: set/tuple/list literals gain the alias, and
   ``m is C3k2`` becomes ``m in (C3k2, C3k2_DSConv)``. Our modules therefore get exactly the
   treatment the installed ultralytics gives the module they mirror, scaling rules included.
2. After the loop that resolves string arguments, one call is inserted:
   ``args = <hook>(d, i, f, n, m, args, ch)``. It validates our rows' argument types (errors name
   the layer) and prepends the input channels for channel-preserving modules such as
   ``BiLevelRoutingAttention``.

Anything unexpected (no source, a mirrored name used in a type test we cannot rewrite, a missing
anchor) raises :class:`ParseModelShapeError` naming the ultralytics version: a silent partial
patch would build wrong models.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Callable, Dict, List, Sequence

__all__ = ["HOOK_NAME", "ParseModelShapeError", "patch_parse_model"]

HOOK_NAME = "_dsconv_ext_row_hook"

# How many rewritable type tests each mirrored name must have in parse_model for the mirroring to
# mean what we claim (8.3.0 and 8.4.x both have: Conv in the base set; C3k2 in the base set, the
# repeat set and `m is C3k2`; C3 in the base and repeat sets; Bottleneck in the base set).
MIN_REFERENCES = {"Conv": 1, "C3k2": 3, "C3": 2, "Bottleneck": 1}


class ParseModelShapeError(RuntimeError):
    """ultralytics' parse_model no longer has the shape dsconv_ext knows how to extend."""


def _version() -> str:
    try:
        import ultralytics

        return ultralytics.__version__
    except Exception:  # pragma: no cover
        return "unknown"


def _fail(msg: str) -> ParseModelShapeError:
    return ParseModelShapeError(
        f"dsconv_ext cannot extend parse_model of ultralytics {_version()}: {msg}. dsconv_ext "
        "supports ultralytics 8.3.0 to 8.4.x; pin one of those, or set DSCONV_EXT_YOLO=0 to "
        "run ultralytics without dsconv_ext's YOLO modules."
    )


def _is_name(node: ast.AST, ids) -> bool:
    return isinstance(node, ast.Name) and node.id in ids


class _AliasRewriter(ast.NodeTransformer):
    """Adds aliases wherever parse_model type-tests a mirrored name."""

    def __init__(self, aliases: Dict[str, Sequence[str]]):
        self.aliases = aliases
        self.handled: set = set()  # id() of Name nodes whose type test now covers the alias
        self.counts = {k: 0 for k in aliases}

    def _extend_collection(self, node):
        self.generic_visit(node)
        present = {e.id for e in node.elts if isinstance(e, ast.Name)}
        extra = []
        for e in node.elts:
            if _is_name(e, self.aliases):
                self.handled.add(id(e))
                self.counts[e.id] += 1
                extra += [a for a in self.aliases[e.id] if a not in present]
        for a in dict.fromkeys(extra):
            node.elts.append(ast.Name(id=a, ctx=ast.Load()))
        return node

    visit_Set = visit_Tuple = visit_List = _extend_collection

    def visit_Compare(self, node):
        self.generic_visit(node)
        if len(node.ops) != 1 or not isinstance(node.ops[0], (ast.Is, ast.IsNot)):
            return node
        left, right = node.left, node.comparators[0]
        target = (
            right
            if _is_name(right, self.aliases)
            else left
            if _is_name(left, self.aliases)
            else None
        )
        if target is None:
            return node
        other = left if target is right else right
        self.handled.add(id(target))
        self.counts[target.id] += 1
        names = [target.id, *self.aliases[target.id]]
        tup = ast.Tuple(elts=[ast.Name(id=x, ctx=ast.Load()) for x in names], ctx=ast.Load())
        op = ast.In() if isinstance(node.ops[0], ast.Is) else ast.NotIn()
        return ast.copy_location(ast.Compare(left=other, ops=[op], comparators=[tup]), node)


def _type_test_names(fn: ast.FunctionDef, names) -> List[ast.Name]:
    """Name nodes of ``names`` used where a type test could see them.

    ``Conv.default_act = ...`` (attribute access) or ``Conv(...)`` (a call) is not a type test;
    a collection element, a comparison operand or an isinstance/issubclass argument is.
    """
    found = []
    for node in ast.walk(fn):
        if isinstance(node, (ast.Set, ast.Tuple, ast.List)):
            found += [e for e in node.elts if _is_name(e, names)]
        elif isinstance(node, ast.Compare):
            found += [e for e in (node.left, *node.comparators) if _is_name(e, names)]
        elif isinstance(node, ast.Call) and _is_name(node.func, {"isinstance", "issubclass"}):
            found += [e for e in node.args if _is_name(e, names)]
    return found


def _find_arg_loop(fn: ast.FunctionDef) -> ast.For:
    """The per-row loop ``for i, (f, n, m, args) in enumerate(...)``."""
    hits = []
    for node in ast.walk(fn):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Tuple):
            elts = node.target.elts
            if (
                len(elts) == 2
                and _is_name(elts[0], {"i"})
                and isinstance(elts[1], ast.Tuple)
                and [getattr(e, "id", None) for e in elts[1].elts] == ["f", "n", "m", "args"]
            ):
                hits.append(node)
    if len(hits) != 1:
        raise _fail(f"expected one `for i, (f, n, m, args) in ...` loop, found {len(hits)}")
    return hits[0]


def _insert_hook(row_loop: ast.For) -> None:
    """Insert the row hook right after the loop that resolves string arguments."""
    idx = [
        k
        for k, s in enumerate(row_loop.body)
        if isinstance(s, ast.For)
        and isinstance(s.target, ast.Tuple)
        and [getattr(e, "id", None) for e in s.target.elts] == ["j", "a"]
    ]
    if len(idx) != 1:
        raise _fail(f"expected one `for j, a in enumerate(args)` loop per row, found {len(idx)}")
    call = ast.parse(f"args = {HOOK_NAME}(d, i, f, n, m, args, ch)").body[0]
    ast.copy_location(call, row_loop.body[idx[0]])
    row_loop.body.insert(idx[0] + 1, call)


def patch_parse_model(tasks, aliases: Dict[str, Sequence[str]]) -> Callable:
    """Compile a copy of ``tasks.parse_model`` that also handles ``aliases`` and calls the hook.

    Args:
        tasks: the ``ultralytics.nn.tasks`` module (its globals become the function's globals,
            so the aliases and ``HOOK_NAME`` must be injected there before the function runs).
        aliases: mirrored ultralytics name -> names of our classes treated like it.

    Returns:
        The new function (not installed; the caller assigns it).
    """
    original = getattr(tasks, "parse_model", None)
    if not inspect.isfunction(original):
        raise _fail("ultralytics.nn.tasks.parse_model is missing or not a plain function")
    params = list(inspect.signature(original).parameters)
    if params[:2] != ["d", "ch"]:
        raise _fail(f"parse_model takes {params}, expected (d, ch, ...)")
    try:
        lines, first = inspect.getsourcelines(original)
    except (OSError, TypeError) as e:
        raise _fail(f"its source is not available ({e})") from e
    tree = ast.parse(textwrap.dedent("".join(lines)))
    fn = tree.body[0]
    if not isinstance(fn, ast.FunctionDef) or fn.name != "parse_model" or fn.decorator_list:
        raise _fail("its source is not a plain `def parse_model`")

    targets = _type_test_names(fn, aliases)
    rewriter = _AliasRewriter(aliases)
    rewriter.visit(fn)
    missed = [t for t in targets if id(t) not in rewriter.handled]
    if missed:
        where = ", ".join(f"{t.id} at line {t.lineno + first - 1}" for t in missed)
        raise _fail(f"type tests it cannot mirror ({where})")
    for name, need in MIN_REFERENCES.items():
        if name in aliases and rewriter.counts[name] < need:
            raise _fail(f"`{name}` is type-tested {rewriter.counts[name]} times, expected {need}")
    _insert_hook(_find_arg_loop(fn))

    ast.fix_missing_locations(tree)
    ast.increment_lineno(tree, first - 1)  # tracebacks point at the real lines of tasks.py
    code = compile(tree, inspect.getsourcefile(original) or "<parse_model>", "exec")
    namespace: dict = {}
    exec(code, tasks.__dict__, namespace)  # globals: tasks' own, so every name resolves as before
    new = namespace["parse_model"]
    new.__doc__ = original.__doc__
    new.__dsconv_ext_original__ = original
    return new
