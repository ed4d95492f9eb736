"""The checkpoint store against a hostile or damaged run directory.

The manifest names only files inside checkpoints/; it is checked by a schema and can be
rebuilt from the checkpoints' own sidecars; resume falls back past any unloadable file;
temp files of killed writes are cleaned; I/O errors are one-line errors that leave the
previous checkpoint intact.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import stagetrain.checkpoint as ck
from stagetrain.checkpoint import (
    LOOP_KEYS,
    CheckpointStore,
    atomic_write,
    remove_orphan_temps,
    sha256_file,
    validate_payload,
)
from stagetrain.errors import CheckpointError, StageTrainError


def payload(step: int, stage_index: int = 0) -> dict[str, Any]:
    """A small payload with every key the loop writes."""
    return {
        "model": {"w": torch.full((4,), float(step))},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "state": {"step": step, "stage_index": stage_index, "stage_step": step},
        "rng": [],
        "fingerprint": "f" * 64,
        "config": "{}",
        "log_lines": step,
        "world_size": 1,
    }


def filled(tmp_path: Path, steps: tuple[int, ...] = (10, 20, 30), keep: int = 3) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "run" / "checkpoints", keep=keep, required=LOOP_KEYS)
    for step in steps:
        store.save(payload(step), step=step, stage="easy")
    return store


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message and "Traceback" not in message
    return message


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# --- the manifest names only files inside checkpoints/ -----------------------------------


def test_manifest_entries_outside_the_directory_are_never_read_hashed_or_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = filled(tmp_path, keep=1)
    outside = tmp_path / "precious"
    outside.mkdir()
    victims = {name: outside / name for name in ("thesis.pt", "ckpt-00000001.pt")}
    for path in victims.values():
        path.write_bytes(b"do not touch")
    (tmp_path / "run" / "config.yaml").write_text("mine\n")
    (store.directory / "ckpt-00000002.pt").symlink_to(victims["ckpt-00000001.pt"])
    hostile = [
        str(victims["thesis.pt"]),
        "../config.yaml",
        "../../precious/thesis.pt",
        "sub/ckpt-00000003.pt",
        "ckpt-00000002.pt",  # a symlink out of the directory
        "manifest.json",
    ]
    manifest = json.loads(store.manifest_path.read_text())
    legit = manifest["checkpoints"][-1]
    manifest["checkpoints"] = [{**legit, "file": f, "step": i} for i, f in enumerate(hostile)]
    manifest["checkpoints"].append(legit)
    store.manifest_path.write_text(json.dumps(manifest))
    hashed: list[Path] = []
    real_hash = ck.sha256_file
    monkeypatch.setattr(ck, "sha256_file", lambda p: hashed.append(Path(p)) or real_hash(p))
    with pytest.warns(UserWarning) as caught:
        loaded, entry = store.load_latest()
        store.save(payload(40), step=40, stage="easy")  # prunes down to keep=1
        store.save(payload(50), step=50, stage="easy")
    assert entry.step == 30 and loaded["state"]["step"] == 30
    for path in victims.values():
        assert path.read_bytes() == b"do not touch"
    assert (tmp_path / "run" / "config.yaml").read_text() == "mine\n"
    assert (store.directory / "ckpt-00000002.pt").is_symlink()  # refused, not deleted
    assert all(p.parent == store.directory and not p.is_symlink() for p in hashed), hashed
    text = " ".join(str(w.message) for w in caught)
    for name in hostile[:5]:
        assert name in text, (name, text)
    assert "never read or deleted" in text
    assert [e.step for e in store.entries()] == [50]


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (
            '{"checkpoints": [{"file": 3, "step": "ten", "stage": "a", "sha256": "x"}]}',
            "checkpoints[0].file",
        ),
        ('{"checkpoints": "all of them"}', "checkpoints"),
        ('{"checkpoints": [{"file": "ckpt-00000010.pt"}]}', "checkpoints[0].step"),
        ("[1, 2, 3]", "manifest"),
        ('{"checkpoints": [', "not valid JSON"),
        ("", "not valid JSON"),
    ],
)
def test_a_malformed_manifest_is_one_line_and_resume_rebuilds_it(
    tmp_path: Path, manifest: str, expected: str
) -> None:
    store = filled(tmp_path)
    store.manifest_path.write_text(manifest)
    with pytest.raises(CheckpointError) as info:
        store.entries()
    message = one_line(info.value)
    assert message.startswith(f"{store.manifest_path}: ") and expected in message, message
    with pytest.warns(UserWarning, match=r"manifest\.json: .*rebuilt from the checkpoint files"):
        loaded, entry = store.load_latest()
    assert entry.step == 30 and loaded["state"]["step"] == 30


def test_deleted_manifest_resumes_from_the_newest_intact_checkpoint(tmp_path: Path) -> None:
    store = filled(tmp_path)
    store.manifest_path.unlink()
    with pytest.warns(UserWarning, match="no manifest.json; rebuilt from the checkpoint files"):
        loaded, entry = store.load_latest()
    assert (entry.step, entry.stage, loaded["state"]["step"]) == (30, "easy", 30)
    assert entry.sha256 == sha256_file(store.directory / "ckpt-00000030.pt")
    store.rebuild_manifest()
    assert [e.step for e in store.entries()] == [10, 20, 30]


def test_the_sidecar_checksum_still_guards_a_rebuilt_manifest(tmp_path: Path) -> None:
    store = filled(tmp_path)
    store.manifest_path.unlink()
    newest = store.directory / "ckpt-00000030.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.warns(
        UserWarning,
        match=r"ckpt-00000030\.pt: checksum mismatch.*resuming from .*ckpt-00000020\.pt",
    ):
        _, entry = store.load_latest()
    assert entry.step == 20


def test_a_complete_checkpoint_that_missed_its_sidecar_is_found(tmp_path: Path) -> None:
    # A kill after the checkpoint's rename but before its sidecar and the manifest.
    store = filled(tmp_path, steps=(10, 20))
    atomic_write(
        store.directory / "ckpt-00000030.pt", lambda f: torch.save({"format": 1, **payload(30)}, f)
    )
    loaded, entry = store.load_latest()
    assert entry.step == 30 and loaded["state"]["step"] == 30


def test_no_loadable_checkpoint_is_an_error_listing_each_reason(tmp_path: Path) -> None:
    store = filled(tmp_path)
    for path in store.directory.glob("ckpt-*.pt"):
        path.write_bytes(b"broken")
    store.manifest_path.unlink()
    with pytest.raises(CheckpointError) as info:
        store.load_latest()
    message = one_line(info.value)
    assert "no intact checkpoint" in message and message.count("checksum mismatch") == 3


def test_an_empty_directory_has_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        CheckpointStore(tmp_path / "checkpoints").load_latest()
    assert CheckpointStore(tmp_path / "checkpoints").latest_entry() is None


# --- fallback past any unloadable checkpoint ----------------------------------------------


def _zip_without(key: str) -> Any:
    def write(path: Path) -> None:
        data = {"format": 1, **payload(30)}
        del data[key]
        torch.save(data, path)

    return write


def _write(obj: Any) -> Any:
    return lambda path: torch.save(obj, path)


def _raw_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"format": 1, **payload(30)}))


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _symlink_out(path: Path) -> None:
    target = path.parent.parent.parent / "elsewhere.pt"
    torch.save({"format": 1, **payload(30)}, target)
    path.unlink()
    path.symlink_to(target)


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_raw_pickle, "not a torch zip archive"),
        (_zip_without("state"), "missing 'state'"),
        (_zip_without("model"), "missing 'model'"),
        (_write({"format": 1, **payload(30), "state": "step 30"}), "state: "),
        (_write({**payload(30), "format": 2}), "format 2"),
        (_write([1, 2, 3]), "not a stagetrain checkpoint"),
        (_directory, "not a regular file"),
        (_symlink_out, "a symbolic link"),
        (_truncated, "not a torch zip archive"),
    ],
    ids=["raw-pickle", "no-state", "no-model", "state-wrong-type", "format-2", "a-list",
         "directory", "symlink", "truncated"],
)  # fmt: skip
def test_any_unloadable_newest_checkpoint_falls_back_to_the_older_one(
    tmp_path: Path, damage: Any, reason: str
) -> None:
    store = filled(tmp_path)
    newest = store.directory / "ckpt-00000030.pt"
    damage(newest)
    if newest.is_file() and not newest.is_symlink():
        # Even with a matching checksum (the file was written by something else), the
        # payload itself must be valid.
        sidecar = store.directory / "ckpt-00000030.json"
        meta = json.loads(sidecar.read_text())
        meta["sha256"] = sha256_file(newest)
        sidecar.write_text(json.dumps(meta))
        manifest = json.loads(store.manifest_path.read_text())
        manifest["checkpoints"][-1]["sha256"] = meta["sha256"]
        store.manifest_path.write_text(json.dumps(manifest))
    with pytest.warns(UserWarning) as caught:
        loaded, entry = store.load_latest()
    assert entry.step == 20 and loaded["state"]["step"] == 20
    text = " ".join(str(w.message) for w in caught)
    assert "ckpt-00000030.pt" in text and reason in text and "resuming from" in text, text


def test_validate_payload_names_every_missing_key(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        validate_payload({"format": 1, "model": {}}, tmp_path / "x.pt", required=LOOP_KEYS)
    message = one_line(info.value)
    assert "missing 'optimizer', 'state', 'rng'" in message
    validate_payload({"format": 1, **payload(1)}, tmp_path / "x.pt", required=LOOP_KEYS)
    # By default only what every stagetrain checkpoint has (the Keras adapter's too).
    validate_payload({"format": 1, "state": payload(1)["state"], "keras": {}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="missing 'state'"):
        validate_payload({"format": 1, "model": {}}, tmp_path / "x.pt")


# --- temp files of killed writes --------------------------------------------------------


def test_orphan_temp_files_are_removed_and_nothing_else(tmp_path: Path) -> None:
    store = filled(tmp_path, steps=(10,))
    run_dir = store.directory.parent
    ours = [
        store.directory / ".ckpt-00000020.pt.k3j_x9a2.tmp",
        store.directory / ".manifest.json.abcdefgh.tmp",
        store.directory / ".ckpt-00000020.json.a1b2c3d4.tmp",
        run_dir / ".summary.json.zz9_0aq1.tmp",
        run_dir / ".config.yaml.00000000.tmp",
    ]
    theirs = [
        store.directory / ".important.tmp",
        store.directory / "notes.tmp",
        run_dir / "data.tmp",
        run_dir / ".ckpt-00000020.pt.short.tmp",
    ]
    for path in ours + theirs:
        path.write_bytes(b"x" * 100)
    (store.directory / ".ckpt-00000030.pt.abcdefgh.tmp").mkdir()  # a directory: not ours
    outside = tmp_path / "elsewhere.tmp"
    outside.write_bytes(b"keep")
    (run_dir / ".metrics.jsonl.qwertyui.tmp").symlink_to(outside)
    before = snapshot(store.directory)
    removed = remove_orphan_temps(run_dir)
    assert sorted(removed) == sorted(ours)
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in theirs) and outside.read_bytes() == b"keep"
    assert (run_dir / ".metrics.jsonl.qwertyui.tmp").is_symlink()
    kept = {k: v for k, v in before.items() if not k.endswith(".tmp")}
    assert {k: v for k, v in snapshot(store.directory).items() if not k.endswith(".tmp")} == kept


# --- I/O errors while saving ----------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT])
@pytest.mark.parametrize("where", ["torch.save", "fsync", "replace", "sidecar", "manifest"])
def test_io_errors_while_saving_are_one_line_and_keep_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, where: str
) -> None:
    store = filled(tmp_path, steps=(10, 20), keep=2)
    before = snapshot(store.directory)
    error = OSError(code, os.strerror(code))
    real_save, real_fsync, real_replace = torch.save, os.fsync, os.replace

    def failing_save(obj: Any, f: Any) -> None:
        f.write(b"partial")
        raise error

    def failing_fsync(fd: int) -> None:
        raise error

    def failing_replace(src: Any, dst: Any) -> None:
        name = Path(dst).name
        if (
            (where == "replace" and name.endswith(".pt"))
            or (where == "sidecar" and name.endswith(".json") and name != "manifest.json")
            or (where == "manifest" and name == "manifest.json")
        ):
            raise error
        real_replace(src, dst)

    if where == "torch.save":
        monkeypatch.setattr(ck.torch, "save", failing_save)
    elif where == "fsync":
        monkeypatch.setattr(ck.os, "fsync", failing_fsync)
    else:
        monkeypatch.setattr(ck.os, "replace", failing_replace)
    with pytest.raises(CheckpointError) as info:
        store.save(payload(30), step=30, stage="easy")
    message = one_line(info.value)
    assert str(store.directory) in message and os.strerror(code) in message, message
    monkeypatch.setattr(ck.torch, "save", real_save)
    monkeypatch.setattr(ck.os, "fsync", real_fsync)
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert snapshot(store.directory) == before  # nothing torn, nothing half-written left
    loaded, entry = store.load_latest()
    assert entry.step == 20 and loaded["state"]["step"] == 20


def test_atomic_write_errors_name_the_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        StageTrainError, match=r"file/summary\.json: cannot write \((Not a directory|File exists)\)"
    ):
        atomic_write(tmp_path / "file" / "summary.json", lambda f: f.write(b"{}"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_checkpoint_directory(tmp_path: Path) -> None:
    store = filled(tmp_path, steps=(10,))
    before = snapshot(store.directory)
    store.directory.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="Permission denied"):
            store.save(payload(20), step=20, stage="easy")
    finally:
        store.directory.chmod(0o755)
    assert snapshot(store.directory) == before


def test_read_only_file_system_mid_run(tmp_path: Path) -> None:
    """A real read-only remount (needs root and mount; skipped elsewhere)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    ok = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    )
    if ok.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {ok.stderr.decode().strip()}")
    try:
        store = filled(mount, steps=(10, 20), keep=2)
        before = snapshot(store.directory)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        with pytest.raises(CheckpointError) as info:
            store.save(payload(30), step=30, stage="easy")
        assert "Read-only file system" in one_line(info.value)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # resume from a read-only copy: nothing to warn
            loaded, entry = store.load_latest()
        assert entry.step == 20 and loaded["state"]["step"] == 20
        assert snapshot(store.directory) == before
        assert remove_orphan_temps(store.directory.parent) == []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_saves_write_a_sidecar_per_checkpoint_and_prune_both(tmp_path: Path) -> None:
    store = filled(tmp_path, steps=(10, 20, 30, 40), keep=2)
    names = sorted(p.name for p in store.directory.iterdir())
    assert names == [
        "ckpt-00000030.json",
        "ckpt-00000030.pt",
        "ckpt-00000040.json",
        "ckpt-00000040.pt",
        "manifest.json",
    ]
    meta = json.loads((store.directory / "ckpt-00000040.json").read_text())
    assert meta["step"] == 40 and meta["stage"] == "easy" and meta["file"] == "ckpt-00000040.pt"
    assert meta["sha256"] == sha256_file(store.directory / "ckpt-00000040.pt")
    assert meta["state"] == {"step": 40, "stage_index": 0, "stage_step": 40}
    with zipfile.ZipFile(store.directory / "ckpt-00000040.pt") as archive:
        assert archive.testzip() is None


