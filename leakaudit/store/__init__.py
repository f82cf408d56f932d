"""The activation store: one HDF5 file per dump (schema ``leakaudit.activations`` v1).

=====================  ==========================================================
path                   content
=====================  ==========================================================
``/`` attrs            schema, schema_version, tool version, created, model spec,
                       checkpoint SHA-256, layer, data spec, input shape, seed, complete, …
``/inputs``            float32 [N, C, H, W] in [0, 1]: exactly what the model saw
``/activations``       float32 or float16 [N, *layer_shape]
``/labels/<task>``     int64 [N]; attrs ``class_names`` (JSON) and ``source``
``/index``             int64 [N]: the row's position in the data source
``/split``             uint8 [N]: 0 attacker-train, 1 attacker-validation, 2 test
``/outputs``           optional float32 [N, K]: the full model's logits
=====================  ==========================================================

Layout. Uncompressed datasets are contiguous and allocated when the file is created:
DESIGN.md measured contiguous storage an order of magnitude faster than 256-row chunks
for shuffled minibatches, and a write into pre-allocated contiguous storage changes no
HDF5 metadata, which is what makes a killed dump resumable. With ``compression`` the
datasets are chunked along N (about 1 MiB per chunk, also allocated early).

Writing, resuming and the rename into place: :mod:`leakaudit.store.writer`. One dump at a
time: :mod:`leakaudit.store.locks`. Checksums: :mod:`leakaudit.store.integrity`. A
distributed dump's stitched store: :mod:`leakaudit.store.virtual`. Reading:
:func:`open_store` checks every checksum before a reader sees any data (a streaming hash,
a small cost beside any attack or metric); ``leakaudit info`` checks the attributes and
the small datasets, ``info --verify`` everything. Stores written before checksums carry
none of these attributes: they open, reported as not verified.
"""

from leakaudit.store.integrity import (
    LARGE_DATASETS,
    NOT_VERIFIED,
    StoreCorruptError,
    attributes_digest,
    dataset_digest,
    record_checksums,
    seal_attributes,
)
from leakaudit.store.locks import DumpInProgressError, DumpLock, check_no_dump_running, wait_for_dump
from leakaudit.store.reader import ActivationStore, open_store
from leakaudit.store.schema import ROLE_CODES, ROLES, SCHEMA, SCHEMA_VERSION, journal_path, lock_path, partial_path
from leakaudit.store.virtual import write_virtual_store
from leakaudit.store.writer import StoreWriter

__all__ = [
    "LARGE_DATASETS",
    "NOT_VERIFIED",
    "ROLES",
    "ROLE_CODES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "ActivationStore",
    "DumpInProgressError",
    "DumpLock",
    "StoreCorruptError",
    "StoreWriter",
    "attributes_digest",
    "check_no_dump_running",
    "dataset_digest",
    "journal_path",
    "lock_path",
    "open_store",
    "partial_path",
    "record_checksums",
    "seal_attributes",
    "wait_for_dump",
    "write_virtual_store",
]
