"""The six settings that name a model, as one value: :class:`ModelSpec`.

``dump``, ``train``, ``harden``, the audit file's ``model:`` section and the command line's
model options all give the same six things (a spec, optional weights, two named
architecture options, further ones, and whether unpickling is allowed) and hand them to
:func:`~leakaudit.models.load_model`. Holding them in one frozen value means they are
spelled, parsed, recorded and loaded in one place.

This module does not import torch: a configuration that names a model can be read (and
rejected) before the model's libraries load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from leakaudit import config

if TYPE_CHECKING:
    from leakaudit.models.builders import LoadedModel


@dataclass(frozen=True)
class ModelSpec:
    """A model spec with its weights and architecture options, loaded by :meth:`load`.

    The field names are those of the audit file's ``model:`` section, so a parsed section
    is a ``ModelSpec`` as it stands.

    Attributes:
        spec: the model spec as the user gave it (``lenet5``, ``timm:resnet18``,
            ``file.py:Factory``, ``model.pt2``, …; see :mod:`leakaudit.models`).
        weights: a ``.safetensors`` or ``torch.save`` file of weights for the architecture.
        num_classes: architecture option (``--num-classes``); ``None`` leaves the
            factory's default, or the one recorded beside the weights.
        in_chans: architecture option (``--in-chans``), likewise.
        args: further keyword arguments for the factory (``--model-arg KEY=VALUE``).
        trust_checkpoint: allow unpickling the checkpoint, which runs code from the file.
    """

    spec: str
    weights: str | None = None
    num_classes: int | None = None
    in_chans: int | None = None
    args: dict[str, Any] = field(default_factory=dict)
    trust_checkpoint: bool = False

    def __post_init__(self) -> None:
        # A copy: the caller's mapping may change later, and a frozen value must not.
        object.__setattr__(self, "args", dict(self.args))

    def options(self) -> dict[str, Any]:
        """The architecture keyword arguments given for the factory (``args`` plus the named two).

        Options recorded beside the weights are not included: :meth:`load` reads them from
        the weights' record and uses them where none is given here.
        """
        return architecture_options(num_classes=self.num_classes, in_chans=self.in_chans, model_args=self.args)

    def load(self) -> LoadedModel:
        """Build the model and load its weights: :func:`~leakaudit.models.load_model` with these settings.

        Raises:
            UnknownNameError: the spec names no known architecture.
            UntrustedCheckpointError: the file needs unpickling and ``trust_checkpoint`` is off.
            CheckpointError: the file is unreadable or the weights do not fit.
            ConfigError: the factory does not accept an option.
            UsageError: the spec or weights cannot be used as given.
        """
        from leakaudit.models.loading import load_model

        return load_model(
            self.spec,
            weights=self.weights,
            num_classes=self.num_classes,
            in_chans=self.in_chans,
            model_args=self.args,
            trust_checkpoint=self.trust_checkpoint,
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values under the field names; :meth:`from_mapping` reads them back."""
        return {
            "spec": self.spec,
            "weights": self.weights,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "args": dict(self.args),
            "trust_checkpoint": self.trust_checkpoint,
        }

    @classmethod
    def from_mapping(cls, data: Any, path: str = "model") -> ModelSpec:
        """Read a model from a parsed YAML or JSON value: a bare spec string, or a mapping of the fields.

        Args:
            data: ``"lenet5"``, or ``{spec: lenet5, weights: w.safetensors, num_classes: 10, …}``.
            path: where ``data`` sits in its file, for messages.

        Raises:
            ConfigError: an unknown key (the allowed ones are listed), a value of the wrong
                type or a missing ``spec``, each with its path (``model.num_classes: expected
                an integer, got 'ten'.``).
        """
        if isinstance(data, str):
            data = {"spec": data}
        return config.from_mapping(cls, data, path)

    @classmethod
    def from_options(
        cls, spec: str, options: Mapping[str, Any], *, weights: str | None = None, trust_checkpoint: bool = False
    ) -> ModelSpec:
        """A model from a spec and one mapping of architecture options, as a model record holds them.

        ``num_classes`` and ``in_chans`` become the named fields, every other key goes to
        ``args``: the inverse of :meth:`options`.
        """
        rest = dict(options)
        return cls(
            spec,
            weights=weights,
            num_classes=rest.pop("num_classes", None),
            in_chans=rest.pop("in_chans", None),
            args=rest,
            trust_checkpoint=trust_checkpoint,
        )


def architecture_options(
    *, num_classes: int | None = None, in_chans: int | None = None, model_args: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The keyword arguments given for the factory: ``model_args``, then the two named options.

    A named option that is ``None`` is left out, so the factory's own default applies; one
    that is given wins over the same key in ``model_args``.
    """
    kwargs: dict[str, Any] = dict(model_args or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    return kwargs
