"""Each stage's code dependencies, derived from the package's import graph (static analysis with :mod:`ast`).

DVC re-runs a stage when one of its deps changes, so a stage's deps must name every ``bnnpan`` module its command
can execute. Hand-written lists drifted (a module newly imported by a stage but missing from its list would not
re-run it); here they are computed:

1. **Entry**: a stage runs ``bnnpan <command> ...``; the command is a function of :mod:`bnnpan.cli`. Its entry
   modules are the ``bnnpan`` imports in that function's body (the CLI imports lazily, per command), in the
   module-level helpers of ``cli.py`` it calls by name (transitively: ``_check_dag_fresh`` for ``check``), and at
   ``cli.py``'s top level. ``cli.py`` itself is *not* a dep: it is argument plumbing shared by every command, and
   an edit to one command's options would otherwise re-run the whole DAG (as before this module).
2. **Closure**: from the entry modules, every ``import``/``from ... import`` of a ``bnnpan`` module, transitively,
   **including imports inside functions** (lazy imports). A lazy import may not run on every code path, so this
   over-approximates: an edit can re-run a stage that would not have executed the edited module, never the
   reverse. Importing ``bnnpan.a.b`` also runs the ``__init__.py`` of ``bnnpan`` and ``bnnpan.a``: they are deps.
   ``from bnnpan.a import b`` depends on ``bnnpan/a/b.py`` when that is a module (else ``b`` is a name in
   ``bnnpan.a``). Relative imports are resolved. Imports by string (``importlib``) are not seen: the package has
   none, and :func:`dynamic_imports` lets a test keep it that way.
3. **Other code a module runs** (the packed runtime's C++ source, compiled on first use): a module lists it in a
   module-level ``CODE_FILES = ("relative/path", ...)`` tuple of string constants, and every stage that imports
   the module depends on those files too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from functools import cache
from pathlib import Path

PACKAGE = "bnnpan"
#: Modules whose imports inside functions are not followed. ``config.py`` is the params schema every stage imports;
#: its methods ``prior_methods``/``network_of`` import the model registry lazily. Followed, they would make every
#: stage (fetch, prepare, report...) depend on all the model code, and the prepared files' code digest
#: (:func:`bnnpan.data.prepare.code_version`) would change with every model edit, retraining everything for
#: nothing. The stages that call those methods (train, pretrain-prior, the params check) import the same modules
#: themselves; tests/test_codedeps.py fails when one of them does not.
EAGER_ONLY = frozenset({"bnnpan/config.py"})
#: The repository root: the folder holding the ``bnnpan`` package (deps are paths relative to it).
ROOT = Path(__file__).resolve().parents[1]


def module_file(module: str, root: Path = ROOT) -> str | None:
    """``bnnpan/a/b.py`` or ``bnnpan/a/b/__init__.py`` (relative to ``root``) of module ``bnnpan.a.b``; None when
    ``module`` is not a module of the package (a name defined in one, or another package)."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    rel = Path(*module.split("."))
    for cand in (rel.with_suffix(".py"), rel / "__init__.py"):
        if (root / cand).is_file():
            return cand.as_posix()
    return None


def _module_name(path: str) -> str:
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _with_parents(module: str) -> list[str]:
    """``bnnpan.a.b`` -> ``[bnnpan, bnnpan.a, bnnpan.a.b]``: importing a module runs its packages' ``__init__``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_modules(nodes: Iterable[ast.AST], importer: str, root: Path = ROOT) -> set[str]:
    """The package's module files imported by the statements under ``nodes`` (walked recursively: imports in
    functions count), for code in module ``importer`` (to resolve relative imports)."""
    is_pkg = (root / Path(*importer.split(".")) / "__init__.py").is_file()
    package = importer if is_pkg else importer.rpartition(".")[0]
    found: set[str] = set()

    def add(module: str) -> bool:
        f = module_file(module, root)
        if f is None:
            return False
        found.update(x for m in _with_parents(module) if (x := module_file(m, root)) is not None)
        return True

    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                add(mod)
                for alias in node.names:  # `from bnnpan.a import b`: b may be a submodule
                    add(f"{mod}.{alias.name}")
    return found


def _parse(path: Path) -> ast.Module:
    return _parse_cached(path, path.stat().st_mtime_ns)  # an edited file is parsed again


@cache
def _parse_cached(path: Path, mtime_ns: int) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _code_files(tree: ast.Module, f: str, root: Path) -> set[str]:
    """The files named by module ``f``'s ``CODE_FILES = (...)`` (paths relative to its folder), checked to exist."""
    out: set[str] = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        if not any(isinstance(t, ast.Name) and t.id == "CODE_FILES" for t in targets):
            continue
        value = ast.literal_eval(node.value)
        for rel in value:
            p = (Path(f).parent / rel).as_posix()
            if not (root / p).is_file():
                raise FileNotFoundError(f"{f}: CODE_FILES names {rel!r}, which is not there")
            out.add(p)
    return out


