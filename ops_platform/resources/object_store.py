"""Where backups and reports are kept: one interface, an S3 bucket or a local directory.

Every ``put`` streams: the SHA-256 and the byte count are computed while the
bytes go out, and at most one part (S3) or one chunk (local) is in memory. The
checksum is stored with the object, so ``head`` returns it without reading
the object back.

Keys are relative POSIX paths (``postgres_main/2024-05-01/base.tar``) whose
parts are not empty and do not start with ``.``; names starting with ``.`` are
the store's own (staged uploads, checksum sidecars) and are never listed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import dagster as dg
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import Field

from ops_platform.errors import MissingSettingError, OpsPlatformError, ServerUnreachableError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB

BUCKET_SETTING = "OPS_BACKUP_BUCKET"
KMS_KEY_SETTING = "OPS_BACKUP_KMS_KEY_ID"
LOCAL_DIR_SETTING = "OPS_BACKUP_DIR"
ENDPOINT_SETTING = "AWS_ENDPOINT_URL"
CREDENTIALS_SETTING = "AWS_ACCESS_KEY_ID (or AWS_PROFILE)"

SHA256_METADATA_KEY = "sha256"
SSE_MODES = ("aws:kms", "AES256")

S3_MIN_PART_SIZE = 5 * MiB
S3_MAX_PART_SIZE = 5 * GiB
S3_MAX_PARTS = 10_000
S3_MAX_SINGLE_COPY = 5 * GiB
PARTS_PER_SIZE_STEP = 2_000

_METADATA_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_T = TypeVar("_T")


class ObjectStoreError(OpsPlatformError):
    """An object store operation failed; the message names the store and the setting."""


class InvalidKeyError(ObjectStoreError, ValueError):
    """A key or prefix that is not a store key (absolute, ``..``, hidden, empty part)."""


class ObjectNotFound(ObjectStoreError):
    def __init__(self, key: str, url: str) -> None:
        self.key = key
        self.url = url
        super().__init__(f"object store: no object {url}")


class BucketNotFoundError(ObjectStoreError):
    """The configured bucket does not exist at the endpoint."""


class UploadFailedError(ObjectStoreError):
    """A put failed and was rolled back: the key holds what it held before."""


class SourceReadError(ObjectStoreError):
    """Reading the stream handed to ``put`` raised."""


@dataclass(frozen=True)
class StoredObject:
    """An object as the store knows it.

    ``sha256`` and ``metadata`` come from ``put`` and ``head``; ``list`` leaves
    them empty because an S3 listing does not carry object metadata.
    ``sha256`` is also None for an object written by something else than this
    store, or changed behind its back.
    """

    key: str
    size: int
    sha256: str | None
    url: str
    etag: str | None = None
    encryption: str | None = None
    kms_key_id: str | None = None
    content_type: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    last_modified: datetime | None = None


class ObjectStore(ABC):
    """Put, read, list and delete objects by key; see the module docstring for keys."""

    @abstractmethod
    def put(
        self,
        key: str,
        stream: BinaryIO,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> StoredObject:
        """Store everything ``stream`` yields under ``key``, atomically.

        Either the whole new object is stored with its checksum, or the key
        keeps what it held before and an error is raised:
        :class:`UploadFailedError` once the upload had started (reading the
        stream failed, a part was refused), or the error of the store itself
        (:class:`BucketNotFoundError`, ``ServerUnreachableError``...).
        """

    @abstractmethod
    def get(self, key: str) -> BinaryIO:
        """A readable stream of the object; close it (``with store.get(key) as stream``).

        Raises :class:`ObjectNotFound` when there is no such object.
        """

    @abstractmethod
    def head(self, key: str) -> StoredObject | None:
        """The object's size, checksum and metadata, or None when there is no such object."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        """Objects whose key starts with ``prefix`` (a plain string prefix), in key order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing object is not an error."""

    @abstractmethod
    def url(self, key: str) -> str:
        """Where the object lives, for people: ``s3://bucket/key`` or ``file:///path``."""

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> StoredObject:
        """Put a small object (a JSON manifest, a report) held in memory."""
        return self.put(key, io.BytesIO(data), content_type=content_type, metadata=metadata)

    def get_bytes(self, key: str) -> bytes:
        """Read a small object whole."""
        with self.get(key) as stream:
            return stream.read()


