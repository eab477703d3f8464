"""Read runs back from their TensorBoard event files."""

import struct
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def load_scalars(run_dir) -> dict:
    """{tag: (steps, wall_times, values)} as numpy arrays, for every scalar tag of the run."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = (
            np.array([e.step for e in events]),
            np.array([e.wall_time for e in events]),
            np.array([e.value for e in events]),
        )
    return out


def truncated_at(path) -> "int | None":
    """Where an event file stops holding whole records, if it ends inside one (cut short: a copy that stopped, a
    full disk), else None. TensorBoard reads such a file up to the cut and says nothing. A record (TFRecord) is
    its length (8 bytes, little-endian), that length's CRC (4), the data, the data's CRC (4)."""
    data = Path(path).read_bytes()
    at = 0
    while at < len(data):
        if at + 12 > len(data):
            return at
        (length,) = struct.unpack_from("<Q", data, at)
        if at + 12 + length + 4 > len(data):
            return at
        at += 12 + length + 4
    return None


def first_crossing(values: np.ndarray, threshold: float, window: int) -> "int | None":
    """Index of the first episode at which the mean of the last `window` episodes is >= threshold."""
    if len(values) < window:
        return None
    means = np.convolve(values, np.ones(window) / window, mode="valid")
    hits = np.nonzero(means >= threshold)[0]
    return None if len(hits) == 0 else int(hits[0]) + window - 1


def newest_run(parent: Path, pattern: str) -> Path:
    runs = sorted(Path(parent).glob(pattern), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no run matching {pattern} in {parent}")
    return runs[-1]
