"""Data sources, tasks, preprocessing and the split every command shares.

:mod:`~leakaudit.data.sources` opens ``--data`` specs (``digits``, ``idx:DIR``,
``folder:DIR``, ``npz:FILE``, ``hdf5:FILE``); :mod:`~leakaudit.data.tasks` turns
``--task NAME=SOURCE`` into labels (``label``, ``parity``, ``threshold:K``,
``map:FILE.yaml``, or an array of the source); :mod:`~leakaudit.data.preprocessing` makes
the model's input from raw rows; :mod:`~leakaudit.data.splits` assigns every row its role
(:mod:`leakaudit.roles`), stratified and seeded, and refuses a task with fewer than two
classes in any role: an attack on one class scores against nothing, and the drop it
reports would look like privacy.

Images are stored and scored in [0, 1] exactly as the model sees them (after resizing and
channel conversion); normalisation is applied only to the model's input, only when asked.
"""

from leakaudit.data.preprocessing import SMALL_IMAGE, Preprocess, parse_normalize, preprocess_for, resize
from leakaudit.data.sources import (
    CLASS_NAME_KEYS,
    IMAGE_KEYS,
    IMAGE_SUFFIXES,
    LABEL_KEYS,
    DataSource,
    open_source,
)
from leakaudit.data.splits import check_task_roles, split_roles, stratified_split
from leakaudit.data.tasks import Task, parse_task_option, resolve_task

__all__ = [
    "CLASS_NAME_KEYS",
    "IMAGE_KEYS",
    "IMAGE_SUFFIXES",
    "LABEL_KEYS",
    "SMALL_IMAGE",
    "DataSource",
    "Preprocess",
    "Task",
    "check_task_roles",
    "open_source",
    "parse_task_option",
    "parse_normalize",
    "preprocess_for",
    "resize",
    "resolve_task",
    "split_roles",
    "stratified_split",
]
