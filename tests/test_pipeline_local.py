"""The local executor of profile runs (bnnpan.pipeline.local): dependency order, the core and resource
limits, and a failure that stops the run with the failed stage's log. Real child processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bnnpan.cli import profile_limits
from bnnpan.config import ConfigError, load_params
from bnnpan.pipeline import Stage, build_stages
from bnnpan.pipeline.local import StageFailed, dependencies, run_stages

REPO = Path(__file__).resolve().parents[1]

# A stage: record (name, start, end) in <out>.json after sleeping, having checked that its inputs exist.
SCRIPT = """
import json, sys, time, pathlib
out, sleep, fail, *deps = sys.argv[1:]
missing = [d for d in deps if not pathlib.Path(d).exists()]
if missing:
    sys.exit(f"missing inputs {missing}")
t0 = time.time(); time.sleep(float(sleep)); t1 = time.time()
if fail == "1":
    print("something went wrong in this stage"); sys.exit(3)
p = pathlib.Path(out); p.parent.mkdir(parents=True, exist_ok=True)
p.write_text(json.dumps([t0, t1]))
"""


def stage(tmp: Path, name: str, deps: tuple[str, ...] = (), sleep: float = 0.3, fail: bool = False,
          resources: dict | None = None, out: str | None = None, threads: int | None = 1, priority: int = 0) -> Stage:
    out = out or f"out/{name}.json"
    cmd = (sys.executable, "-c", SCRIPT, str(tmp / out), str(sleep), "1" if fail else "0",
           *(str(tmp / d) for d in deps))
    return Stage(name=name, cmd=cmd, deps=deps, params=(), outs=(out,), resources=resources or {}, threads=threads,
                 priority=priority)


def spans(tmp: Path, names) -> dict[str, tuple[float, float]]:
    return {n: tuple(json.loads((tmp / f"out/{n}.json").read_text())) for n in names}


def max_overlap(sp: dict[str, tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in sp.values()] + [(b, -1) for _, b in sp.values()], key=lambda e: (e[0], e[1]))
    now = top = 0
    for _, d in events:
        now += d
        top = max(top, now)
    return top


def run(tmp: Path, stages, **kw) -> list[str]:
    said: list[str] = []
    run_stages(stages, lambda s: list(s.cmd), log_dir=tmp / "logs", echo=said.append, **kw)
    return said


def test_dependencies_follow_paths_files_and_directories(tmp_path):
    a = stage(tmp_path, "a", out="data/a")  # a directory output
    b = stage(tmp_path, "b", deps=("data/a/x.h5",))  # reads a file inside it
    c = stage(tmp_path, "c", deps=("out",))  # reads a directory holding b's output
    d = stage(tmp_path, "d", deps=("bnnpan/data",))  # code only
    assert dependencies([a, b, c, d]) == {"a": set(), "b": {"a"}, "c": {"b"}, "d": set()}


def test_independent_stages_run_side_by_side_and_dependents_after(tmp_path):
    first = stage(tmp_path, "first")
    mids = [stage(tmp_path, f"mid{i}", deps=("out/first.json",), sleep=0.6) for i in range(4)]
    last = stage(tmp_path, "last", deps=tuple(f"out/mid{i}.json" for i in range(4)))
    run(tmp_path, [first, *mids, last], cores=2)
    sp = spans(tmp_path, ["first", *(m.name for m in mids), "last"])
    assert all(sp[m.name][0] >= sp["first"][1] for m in mids)
    assert sp["last"][0] >= max(sp[m.name][1] for m in mids)
    mid_spans = {k: v for k, v in sp.items() if k.startswith("mid")}
    assert max_overlap(mid_spans) == 2  # two at once: never more than cores, and not one at a time
    assert (tmp_path / "logs/mid0.log").is_file()


def test_one_core_runs_one_stage_at_a_time(tmp_path):
    stages = [stage(tmp_path, f"s{i}") for i in range(3)]
    run(tmp_path, stages, cores=1)
    assert max_overlap(spans(tmp_path, [s.name for s in stages])) == 1


def test_the_longest_chain_starts_first(tmp_path):
    """A ready stage of higher priority starts before earlier-listed ones, as the default DAG's prior does."""
    short = [stage(tmp_path, f"short{i}", sleep=0.1) for i in range(2)]
    chain = stage(tmp_path, "prior", sleep=0.1, priority=1)
    run(tmp_path, [*short, chain], cores=1)
    sp = spans(tmp_path, ["short0", "short1", "prior"])
    assert sp["prior"][1] <= min(sp["short0"][0], sp["short1"][0])
    assert sp["short0"][1] <= sp["short1"][0]  # otherwise the list's order
    names = {s.name: s for s in build_stages(load_params(REPO / "params.yaml"))}
    assert names["pretrain_prior_landsat8"].priority == names["train_landsat8_bnnpan"].priority == 2
    assert names["train_landsat8_fp"].priority == 1 and names["evaluate_landsat8_exp"].priority == 0


