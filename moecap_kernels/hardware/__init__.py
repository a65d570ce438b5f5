"""Hardware peaks: the denominators of S-MBU and S-MFU, one concept per module.

- ``datasheet``: vendor figures, kept as data in ``datasheet.json`` with each entry's source;
- ``device``: what a profile runs on (name, memory, last-level cache, cores, cache key);
- ``calibration``: figures measured on this machine, their trials' spread, cached;
- ``cpu_load``: how much CPU time other processes took while a calibration ran;
- ``peaks``: which figure divides (override > datasheet > calibration).

The names callers use are re-exported here.
"""

from moecap_kernels.hardware.calibration import (
    Calibration,
    cache_path,
    cached_calibration,
    calibrate,
    read_cache,
    save_calibration,
)
from moecap_kernels.hardware.datasheet import (
    DatasheetEntry,
    datasheet_entries,
    datasheet_entry,
    format_datasheet,
)
from moecap_kernels.hardware.device import DeviceInfo, detect_device, machine_id_for
from moecap_kernels.hardware.peaks import Peaks, resolve_peaks

__all__ = [
    "Calibration",
    "DatasheetEntry",
    "DeviceInfo",
    "Peaks",
    "cache_path",
    "cached_calibration",
    "calibrate",
    "datasheet_entries",
    "datasheet_entry",
    "detect_device",
    "format_datasheet",
    "machine_id_for",
    "read_cache",
    "resolve_peaks",
    "save_calibration",
]
