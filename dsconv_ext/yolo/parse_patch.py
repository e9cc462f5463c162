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

Anything unexpected raises :class:`ParseModelShapeError` naming the ultralytics version: a silent
partial patch would build wrong models. What is refused, and why:

- ``parse_model`` is not a plain function of ``ultralytics.nn.tasks``: another plugin wrapped it
  (``functools.wraps`` leaves ``__wrapped__``; recompiling the wrapped source would drop that
  plugin's wrapper) or replaced it with a function of another module (whose globals are not
  tasks').
- The source ``inspect`` finds is not the code that was loaded: the source, compiled unchanged,
  must give the loaded function's bytecode (instructions, constants, names, nested code objects;
  not line numbers or file names, which differ for identical code). Otherwise tasks.py changed
  on disk after import, or the loaded function came from elsewhere, and recompiling "its" source
  would silently swap the code that runs.
- A mirrored name used in a type test we cannot rewrite, too few type tests, a missing anchor.
- Scaling rules that our rewrite does not reach (a helper function deciding which modules scale,
  ``match`` statements or comparisons of class names): :func:`check_alias_treatment` builds a
  tiny model through the patched function, each of our modules beside the module it mirrors, and
  refuses unless both get the same channels, repeats and inner blocks.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import types
from typing import Callable, Dict, List, Optional, Sequence

from .errors import RegistrationError

__all__ = [
    "HOOK_NAME",
    "OURS_ATTR",
    "ParseModelShapeError",
    "check_alias_treatment",
    "is_our_wrapper",
    "patch_parse_model",
]

HOOK_NAME = "_dsconv_ext_row_hook"

# How many rewritable type tests each mirrored name must have in parse_model for the mirroring to
# mean what we claim (8.3.0 and 8.4.x both have: Conv in the base set; C3k2 in the base set, the
# repeat set and `m is C3k2`; C3 in the base and repeat sets; Bottleneck in the base set).
MIN_REFERENCES = {"Conv": 1, "C3k2": 3, "C3": 2, "Bottleneck": 1}


class ParseModelShapeError(RegistrationError):
    """ultralytics' parse_model no longer has the shape dsconv_ext knows how to extend."""


def _version() -> str:
    try:
        import ultralytics

        return ultralytics.__version__
    except Exception:  # pragma: no cover
        return "unknown"


_SUPPORTED = "dsconv_ext supports ultralytics 8.3.0 to 8.4.x; pin one of those"


