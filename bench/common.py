"""Shared set-up of the training benchmarks: the prepared dataset they run on."""

from __future__ import annotations

from pathlib import Path


def prepared_params(p, dataset: str, work: Path):
    """``p`` with ``paths.prepared`` pointing at a prepared ``dataset``.

    Uses ``<paths.prepared>/<dataset>`` when it is there; otherwise prepares it into ``work``, from
    ``<paths.raw>`` when the fetched scenes are there, else fetching them (verified downloads) first
    (an imported PanCollection dataset: its files, imported into ``work``).
    """
    from bnnpan.config import PanCollectionDataset
    from bnnpan.data.prepare import prepare_dataset

    if (Path(p.paths.prepared) / dataset / "train.h5").is_file():
        return p
    raw = Path(p.paths.raw)
    # an imported dataset (source: pancollection) has no scenes: its files are imported as they are
    scenes = [] if isinstance(p.datasets[dataset], PanCollectionDataset) else p.datasets[dataset].scenes
    if not all((raw / s / "scene.json").is_file() for s in scenes):
        from bnnpan.data.download import FetchContext
        from bnnpan.data.sources import fetch_scene

        raw = work / "raw"
        for s in scenes:
            fetch_scene(s, p.scenes[s], FetchContext(downloads=work / "dl", progress=False), raw / s)
    p = p.model_copy(update={"paths": p.paths.model_copy(update={
        "raw": str(raw), "prepared": str(work / "prepared"), "downloads": str(work / "dl")})})
    prepare_dataset(p, dataset)
    return p
