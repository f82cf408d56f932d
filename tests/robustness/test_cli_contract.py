"""The command line's contract: exit codes (with and without --debug), JSON alone on stdout,
and one-line errors for the file-system conditions users meet (a file in the way, permission
denied, a full disk, a folder where a file should be), with nothing half-written left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer

from tests.conftest import error_line

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "examples" / "policy.yaml"

# A factory that is interrupted while it builds (what Ctrl-C does mid-command), for `layers`.
INTERRUPTING_FACTORY = "def make():\n    raise KeyboardInterrupt\n"
# A factory that says it has started and then waits, for a real Ctrl-C to interrupt.
WAITING_FACTORY = (
    "import pathlib, time\n"
    "def make():\n"
    "    pathlib.Path(__file__).with_name('started').touch()\n"
    "    time.sleep(120)\n"
)


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def work(tmp_path_factory, digits_store) -> Path:
    """A folder with a copy of the digits store and its report (the intra-class distance only: cheap)."""
    from typer.testing import CliRunner

    from leakaudit.cli import app

    folder = tmp_path_factory.mktemp("contract")
    store = folder / "store.h5"
    shutil.copy(digits_store, store)
    result = CliRunner().invoke(app, ["--quiet", "metrics", str(store), "--only", "intra-class-distance"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert (folder / "store.report.json").exists()
    return folder


def _entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _unwritable_dir() -> Path:
    """A folder even root may not create files in (sysfs); tests that need one skip without it."""
    probe = Path("/sys/leakaudit-contract-probe")
    try:
        probe.open("w").close()
    except PermissionError:
        return Path("/sys")
    except OSError:
        pytest.skip("no folder here refuses writes with EACCES")
    probe.unlink()
    pytest.skip("/sys accepts files here; no folder refuses writes")


def _full_device(folder: Path) -> Path:
    """A private ``/dev/full`` (char 1,7): every write fails with ENOSPC, as on a full disk.

    A node of our own, rather than /dev/full itself: were a writer to rename over it, only
    this node would be lost.
    """
    path = folder / "full"
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 7))
        with open(path, "wb") as handle:
            handle.write(b"x")
            handle.flush()
    except PermissionError:
        pytest.skip("cannot make a device node here (needs CAP_MKNOD)")
    except OSError as exc:
        if exc.errno != 28:  # a node on a nodev mount opens with EACCES; ENOSPC is what we want
            pytest.skip(f"a device node does not behave as /dev/full here ({exc.strerror})")
        return path
    pytest.skip("the device node accepted a write; it is not /dev/full here")


def _traceback_then_error(stderr: str) -> None:
    """``--debug``: a traceback, then the one ``Error:`` line as the last line."""
    lines = stderr.rstrip("\n").splitlines()
    assert "Traceback (most recent call last):" in stderr
    assert lines[-1].startswith("Error: ")
    assert stderr.index("Traceback") < stderr.index("\nError: ")


# --------------------------------------------------------------------------- exit codes, --debug


def _case(name: str, tmp_path: Path, work: Path) -> tuple[list[str], int, str, list[Path]]:
    """(arguments, exit code, fragment of the Error line, outputs that must not appear)."""
    if name == "usage":
        out = tmp_path / "acts.h5"
        return ["dump", "lenet5", "--layer", "nope", "--data", "digits", "-o", str(out)], 2, "unknown layer 'nope'", [out]
    if name == "runtime":
        weights = tmp_path / "weights.safetensors"
        weights.write_text("not a checkpoint\n")
        return ["layers", "lenet5", "--weights", str(weights)], 3, "not a safetensors file", []
    if name == "interrupt":
        (tmp_path / "interrupting.py").write_text(INTERRUPTING_FACTORY)
        return ["layers", f"{tmp_path / 'interrupting.py'}:make"], 130, "Error: interrupted.", []
    if name == "file-in-the-way":
        (tmp_path / "notes.txt").write_text("keep me\n")
        out = tmp_path / "notes.txt" / "summary.md"
        args = ["gate", str(work / "store.report.json"), "--policy", str(POLICY), "--summary", str(out)]
        return args, 2, "Not a directory", [out]
    raise AssertionError(name)


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
@pytest.mark.parametrize("name", ["usage", "runtime", "interrupt", "file-in-the-way"])
def test_exit_code_is_the_errors_own_and_debug_only_adds_the_traceback(cli, tmp_path, work, name, debug):
    args, code, fragment, outputs = _case(name, tmp_path, work)
    before = _entries(tmp_path)
    flags = ["--debug", "--quiet"] if debug else []
    result = cli(*flags, *args)
    assert result.exit_code == code, result.stderr
    assert fragment in error_line(result)
    assert "unexpected" not in result.stderr and "report it" not in result.stderr
    if debug:
        _traceback_then_error(result.stderr)
    else:
        assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for path in outputs:
        assert not path.exists() and not Path(f"{path}.partial").exists()
    assert _entries(tmp_path) == before
    if name == "file-in-the-way":
        assert (tmp_path / "notes.txt").read_text() == "keep me\n"


def test_debug_keeps_the_exit_code_in_a_real_process(tmp_path):
    # The exit path differs from CliRunner's: an exception escaping the group would end the
    # interpreter with exit code 1, the gate-failed code.
    out = tmp_path / "acts.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "leakaudit", "--debug", "dump", "lenet5", "--layer", "conv3", "--data", "digits",
               "--split", "1,2", "-o", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    _traceback_then_error(done.stderr)
    lines = done.stderr.splitlines()
    assert [line for line in lines if line.startswith("Error:")] == [lines[-1]]
    assert lines[-1] == "Error: --split expects three fractions TRAIN,VAL,TEST, got '1,2'."
    assert _entries(tmp_path) == set()


def test_ctrl_c_in_a_real_process_is_one_line_and_exit_130(tmp_path):
    factory = tmp_path / "waiting.py"
    factory.write_text(WAITING_FACTORY)
    out = tmp_path / "acts.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "leakaudit", "dump", f"{factory}:make", "--layer", "conv", "--data", "digits", "-o", str(out)]
    # SIGINT as a terminal delivers it: a suite started in the background (`make test &`, nohup)
    # hands its children SIGINT ignored, and Python then never installs its handler.
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "started").exists() and process.poll() is None:
        time.sleep(0.05)  # interrupt the command itself, not the interpreter's start
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert [line for line in stderr.splitlines() if line.strip()] == ["Error: interrupted."]
    assert stdout == ""
    assert _entries(tmp_path) == {"waiting.py", "started"}  # no store, no partial file


def test_a_failed_gate_keeps_exit_code_1_under_debug(cli, work):
    result = cli("--debug", "gate", work / "store.report.json", "--policy", POLICY)
    assert result.exit_code == 1, result.stderr
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr


def _app_raising(exc: BaseException) -> typer.Typer:
    """The real group and global options around one command that fails as a bug would."""
    from leakaudit.cli import _global_options, _LeakAuditGroup

    app = typer.Typer(cls=_LeakAuditGroup, pretty_exceptions_enable=False, add_completion=False)
    app.callback()(_global_options)

    @app.command("boom")
    def boom() -> None:
        raise exc

    @app.command("other")
    def other() -> None:  # a second command, so that `boom` stays a subcommand
        pass

    return app


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
@pytest.mark.parametrize(
    "exc, shown",
    [(ZeroDivisionError("division by zero"), "unexpected ZeroDivisionError: division by zero."),
     (OSError("Unable to open object (library failure)"), "unexpected OSError: Unable to open object (library failure).")],
    ids=["bug", "oserror-without-errno"],
)  # fmt: skip
def test_only_real_bugs_ask_to_be_reported(exc, shown, debug):
    from typer.testing import CliRunner

    result = CliRunner().invoke(_app_raising(exc), [*(["--debug"] if debug else []), "boom"], catch_exceptions=False)
    assert result.exit_code == 3
    line = error_line(result)
    assert shown in line and line.endswith("report it if it is a bug.")
    assert ("Traceback" in result.stderr) == debug


# --------------------------------------------------------------------------- --json - : JSON alone


def _json_commands(tmp_path: Path, work: Path) -> dict[str, list[str]]:
    store, report = str(work / "store.h5"), str(work / "store.report.json")
    return {
        "train": ["train", "lenet5", "--data", "digits", "--task", "public=parity", "--limit", "120", "--epochs", "1",
                  "-o", str(tmp_path / "m.safetensors"), "--json", "-"],
        "attack": ["attack", store, "--classifier", "--head", "linear", "--epochs", "1", "--report",
                   str(tmp_path / "r.json"), "--json", "-"],
        "metrics": ["metrics", store, "--only", "intra-class-distance", "--report", str(tmp_path / "r.json"), "--json", "-"],
        "gate": ["gate", report, "--policy", str(POLICY), "--json", "-"],
        "info": ["info", store, "--json"],
        "layers": ["layers", "lenet5", "--json"],
        "list-attacks": ["list", "attacks", "--json"],
        "list-metrics": ["list", "metrics", "--json"],
        "list-recipes": ["list", "recipes", "--json"],
    }  # fmt: skip


@pytest.mark.parametrize(
    "command", ["train", "attack", "metrics", "gate", "info", "layers", "list-attacks", "list-metrics", "list-recipes"]
)
def test_json_to_stdout_is_all_that_stdout_holds(cli, tmp_path, work, command):
    result = cli(*_json_commands(tmp_path, work)[command])
    assert result.exit_code in (0, 1), result.stderr  # 1: the gate may fail this report
    json.loads(result.stdout)  # stdout is one JSON document and nothing else
    assert "Error:" not in result.stderr


def test_harden_json_to_stdout_is_all_that_stdout_holds(cli, tmp_path):
    weights = tmp_path / "m.safetensors"
    trained = cli("--quiet", "train", "lenet5", "--data", "digits", "--task", "public=parity", "--limit", "120",
                  "--epochs", "1", "-o", weights)  # fmt: skip
    assert trained.exit_code == 0, trained.stderr
    result = cli("harden", "lenet5", "--weights", weights, "--num-classes", "2", "--layer", "conv3", "--data", "digits",
                 "--task", "public=parity", "--method", "nopeek", "--limit", "120", "--epochs", "1",
                 "-o", tmp_path / "hardened", "--json", "-")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["method"] == "nopeek"
    assert "nopeek at conv3" in result.stderr  # the table went to stderr


def test_list_json_describes_each_option_with_type_and_default(cli):
    result = cli("list", "recipes", "--json")
    assert result.exit_code == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert {"center-loss", "nopeek", "shredder"} <= set(plugins)
    options = {o["name"]: o for o in plugins["center-loss"]["options"]}
    # The CLI spells the option `lambda` (the field is `lambda_`: a Python keyword).
    assert options["lambda"] == {"name": "lambda", "type": "float", "required": False, "default": 0.9}
    assert plugins["center-loss"]["description"]


def test_a_closed_stdout_pipe_ends_quietly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "leakaudit", "list", "attacks"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    process.stdout.close()  # the reader left before anything was written (`| head -0`)
    stderr = process.stderr.read()
    process.wait(timeout=120)
    assert process.returncode == 141  # 128 + SIGPIPE, as a shell reports it; not 1 (gate failed)
    assert "Error" not in stderr and "Traceback" not in stderr


# --------------------------------------------------------------------------- outputs the system refuses


def _writer(name: str, work: Path, out: Path, scratch: Path) -> list[str]:
    report = str(work / "store.report.json")
    if name == "gate --summary":
        return ["gate", report, "--policy", str(POLICY), "--summary", str(out), "--force"]
    if name == "gate --junit":
        return ["gate", report, "--policy", str(POLICY), "--junit", str(out), "--force"]
    if name == "gate --json":
        return ["gate", report, "--policy", str(POLICY), "--json", str(out), "--force"]
    if name == "report -o":
        return ["report", report, "--no-tsne", "-o", str(out), "--force"]
    if name == "metrics --json":
        return ["metrics", str(work / "store.h5"), "--only", "intra-class-distance", "--report", str(scratch / "r.json"),
                "--json", str(out), "--force"]  # fmt: skip
    raise AssertionError(name)


WRITERS = ["gate --summary", "gate --junit", "gate --json", "report -o", "metrics --json"]


def _condition(condition: str, tmp_path: Path) -> tuple[Path, int, str]:
    """(the output path, exit code, what the Error line says)."""
    if condition == "file-in-the-way":
        (tmp_path / "notes.txt").write_text("keep me\n")
        return tmp_path / "notes.txt" / "out.txt", 2, "Not a directory"
    if condition == "folder":
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "kept.txt").write_text("keep me\n")
        return tmp_path / "folder", 2, "Is a directory"
    if condition == "permission":
        return _unwritable_dir() / "leakaudit-out.txt", 3, "Permission denied"
    if condition == "disk-full":
        return _full_device(tmp_path), 3, "No space left on device"
    raise AssertionError(condition)


@pytest.mark.parametrize("condition", ["file-in-the-way", "folder", "permission", "disk-full"])
@pytest.mark.parametrize("writer", WRITERS)
def test_an_output_the_system_refuses_is_one_line_and_leaves_nothing(cli, tmp_path, work, writer, condition):
    out, code, reason = _condition(condition, tmp_path)
    before = _entries(tmp_path)
    result = cli("--quiet", *_writer(writer, work, out, tmp_path))
    assert result.exit_code == code, result.stderr
    line = error_line(result)
    assert reason in line and repr(str(out)) in line
    assert "unexpected" not in line and "Traceback" not in result.stderr
    if condition == "disk-full":
        assert stat.S_ISCHR(out.stat().st_mode)  # written into, not replaced by a file
    elif condition == "folder":
        assert out.is_dir() and _entries(out) == {"kept.txt"}
    else:
        assert not out.exists()
    leftovers = _entries(tmp_path) - before - {"r.json"}  # metrics merges into its report first
    assert not leftovers, leftovers  # no temporary file beside the output
    if condition == "file-in-the-way":
        assert (tmp_path / "notes.txt").read_text() == "keep me\n"


@pytest.mark.parametrize("condition", ["file-in-the-way", "permission"])
def test_a_store_output_the_system_refuses_is_one_line(cli, tmp_path, condition):
    out, code, reason = _condition(condition, tmp_path)
    before = _entries(tmp_path)
    result = cli("--quiet", "dump", "lenet5", "--layer", "conv3", "--data", "digits", "--limit", "40", "-o", out)
    assert result.exit_code == code, result.stderr
    line = error_line(result)
    assert reason in line and "unexpected" not in line
    assert f"{str(out)!r}" in line and ".partial" not in line  # the path the user gave, not ours
    assert not out.exists() and not Path(f"{out}.partial").exists()
    assert _entries(tmp_path) == before


def test_a_missing_output_folder_is_created(cli, tmp_path, work):
    out = tmp_path / "new" / "deeper" / "summary.md"
    result = cli("--quiet", *_writer("gate --summary", work, out, tmp_path))
    assert result.exit_code in (0, 1), result.stderr
    assert out.read_text().strip()
    assert _entries(out.parent) == {"summary.md"}


def _long_command(name: str, work: Path, out: Path) -> list[str]:
    train = ["lenet5", "--data", "digits", "--task", "public=parity", "--limit", "120", "--epochs", "1"]
    if name == "train -o":
        return ["train", *train, "-o", f"{out}.safetensors"]
    if name == "train --json":
        return ["train", *train, "-o", str(out.parent.parent / "m.safetensors"), "--json", str(out)]
    if name == "harden -o":
        return ["harden", *train, "--num-classes", "2", "--layer", "conv3", "--method", "nopeek", "-o", str(out)]
    if name == "attack --json":
        return ["attack", str(work / "store.h5"), "--classifier", "--epochs", "1", "--json", str(out)]
    if name == "demo -o":
        return ["demo", "--epochs", "1", "-o", str(out)]
    raise AssertionError(name)


@pytest.mark.parametrize("command", ["train -o", "train --json", "harden -o", "attack --json", "demo -o"])
def test_a_file_in_the_way_of_an_output_is_refused_before_any_work(cli, tmp_path, work, command):
    (tmp_path / "notes.txt").write_text("keep me\n")
    out = tmp_path / "notes.txt" / "out"
    args = _long_command(command, work, out)
    out = Path(args[-1])  # the output as the command names it
    result = cli(*args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.splitlines() == [error_line(result)]  # no epoch lines or progress: nothing ran
    assert "Not a directory" in error_line(result) and repr(str(out)) in error_line(result)
    assert _entries(tmp_path) == {"notes.txt"} and (tmp_path / "notes.txt").read_text() == "keep me\n"


def test_train_refuses_an_existing_json_output_before_training(cli, tmp_path):
    existing = tmp_path / "result.json"
    existing.write_text("{}\n")
    result = cli("train", "lenet5", "--data", "digits", "--task", "public=parity", "--limit", "120", "--epochs", "1",
                 "-o", tmp_path / "m.safetensors", "--json", existing)  # fmt: skip
    assert result.exit_code == 2, result.stderr
    assert error_line(result) == f"Error: {str(existing)!r} exists. Pass --force to overwrite it."
    assert existing.read_text() == "{}\n" and _entries(tmp_path) == {"result.json"}
