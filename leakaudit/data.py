"""Data sources, tasks and preprocessing.

Sources (``--data``):

- ``digits`` — scikit-learn's 1,797 handwritten 8×8 digits, built in.
- ``idx:DIR[:train|:test]`` — MNIST-format idx files, gzipped or not (Fashion-MNIST from
  Debian's ``dataset-fashion-mnist`` lives in ``/usr/share/datasets/fashion-mnist``).
- ``folder:DIR`` — one sub-folder per class of image files.
- ``npz:FILE`` / ``hdf5:FILE`` — an image array (``x``, ``images``, ``inputs`` or ``data``),
  optional labels (``y``, ``labels`` or ``targets``), optional ``class_names`` (one string per
  label value) and further per-row arrays usable as tasks.

Tasks (``--task NAME=SOURCE``): ``label``, ``parity``, ``threshold:K`` (label ≥ K),
``map:FILE.yaml`` (label or class name → group), or an array name of an npz/HDF5 source.

Every task has at least two classes in each role of the split (attacker-train,
attacker-validation, test): an attack on one class scores against nothing, and the drop it
reports would look like privacy.

Images are stored and scored in [0, 1] exactly as the model sees them (after resizing and
channel conversion); normalisation is applied only to the model's input, only when asked.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from leakaudit.errors import ConfigError, DataError, UnknownNameError

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
                        image = image.resize((self.size[1], self.size[0]), Image.BILINEAR)
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
    return DataSource(spec, tuple(int(c) for c in chw), labels, names, arrays, _images=view)


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


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """Labels of one task for every row of a source."""

    name: str
    source: str
    labels: np.ndarray
    class_names: list[str]


def parse_task_option(text: str) -> tuple[str, str]:
    """``NAME=SOURCE`` → (name, source); a bare ``SOURCE`` names itself."""
    name, sep, source = text.partition("=")
    if not sep:
        name, source = text, text
    name, source = name.strip(), source.strip()
    if not name or not source:
        raise ConfigError(f"--task expects NAME=SOURCE, got {text!r}.")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"task name {name!r} may use letters, digits, '-' and '_' only.")
    return name, source


def resolve_task(name: str, source: str, data: DataSource) -> Task:
    """Compute the labels of task ``name`` from ``source`` (see the module docstring).

    Raises:
        DataError: the source has no labels, or a label lies outside the task's classes.
        ConfigError: a malformed ``threshold:K`` or ``map:FILE.yaml``.
        UnknownNameError: ``source`` is none of the above nor an array of the data.
    """
    task = _resolve_task(name, source, data)
    labels = task.labels
    outside = labels[(labels < 0) | (labels >= len(task.class_names))] if len(labels) else labels
    if len(outside):
        raise DataError(
            f"task {name!r} ({source}): label value {int(outside[0])} is outside the valid range "
            f"0..{len(task.class_names) - 1} of its {len(task.class_names)} classes. "
            "Fix the labels of the data source or the task's definition."
        )
    return task


def _resolve_task(name: str, source: str, data: DataSource) -> Task:
    kind, sep, argument = source.partition(":")
    if source in ("label", "parity") or kind in ("threshold", "map"):
        if data.labels is None:
            raise DataError(f"task {name!r} needs labels, but data source {data.spec!r} has none.")
        labels = data.labels
        names = data.class_names or [str(i) for i in range(int(labels.max()) + 1)]
        if source == "label":
            return Task(name, source, labels, list(names))
        if source == "parity":
            return Task(name, source, labels % 2, ["even", "odd"])
        if kind == "threshold":
            try:
                k = int(argument)
            except ValueError:
                raise ConfigError(f"task {name!r}: threshold:K needs an integer K, got {argument!r}.") from None
            return Task(name, source, (labels >= k).astype(np.int64), [f"<{k}", f">={k}"])
        return _mapped_task(name, source, argument, labels, list(names))
    if source in data.arrays:
        labels, class_names = _encode_labels(data.arrays[source], f"{data.spec}:{source}")
        return Task(name, source, labels, class_names)
    known = ["label", "parity", "threshold:K", "map:FILE.yaml", *data.arrays]
    raise UnknownNameError(f"task source for {name!r}", source, known)


def _mapped_task(name: str, source: str, path: str, labels: np.ndarray, names: list[str]) -> Task:
    from leakaudit.config import load_yaml

    mapping = load_yaml(path, what="task map")
    if not isinstance(mapping, Mapping) or not mapping:
        raise ConfigError(f"task map {path!r} must map labels (or class names) to group names.")
    groups: dict[str, int] = {}
    lookup: dict[int, int] = {}
    for key, group in mapping.items():
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < len(names):
                raise DataError(
                    f"task {name!r}: map {path!r} maps label {key}, outside the valid range 0..{len(names) - 1} "
                    f"of the data's {len(names)} classes. Remove it or fix the label."
                )
            label = key
        elif str(key) in names:
            label = names.index(str(key))
        else:
            raise ConfigError(f"task map {path!r}: {key!r} is neither a label nor a class name.")
        if isinstance(group, bool) or not isinstance(group, (str, int)) or str(group).strip() == "":
            raise ConfigError(
                f"task {name!r}: map {path!r} maps {key!r} to {group!r}, which is not a group name. "
                "Give every label a group name (a string or an integer)."
            )
        if label in lookup:
            raise ConfigError(f"task {name!r}: map {path!r} maps label {label} ({names[label]!r}) twice; give it one group.")
        lookup[label] = groups.setdefault(str(group), len(groups))
    present = np.unique(labels)
    unmapped = [int(v) for v in present if int(v) not in lookup]
    if unmapped:
        raise ConfigError(f"task map {path!r} leaves labels unmapped: {', '.join(map(str, unmapped[:10]))}.")
    table = np.full(int(present.max()) + 1, -1, dtype=np.int64)
    for label, group in lookup.items():
        if label < len(table):
            table[label] = group
    return Task(name, source, table[labels], list(groups))


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """How raw rows become the model's input: size, channels, optional normalisation."""

    input_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def images(self, block: np.ndarray) -> torch.Tensor:
        """Raw rows → float32 [B, C, H, W] in [0, 1], as stored in ``/inputs``."""
        block = np.ascontiguousarray(block)
        if not block.flags.writeable:  # idx files are read-only buffers; torch wants writable memory
            block = block.copy()
        x = torch.from_numpy(block)
        scale = 1.0
        if x.dtype == torch.uint8:
            x, scale = x.float(), 1.0 / 255.0  # the scale folds into a small resize's weights
        elif x.dtype == torch.bool:
            x = x.float()
        else:
            x = x.float()
            if not torch.isfinite(x).all():
                raise DataError("input images contain NaN or infinite values.")
            low, high = float(x.min()), float(x.max())
            if low < -1e-6 or high > 1 + 1e-6:
                raise DataError(
                    f"float images must lie in [0, 1]; found values in [{low:.3g}, {high:.3g}]. "
                    "Scale them (or store uint8) before dumping."
                )
        channels = x.shape[1]
        if channels == 4:
            x, channels = x[:, :3], 3
        if channels != self.in_chans and not (channels == 1 or (channels == 3 and self.in_chans == 1)):
            raise DataError(f"cannot convert {channels}-channel images to the model's {self.in_chans} channels.")
        if channels == 3 and self.in_chans == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x * weights).sum(1, keepdim=True)
        if tuple(x.shape[-2:]) != self.input_size:
            x = resize(x, self.input_size, scale).clamp_(0.0, 1.0)
        elif scale != 1.0:
            x = x.mul_(scale)
        if x.shape[1] == 1 and self.in_chans > 1:
            # Gray to the model's channels after resizing: the same image, a third of the work.
            x = x.expand(-1, self.in_chans, -1, -1)
        return x.contiguous()

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the optional normalisation to stored inputs."""
        if self.mean is None or self.std is None:
            return x
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


SMALL_IMAGE = 64  # largest side resized by matrix products (faster than interpolate up to here)


def resize(x: torch.Tensor, size: tuple[int, int], scale: float = 1.0) -> torch.Tensor:
    """``scale · x`` resized bilinearly with antialiasing: ``F.interpolate``'s result.

    Bilinear resizing is separable, ``A_h · x · A_wᵀ``. For small images (every side up to
    ``SMALL_IMAGE``) two matrix products with those operators cost half of ``interpolate``'s
    kernel on one thread (28→32: 0.09 vs 0.21 s per 60,000 images), which is CPU the dump's
    forward pass keeps; the operators are ``interpolate``'s own (``_resize_operator``), so
    the images agree with it to float rounding (1.2e-7). Where every output row mixes at most
    two input rows (any enlargement), the second product is two row gathers instead
    (``_two_taps``: 28→32, 22 instead of 43 ms per 60,000 images). Larger images go to
    ``interpolate``.
    """
    batch, channels, height, width = x.shape
    out_h, out_w = size
    if max(height, width, out_h, out_w) > SMALL_IMAGE:
        if scale != 1.0:
            x = x * scale
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    a_h = _resize_operator(height, out_h)
    a_w = _resize_operator(width, out_w)
    if scale != 1.0:
        a_w = a_w * scale
    planes = batch * channels
    rows = (x.reshape(planes * height, width) @ a_w.T).view(planes, height, out_w)  # every row at once: one GEMM
    taps = _two_taps(height, out_h)
    if taps is None:
        out = torch.bmm(a_h.expand(planes, -1, -1), rows)
    else:
        first, second, w_first, w_second = taps
        out = rows.index_select(1, first).mul_(w_first).addcmul_(rows.index_select(1, second), w_second)
    return out.view(batch, channels, out_h, out_w)


@functools.lru_cache(maxsize=32)
def _two_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, ...] | None:
    """``_resize_operator(n_in, n_out)`` as two (index, weight) columns, if no row has more
    than two nonzero weights: output row i = w₁[i]·x[j₁[i]] + w₂[i]·x[j₂[i]]."""
    operator = _resize_operator(n_in, n_out)
    nonzero = [row.nonzero().flatten().tolist() for row in operator]
    if any(len(columns) > 2 for columns in nonzero):
        return None
    first = torch.tensor([columns[0] for columns in nonzero])
    second = torch.tensor([columns[-1] for columns in nonzero])
    rows = torch.arange(n_out)
    w_second = torch.where(first == second, 0.0, operator[rows, second])  # a one-tap row counts once
    return first, second, operator[rows, first].view(1, n_out, 1), w_second.view(1, n_out, 1)


@functools.lru_cache(maxsize=32)
def _resize_operator(n_in: int, n_out: int) -> torch.Tensor:
    """The [n_out, n_in] matrix of 1-D bilinear antialiased resizing, taken from ``interpolate``.

    Column i is the resized i-th basis vector. The basis is resized as one n_in × n_in image
    along its height only: ``interpolate`` returns wrong values for width-1 inputs.
    """
    basis = torch.eye(n_in).view(1, 1, n_in, n_in)
    out = F.interpolate(basis, size=(n_out, n_in), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].contiguous()


def preprocess_for(
    source: DataSource,
    *,
    model_input_size: tuple[int, int] | None,
    model_in_chans: int | None,
    input_size: tuple[int, int] | None = None,
    normalize: str | None = None,
) -> Preprocess:
    """How ``source`` is fed to a model: ``--input-size`` > the model's declared size > the data's."""
    in_chans = model_in_chans or source.shape[0]
    size = input_size or model_input_size or source.shape[1:]
    mean, std = parse_normalize(normalize, in_chans)
    return Preprocess((int(size[0]), int(size[1])), int(in_chans), mean, std)


def parse_normalize(text: str | None, in_chans: int) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``MEAN,STD`` (one value each, or one per channel separated by '/') → per-channel tuples."""
    if text is None:
        return None, None
    try:
        mean_text, std_text = text.split(",")
        mean = tuple(float(v) for v in mean_text.split("/"))
        std = tuple(float(v) for v in std_text.split("/"))
    except ValueError:
        raise ConfigError(
            f"--normalize expects MEAN,STD (per channel: M1/M2/M3,S1/S2/S3), got {text!r}."
        ) from None
    if len(mean) == 1:
        mean = mean * in_chans
    if len(std) == 1:
        std = std * in_chans
    if len(mean) != in_chans or len(std) != in_chans or any(s <= 0 for s in std):
        raise ConfigError(f"--normalize needs {in_chans} means and {in_chans} positive stds, got {text!r}.")
    return mean, std


