"""The checkpoint manifest and sidecars: their schemas, and the entries they describe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr


@dataclass(frozen=True)
class ManifestEntry:
    """One checkpoint: its file name inside ``checkpoints/``, step, stage and checksum.

    ``sha256`` is ``None`` for a complete checkpoint file found without its sidecar
    (then the zip archive's own CRCs are checked instead); ``state`` holds the counters
    the sidecar recorded (``step``, ``stage_index``, ``stage_step``) when known.
    """

    file: str
    step: int
    stage: str
    sha256: str | None
    state: dict[str, int] | None = field(default=None, compare=False)

    def manifest_dict(self) -> dict[str, Any]:
        return {"file": self.file, "step": self.step, "stage": self.stage, "sha256": self.sha256}


class EntrySchema(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    file: StrictStr
    step: StrictInt = Field(ge=0)
    stage: StrictStr
    sha256: StrictStr = Field(pattern=r"^[0-9a-f]{64}$")


class ManifestSchema(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    checkpoints: list[EntrySchema]


class SidecarSchema(EntrySchema):
    format: StrictInt
    bytes: StrictInt = Field(ge=0)
    state: dict[str, StrictInt] | None = None


def sidecar_name(checkpoint: str) -> str:
    return checkpoint[: -len(".pt")] + ".json"


def payload_counters(payload: dict[str, Any]) -> dict[str, int] | None:
    state = payload.get("state")
    if not isinstance(state, dict):
        return None
    keys = ("step", "stage_index", "stage_step")
    if not all(isinstance(state.get(k), int) for k in keys):
        return None
    return {k: int(state[k]) for k in keys}
