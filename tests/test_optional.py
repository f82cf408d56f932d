"""``leakaudit._optional.require``: a missing optional package names the extra that installs it."""

from __future__ import annotations

import sys

import pytest

from leakaudit._optional import MissingExtraError, require
from leakaudit.errors import EXIT_USAGE, LeakAuditError


def test_an_installed_module_is_returned():
    import json

    assert require("json", "hf") is json
    assert require("os.path", "hf") is sys.modules["os.path"]


def test_a_missing_module_names_the_package_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without it imports
    with pytest.raises(MissingExtraError) as caught:
        require("onnxruntime", "onnx", purpose="dumping an ONNX encoder")
    error = caught.value
    assert str(error) == "dumping an ONNX encoder needs the optional package onnxruntime: pip install 'leakaudit[onnx]'."
    assert isinstance(error, LeakAuditError) and error.exit_code == EXIT_USAGE
    assert (error.package, error.extra) == ("onnxruntime", "onnx")
    assert error.__cause__ is None and error.__suppress_context__  # one line, no chained traceback


def test_a_missing_submodule_and_a_distribution_name_that_differs(monkeypatch):
    # A package no test imports (transformers may already be loaded by another test, and a
    # loaded parent makes its submodules importable whatever sys.modules says of it).
    monkeypatch.setitem(sys.modules, "absent_top", None)
    with pytest.raises(
        MissingExtraError, match=r"^this needs the optional package absent_top: pip install 'leakaudit\[hf\]'\.$"
    ):
        require("absent_top.models.vit", "hf")
    monkeypatch.setitem(sys.modules, "fancy_module", None)
    with pytest.raises(MissingExtraError, match=r"optional package fancy-dist: pip install 'leakaudit\[fancy\]'"):
        require("fancy_module", "fancy", package="fancy-dist")


def test_a_package_whose_own_dependency_is_missing_says_what_failed(monkeypatch, tmp_path):
    # The package is installed but one of its dependencies is not: the message names both.
    (tmp_path / "fake_onnxscript.py").write_text("import fake_onnx_ir_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "fake_onnx_ir_dependency", None)
    monkeypatch.delitem(sys.modules, "fake_onnxscript", raising=False)
    with pytest.raises(MissingExtraError) as caught:
        require("fake_onnxscript", "onnx", package="onnxscript", purpose="exporting encoder.onnx")
    message = str(caught.value)
    assert message.startswith("exporting encoder.onnx needs the optional package onnxscript, which failed to import (")
    assert "fake_onnx_ir_dependency" in message and message.endswith(": pip install 'leakaudit[onnx]'.")


def test_an_import_error_that_is_not_a_missing_module_is_reported_as_such(monkeypatch, tmp_path):
    # Installed, but a version that does not fit: `cannot import name`, not "install it".
    (tmp_path / "fake_transformers.py").write_text("from json import no_such_name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_transformers", raising=False)
    with pytest.raises(MissingExtraError, match=r"which failed to import \(cannot import name 'no_such_name'"):
        require("fake_transformers", "hf", package="transformers")