def split_roles(
    source: DataSource, n: int, fractions: tuple[float, float, float], seed: int, tasks: Sequence[Task] = ()
) -> tuple[np.ndarray, str]:
    """The split every command shares: roles for the first ``n`` rows of ``source``.

    Stratified by the source's own labels when it has them (the finest grouping, so coarser
    tasks are balanced too), else by the finest task, else a seeded random assignment. Since
    ``train``, ``harden`` and ``dump`` call this with the same data, fractions and seed, a
    model trained on the attacker-train rows and selected on attacker-validation is scored on
    test rows it never saw, as in the Scrunch paper's 40/40/20 protocol.

    Returns:
        The role codes (0 attacker-train, 1 attacker-validation, 2 test) and what they were
        stratified by (``label``, a task name, or ``""``).

    Raises:
        DataError: a class is too rare to split, or a task has fewer than two classes in
            some role (:func:`check_task_roles`).
    """
    if source.labels is not None:
        roles, by = stratified_split(source.labels[:n], fractions, seed), "label"
    elif tasks:
        finest = max(tasks, key=lambda t: len(t.class_names))
        roles, by = stratified_split(finest.labels[:n], fractions, seed), finest.name
    else:
        rng = np.random.default_rng(seed)
        roles, by = rng.choice(3, size=n, p=list(fractions)).astype(np.uint8), ""
    for task in tasks:
        labels = task.labels[:n]
        check_task_roles(task.name, {role: labels[roles == code] for code, role in enumerate(ROLES)}, task.source)
    return roles, by


