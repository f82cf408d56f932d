"""What defines a dump (:class:`DumpSettings`) and what it did (:class:`DumpReport`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from leakaudit.errors import ConfigError
from leakaudit.models.spec import ModelSpec


@dataclass(frozen=True)
class DumpSettings:
    """Everything that defines a dump. Mirrors the options of ``leakaudit dump``."""

    #: The model, its weights and architecture options (a bare spec string is taken as ``ModelSpec(spec)``).
    model: ModelSpec
    #: The split layer; None only for a client encoder exported by ``harden`` (its output).
    layer: str | None
    data: str
    output: Path
    tasks: tuple[tuple[str, str], ...] = ()
    input_size: tuple[int, int] | None = None
    normalize: str | None = None
    batch_size: int = 256
    dtype: Literal["float32", "float16"] = "float32"
    with_outputs: bool = False
    split: tuple[float, float, float] = (0.4, 0.4, 0.2)
    seed: int = 0
    device: str = "auto"
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    #: Torch threads of the forward pass. None: chosen by the timing trial when
    #: ``memory_format`` is "auto", torch's current setting otherwise.
    threads: int | None = None
    #: Forward passes run at once on separate batches, each with ``threads`` threads. None:
    #: chosen by the timing trial (1, or one per core with 1 thread each).
    workers: int | None = None
    compression: str | None = None
    limit: int | None = None
    store_inputs: bool = True
    resume: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            object.__setattr__(self, "model", ModelSpec(self.model))
        if self.layer is not None and not self.layer.strip():
            raise ConfigError(
                f"--layer is empty ({self.layer!r}). Give a layer from `leakaudit layers MODEL`, or 'output' for the whole model."
            )
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}.")
        if self.dtype not in ("float32", "float16"):
            raise ConfigError(f"--dtype must be float32 or float16, got {self.dtype!r}.")
        if len(self.split) != 3 or any(f <= 0 for f in self.split):
            raise ConfigError(f"--split needs three positive fractions TRAIN,VAL,TEST, got {self.split}.")
        if abs(sum(self.split) - 1.0) > 1e-6:
            raise ConfigError(f"--split fractions must sum to 1, got {sum(self.split):g}.")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"--limit must be positive, got {self.limit}.")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"--threads must be positive, got {self.threads}.")
        if self.workers is not None and self.workers <= 0:
            raise ConfigError(f"--workers must be positive, got {self.workers}.")
        if self.compression not in (None, "gzip", "lzf"):
            raise ConfigError(f"--compression must be gzip or lzf, got {self.compression!r}.")


@dataclass
class DumpReport:
    """What a dump did: where, how many rows, how fast, and how it cut the model."""

    path: Path
    rows: int
    resumed_from: int
    seconds: float
    rows_per_second: float
    truncation: str
    memory_format: str
    device: str
    layer_shape: tuple[int, ...]
    threads: int = 0
    workers: int = 1
    #: Where the batch loop's time went: seconds the forward waited for the reader
    #: (input-bound) and for the writer (storage-bound), seconds in the forward itself, and
    #: the CPU seconds of the reader and writer threads. Waits near 0 mean the dump ran at
    #: the speed of its forward pass; on a machine whose cores the forward fills, the
    #: helpers' CPU seconds are what the forward loses to them.
    wait_reader_s: float = 0.0
    wait_writer_s: float = 0.0
    forward_s: float = 0.0
    #: Seconds the forward's threads spent preprocessing (on a CPU; 0 where the reader does).
    preprocess_s: float = 0.0
    reader_cpu_s: float = 0.0
    writer_cpu_s: float = 0.0
