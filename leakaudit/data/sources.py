"""Data sources (``--data``): images with optional labels and per-row arrays.

- ``digits`` — scikit-learn's 1,797 handwritten 8×8 digits, built in.
- ``idx:DIR[:train|:test]`` — MNIST-format idx files, gzipped or not (Fashion-MNIST from
  Debian's ``dataset-fashion-mnist`` lives in ``/usr/share/datasets/fashion-mnist``).
- ``folder:DIR`` — one sub-folder per class of image files.
- ``npz:FILE`` / ``hdf5:FILE`` — an image array (``x``, ``images``, ``inputs`` or ``data``),
  optional labels (``y``, ``labels`` or ``targets``), optional ``class_names`` (one string per
  label value) and further per-row arrays usable as tasks.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leakaudit.errors import DataError, UnknownNameError

IMAGE_KEYS = ("x", "X", "images", "inputs", "data")
LABEL_KEYS = ("y", "Y", "labels", "label", "targets")
CLASS_NAME_KEYS = ("class_names", "classes")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


@dataclass
class DataSource:
    """Rows of images with optional labels and per-row arrays.

    Attributes:
        spec: the spec as given.
        shape: native (C, H, W) of one image.
        labels: int64 labels, or ``None``.
        class_names: names of the label values, index = label.
        arrays: further per-row arrays (npz/HDF5 sources) usable as tasks.
    """

    spec: str
    shape: tuple[int, int, int]
    labels: np.ndarray | None
    class_names: list[str] | None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    _images: object = None  # array-like [N, C, H, W] (uint8 or float) or a loader

    def __len__(self) -> int:
        return len(self._images)  # type: ignore[arg-type]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a [B, C, H, W] uint8 or float array."""
        return np.asarray(self._images[start:stop])  # type: ignore[index]


class _ChannelsLast:
    """View of an [N, H, W, C] or [N, H, W] array as [N, C, H, W], read lazily."""

    def __init__(self, array, layout: str) -> None:
        self.array, self.layout = array, layout

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, item: slice) -> np.ndarray:
        block = np.asarray(self.array[item])
        if self.layout == "NHW":
            return block[:, None]
        if self.layout == "NHWC":
            return np.ascontiguousarray(block.transpose(0, 3, 1, 2))
        return block


class _FolderImages:
    def __init__(self, files: Sequence[Path], mode: str, size: tuple[int, int]) -> None:
        self.files, self.mode, self.size = list(files), mode, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: slice) -> np.ndarray:
        from PIL import Image

        rows = []
        for path in self.files[item]:
            try:
                with Image.open(path) as image:
                    image = image.convert(self.mode)
                    if image.size != (self.size[1], self.size[0]):
                        image = image.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
                    array = np.asarray(image, dtype=np.uint8)
            except OSError as exc:
                raise DataError(f"cannot read image {str(path)!r}: {exc}.") from None
            rows.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        return np.stack(rows)


def open_source(spec: str) -> DataSource:
    """Open the data source ``spec`` names (see the module docstring)."""
    kind, sep, rest = spec.partition(":")
    if spec == "digits":
        source = _digits()
    elif kind == "idx" and sep:
        source = _idx(spec, rest)
    elif kind == "folder" and sep:
        source = _folder(spec, Path(rest))
    elif kind == "npz" and sep:
        source = _npz(spec, Path(rest))
    elif kind in ("hdf5", "h5") and sep:
        source = _hdf5(spec, Path(rest))
    else:
        raise UnknownNameError(
            "data source",
            spec,
            ["digits", "idx:DIR", "folder:DIR", "npz:FILE", "hdf5:FILE"],
        )
    if len(source) == 0:
        raise DataError(f"data source {spec!r} is empty.")
    return source


def _digits() -> DataSource:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    return DataSource(
        "digits", (1, 8, 8), bunch.target.astype(np.int64), [str(c) for c in bunch.target_names], _images=images
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read idx file {str(path)!r}: {exc}.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{str(path)!r} is not an unsigned-byte idx file (bad magic number).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"idx file {str(path)!r} is truncated: expected {header + int(np.prod(dims))} bytes, got {len(raw)}.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx(spec: str, rest: str) -> DataSource:
    directory, part = rest, "train"
    head, sep, tail = rest.rpartition(":")
    if sep and tail in ("train", "test"):
        directory, part = head, tail
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"idx directory {directory!r} does not exist.")
    prefixes = ("train",) if part == "train" else ("t10k", "test")

    def find(kind: str) -> Path | None:
        for prefix in prefixes:
            for path in sorted(root.iterdir()):
                name = path.name
                if name.startswith(prefix) and kind in name and ("idx1" in name or "idx3" in name):
                    return path
        return None

    images_path, labels_path = find("images"), find("labels")
    if images_path is None:
        raise DataError(f"no {part} images idx file ({prefixes[0]}-images-idx3-ubyte[.gz]) in {directory!r}.")
    images = _read_idx(images_path)
    if images.ndim != 3:
        raise DataError(f"{str(images_path)!r} holds a {images.ndim}-D array; expected [N, H, W] images.")
    labels = None
    if labels_path is not None:
        labels = _read_idx(labels_path).astype(np.int64)
        if len(labels) != len(images):
            raise DataError(f"{len(images)} images but {len(labels)} labels in {directory!r}.")
    names = [str(i) for i in range(int(labels.max()) + 1)] if labels is not None and len(labels) else None
    return DataSource(spec, (1, *images.shape[1:]), labels, names, _images=_ChannelsLast(images, "NHW"))