def test_stages_using_every_core_run_alone(tmp_path):
    """``threads: null`` (every core): a training runs alone; 1-thread stages fill the cores around it."""
    wide = [stage(tmp_path, f"wide{i}", sleep=0.5, threads=None) for i in range(2)]
    narrow = [stage(tmp_path, f"narrow{i}", sleep=0.5) for i in range(2)]
    run(tmp_path, [*wide, *narrow], cores=2)
    sp = spans(tmp_path, [s.name for s in [*wide, *narrow]])
    for w in wide:
        assert all(b <= sp[w.name][0] or a >= sp[w.name][1] for k, (a, b) in sp.items() if k != w.name), w.name
    assert max_overlap({k: v for k, v in sp.items() if k.startswith("narrow")}) == 2


def test_a_resource_limit_keeps_trainings_one_at_a_time(tmp_path):
    trains = [stage(tmp_path, f"train{i}", sleep=0.5, resources={"train": 1}) for i in range(3)]
    evals = [stage(tmp_path, f"eval{i}", sleep=0.5) for i in range(2)]
    run(tmp_path, [*trains, *evals], cores=3, limits={"train": 1})
    sp = spans(tmp_path, [s.name for s in [*trains, *evals]])
    assert max_overlap({k: v for k, v in sp.items() if k.startswith("train")}) == 1
    assert max_overlap(sp) >= 2  # evaluate jobs still run beside a training


def test_a_failure_stops_new_stages_and_raises_with_the_log(tmp_path):
    bad = stage(tmp_path, "bad", fail=True, sleep=0.1)
    slow = stage(tmp_path, "slow", sleep=1.0)  # running when `bad` fails: it finishes
    after = stage(tmp_path, "after", deps=("out/bad.json",))
    never = stage(tmp_path, "never")
    with pytest.raises(StageFailed) as e:
        run(tmp_path, [bad, slow, after, never], cores=2)
    assert e.value.stage == "bad" and e.value.returncode == 3
    assert "something went wrong in this stage" in str(e.value)
    assert (tmp_path / "out/slow.json").is_file()
    assert not (tmp_path / "out/after.json").exists() and not (tmp_path / "out/never.json").exists()


def test_bad_limits_are_errors_before_anything_runs(tmp_path):
    s = stage(tmp_path, "t", resources={"train": 2})
    with pytest.raises(ValueError, match="more than the limit"):
        run(tmp_path, [s], cores=2, limits={"train": 1})
    with pytest.raises(ValueError, match="cores"):
        run(tmp_path, [s], cores=0)
    assert not (tmp_path / "out").exists()


def test_profile_limits_are_the_snakemake_profiles(tmp_path):
    assert profile_limits(REPO / "profiles/default") == {}  # the stages' threads pace the trainings
    (tmp_path / "config.yaml").write_text("cores: 2\nresources:\n  - train=1\n  - gpu=2\n")
    assert profile_limits(tmp_path) == {"train": 1, "gpu": 2}
    (tmp_path / "config.yaml").write_text("resources:\n  - train=x\n")
    with pytest.raises(ConfigError, match="train=x"):
        profile_limits(tmp_path)
    with pytest.raises(ConfigError, match="no such"):
        profile_limits(tmp_path / "missing")


def test_every_profile_orders_trainings_after_their_data_and_the_report_last():
    """On the real stage lists of the shipped profiles: each train stage waits for its dataset's prepare
    (and BNNPan for its prior), and the report waits for every evaluate stage."""
    for prof in sorted((REPO / "profiles").glob("*/params.yaml")):
        stages = build_stages(load_params(prof))
        deps = dependencies(stages)
        for s in stages:
            if s.name.startswith("train_"):
                assert any(d.startswith("prepare_") for d in deps[s.name]), (prof, s.name)
            if s.name.startswith("evaluate_"):
                assert s.name in deps["report"], (prof, s.name)
        def reads_prior(s: Stage) -> bool:
            return any(Path(d).name.startswith("prior") and not d.startswith("bnnpan/") for d in s.deps)

        with_prior = [s for s in stages if s.name.startswith("train_") and reads_prior(s)]
        assert with_prior or "bnnpan" not in {m.split("_")[0] for m in load_params(prof).train.methods}, prof
        for s in with_prior:  # BNNPan reads its pretrained prior
            assert any(d.startswith("pretrain_prior_") for d in deps[s.name]), (prof, s.name)