def validate_key(key: str) -> str:
    if (
        not isinstance(key, str)
        or not key
        or key.startswith("/")
        or "\\" in key
        or "\x00" in key
        or any(not part or part.startswith(".") for part in key.split("/"))
    ):
        raise InvalidKeyError(
            f"object key {key!r} is not allowed: a key is a relative path such as "
            "'postgres_main/2024-05-01/base.tar' whose parts are not empty and do not start with '.'"
        )
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: a key, a key with a trailing '/', or the start of one."""
    if not prefix:
        return ""
    *folders, last = prefix.split("/")
    if folders:
        validate_key("/".join(folders))
    if last:
        validate_key(last)
    return prefix


def validate_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    checked: dict[str, str] = {}
    for name, value in (metadata or {}).items():
        if name == SHA256_METADATA_KEY or not _METADATA_NAME.match(name):
            raise ValueError(
                f"object metadata name {name!r} is not allowed: use lowercase letters, digits and '-', "
                f"and not {SHA256_METADATA_KEY!r} (the store sets it)"
            )
        if not isinstance(value, str) or not value.isascii() or not value.isprintable():
            raise ValueError(f"object metadata {name!r} must be printable ASCII text")
        checked[name] = value
    return checked


def read_part(stream: BinaryIO, size: int, buffer: bytearray | None = None) -> bytearray:
    """Up to ``size`` bytes of ``stream``; fewer only at its end.

    The bytes go into ``buffer`` when it has that size, so a loop reading part
    after part holds one part in memory; reads are at most 1 MiB each.
    """
    if buffer is None or len(buffer) != size:
        buffer = bytearray(size)
    filled = 0
    try:
        with memoryview(buffer) as view:
            while filled < size:
                chunk = stream.read(min(size - filled, MiB))
                if not chunk:
                    break
                view[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
    except Exception as error:
        raise SourceReadError(f"reading the source stream failed ({type(error).__name__}: {error})") from error
    del buffer[filled:]
    return buffer


def aws_errors() -> tuple[type[Exception], ...]:
    """botocore's failures that are not a ClientError.

    botocore.parsers takes a tenth of a second to import, so it is imported
    when an error is being matched, not when the code location loads.
    """
    from botocore.parsers import ResponseParserError

    return (BotoCoreError, ResponseParserError)


def aws_client(
    service: str,
    *,
    region: str | None,
    endpoint_url: str | None,
    needed_for: str,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    max_attempts: int = 2,
) -> Any:
    """A boto3 client that fails fast when the endpoint is down.

    boto3 falls back to its own environment (``AWS_REGION``, ``AWS_ENDPOINT_URL``,
    credentials chain) for what is not given. Missing credentials are reported
    here, before any request, naming the settings to set.
    """
    import boto3
    from botocore.config import Config

    try:
        session = boto3.session.Session(region_name=region)
        credentials = session.get_credentials()
    except ProfileNotFound as error:
        raise OpsPlatformError(
            f"{needed_for}: {error} (check AWS_PROFILE and AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE)"
        ) from None
    if credentials is None:
        raise MissingSettingError(
            CREDENTIALS_SETTING,
            needed_for,
            "no AWS credentials in the environment, the shared credentials file or an instance role",
        )
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": max_attempts, "mode": "standard"},
    )
    try:
        return session.client(service, endpoint_url=endpoint_url or None, config=config)
    except NoRegionError:
        raise MissingSettingError("AWS_REGION", needed_for) from None


def _client_error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _http_status(error: ClientError) -> int | None:
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


class S3ObjectStore(ObjectStore):
    """Objects in an S3 bucket under ``prefix``, encrypted at rest.

    Encryption: SSE-KMS with ``kms_key_id`` whenever one is given, whatever
    ``sse`` says (``sse`` is the fallback without a key: ``"aws:kms"`` for the
    AWS-managed key, ``"AES256"`` for SSE-S3), else the bucket's default.

    A stream that fits in one part is stored with one PutObject carrying its
    checksum. A longer stream is uploaded part by part to a staging key, and
    then published to its key by one server-side copy that sets the checksum
    metadata (S3 takes metadata when an upload starts, before the checksum is
    known). The copy makes the publication atomic: nobody ever sees the new
    bytes without their checksum, and a failure at any step leaves the key as
    it was and no pending multipart upload. Copies above 5 GiB go through
    UploadPartCopy. Only a killed process can leave a staging object
    (``<prefix>.staging/``) or an incomplete upload behind: give the bucket a
    lifecycle rule that expires ``.staging/`` and aborts incomplete uploads.
    """

    STAGING_FOLDER = ".staging"

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        kms_key_id: str | None = None,
        sse: str | None = None,
        part_size: int = 8 * MiB,
        max_single_copy: int = S3_MAX_SINGLE_COPY,
        copy_part_size: int = 512 * MiB,
        list_page_size: int = 1000,
    ) -> None:
        if sse not in (None, *SSE_MODES):
            raise ValueError(f"sse must be one of {SSE_MODES} or None, not {sse!r}")
        for name, size in (("part_size", part_size), ("copy_part_size", copy_part_size)):
            if not S3_MIN_PART_SIZE <= size <= S3_MAX_PART_SIZE:
                raise ValueError(f"{name} must be between 5 MiB and 5 GiB, not {size} bytes")
        if not 0 < max_single_copy <= S3_MAX_SINGLE_COPY:
            raise ValueError("max_single_copy must be positive and at most 5 GiB")
        self.client = client
        self.bucket = bucket
        self.prefix = validate_key(prefix.strip("/")) + "/" if prefix.strip("/") else ""
        self.kms_key_id = kms_key_id or None
        self.sse = "aws:kms" if self.kms_key_id else sse
        self.part_size = part_size
        self.max_single_copy = max_single_copy
        self.copy_part_size = copy_part_size
        self.list_page_size = list_page_size

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def put(
        self,
        key: str,
        stream: BinaryIO,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> StoredObject:
        object_key = self._object_key(key)
        user_metadata = validate_metadata(metadata)
        digest = hashlib.sha256()
        try:
            first_part = read_part(stream, self.part_size)
        except SourceReadError as error:
            raise UploadFailedError(f"s3: put of {self.url(key)} failed, nothing was written: {error}") from error
        digest.update(first_part)
        if len(first_part) < self.part_size:
            return self._put_single(key, object_key, first_part, digest.hexdigest(), content_type, user_metadata)
        parts = self._parts(stream, first_part, digest)
        return self._put_multipart(key, object_key, parts, digest, content_type, user_metadata)

    def get(self, key: str) -> BinaryIO:
        object_key = self._object_key(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=object_key)
        except ClientError as error:
            if _client_error_code(error) == "NoSuchKey":
                raise ObjectNotFound(key, self.url(key)) from None
            raise self._translate(error, "get", key) from error
        except aws_errors() as error:
            raise self._translate(error, "get", key) from error
        return response["Body"]

    def head(self, key: str) -> StoredObject | None:
        object_key = self._object_key(key)
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=object_key)
        except ClientError as error:
            if _http_status(error) == 404:
                # HEAD answers a bare 404 for a missing bucket as for a missing key.
                self._require_bucket()
                return None
            raise self._translate(error, "head", key) from error
        except aws_errors() as error:
            raise self._translate(error, "head", key) from error
        stored_metadata = dict(response.get("Metadata") or {})
        sha256 = stored_metadata.pop(SHA256_METADATA_KEY, None)
        if sha256 is not None and not _SHA256_HEX.match(sha256):
            sha256 = None
        return StoredObject(
            key=key,
            size=int(response["ContentLength"]),
            sha256=sha256,
            url=self.url(key),
            etag=response.get("ETag"),
            encryption=response.get("ServerSideEncryption"),
            kms_key_id=response.get("SSEKMSKeyId"),
            content_type=response.get("ContentType"),
            metadata=stored_metadata,
            last_modified=response.get("LastModified"),
        )

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        listing_prefix = self.prefix + validate_prefix(prefix)
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket,
            Prefix=listing_prefix,
            PaginationConfig={"PageSize": self.list_page_size},
        )
        try:
            for page in pages:
                for entry in page.get("Contents", []):
                    key = entry["Key"][len(self.prefix) :]
                    if not _is_store_key(key):
                        continue
                    yield StoredObject(
                        key=key,
                        size=int(entry["Size"]),
                        sha256=None,
                        url=self.url(key),
                        etag=entry.get("ETag"),
                        last_modified=entry.get("LastModified"),
                    )
        except (ClientError, *aws_errors()) as error:
            raise self._translate(error, "list", prefix or None) from error

    def delete(self, key: str) -> None:
        object_key = self._object_key(key)
        self._request("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=object_key))

    def _object_key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _encryption(self) -> dict[str, str]:
        if self.kms_key_id:
            return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.kms_key_id}
        if self.sse:
            return {"ServerSideEncryption": self.sse}
        return {}

    def _object_settings(self, content_type: str | None, metadata: dict[str, str]) -> dict[str, Any]:
        settings: dict[str, Any] = {"Metadata": metadata, **self._encryption()}
        if content_type:
            settings["ContentType"] = content_type
        return settings

    def _put_single(
        self,
        key: str,
        object_key: str,
        data: bytearray,
        sha256: str,
        content_type: str | None,
        metadata: dict[str, str],
    ) -> StoredObject:
        settings = self._object_settings(content_type, {**metadata, SHA256_METADATA_KEY: sha256})
        response = self._request(
            "put",
            key,
            lambda: self.client.put_object(Bucket=self.bucket, Key=object_key, Body=data, **settings),
        )
        return self._stored(key, len(data), sha256, response, content_type, metadata)

    def _parts(self, stream: BinaryIO, part: bytearray, digest: Any) -> Iterator[bytearray]:
        """The parts of the stream, read into one buffer that each part reuses."""
        number = 1
        while part:
            yield part
            number += 1
            part = read_part(stream, self._part_size(number), part)
            digest.update(part)

    def _put_multipart(
        self,
        key: str,
        object_key: str,
        parts: Iterator[bytearray],
        digest: Any,
        content_type: str | None,
        metadata: dict[str, str],
    ) -> StoredObject:
        staging_key = f"{self.prefix}{self.STAGING_FOLDER}/{uuid.uuid4().hex}"
        settings = self._object_settings(content_type, {})
        upload_id = self._request(
            "put",
            key,
            lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=staging_key, **settings)["UploadId"],
        )
        try:
            size, staging_version = self._upload_parts(staging_key, upload_id, parts)
        except BaseException as error:
            aborted = self._abort(staging_key, upload_id)
            if isinstance(error, Exception):
                raise UploadFailedError(
                    f"s3: put of {self.url(key)} failed and was rolled back "
                    f"({aborted}; the key is unchanged): {self._reason(error, key)}"
                ) from error
            raise
        sha256 = digest.hexdigest()
        try:
            response = self._publish(
                key, object_key, staging_key, size, content_type, {**metadata, SHA256_METADATA_KEY: sha256}
            )
        except Exception as error:
            raise UploadFailedError(
                f"s3: put of {self.url(key)} failed while publishing the uploaded object "
                f"(the key is unchanged): {self._reason(error, key)}"
            ) from error
        finally:
            self._discard_staging(staging_key, staging_version)
        return self._stored(key, size, sha256, response, content_type, metadata)

    def _upload_parts(self, staging_key: str, upload_id: str, parts: Iterator[bytearray]) -> tuple[int, str | None]:
        """Upload every part; returns the object size and, in a versioned bucket, its version id."""
        uploaded: list[dict[str, Any]] = []
        size = 0
        for number, part in enumerate(parts, start=1):
            if number > S3_MAX_PARTS:
                raise ObjectStoreError(f"the object is larger than S3 allows ({S3_MAX_PARTS} parts)")
            response = self.client.upload_part(
                Bucket=self.bucket, Key=staging_key, UploadId=upload_id, PartNumber=number, Body=part
            )
            uploaded.append({"ETag": response["ETag"], "PartNumber": number})
            size += len(part)
        completed = self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=staging_key, UploadId=upload_id, MultipartUpload={"Parts": uploaded}
        )
        return size, completed.get("VersionId")

    def _part_size(self, number: int) -> int:
        """Parts double in size every 2,000 parts, so 10,000 parts reach S3's 5 TB object limit
        while a stream of ordinary size keeps one ``part_size`` in memory."""
        return min(self.part_size * 2 ** ((number - 1) // PARTS_PER_SIZE_STEP), S3_MAX_PART_SIZE)

    def _publish(
        self,
        key: str,
        object_key: str,
        staging_key: str,
        size: int,
        content_type: str | None,
        metadata: dict[str, str],
    ) -> dict[str, Any]:
        source = {"Bucket": self.bucket, "Key": staging_key}
        settings = self._object_settings(content_type, metadata)
        if size <= self.max_single_copy:
            return self._request(
                "put",
                key,
                lambda: self.client.copy_object(
                    Bucket=self.bucket, Key=object_key, CopySource=source, MetadataDirective="REPLACE", **settings
                ),
            )
        return self._copy_in_parts(key, object_key, source, size, settings)

    def _copy_in_parts(
        self, key: str, object_key: str, source: dict[str, str], size: int, settings: dict[str, Any]
    ) -> dict[str, Any]:
        upload_id = self._request(
            "put",
            key,
            lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=object_key, **settings)["UploadId"],
        )
        try:
            parts = []
            for number, start in enumerate(range(0, size, self.copy_part_size), start=1):
                end = min(start + self.copy_part_size, size) - 1
                response = self.client.upload_part_copy(
                    Bucket=self.bucket,
                    Key=object_key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=source,
                    CopySourceRange=f"bytes={start}-{end}",
                )
                parts.append({"ETag": response["CopyPartResult"]["ETag"], "PartNumber": number})
            return self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=object_key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            self._abort(object_key, upload_id)
            raise

    def _abort(self, object_key: str, upload_id: str) -> str:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=object_key, UploadId=upload_id)
        except Exception as error:  # noqa: BLE001 - the original failure is the one to report
            log.warning("s3: could not abort multipart upload %s of s3://%s/%s: %s", upload_id, self.bucket, object_key, error)
            return (
                f"aborting multipart upload {upload_id} also failed ({error}); "
                "the bucket's AbortIncompleteMultipartUpload lifecycle rule will remove it"
            )
        return "multipart upload aborted"

    def _discard_staging(self, staging_key: str, version_id: str | None) -> None:
        # In a versioned bucket only deleting the version itself frees the space.
        version = {"VersionId": version_id} if version_id else {}
        try:
            self.client.delete_object(Bucket=self.bucket, Key=staging_key, **version)
        except Exception as error:  # noqa: BLE001 - the outcome of the put is already decided
            log.warning("s3: could not delete staging object s3://%s/%s: %s", self.bucket, staging_key, error)

    def _require_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if _http_status(error) == 404:
                raise self._bucket_missing() from None
            raise self._translate(error, "head", None) from error
        except aws_errors() as error:
            raise self._translate(error, "head", None) from error

    def _request(self, action: str, key: str | None, request: Callable[[], _T]) -> _T:
        try:
            return request()
        except (ClientError, *aws_errors()) as error:
            raise self._translate(error, action, key) from error

    def _stored(
        self,
        key: str,
        size: int,
        sha256: str,
        response: Mapping[str, Any],
        content_type: str | None,
        metadata: dict[str, str],
    ) -> StoredObject:
        etag = response.get("ETag") or response.get("CopyObjectResult", {}).get("ETag")
        return StoredObject(
            key=key,
            size=size,
            sha256=sha256,
            url=self.url(key),
            etag=etag,
            encryption=response.get("ServerSideEncryption"),
            kms_key_id=response.get("SSEKMSKeyId"),
            content_type=content_type,
            metadata=metadata,
        )

    def _bucket_missing(self) -> BucketNotFoundError:
        return BucketNotFoundError(
            f"s3: bucket '{self.bucket}' does not exist at {self.endpoint} (check {BUCKET_SETTING})"
        )

    def _reason(self, error: BaseException, key: str) -> str:
        if isinstance(error, OpsPlatformError):
            return str(error)
        if isinstance(error, (ClientError, *aws_errors())):
            return str(self._translate(error, "put", key))
        return f"{type(error).__name__}: {error}"

    def _translate(self, error: Exception, action: str, key: str | None) -> OpsPlatformError:
        # Not self.url(): key may be a listing prefix, which is no valid key.
        target = f"s3://{self.bucket}/{self.prefix}{key or ''}"
        if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
            return MissingSettingError(CREDENTIALS_SETTING, f"s3 bucket '{self.bucket}'")
        if isinstance(error, (BotoConnectionError, HTTPClientError)):
            return ServerUnreachableError(
                f"s3 bucket '{self.bucket}'", self.endpoint, ENDPOINT_SETTING, f"cannot connect ({type(error).__name__})"
            )
        if isinstance(error, ClientError):
            code = _client_error_code(error)
            message = error.response.get("Error", {}).get("Message", "")
            if code == "NoSuchBucket":
                return self._bucket_missing()
            if code.startswith("KMS.") or "KMS" in message:
                return ObjectStoreError(
                    f"s3: {action} of {target} was refused by KMS ({code}: {message}) (check {KMS_KEY_SETTING})"
                )
            if code == "AccessDenied" or _http_status(error) == 403:
                return ObjectStoreError(
                    f"s3: access denied to {action} {target} at {self.endpoint} "
                    f"(check the IAM policy of the credentials and {BUCKET_SETTING})"
                )
            if code.isdigit():
                return ObjectStoreError(
                    f"s3: {action} of {target} failed: {self.endpoint} did not answer like S3 "
                    f"(HTTP {code} {message}) (check {ENDPOINT_SETTING})"
                )
            return ObjectStoreError(f"s3: {action} of {target} failed at {self.endpoint}: {code}: {message}")
        return ObjectStoreError(
            f"s3: {action} of {target} failed: {self.endpoint} did not answer like S3 ({error}) "
            f"(check {ENDPOINT_SETTING})"
        )


def _is_store_key(key: str) -> bool:
    try:
        validate_key(key)
    except InvalidKeyError:
        return False
    return True


@dataclass(frozen=True)
class _FileStamp:
    """Identifies one written file, so a checksum sidecar is only trusted for the file it describes."""

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, stat: os.stat_result) -> _FileStamp:
        return cls(inode=stat.st_ino, size=stat.st_size, mtime_ns=stat.st_mtime_ns)


class LocalObjectStore(ObjectStore):
    """Objects as files under ``root``, for the sandbox and for tests.

    A put writes a hidden temporary file in the key's directory and renames
    it over the key only once complete, so a failed put leaves the previous
    object in place. The checksum, content type and metadata are kept in a
    hidden sidecar ``.<name>.meta.json`` beside the file, with the file's
    inode, size and mtime: a file changed behind the store's back has no
    checksum rather than a wrong one. Unlike S3, a key cannot also be the
    folder of other keys (``a`` and ``a/b``).
    """

    def __init__(self, root: Path | str, *, chunk_size: int = 1 * MiB) -> None:
        self.root = Path(root).absolute()
        self.chunk_size = chunk_size

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def put(
        self,
        key: str,
        stream: BinaryIO,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> StoredObject:
        path = self._path(key)
        user_metadata = validate_metadata(metadata)
        self._make_folder(key, path.parent)
        token = uuid.uuid4().hex
        staged = path.with_name(f".{path.name}.{token}.tmp")
        staged_sidecar = path.with_name(f".{path.name}.{token}.meta.tmp")
        try:
            size, sha256, stamp = self._write(stream, staged)
            sidecar = {
                SHA256_METADATA_KEY: sha256,
                "content_type": content_type,
                "metadata": user_metadata,
                "stamp": stamp.__dict__,
            }
            staged_sidecar.write_text(json.dumps(sidecar))
            os.replace(staged, path)
            os.replace(staged_sidecar, self._sidecar(path))
            _sync_folder(path.parent)
        except BaseException as error:
            staged.unlink(missing_ok=True)
            staged_sidecar.unlink(missing_ok=True)
            if isinstance(error, SourceReadError):
                raise UploadFailedError(
                    f"local store: put of {path.as_uri()} failed, the key is unchanged: {error}"
                ) from error
            if isinstance(error, OSError):
                raise ObjectStoreError(
                    f"local store: cannot write {path} ({error.strerror or error}) (check {LOCAL_DIR_SETTING})"
                ) from error
            raise
        return StoredObject(
            key=key,
            size=size,
            sha256=sha256,
            url=path.as_uri(),
            content_type=content_type,
            metadata=user_metadata,
            last_modified=_utc(stamp.mtime_ns),
        )

    def get(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key, path.as_uri()) from None

    def head(self, key: str) -> StoredObject | None:
        path = self._path(key)
        try:
            stat = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        sidecar = self._read_sidecar(path, _FileStamp.of(stat))
        return StoredObject(
            key=key,
            size=stat.st_size,
            sha256=sidecar.get(SHA256_METADATA_KEY),
            url=path.as_uri(),
            content_type=sidecar.get("content_type"),
            metadata=dict(sidecar.get("metadata") or {}),
            last_modified=_utc(stat.st_mtime_ns),
        )

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        validate_prefix(prefix)
        folder = self.root / prefix.rpartition("/")[0]
        keys = sorted(key for key in self._keys_under(folder) if key.startswith(prefix))
        for key in keys:
            path = self.root / key
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # deleted while listing
            yield StoredObject(
                key=key, size=stat.st_size, sha256=None, url=path.as_uri(), last_modified=_utc(stat.st_mtime_ns)
            )

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            return
        path.unlink(missing_ok=True)
        self._sidecar(path).unlink(missing_ok=True)
        for folder in path.parents:
            if folder == self.root or not folder.is_relative_to(self.root):
                break
            try:
                folder.rmdir()
            except OSError:
                break

    def _path(self, key: str) -> Path:
        path = self.root / validate_key(key)
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise InvalidKeyError(f"object key {key!r} leads outside the local store {self.root} through a link")
        return path

    def _make_folder(self, key: str, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ObjectStoreError(
                f"local store: cannot store {key!r} in {self.root}: part of its path is an existing object"
            ) from None
        except OSError as error:
            raise ObjectStoreError(
                f"local store: cannot create {folder} ({error.strerror or error}) (check {LOCAL_DIR_SETTING})"
            ) from error

    def _write(self, stream: BinaryIO, staged: Path) -> tuple[int, str, _FileStamp]:
        digest = hashlib.sha256()
        size = 0
        chunk = bytearray()
        with open(staged, "xb") as out:
            while chunk := read_part(stream, self.chunk_size, chunk):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
            stamp = _FileStamp.of(os.fstat(out.fileno()))
        return size, digest.hexdigest(), stamp

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(f".{path.name}.meta.json")

    def _read_sidecar(self, path: Path, stamp: _FileStamp) -> dict[str, Any]:
        try:
            sidecar = json.loads(self._sidecar(path).read_text())
            if _FileStamp(**sidecar["stamp"]) != stamp:
                return {}
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        return sidecar

    def _keys_under(self, folder: Path) -> Iterator[str]:
        if not folder.is_dir() or not folder.resolve().is_relative_to(self.root.resolve()):
            return
        for current, folders, files in os.walk(folder):
            folders[:] = [name for name in folders if not name.startswith(".")]
            base = Path(current).relative_to(self.root)
            for name in files:
                if not name.startswith("."):
                    yield (base / name).as_posix()


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _utc(mtime_ns: int) -> datetime:
    return datetime.fromtimestamp(mtime_ns / 1e9, tz=timezone.utc)


class ObjectStoreResource(dg.ConfigurableResource):
    """The object store for backups and reports: S3 when ``bucket`` is set, else a local directory."""

    bucket: str | None = Field(
        default=None,
        description=f"S3 bucket ({BUCKET_SETTING}); unset keeps objects in local_dir instead.",
    )
    prefix: str = Field(default="", description="Key prefix inside the bucket (OPS_BACKUP_PREFIX).")
    kms_key_id: str | None = Field(
        default=None,
        description=f"KMS key id or ARN for SSE-KMS ({KMS_KEY_SETTING}); unset uses `sse` or the bucket default.",
    )
    sse: str | None = Field(
        default=None,
        description="Server-side encryption without a key id: 'aws:kms' (AWS-managed key) or 'AES256'.",
    )
    endpoint_url: str | None = Field(
        default=None,
        description=f"S3 endpoint; unset uses boto3's default ({ENDPOINT_SETTING} or AWS itself).",
    )
    region: str | None = Field(default=None, description="AWS region; unset uses AWS_REGION.")
    local_dir: str = Field(
        default=".sandbox/store",
        description=f"Directory of the local store used when no bucket is set ({LOCAL_DIR_SETTING}).",
    )
    part_size_mib: int = Field(
        default=8, description="Multipart upload part size in MiB (5 to 5120); one part is held in memory."
    )
    connect_timeout_seconds: float = Field(
        default=5.0, description="How long to wait for the S3 endpoint to accept a connection."
    )
    max_attempts: int = Field(default=2, description="Attempts per S3 request, the first included.")

    def get_store(self) -> ObjectStore:
        if not self.bucket:
            return LocalObjectStore(Path(self.local_dir))
        client = aws_client(
            "s3",
            region=self.region,
            endpoint_url=self.endpoint_url,
            needed_for=f"s3 bucket '{self.bucket}'",
            connect_timeout=self.connect_timeout_seconds,
            max_attempts=self.max_attempts,
        )
        return S3ObjectStore(
            client,
            self.bucket,
            self.prefix,
            kms_key_id=self.kms_key_id,
            sse=self.sse,
            part_size=self.part_size_mib * MiB,
        )