def closure(files: Iterable[str], root: Path = ROOT) -> list[str]:
    """``files`` and every package module they import, transitively (sorted paths relative to ``root``)."""
    seen: set[str] = set()
    todo = list(files)
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        if not f.endswith(".py"):
            continue
        tree = _parse(root / f)
        todo.extend(_code_files(tree, f, root) - seen)
        # a module of EAGER_ONLY contributes its module-level imports, not those inside its functions
        eager = [n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)]
        nodes = eager if f in EAGER_ONLY else [tree]
        todo.extend(imported_modules(nodes, _module_name(f), root) - seen)
    return sorted(seen)


def _command_functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """``{command name: function}`` of the Typer commands in ``cli.py`` (``@app.command()`` takes the function's
    name with ``_`` -> ``-``; ``@x.command("name")`` the given name)."""
    out: dict[str, ast.FunctionDef] = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "command":
                name = (dec.args[0].value if dec.args and isinstance(dec.args[0], ast.Constant)
                        else node.name.replace("_", "-"))
                out.setdefault(name, node)
    return out


def _bound_names(fn: ast.FunctionDef) -> set[str]:
    """Names ``fn`` binds itself (arguments, assignment/loop/with targets, nested definitions): they shadow the
    module's functions of the same name."""
    a = fn.args
    names = {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, *(v for v in (a.vararg, a.kwarg) if v))}
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node is not fn:
            names.add(node.name)
    return names


def entry_modules(cmd: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """The module files a stage command ``("bnnpan", "<command>", ...)`` enters through (see the module docstring)."""
    cli_file = f"{PACKAGE}/cli.py"
    tree = _parse(root / cli_file)
    commands = _command_functions(tree)
    if len(cmd) < 2 or cmd[0] != PACKAGE or cmd[1] not in commands:
        raise ValueError(f"not a bnnpan command line: {cmd!r} (commands: {sorted(commands)})")
    helpers = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    # the command function, and the cli.py helpers it calls by name (or is decorated with), transitively
    funcs, todo = {}, [commands[cmd[1]]]
    while todo:
        fn = todo.pop()
        if fn.name in funcs:
            continue
        funcs[fn.name] = fn
        local = _bound_names(fn)  # a local `run = ...` is not the `run` command
        for node in ast.walk(fn):
            if isinstance(node, ast.Name) and node.id in helpers and node.id not in funcs and node.id not in local:
                todo.append(helpers[node.id])
    top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    return sorted(imported_modules([*top_level, *funcs.values()], f"{PACKAGE}.cli", root) - {cli_file})


def code_deps(cmd: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """Every package module the stage command ``cmd`` can execute (sorted paths relative to ``root``)."""
    if len(cmd) < 2:
        raise ValueError(f"not a bnnpan command line: {cmd!r}")
    # one analysis per command and state of the package (a DAG has hundreds of stages, a few kinds of command)
    stamp = tuple(sorted((str(f), f.stat().st_mtime_ns) for f in (root / PACKAGE).rglob("*.py")))
    return list(_code_deps_cached(tuple(cmd[:2]), root, stamp))


@cache
def _code_deps_cached(cmd: tuple[str, ...], root: Path, stamp: tuple) -> tuple[str, ...]:
    return tuple(closure(entry_modules(cmd, root), root))


def dynamic_imports(root: Path = ROOT) -> list[str]:
    """``file:line`` of every ``importlib.import_module`` / ``__import__`` call in the package: imports by string,
    which :func:`closure` cannot follow."""
    hits = []
    for f in sorted((root / PACKAGE).rglob("*.py")):
        for node in ast.walk(_parse(f)):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in ("import_module", "__import__"):
                    hits.append(f"{f.relative_to(root).as_posix()}:{node.lineno}")
    return hits