def _fail(msg: str, hint: str = _SUPPORTED) -> ParseModelShapeError:
    return ParseModelShapeError(
        f"dsconv_ext cannot extend parse_model of ultralytics {_version()}: {msg}. {hint}, or "
        "set DSCONV_EXT_YOLO=0 to run ultralytics without dsconv_ext's YOLO modules."
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


def _describe(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# Set on our parse_model wrapper to the wrapper itself: functools.wraps copies a wrapped
# function's __dict__ into its wrapper, so another plugin's wrapper of ours carries our other
# attributes (and would pass for ours), but this one then names a different function.
OURS_ATTR = "__dsconv_ext_wrapper__"


def is_our_wrapper(fn) -> bool:
    """True for the parse_model wrapper of a dsconv_ext registration (not for a wrapper of it)."""
    attrs = getattr(fn, "__dict__", None)
    return attrs is not None and attrs.get(OURS_ATTR) is fn


def _loaded_function(tasks) -> Callable:
    """The plain ``parse_model`` function that ``tasks`` runs, ours unwrapped; refuses anything
    whose source we must not recompile in its place (see the module docstring)."""
    current = getattr(tasks, "parse_model", None)
    fn = current
    if is_our_wrapper(current):  # an earlier registration's: recompile what it wraps
        fn = current.__dsconv_ext_original__
    if not inspect.isfunction(fn):
        raise _fail("ultralytics.nn.tasks.parse_model is missing or not a plain function")
    if hasattr(fn, "__wrapped__"):
        # Another plugin's functools.wraps wrapper: inspect would hand us the source of the
        # function it wraps, and installing our recompiled copy would silently drop the wrapper.
        raise _fail(
            f"ultralytics.nn.tasks.parse_model is {_describe(fn)}, a wrapper (by another plugin?) "
            f"of {_describe(fn.__wrapped__)}; dsconv_ext will not unwrap it, which would drop "
            "that wrapper",
            "Register dsconv_ext before the other plugin patches parse_model "
            "(import dsconv_ext.yolo and call register() first)",
        )
    if fn.__globals__ is not vars(tasks):
        raise _fail(
            f"ultralytics.nn.tasks.parse_model is {_describe(fn)}, defined outside "
            f"{tasks.__name__} (replaced by another plugin?)",
            "Register dsconv_ext before the other plugin patches parse_model",
        )
    if fn.__code__.co_freevars:  # a closure: our module-level copy could not see its cells
        raise _fail(f"ultralytics.nn.tasks.parse_model is a closure ({_describe(fn)})")
    return fn


def _const_key(c):
    """A comparable stand-in for a code constant: nested code objects by :func:`_code_key`,
    floats by repr (0.0 == -0.0 and NaN != NaN would mislead a plain comparison)."""
    if isinstance(c, types.CodeType):
        return ("code", _code_key(c))
    if isinstance(c, tuple):
        return ("tuple", tuple(_const_key(x) for x in c))
    if isinstance(c, frozenset):
        return ("frozenset", frozenset(_const_key(x) for x in c))
    if isinstance(c, (float, complex)):
        return (type(c).__name__, repr(c))
    return (type(c).__name__, c)


# What must agree between the loaded code and the source compiled again. Left out on purpose:
# co_filename, co_firstlineno, co_linetable / co_lnotab (line and column numbers: the same code
# compiled from another path, at another line or dedented differs only there) and co_qualname.
_CODE_FIELDS = (
    "co_argcount",
    "co_posonlyargcount",
    "co_kwonlyargcount",
    "co_nlocals",
    "co_stacksize",
    "co_flags",
    "co_code",  # the instructions (de-specialised; line numbers live in co_linetable)
    "co_names",
    "co_varnames",
    "co_freevars",
    "co_cellvars",
    "co_exceptiontable",  # 3.11+: handler ranges, instruction offsets only
    "co_name",
)


def _code_key(code: types.CodeType) -> tuple:
    fields = tuple(getattr(code, f, None) for f in _CODE_FIELDS)
    return (fields, tuple(_const_key(c) for c in code.co_consts))


def _code_difference(a: types.CodeType, b: types.CodeType, where: str = "") -> Optional[str]:
    """The first field where two code objects differ (recursing into nested code), or None."""
    for f in _CODE_FIELDS:
        if getattr(a, f, None) != getattr(b, f, None):
            return f"{where}{f}"
    ca, cb = a.co_consts, b.co_consts
    if len(ca) != len(cb):
        return f"{where}co_consts"
    for x, y in zip(ca, cb):
        if isinstance(x, types.CodeType) and isinstance(y, types.CodeType):
            diff = _code_difference(x, y, f"{where}{x.co_name}.")
            if diff:
                return diff
        elif _const_key(x) != _const_key(y):
            return f"{where}co_consts"
    return None


def _future_flags(code: types.CodeType) -> int:
    """The ``from __future__`` compiler flags the loaded code was compiled with (they change the
    code: compiling without them would differ from the loaded function)."""
    future = importlib.import_module("__future__")  # (an `import __future__` reads oddly)
    flags = 0
    for name in future.all_feature_names:
        flag = getattr(future, name).compiler_flag
        if code.co_flags & flag:
            flags |= flag
    return flags


def _find_code(code: types.CodeType, name: str, line: int) -> Optional[types.CodeType]:
    """The code object of the ``def name`` at ``line`` compiled inside ``code``."""
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            if c.co_name == name and c.co_firstlineno == line:
                return c
            found = _find_code(c, name, line)
            if found is not None:
                return found
    return None


def patch_parse_model(tasks, aliases: Dict[str, Sequence[str]]) -> Callable:
    """Compile a copy of ``tasks.parse_model`` that also handles ``aliases`` and calls the hook.

    Args:
        tasks: the ``ultralytics.nn.tasks`` module (its globals become the function's globals,
            so the aliases and ``HOOK_NAME`` must be injected there before the function runs).
        aliases: mirrored ultralytics name -> names of our classes treated like it.

    Returns:
        The new function (not installed; the caller assigns it, after
        :func:`check_alias_treatment`).
    """
    original = _loaded_function(tasks)
    params = list(inspect.signature(original).parameters)
    if params[:2] != ["d", "ch"]:
        raise _fail(f"parse_model takes {params}, expected (d, ch, ...)")
    try:
        lines, _ = inspect.findsource(original)  # the whole file, as inspect.getsource reads it
    except (OSError, TypeError) as e:
        raise _fail(f"its source is not available ({e})") from e
    filename = inspect.getsourcefile(original) or "<parse_model>"
    line = original.__code__.co_firstlineno
    try:
        module_tree = ast.parse("".join(lines), filename)
    except SyntaxError as e:
        raise _fail(f"its source file does not parse ({e})") from e
    defs = [  # top level, where ultralytics defines it (walking the whole file is slower)
        node
        for node in module_tree.body
        if isinstance(node, ast.FunctionDef) and node.name == "parse_model" and node.lineno == line
    ] or [
        node
        for node in ast.walk(module_tree)
        if isinstance(node, ast.FunctionDef) and node.name == "parse_model" and node.lineno == line
    ]
    if len(defs) != 1 or defs[0].decorator_list:
        raise _fail(f"{filename} has no plain `def parse_model` at line {line}")

    # The source must be the code that runs: compile the file unchanged and compare its
    # parse_model with the loaded bytecode before trusting the source as the base of our copy.
    # (The whole file: how a call compiles depends on whether its object was imported there.)
    pristine = _find_code(
        compile(module_tree, filename, "exec", dont_inherit=True), "parse_model", line
    )
    diff = "the function" if pristine is None else _code_difference(pristine, original.__code__)
    if diff:
        raise _fail(
            f"the source of parse_model in {filename} (line {line}) is not the code that was "
            f"loaded (their bytecode differs in {diff}): the file changed after ultralytics was "
            "imported, or parse_model was replaced by code whose source cannot be read",
            "Restart Python after changing ultralytics",
        )
    fn = defs[0]  # (compile() above left the tree as it was)
    fn.col_offset = 0  # compiled at module level below, wherever the file defines it
    tree = ast.Module(body=[fn], type_ignores=[])

    targets = _type_test_names(fn, aliases)
    rewriter = _AliasRewriter(aliases)
    rewriter.visit(fn)
    missed = [t for t in targets if id(t) not in rewriter.handled]
    if missed:
        where = ", ".join(f"{t.id} at line {t.lineno}" for t in missed)
        raise _fail(f"type tests it cannot mirror ({where})")
    for name, need in MIN_REFERENCES.items():
        if name in aliases and rewriter.counts[name] < need:
            raise _fail(f"`{name}` is type-tested {rewriter.counts[name]} times, expected {need}")
    _insert_hook(_find_arg_loop(fn))

    ast.fix_missing_locations(tree)  # (line numbers stay the file's: tracebacks point there)
    flags = _future_flags(original.__code__)
    code = compile(tree, filename, "exec", flags=flags, dont_inherit=True)
    namespace: dict = {}
    exec(code, vars(tasks), namespace)  # globals: tasks' own, so every name resolves as before
    new = namespace["parse_model"]
    # Defaults are evaluated where the def runs: take the loaded function's, not the source's.
    new.__defaults__, new.__kwdefaults__ = original.__defaults__, original.__kwdefaults__
    new.__doc__ = original.__doc__
    new.__dsconv_ext_original__ = original
    return new


# --- behaviour check ---------------------------------------------------------------------------

# Per mirrored name: (repeats, YAML args) of a probe row on which every scaling rule the installed
# ultralytics has for that module shows (width and max_channels on c2; depth on repeats > 1;
# C3k2's c3k forced on at the m scale).
PROBE_ROWS = {
    "Conv": (1, [64, 3, 2]),
    "Bottleneck": (1, [64]),
    "C3": (3, [64]),
    "C3k2": (3, [64, False, 0.25]),
}
# depth 0.5 (3 repeats -> 2), width 0.5, max_channels 48 (so 64 -> 48 -> 24): unscaled rows differ
PROBE_SCALE = ("m", [0.5, 0.5, 48])


def _wiring(layer) -> tuple:
    """What scaling decides about a built layer: the Sequential of repeats parse_model wraps
    around modules it does not repeat itself, and the channels of every convolution by path
    (inner block types and counts show in the paths)."""
    import torch.nn as nn

    top = ("Sequential", len(layer)) if type(layer) is nn.Sequential else ("single",)
    convs = tuple(
        (name, m.in_channels, m.out_channels, getattr(m, "groups", 1))
        for name, m in layer.named_modules()
        if next(m.children(), None) is None
        and isinstance(getattr(m, "in_channels", None), int)
        and isinstance(getattr(m, "out_channels", None), int)
    )
    return top, convs


def _wiring_difference(want, got) -> str:
    """The first difference between two (output channels, wiring) pairs, as a template with
    {alias} and {name}; empty when equal."""
    (c_want, (top_want, convs_want)), (c_got, (top_got, convs_got)) = want, got
    if c_want != c_got:
        return f"{{alias}} gives {c_want} output channels, {{name}} {c_got}"
    if top_want != top_got:
        return f"{{alias}} is built as {top_want}, {{name}} as {top_got}"
    if len(convs_want) != len(convs_got):
        return f"{{alias}} has {len(convs_want)} convolutions, {{name}} {len(convs_got)}"
    for a, b in zip(convs_want, convs_got):
        if a != b:
            return (
                f"first different convolution (path, in, out, groups): {{alias}} {a}, {{name}} {b}"
            )
    return ""


def check_alias_treatment(
    patched: Callable,
    tasks,
    aliases: Dict[str, Sequence[str]],
    classes: Dict[str, type],
    hook: Callable,
) -> None:
    """Refuse unless the patched ``parse_model`` treats each of our modules exactly like the
    ultralytics module it mirrors: same output channels, repeats and inner blocks for the same
    YAML row at a scale where every rule matters.

    Runs a copy of ``patched`` on a copy of tasks' globals (with ``classes`` and the row hook
    added), so nothing in ultralytics changes before the check passes. Rules that moved where our
    source rewrite cannot reach (helpers, ``match``, name comparisons) show here as a difference.
    """
    missing = [a for a in aliases if a not in PROBE_ROWS]
    if missing:  # a new alias needs a probe row: a programming error, not an ultralytics change
        raise ValueError(f"no probe row for {missing}")
    scale, multiples = PROBE_SCALE
    rows = [[-1, 1, "Conv", [16, 1, 1]]]  # layer 0 feeds every probe
    pairs = []
    for alias, ours in aliases.items():
        n, args = PROBE_ROWS[alias]
        rows.append([0, n, alias, list(args)])
        for name in ours:
            pairs.append((alias, len(rows) - 1, name, len(rows)))
            rows.append([0, n, name, list(args)])
    rows.append([-1, 1, "nn.Identity", []])  # its hook call sees every other row's channels
    d = {"nc": 1, "scales": {scale: multiples}, "scale": scale, "backbone": rows, "head": []}

    seen: Dict[str, list] = {}

    def recording_hook(d, i, f, n, m, args, ch):
        seen["ch"] = list(ch)  # channels of rows 0..i-1
        return hook(d, i, f, n, m, args, ch)

    trial_globals = {**vars(tasks), **classes, HOOK_NAME: recording_hook}
    trial = types.FunctionType(
        patched.__code__, trial_globals, patched.__name__, patched.__defaults__, patched.__closure__
    )
    trial.__kwdefaults__ = patched.__kwdefaults__
    kwargs = {"verbose": False} if "verbose" in inspect.signature(trial).parameters else {}
    try:
        layers, _ = trial(d, 3, **kwargs)
    except Exception as e:
        raise _fail(
            f"a probe model of {', '.join(aliases)} and our modules beside them fails to build "
            f"({type(e).__name__}: {e})"
        ) from e
    finally:
        from .rows import clear_row

        clear_row()
    ch = seen.get("ch", [])
    if len(ch) != len(rows) - 1:
        raise _fail(f"the row hook saw {len(ch)} channel counts, expected {len(rows) - 1}")
    bad = []
    for alias, ia, name, io in pairs:
        diff = _wiring_difference((ch[ia], _wiring(layers[ia])), (ch[io], _wiring(layers[io])))
        if diff:
            n, args = PROBE_ROWS[alias]
            bad.append(
                f"{name} is not scaled like {alias} (row [0, {n}, {name}, {args}] at scale "
                f"{scale!r}: {diff.format(alias=alias, name=name)})"
            )
    if bad:
        raise _fail(
            "; ".join(bad) + ". Its scaling rules are not all where dsconv_ext extends them "
            "(a helper function, a `match` statement or a comparison of names?)"
        )