# --- fuzz: hostile manifests, sidecars and checkpoint files ------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_HOSTILE_NAMES = st.sampled_from(
    ["../outside.pt", "/etc/passwd", "ckpt-00000010.pt", "ckpt-00000020.pt", "ckpt-1.pt",
     "sub/ckpt-00000030.pt", "manifest.json", "ckpt-00000030.json", "", ".", "..",
     "ckpt-00000030.pt\x00", "ckpt-00000099.pt"]
)  # fmt: skip
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats(allow_nan=True) | st.text(max_size=8) | _HOSTILE_NAMES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["file", "step", "stage", "sha256", "checkpoints", "state", "format", "bytes"]), inner, max_size=5),
    max_leaves=12,
)  # fmt: skip
_DAMAGE = st.sampled_from(["none", "flip", "truncate", "empty", "directory", "pickle", "delete"])


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    manifest=st.one_of(_JSON, st.builds(lambda e: {"checkpoints": e}, st.lists(st.fixed_dictionaries({"file": _HOSTILE_NAMES, "step": st.integers(0, 50), "stage": st.just("s"), "sha256": st.just("0" * 64)}), max_size=4))),
    sidecar=st.one_of(st.none(), _JSON),
    damage=st.tuples(_DAMAGE, _DAMAGE, _DAMAGE),
)  # fmt: skip
def test_fuzzed_run_directories_fail_cleanly_and_touch_nothing_outside(
    tmp_path_factory: pytest.TempPathFactory,
    manifest: Any,
    sidecar: Any,
    damage: tuple[str, str, str],
) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    outside = root / "outside.pt"
    outside.write_bytes(b"precious")
    store = filled(root)
    for step, how in zip((10, 20, 30), damage, strict=True):
        path = store.directory / f"ckpt-{step:08d}.pt"
        if how == "flip":
            data = bytearray(path.read_bytes())
            data[len(data) // 3] ^= 0x55
            path.write_bytes(bytes(data))
        elif how == "truncate":
            path.write_bytes(path.read_bytes()[:100])
        elif how == "empty":
            path.write_bytes(b"")
        elif how == "directory":
            path.unlink()
            path.mkdir()
        elif how == "pickle":
            path.write_bytes(pickle.dumps({"format": 1}))
        elif how == "delete":
            path.unlink()
    if sidecar is not None:
        (store.directory / "ckpt-00000030.json").write_text(json.dumps(sidecar))
    store.manifest_path.write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            loaded, entry = store.load_latest()
        except CheckpointError as exc:
            one_line(exc)
        else:
            assert loaded["state"]["step"] == entry.step and entry.step in (10, 20, 30)
            intact = [s for s, how in zip((10, 20, 30), damage, strict=True) if how == "none"]
            # never older than the newest intact one (a flipped byte outside every CRC
            # can leave a file loadable when its sidecar was destroyed too)
            assert entry.step >= max(intact, default=0)
        try:
            store.save(payload(40), step=40, stage="s")
        except CheckpointError as exc:
            one_line(exc)
    assert outside.read_bytes() == b"precious"
    assert {p.name for p in root.iterdir()} == {"outside.pt", "run"}
