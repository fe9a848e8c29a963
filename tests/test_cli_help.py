"""What a newcomer meets first: short help, cheap checks first, one-line errors, quiet logs."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qdd.cli import VERBOSE_ENV, main
from qdd.detectors.weights import read_state
from qdd.errors import QddError
from qdd.quiet import SILENCED, is_silenced, silence
from qdd.threads import torch_threads, use_threads

OWN_FLAGS = ("--detector", "--data", "--weights", "--random-weights", "--out", "--ckpt_path")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("command", ["test", "fit"])
def test_help_opens_with_qdds_flags_without_importing_lightning(command: str) -> None:
    done = run_python(
        f"""
        import sys
        from qdd.cli import main
        main(["{command}", "--help"])
        assert "lightning" not in sys.modules and "torch" not in sys.modules
        """
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) <= 50
    head = "\n".join(lines[:40])
    for flag in OWN_FLAGS:
        assert f"  {flag} " in head, flag
    assert f"qdd-cli {command} " in head  # examples
    assert f"qdd-cli {command} --help-all" in lines[-1]


def test_help_all_is_lightnings_full_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--help-all"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "--trainer.max_epochs" in printed and "--data.paths" in printed
    assert len(printed.splitlines()) > 200


def test_bad_data_is_reported_before_weights_or_models(tmp_path: Path) -> None:
    """No NPR weights exist here either: the data error must come first, without Lightning."""
    done = run_python(
        f"""
        import os, sys
        os.environ["QDD_CHECKPOINTS"] = {str(tmp_path)!r}
        from qdd.cli import main
        try:
            main(["test", "--detector", "npr", "--data", {str(tmp_path / "nonexistent")!r}])
        except SystemExit as exit:
            assert exit.code == 2, exit.code
            assert "lightning" not in sys.modules and "torch" not in sys.modules
            sys.exit(3)
        """
    )
    assert done.returncode == 3, done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "nonexistent" in err[0] and "--data" in err[0], err


class Payload:
    """Any object a weights file should not hold."""


def test_unreadable_weights_never_advise_unpickling(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage, not a checkpoint")
    pickled = tmp_path / "object.pth"
    torch.save({"fc1.weight": torch.zeros(1), "extra": Payload()}, pickled)
    for path, reason in [(junk, "not a PyTorch tensor file"), (pickled, "pickled Python object")]:
        with pytest.raises(QddError) as error:
            read_state(path)
        message = str(error.value)
        assert reason in message and str(path) in message and "\n" not in message
        assert "weights_only=False" not in message and "weights_only" not in message


def test_listed_library_messages_are_dropped_unless_verbose(monkeypatch, capsys) -> None:
    monkeypatch.setenv(VERBOSE_ENV, "0")  # restored (unset) after the test, as --verbose sets it
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.addHandler(Keep())
    logger.propagate = False
    text = "Pipelines loaded with `dtype=torch.float16` cannot run with `cpu` device. It is not"
    try:
        main(["--help"])
        logger.warning(text)
        logger.warning("a message nobody listed")
        assert seen == ["a message nobody listed"]
        main(["--help", "--verbose"])
        logger.warning(text)
        assert seen[-1] == text
    finally:
        logger.handlers.clear()
        logger.propagate = True
        silence()
    assert is_silenced("diffusers.pipelines.pipeline_utils", text)
    assert all(entry.why for entry in SILENCED)


def test_bitsandbytes_hub_kernel_message_is_silenced_whatever_the_reason() -> None:
    """bitsandbytes tries a hub kernel at import on AVX512-BF16 CPUs; offline it fails for
    one reason or another (no `kernels` package, an untrusted publisher): never qdd's path."""
    head = "Failed to load CPU gemm_4bit_forward from kernels-community: "
    tail = ". Please make sure you already `pip install kernels` and the kernels >= 0.11.1"
    for reason in ("No module named 'kernels'",
                   "Kernel repository 'kernels-community/quantization-bitsandbytes' could not "
                   "verify publisher trust status."):  # fmt: skip
        assert is_silenced("bitsandbytes.backends.cpu.ops", head + reason + tail)
    assert not is_silenced("bitsandbytes.backends.cpu.ops", "some other failure")


def test_threads_fit_the_cores(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert torch_threads(cores=2) == 2
    assert torch_threads(workers=1, cores=2) == 1
    assert torch_threads(workers=4, cores=2) == 1  # never zero
    assert torch_threads(workers=2, processes=2, cores=16) == 6  # 2 x (6 + 2) = 16
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert torch_threads(cores=16) == 3  # an explicit setting is an upper bound
    before = torch.get_num_threads()
    try:
        assert use_threads() == torch.get_num_threads() <= 3
    finally:
        torch.set_num_threads(before)


def test_every_warning_is_printed_once() -> None:
    """A library's logging.warning() must not make qdd's (or anyone's) lines print twice."""
    done = run_python(
        """
        import logging
        from qdd.cli import main
        main(["--help"])
        own = logging.getLogger("somelib")  # a library with its own handler, as Lightning's
        own.addHandler(logging.StreamHandler())
        logging.warning("open_clip style warning on the root logger")
        logging.getLogger("qdd.x").warning("a qdd warning")
        logging.getLogger("somelib.y").warning("a library warning")
        logging.getLogger("other.z").warning("an unhandled warning")
        """
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "open_clip style warning on the root logger",
        "WARNING qdd.x: a qdd warning",
        "a library warning",
        "an unhandled warning",
    ]
