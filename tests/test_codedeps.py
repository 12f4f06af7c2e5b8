"""Each stage's code deps are derived from the package's import graph (bnnpan/codedeps.py), not hand-written lists:
they must agree with what Python really imports, and a module newly imported by a stage must show up in dvc.yaml."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bnnpan.codedeps import EAGER_ONLY, closure, code_deps, dynamic_imports, entry_modules, imported_modules
from bnnpan.config import load_params
from bnnpan.pipeline import build_stages
from tests.test_pipeline import PROFILES

REPO = Path(__file__).resolve().parents[1]
KINDS = ("check", "fetch", "prepare", "pretrain-prior", "train", "evaluate", "export", "fuse", "report")


def _code(deps) -> set[str]:
    return {d for d in deps if d.startswith("bnnpan/")}


@pytest.mark.parametrize("params_file", PROFILES)
def test_every_stage_depends_on_exactly_its_derived_code(params_file, monkeypatch):
    """No stage lists code by hand: its bnnpan deps are the import closure of its command, nothing more or less."""
    monkeypatch.chdir(REPO)
    stages = build_stages(load_params(REPO / params_file))
    assert {s.cmd[1] for s in stages} <= set(KINDS)
    for s in stages:
        assert _code(s.deps) == set(code_deps(s.cmd)), s.name
        assert all((REPO / d).is_file() for d in _code(s.deps)), s.name


def test_every_stage_kind_has_its_own_module_among_its_deps():
    own = {"fetch": "data/sources.py", "prepare": "data/prepare.py", "pretrain-prior": "train/prior.py",
           "train": "train/run.py", "evaluate": "eval/evaluate.py", "export": "deploy/export.py",
           "fuse": "deploy/fuse.py", "report": "report/build.py", "check": "pipeline/stages.py"}
    for kind, module in own.items():
        deps = code_deps(("bnnpan", kind))
        assert f"bnnpan/{module}" in deps, kind
        assert "bnnpan/cli.py" not in deps  # argument plumbing, shared by every command (see bnnpan/codedeps.py)
    # a training does not depend on the report, the deploy code or the data download; the report not on the models
    assert not any(d.startswith(("bnnpan/report/", "bnnpan/deploy/")) for d in code_deps(("bnnpan", "train")))
    assert "bnnpan/data/download.py" not in code_deps(("bnnpan", "train"))
    assert not any(d.startswith("bnnpan/models/") for d in code_deps(("bnnpan", "report")))


def test_what_python_really_imports_is_among_the_derived_deps():
    """Independent of the static analysis: import each command's entry modules in a fresh interpreter and compare
    the bnnpan modules Python loaded (the module-level import graph, run for real) with the derived deps."""
    script = ("import json, sys, importlib\n"
              "import bnnpan.cli\n"
              "for m in sys.argv[1:]:\n"
              "    importlib.import_module(m)\n"
              "print(json.dumps(sorted(getattr(v, '__file__', None) or '' for k, v in sys.modules.items()\n"
              "                        if k == 'bnnpan' or k.startswith('bnnpan.'))))\n")
    for kind in KINDS:
        entries = [f.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for f in entry_modules(
            ("bnnpan", kind))]
        r = subprocess.run([sys.executable, "-c", script, *entries], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        loaded = {Path(f).resolve().relative_to(REPO).as_posix() for f in json.loads(r.stdout.splitlines()[-1])}
        missing = loaded - {"bnnpan/cli.py"} - set(code_deps(("bnnpan", kind)))
        assert not missing, f"{kind}: imported but not a dep: {sorted(missing)}"


def test_lazy_imports_of_the_eager_only_modules_are_deps_of_the_stages_that_use_them():
    """config.py's function-level imports (the model registry, for Params.prior_methods) are not followed from every
    stage (bnnpan/codedeps.py, EAGER_ONLY). The stages that call those methods must reach the modules anyway."""
    assert EAGER_ONLY == {"bnnpan/config.py"}
    tree = ast.parse((REPO / "bnnpan/config.py").read_text())
    lazy = closure(imported_modules([tree], "bnnpan.config"))
    assert "bnnpan/models/networks.py" in lazy
    for kind in ("check", "pretrain-prior", "train"):
        assert set(lazy) <= set(code_deps(("bnnpan", kind))), kind


def test_no_import_by_string_hides_from_the_analysis():
    assert dynamic_imports() == []


def test_a_module_newly_imported_by_train_shows_up_in_its_dvc_yaml_deps(tmp_path):
    """On a copy of the package: train/run.py gets a lazy import of a new module (inside a function, as the CLI
    imports); `bnnpan dag write` puts it in every train stage's deps, and in no stage that does not import it."""
    shutil.copytree(REPO / "bnnpan", tmp_path / "bnnpan", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "bnnpan/train/schedule_extra.py").write_text("WARMUP = 3\n")
    run_py = tmp_path / "bnnpan/train/run.py"
    src = run_py.read_text()
    anchor = "def train_method("
    assert anchor in src
    run_py.write_text(src.replace(anchor, "def _extra() -> int:\n    from bnnpan.train.schedule_extra import WARMUP\n\n"
                                          "    return WARMUP\n\n\n" + anchor, 1))
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(tmp_path), "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "bnnpan.cli", "dag", "write"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    new = "bnnpan/train/schedule_extra.py"
    with_new = {name for name, st in stages.items() if new in st["deps"]}
    trains = {name for name in stages if name.startswith(("train_", "pretrain_prior_"))}
    assert trains and trains <= with_new  # pretrain-prior imports train/run.py too
    assert not any(name.startswith(("fetch_", "prepare_", "report")) for name in with_new)
    # and the repository's own dvc.yaml does not have it (the copy was really what changed)
    assert new not in (REPO / "dvc.yaml").read_text()


def test_non_python_code_a_module_runs_is_a_dep_of_the_stages_that_import_it(tmp_path):
    """The packed runtime's C++ source (compiled on first use) is named by its module's CODE_FILES: evaluate and
    fuse run it, so it is among their deps; a CODE_FILES entry that is not there is an error, not a silent gap."""
    for kind in ("evaluate", "fuse"):
        assert "bnnpan/models/csrc/binconv.cpp" in code_deps(("bnnpan", kind)), kind
    assert "bnnpan/models/csrc/binconv.cpp" not in code_deps(("bnnpan", "report"))
    pkg = tmp_path / "bnnpan"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text('CODE_FILES = ("kernels/k.c",)\n')
    with pytest.raises(FileNotFoundError, match="kernels/k.c"):
        closure(["bnnpan/a.py"], tmp_path)
    (pkg / "kernels").mkdir()
    (pkg / "kernels" / "k.c").write_text("int f(void) { return 0; }\n")
    assert closure(["bnnpan/a.py"], tmp_path) == ["bnnpan/a.py", "bnnpan/kernels/k.c"]
