"""Environment variables stagetrain reads, validated in one place.

================================ ==================================== ==============
variable                         meaning                              default
================================ ==================================== ==============
``WORLD_SIZE``                   number of processes (torchrun)       1
``RANK``                         this process, ``0 .. WORLD_SIZE-1``  0
``LOCAL_RANK``                   index on this machine (the GPU)      0
``LOCAL_WORLD_SIZE``             processes on this machine            unset
``MASTER_ADDR``, ``MASTER_PORT`` rank 0's rendezvous store            unset
``TORCHELASTIC_RESTART_COUNT``   restarts by ``--max-restarts``       0
``TORCHELASTIC_USE_AGENT_STORE`` the store is torchrun's agent's      false
``STAGETRAIN_DIST_TIMEOUT``      collective timeout, s (<= 604800)    1800
``STAGETRAIN_CACHE``             difficulty-score cache directory     see below
================================ ==================================== ==============

The cache defaults to ``~/.cache/stagetrain/scores``.
Every problem is one :class:`~stagetrain.errors.EnvError` line that names the variable
and what it should hold. ``WORLD_SIZE > 1`` without ``RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` (a stray export, not a launcher) is refused at once instead of waiting
for the other processes until the timeout. An empty variable counts as unset.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from stagetrain.errors import EnvError

DEFAULT_DIST_TIMEOUT_S = 1800.0
MAX_DIST_TIMEOUT_S = 7 * 24 * 3600.0
"""A week: longer is a typo (and ``timedelta`` overflows long before ``1e400``)."""
_PSEUDO_FILE_SYSTEMS = ("/proc", "/sys", "/dev")


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in a (possibly single-process) job, as the launcher set it.

    The distributed engine reads everything from here instead of ``os.environ``:
    ``world_size``/``rank``/``local_rank`` for the process group and the device,
    ``master_addr``/``master_port``/``use_agent_store`` for the rendezvous store,
    ``restart_count`` for the store's namespace and ``--auto-resume``, ``timeout`` for
    ``init_process_group``.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    restart_count: int = 0
    use_agent_store: bool = False
    dist_timeout_s: float = DEFAULT_DIST_TIMEOUT_S

    @property
    def distributed(self) -> bool:
        """More than one process: a process group is needed."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def restarted(self) -> bool:
        """Started again by ``torchrun --max-restarts`` (then continue from a checkpoint)."""
        return self.restart_count > 0

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self.dist_timeout_s)


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read and check the launcher's variables (``os.environ`` by default).

    Raises:
        EnvError: a variable with an invalid value, or ``WORLD_SIZE > 1`` without the
            rest of a launcher's variables.
    """
    env = os.environ if environ is None else environ
    world_size = _whole(env, "WORLD_SIZE", 1, minimum=1, what="the number of processes")
    given = {k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if _get(env, k) is not None}
    if world_size > 1 and len(given) < 3:
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in given]
        verb = "is" if len(missing) == 1 else "are"
        raise EnvError(
            f"WORLD_SIZE={world_size}, but {', '.join(missing)} {verb} not set: start the "
            f"processes with a launcher (torchrun --nproc-per-node {world_size} -m "
            "stagetrain.cli run ...), or unset WORLD_SIZE for a single process"
        )
    rank = _whole(env, "RANK", 0, minimum=0, what="this process's index")
    if rank >= world_size:
        raise EnvError(f"RANK: {rank} is not below WORLD_SIZE {world_size}")
    local_world_size = _whole(env, "LOCAL_WORLD_SIZE", None, minimum=1, what="processes here")
    local_rank = _whole(env, "LOCAL_RANK", 0, minimum=0, what="the index on this machine")
    if local_world_size is not None and local_rank >= local_world_size:
        raise EnvError(f"LOCAL_RANK: {local_rank} is not below LOCAL_WORLD_SIZE {local_world_size}")
    master_addr = _get(env, "MASTER_ADDR")
    if master_addr is not None and not master_addr.strip():
        raise EnvError(f"MASTER_ADDR: expected a host name or address, got {master_addr!r}")
    port_text = _get(env, "MASTER_PORT")
    master_port = None
    if port_text is not None:
        master_port = _parse_int(port_text)
        if master_port is None or not 1 <= master_port <= 65535:
            raise EnvError(f"MASTER_PORT: expected a port number 1-65535, got {port_text!r}")
    restarts = _whole(env, "TORCHELASTIC_RESTART_COUNT", 0, minimum=0, what="restarts so far")
    return LaunchEnv(
        world_size=world_size,
        rank=rank,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=master_addr.strip() if master_addr is not None else None,
        master_port=master_port,
        restart_count=restarts,
        use_agent_store=_boolean(env, "TORCHELASTIC_USE_AGENT_STORE"),
        dist_timeout_s=_seconds(env, "STAGETRAIN_DIST_TIMEOUT"),
    )


def cache_dir(environ: Mapping[str, str] | None = None, *, create: bool = True) -> Path:
    """The difficulty-score cache: ``$STAGETRAIN_CACHE`` or ``~/.cache/stagetrain/scores``.

    Created when ``create`` (default), and checked: a directory, writable, not on a
    pseudo file system such as ``/proc``.

    Raises:
        EnvError: naming ``STAGETRAIN_CACHE`` and what is wrong with it.
    """
    env = os.environ if environ is None else environ
    value = _get(env, "STAGETRAIN_CACHE")
    if value is None:
        home = _get(env, "HOME")
        base = Path(home) if home is not None else Path.home()
        return _checked_dir(base / ".cache" / "stagetrain" / "scores", None, create)
    return _checked_dir(Path(value).expanduser(), value, create)


def _checked_dir(path: Path, value: str | None, create: bool) -> Path:
    label = f"STAGETRAIN_CACHE: {value!r}" if value is not None else f"score cache {str(path)!r}"
    expected = "expected a writable directory"
    resolved = path.resolve()
    for pseudo in _PSEUDO_FILE_SYSTEMS:
        if resolved == Path(pseudo) or Path(pseudo) in resolved.parents:
            raise EnvError(f"{label} is on a pseudo file system ({pseudo}); {expected}")
    if path.exists() and not path.is_dir():
        raise EnvError(f"{label} is a file, not a directory; {expected}")
    if not create:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnvError(f"{label} cannot be created ({exc.strerror or exc}); {expected}") from None
    try:  # os.access alone is fooled by read-only mounts and by root
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise EnvError(f"{label} is not writable ({exc.strerror or exc}); {expected}") from None
    return path


def _get(env: Mapping[str, str], key: str) -> str | None:
    value = env.get(key)
    return None if value is None or value == "" else value


def _parse_int(text: str) -> int | None:
    text = text.strip()
    if not text or not (text.isdigit() or (text[0] in "+-" and text[1:].isdigit())):
        return None
    return int(text)


def _whole(
    env: Mapping[str, str], key: str, default: int | None, *, minimum: int, what: str
) -> int:
    text = _get(env, key)
    if text is None:
        return default  # type: ignore[return-value]
    value = _parse_int(text)
    if value is None or value < minimum:
        raise EnvError(f"{key}: expected a whole number >= {minimum} ({what}), got {text!r}")
    return value


def _boolean(env: Mapping[str, str], key: str) -> bool:
    text = _get(env, key)
    if text is None:
        return False
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise EnvError(f"{key}: expected true or false, got {text!r}")


def _seconds(env: Mapping[str, str], key: str) -> float:
    text = _get(env, key)
    if text is None:
        return DEFAULT_DIST_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_DIST_TIMEOUT_S:  # nan and inf fail too
        raise EnvError(
            f"{key}: expected seconds, a number > 0 and at most {MAX_DIST_TIMEOUT_S:.0f}, "
            f"got {text!r}"
        )
    return value