ROLES = ("attacker-train", "attacker-validation", "test")


def check_task_roles(task: str, labels_by_role: Mapping[str, np.ndarray], source: str | None = None) -> None:
    """Refuse a task with fewer than two classes among the rows of any role.

    With one class, every prediction is that class or wrong: the attack's accuracy and the
    drop derived from it would measure nothing, yet read like results.

    Args:
        task: the task's name, for the message.
        labels_by_role: each role's labels (``attacker-train``, ``attacker-validation``, ``test``).
        source: how the task was defined (``threshold:9``), for the message.

    Raises:
        DataError: naming the task, the role and its class count.
    """
    for role, labels in labels_by_role.items():
        classes = len(np.unique(labels))
        if classes < 2:
            what = f"task {task!r}" + (f" ({source})" if source else "")
            found = "no rows" if len(labels) == 0 else f"{classes} class"
            raise DataError(
                f"{what} has {found} in the {role} rows; every role needs at least 2 classes, or its "
                "accuracy means nothing. Choose a task source that divides the rows into classes "
                "(e.g. a smaller K in threshold:K), or dump more rows."
            )


def stratified_split(
    labels: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> np.ndarray:
    """Assign each row a role 0 (attacker-train), 1 (attacker-validation) or 2 (test).

    Stratified by ``labels`` and deterministic for a given seed. Raises when a class has
    too few rows to appear in every role.
    """
    from sklearn.model_selection import train_test_split

    n = len(labels)
    train, val, test = fractions
    counts = np.bincount(labels) if len(labels) else np.zeros(0, dtype=int)
    present = counts[counts > 0]
    if len(present) and present.min() < 3:
        rare = int(np.flatnonzero(counts == present.min())[0])
        raise DataError(
            f"class {rare} has only {int(present.min())} rows; a stratified three-way split needs at least 3 per class."
        )
    index = np.arange(n)
    roles = np.empty(n, dtype=np.uint8)
    try:
        rest, test_idx = train_test_split(index, test_size=test, random_state=seed, stratify=labels)
        train_idx, val_idx = train_test_split(
            rest, test_size=val / (train + val), random_state=seed, stratify=labels[rest]
        )
    except ValueError as exc:
        raise DataError(f"cannot split {n} rows {fractions} by class: {exc}.") from None
    roles[train_idx], roles[val_idx], roles[test_idx] = 0, 1, 2
    return roles