def _folder(spec: str, root: Path) -> DataSource:
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(index)
    if not files:
        raise DataError(f"image folder {str(root)!r} has no images in class sub-folders.")
    from PIL import Image

    with Image.open(files[0]) as first:
        mode = "L" if first.mode in ("1", "L", "I", "I;16", "F") else "RGB"
        width, height = first.size
    channels = 1 if mode == "L" else 3
    return DataSource(
        spec,
        (channels, height, width),
        np.asarray(labels, dtype=np.int64),
        classes,
        _images=_FolderImages(files, mode, (height, width)),
    )


def _layout(shape: tuple[int, ...], where: str) -> str:
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        if shape[1] in (1, 3) and shape[-1] not in (1, 3):
            return "NCHW"
        if shape[-1] in (1, 3, 4):
            return "NHWC"
        if shape[1] in (1, 3, 4):
            return "NCHW"
    raise DataError(f"{where}: images of shape {shape} are not [N, H, W], [N, C, H, W] or [N, H, W, C].")


def _array_source(spec: str, container: Mapping, keys: Sequence[str], where: str) -> DataSource:
    image_key = next((k for k in IMAGE_KEYS if k in keys), None)
    if image_key is None:
        raise DataError(f"{where} has no image array; expected one named {', '.join(IMAGE_KEYS)} (found: {', '.join(keys)}).")
    images = container[image_key]
    layout = _layout(tuple(images.shape), where)
    view = _ChannelsLast(images, layout) if layout != "NCHW" else images
    shape = tuple(images.shape)
    if layout == "NHW":
        chw = (1, shape[1], shape[2])
    elif layout == "NHWC":
        chw = (shape[3], shape[1], shape[2])
    else:
        chw = shape[1:4]
    label_key = next((k for k in LABEL_KEYS if k in keys), None)
    names_key = next((k for k in CLASS_NAME_KEYS if k in keys), None)
    labels = names = declared = None
    if names_key is not None:
        declared = _class_names(np.asarray(container[names_key]), f"{where}:{names_key}")
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        if key in (image_key, names_key):
            continue
        array = np.asarray(container[key])
        if array.ndim == 1 and len(array) == len(images):
            arrays[key] = array
    if label_key is not None and label_key in arrays:
        labels, names = _encode_labels(arrays[label_key], f"{where}:{label_key}", declared)
    elif declared is not None:
        raise DataError(f"{where}:{names_key} names classes, but there is no label array ({', '.join(LABEL_KEYS)}) for them.")
    c, h, w = (int(v) for v in chw)
    return DataSource(spec, (c, h, w), labels, names, arrays, _images=view)


def _npz(spec: str, path: Path) -> DataSource:
    if not path.is_file():
        raise DataError(f"npz file {str(path)!r} does not exist.")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {str(path)!r} as npz: {exc}.") from None
    try:
        return _array_source(spec, archive, list(archive.files), str(path))
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise DataError(f"{str(path)!r} holds pickled object arrays, which are not read: {exc}.") from None


def _hdf5(spec: str, path: Path) -> DataSource:
    import h5py

    if not path.is_file():
        raise DataError(f"HDF5 file {str(path)!r} does not exist.")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r} as HDF5: {exc}.") from None
    keys = [k for k in handle.keys() if isinstance(handle[k], h5py.Dataset)]
    return _array_source(spec, handle, keys, str(path))


def _class_names(values: np.ndarray, where: str) -> list[str]:
    if values.ndim != 1 or values.dtype.kind not in "USO" or len(values) == 0:
        raise DataError(f"{where}: expected a 1-D array of class name strings, got shape {values.shape} of {values.dtype}.")
    names = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    if len(set(names)) != len(names):
        raise DataError(f"{where}: class names must be distinct.")
    return names


def _encode_labels(
    values: np.ndarray, where: str, class_names: list[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Map label values to 0..K-1, keeping integer labels as they are when already 0..K-1.

    Integer labels are label values, so a negative one (or, with ``class_names``, one of K
    or more) is an error rather than a new class: relabelling it would shift every class.
    """
    if values.dtype.kind in "iu" or class_names is not None:
        if values.dtype.kind not in "iu":
            raise DataError(f"{where}: labels beside class_names must be integers 0..{len(class_names or ()) - 1}, got {values.dtype}.")
        top = len(class_names) - 1 if class_names is not None else int(values.max(initial=0))
        outside = values[(values < 0) | (values > top)]
        if len(outside):
            bad = int(outside[0])
            count = f" (and {len(outside) - 1} more rows)" if len(outside) > 1 else ""
            valid = f"the valid range 0..{top} of its {top + 1} class names" if class_names is not None else "valid labels 0..K-1"
            raise DataError(
                f"{where}: label value {bad}{count} is outside {valid}. "
                "Fix or drop those rows (labels are integers 0..K-1, or strings)."
            )
        return values.astype(np.int64), class_names or [str(i) for i in range(top + 1)]
    if values.dtype.kind == "b":
        return values.astype(np.int64), ["false", "true"]
    if values.dtype.kind in "fc":
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise DataError(f"{where}: labels must be integers or strings, got non-integer numbers.")
    uniques, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int64), [str(u.decode() if isinstance(u, bytes) else u) for u in uniques]
