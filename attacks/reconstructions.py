"""Writing an image attack's reconstructions: the HDF5 of test reconstructions and the PNG grid.

Any attack whose result holds ``reconstructions`` (float32 [N, C, H, W]), ``test_rows`` (their
store rows), ``best`` (the model that made them), ``ssim_per_image`` and ``mean_image_array``
can use these writers (the decoders, the inversion and the substitute attacks do).
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from leakaudit import __version__
from leakaudit.errors import DataError
from leakaudit.store import ActivationStore

RECONSTRUCTIONS_SCHEMA = "leakaudit.reconstructions"


def _atomic_path(path: Path):
    """A temporary file beside ``path``; the caller renames it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def save_reconstructions(result: Any, path: str | Path, *, store_path: str | Path | None = None) -> Path:
    """Write the best decoder's test reconstructions to HDF5, atomically (temp file + rename).

    Layout: ``/rows`` (store rows), ``/reconstructions`` float32 [N, C, H, W] of the best
    decoder, ``/ssim/<decoder>`` per-image SSIM of every decoder and of ``mean-image``,
    ``/mean_image`` [C, H, W]; attributes ``schema``, ``schema_version``, ``decoder``,
    ``store``, ``tool_version``, ``created``.
    """
    import h5py

    path = Path(path)
    if result.reconstructions is None or result.test_rows is None:
        raise DataError("this decoder result holds no reconstructions to save.")
    if len(result.reconstructions) < len(result.test_rows):
        raise DataError(
            f"only {len(result.reconstructions)} of the {len(result.test_rows):,} test reconstructions were kept: the test "
            "role exceeded the memory budget and was streamed. Raise --memory-budget to save them all."
        )
    tmp = _atomic_path(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["schema"] = RECONSTRUCTIONS_SCHEMA
            f.attrs["schema_version"] = 1
            f.attrs["decoder"] = result.best
            f.attrs["store"] = str(store_path or "")
            f.attrs["tool_version"] = __version__
            f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            f.create_dataset("rows", data=np.asarray(result.test_rows, dtype=np.int64))
            f.create_dataset("reconstructions", data=np.asarray(result.reconstructions, dtype=np.float32))
            group = f.create_group("ssim")
            for name, values in result.ssim_per_image.items():
                group.create_dataset(name, data=np.asarray(values, dtype=np.float32))
            if result.mean_image_array is not None:
                f.create_dataset("mean_image", data=np.asarray(result.mean_image_array, dtype=np.float32))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def image_grid(originals: np.ndarray, reconstructions: np.ndarray, *, scale: int | None = None, pad: int = 2) -> np.ndarray:
    """A uint8 image: ``originals`` in the top row, ``reconstructions`` below, [H', W', C].

    Small images are enlarged (nearest neighbour) to about 64 pixels so that the grid can be read.
    """
    n, channels, height, width = originals.shape
    scale = scale or max(1, 64 // max(height, width))
    cell_h, cell_w = height * scale + pad, width * scale + pad
    grid = np.ones((2 * cell_h + pad, n * cell_w + pad, channels), dtype=np.float32)
    for row, images in enumerate((originals, reconstructions)):
        for i, image in enumerate(images):
            big = np.repeat(np.repeat(np.transpose(image, (1, 2, 0)), scale, axis=0), scale, axis=1)
            top, left = pad + row * cell_h, pad + i * cell_w
            grid[top : top + height * scale, left : left + width * scale] = big
    return (np.clip(grid, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_grid(result: Any, store: ActivationStore, path: str | Path, *, columns: int = 8) -> Path:
    """Write a PNG of the first ``columns`` test images above their reconstructions, atomically."""
    from io import BytesIO

    from PIL import Image

    from leakaudit._io import atomic_write_bytes

    if result.reconstructions is None or result.test_rows is None:
        raise DataError("this decoder result holds no reconstructions to draw.")
    count = min(columns, len(result.test_rows))
    originals = store.inputs(np.asarray(result.test_rows[:count]))
    grid = image_grid(originals, result.reconstructions[:count])
    # Grey for one channel, RGB for three; other channel counts show their first channel.
    image = Image.fromarray(grid if grid.shape[-1] == 3 else grid[..., 0])
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
