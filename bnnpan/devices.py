"""The ``device`` setting turned into a concrete ``torch.device``.

``params.yaml``'s ``device`` is validated at load time (:data:`bnnpan.config.DEVICE_RE`: ``cpu``, ``cuda``
or ``cuda:N``); this module checks it against the machine at run time. ``cuda`` means *the current GPU*
(``torch.cuda.current_device()``, i.e. GPU 0 unless ``CUDA_VISIBLE_DEVICES`` or the caller chose another);
under ``torchrun`` it means the rank's own GPU, ``cuda:$LOCAL_RANK``. The result always carries an index:
``torch.cuda.set_device`` and DistributedDataParallel's ``device_ids`` refuse an index-less CUDA device.
"""

from __future__ import annotations

import torch

from bnnpan.config import DEVICE_RE, ConfigError


class DeviceError(ConfigError):
    """The ``device`` setting names a device this machine does not have (one line, names the key)."""


def resolve_device(spec: str | torch.device, local_rank: int | None = None) -> torch.device:
    """``cpu`` -> CPU; ``cuda`` -> ``cuda:<current>`` (or ``cuda:<local_rank>`` under torchrun); ``cuda:N`` checked.

    Raises :class:`DeviceError` for an unsupported string, a machine without a usable CUDA GPU, or an index
    past ``torch.cuda.device_count()``.
    """
    text = str(spec)
    if not DEVICE_RE.match(text):
        raise DeviceError(f"device {text!r} is not supported: use cpu, cuda (the current GPU) or cuda:N")
    dev = torch.device(text)
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise DeviceError(f"device {text!r}: torch {torch.__version__} sees no CUDA GPU on this machine "
                          f"(CUDA build: {torch.version.cuda or 'none'}); set `device: cpu` in params.yaml")
    count = torch.cuda.device_count()
    index = dev.index
    if index is None:
        index = local_rank if local_rank is not None else torch.cuda.current_device()
    if not 0 <= index < count:
        raise DeviceError(f"device {text!r}: GPU index {index} does not exist (this machine has {count} "
                          f"CUDA device(s): cuda:0 .. cuda:{count - 1})")
    return torch.device("cuda", index)
