"""The sensor table: bands, display bands, radiometric scale, resolution ratio and MTF gains.

One place in the code holds what the protocol needs to know about a sensor
(``shared/design/protocol.md``, "Scenes and sensors"):

* the MS bands in their order, each with the amplitude of the sensor's MTF at the
  Nyquist frequency (the *Nyquist gain*, Aiazzi et al. 2006; values of the toolbox of
  Vivone et al. 2015), and the PAN gain;
* the RGB display bands (by name, so a scene that keeps a subset of the bands still
  finds them);
* the bit depth and the *scale* used to normalise DN (``2**storage_bits - 1``; loaders
  divide by it and never guess it from the data);
* the PAN/MS resolution ratio.

Landsat 8/9 OLI: the sensor quantises to 12 bits but Level-1 products store 16-bit
scaled DN (values of 5 000-40 000 are normal), so the scale is 65535. The MS gains of
0.30 are **our choice** (no measured values are published in the toolbox); the PAN
band (0.50-0.68 um) does not cover NIR, so B5 is only usable with that caveat.
An unknown sensor is an error that lists the known ones.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sensor:
    """Static description of one sensor (see the module docstring for the sources)."""

    name: str
    title: str
    bands: tuple[str, ...]
    ms_gains: tuple[float, ...]
    pan_gain: float
    bits: int
    storage_bits: int
    ratio: int
    rgb: tuple[str, str, str]
    note: str = ""

    def __post_init__(self) -> None:
        if len(self.bands) != len(self.ms_gains):
            raise ValueError(f"sensor {self.name}: {len(self.bands)} bands but {len(self.ms_gains)} gains")
        if any(b not in self.bands for b in self.rgb):
            raise ValueError(f"sensor {self.name}: RGB bands {self.rgb} not all in {self.bands}")
        if not all(0.0 < g < 1.0 for g in (*self.ms_gains, self.pan_gain)):
            raise ValueError(f"sensor {self.name}: Nyquist gains must lie in (0, 1)")

    @property
    def scale(self) -> float:
        """DN normalisation constant: 2**storage_bits - 1 (2047 for 11 bit, 65535 for Landsat L1)."""
        return float(2**self.storage_bits - 1)

    def select(self, bands: list[str] | tuple[str, ...] | None) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """Validate a band subset (``None`` = all bands) and return (names, gains) in that order."""
        if bands is None:
            return self.bands, self.ms_gains
        unknown = [b for b in bands if b not in self.bands]
        if unknown:
            raise ValueError(
                f"sensor {self.name} has no band(s) {unknown}; its bands are {list(self.bands)}"
            )
        if len(set(bands)) != len(bands):
            raise ValueError(f"duplicate band names in {list(bands)}")
        idx = [self.bands.index(b) for b in bands]
        return tuple(bands), tuple(self.ms_gains[i] for i in idx)

    def rgb_indices(self, bands: tuple[str, ...] | list[str]) -> tuple[int, int, int] | None:
        """Indices of the R, G, B display bands within ``bands`` (None if one is missing)."""
        if not all(b in bands for b in self.rgb):
            return None
        return tuple(list(bands).index(b) for b in self.rgb)  # type: ignore[return-value]


_WV2_BANDS = ("coastal", "blue", "green", "yellow", "red", "red_edge", "nir1", "nir2")
_L8_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7")

SENSORS: dict[str, Sensor] = {
    s.name: s
    for s in (
        Sensor("quickbird", "QuickBird", ("blue", "green", "red", "nir"),
               (0.34, 0.32, 0.30, 0.22), 0.15, 11, 11, 4, ("red", "green", "blue")),
        Sensor("ikonos", "IKONOS", ("blue", "green", "red", "nir"),
               (0.26, 0.28, 0.29, 0.28), 0.17, 11, 11, 4, ("red", "green", "blue")),
        Sensor("geoeye1", "GeoEye-1", ("blue", "green", "red", "nir"),
               (0.23, 0.23, 0.23, 0.23), 0.16, 11, 11, 4, ("red", "green", "blue")),
        Sensor("worldview2", "WorldView-2", _WV2_BANDS,
               (0.35,) * 7 + (0.27,), 0.11, 11, 11, 4, ("red", "green", "blue")),
        Sensor("worldview3", "WorldView-3", _WV2_BANDS,
               (0.325, 0.355, 0.360, 0.350, 0.365, 0.360, 0.335, 0.315), 0.14, 11, 11, 4,
               ("red", "green", "blue")),
        Sensor("gaofen2", "GaoFen-2", ("blue", "green", "red", "nir"),
               (0.30, 0.30, 0.30, 0.30), 0.15, 10, 10, 4, ("red", "green", "blue"),
               note="gains: toolbox default"),
        Sensor("landsat8", "Landsat-8 OLI", _L8_BANDS, (0.30,) * 7, 0.15, 12, 16, 2,
               ("B4", "B3", "B2"),
               note="MS gains 0.30 are our choice; L1 stores 16-bit scaled DN; PAN does not cover NIR"),
        Sensor("landsat9", "Landsat-9 OLI-2", _L8_BANDS, (0.30,) * 7, 0.15, 14, 16, 2,
               ("B4", "B3", "B2"),
               note="as landsat8 (OLI-2 quantises to 14 bits; L1 stores 16-bit scaled DN)"),
    )
}

# Sensor names as the pan-sharpening toolboxes write them in a .mat's `sensor` variable -> sensor names.
MAT_SENSORS: dict[str, str] = {
    "wv2": "worldview2", "worldview2": "worldview2", "worldview-2": "worldview2",
    "wv3": "worldview3", "worldview3": "worldview3", "worldview-3": "worldview3",
    "qb": "quickbird", "quickbird": "quickbird",
    "ikonos": "ikonos", "ik": "ikonos",
    "geoeye1": "geoeye1", "geoeye-1": "geoeye1", "ge1": "geoeye1", "ge": "geoeye1",
    "gf2": "gaofen2", "gaofen2": "gaofen2", "gaofen-2": "gaofen2",
    "landsat8": "landsat8", "l8": "landsat8", "landsat9": "landsat9", "l9": "landsat9",
}


def sensor_from_alias(text: str) -> Sensor:
    """A toolbox sensor string (``WV3``, ``QB``, ``GeoEye1``, ``GF2``, ...) or a sensor name -> the sensor."""
    key = text.strip().lower().replace(" ", "").replace("_", "")
    name = MAT_SENSORS.get(key) or (key if key in SENSORS else None)
    if name is None:
        raise ValueError(f"unknown sensor {text!r}; known: {', '.join(sorted(set(MAT_SENSORS) | set(SENSORS)))}")
    return SENSORS[name]


# STAC / Maxar platform codes -> sensor names (read from the item, never from the id).
PLATFORMS: dict[str, str] = {
    "WV02": "worldview2", "worldview-2": "worldview2",
    "WV03": "worldview3", "worldview-3": "worldview3",
    "GE01": "geoeye1", "geoeye-1": "geoeye1",
    "QB02": "quickbird", "quickbird-2": "quickbird",
    "landsat-8": "landsat8", "landsat-9": "landsat9",
}


def get_sensor(name: str) -> Sensor:
    """Look a sensor up by name; an unknown name raises a ValueError listing the known ones."""
    try:
        return SENSORS[name]
    except KeyError:
        raise ValueError(f"unknown sensor {name!r}; known sensors: {', '.join(sorted(SENSORS))}") from None


def sensor_from_platform(platform: str) -> Sensor:
    """Map a STAC ``platform`` value (``WV02``, ``GE01``, ...) to a sensor."""
    key = PLATFORMS.get(platform) or PLATFORMS.get(platform.lower())
    if key is None:
        raise ValueError(f"unknown platform {platform!r}; known platforms: {', '.join(sorted(PLATFORMS))}")
    return SENSORS[key]
