"""The background checkpoint writer: one write in flight, failures as one CheckpointError."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from stagetrain.errors import CheckpointError
from stagetrain.train.background import BackgroundWriter


def test_writes_run_one_at_a_time_in_order(tmp_path: Path) -> None:
    writer = BackgroundWriter(tmp_path)
    order: list[int] = []
    release = threading.Event()

    def write(n: int) -> None:
        if n == 0:
            assert release.wait(5)
        order.append(n)

    writer.submit(write, 0)
    release.set()
    writer.submit(write, 1)  # waits for write 0 first
    assert order == [0]
    writer.wait()
    assert order == [0, 1]
    writer.wait()  # nothing in flight: returns at once


def test_a_failed_write_is_one_checkpoint_error_naming_the_directory(tmp_path: Path) -> None:
    writer = BackgroundWriter(tmp_path)

    def write() -> None:
        raise OSError(28, "No space left on device\nsecond line")

    writer.submit(write)
    with pytest.raises(CheckpointError) as caught:
        writer.wait()
    text = str(caught.value)
    assert text.startswith(f"{tmp_path}: writing a checkpoint failed (OSError:")
    assert "second line" not in text
    writer.wait()  # the failure is reported once


def test_a_checkpoint_error_of_the_write_is_raised_as_it_is(tmp_path: Path) -> None:
    writer = BackgroundWriter(tmp_path)
    error = CheckpointError("ckpt-00000010.pt: disk is read-only")

    def write() -> None:
        raise error

    writer.submit(write)
    with pytest.raises(CheckpointError) as caught:
        writer.wait()
    assert caught.value is error
