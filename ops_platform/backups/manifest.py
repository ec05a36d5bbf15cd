"""The JSON manifest written beside every backup's artifacts.

It is the commit marker of a backup: the catalog writes it last, so a backup
without one never happened as far as restores and retention are concerned.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ops_platform.backups.base import Artifact
from ops_platform.errors import OpsPlatformError

MANIFEST_FORMAT = "ops-platform-backup-manifest/1"
MANIFEST_NAME = "manifest.json"


class ManifestError(OpsPlatformError):
    """A manifest is missing, not JSON, or not a manifest; names its URL and the problem."""

    def __init__(self, url: str, problem: str) -> None:
        self.url = url
        self.problem = problem
        super().__init__(f"backup manifest {url}: {problem}")


class _ArtifactModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    key: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    url: str
    encryption: str | None = None


class BackupManifest(BaseModel):
    """One committed backup: what it is, where its bytes are, what a restore needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = MANIFEST_FORMAT
    backup_id: str
    datastore: str
    engine: str
    method: str
    partition: str
    started_at: datetime
    finished_at: datetime
    recovery_point: datetime
    bytes: int = Field(ge=0)  # stored: what the backup occupies where it is kept
    source_bytes: int | None = Field(default=None, ge=0)  # read from the source (database size)
    sha256: str | None = None
    artifacts: list[_ArtifactModel] = []
    source_version: str
    encryption: str | None = None
    restore: dict[str, Any] = {}
    counts: dict[str, int] = {}
    details: dict[str, Any] = {}

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value != MANIFEST_FORMAT:
            raise ValueError(f"unknown manifest format {value!r} (expected {MANIFEST_FORMAT})")
        return value

    @field_validator("started_at", "finished_at", "recovery_point")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("timestamp without a time zone")
        return value

    @property
    def duration_seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    def artifact_list(self) -> list[Artifact]:
        return [Artifact(**item.model_dump()) for item in self.artifacts]

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True).encode()

    @classmethod
    def build(cls, **fields: Any) -> BackupManifest:
        artifacts: list[Artifact] = list(fields.pop("artifacts", ()))
        fields["artifacts"] = [artifact.__dict__ for artifact in artifacts]
        fields.setdefault("bytes", sum(artifact.size for artifact in artifacts))
        if len(artifacts) == 1:
            fields.setdefault("sha256", artifacts[0].sha256)
        encryptions = {artifact.encryption for artifact in artifacts}
        if len(encryptions) == 1:
            fields.setdefault("encryption", encryptions.pop())
        return cls(**fields)


def parse_manifest(raw: bytes, url: str) -> BackupManifest:
    """Parse a manifest, or raise :class:`ManifestError` saying what is wrong with it."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(url, f"not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ManifestError(url, f"expected a JSON object, got {type(document).__name__}")
    try:
        return BackupManifest.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(top level)'}: "
            f"{error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        )
        raise ManifestError(url, problems) from None
