"""The object store against moto's S3 over real HTTP, and against a local directory."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from ops_platform.errors import MissingSettingError, ServerUnreachableError
from ops_platform.local_servers.process import free_port
from ops_platform.resources.object_store import (
    MiB,
    BucketNotFoundError,
    InvalidKeyError,
    LocalObjectStore,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreResource,
    S3ObjectStore,
    UploadFailedError,
    aws_client,
)

PART = 5 * MiB  # S3's smallest part


class PatternStream:
    """``size`` bytes made up while they are read, never held whole: what a backup tool pipes.

    With ``fail_after``, reading past that many bytes raises ``error``.
    """

    BLOCK = 64 * 1024

    def __init__(
        self, size: int, *, seed: str = "x", fail_after: int | None = None, error: BaseException | None = None
    ) -> None:
        self.size = size
        self.seed = seed
        self.fail_after = fail_after
        self.error = error or OSError("pipe from pg_dump closed")
        self.position = 0

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.position >= self.fail_after:
            raise self.error
        remaining = self.size - self.position
        n = remaining if n is None or n < 0 else min(n, remaining)
        block, offset = divmod(self.position, self.BLOCK)
        chunk = self._block(block)[offset : offset + n]
        self.position += len(chunk)
        return chunk

    def _block(self, number: int) -> bytes:
        return hashlib.sha256(f"{self.seed}:{number}".encode()).digest() * (self.BLOCK // 32)


def sha256_of(stream: Any) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(MiB):
        digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture
def s3_client(aws_env: Any) -> Any:
    return aws_client("s3", region=None, endpoint_url=None, needed_for="tests")


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return S3ObjectStore(request.getfixturevalue("s3_client"), bucket, prefix="backups", part_size=PART)


def pending_uploads(client: Any, bucket: str) -> list[Any]:
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def bucket_keys(client: Any, bucket: str) -> list[str]:
    return [entry["Key"] for entry in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_round_trip_put_head_get_list_delete(store: ObjectStore) -> None:
    expected = sha256_of(PatternStream(300_000))

    stored = store.put("postgres_main/2024-05-01/base.tar", PatternStream(300_000))

    assert (stored.size, stored.sha256) == (300_000, expected)
    assert stored.url.endswith("postgres_main/2024-05-01/base.tar")
    head = store.head("postgres_main/2024-05-01/base.tar")
    assert head is not None and (head.size, head.sha256, head.url) == (300_000, expected, stored.url)
    with store.get("postgres_main/2024-05-01/base.tar") as stream:
        assert sha256_of(stream) == expected
    assert [(o.key, o.size) for o in store.list("postgres_main/")] == [("postgres_main/2024-05-01/base.tar", 300_000)]

    store.delete("postgres_main/2024-05-01/base.tar")

    assert store.head("postgres_main/2024-05-01/base.tar") is None
    assert list(store.list()) == []
    with pytest.raises(ObjectNotFound, match="base.tar"):
        store.get("postgres_main/2024-05-01/base.tar")
    store.delete("postgres_main/2024-05-01/base.tar")  # deleting again is not an error


def test_small_manifest_keeps_content_type_and_metadata(store: ObjectStore) -> None:
    manifest = b'{"backup": "postgres_main", "files": 3}'

    stored = store.put_bytes(
        "postgres_main/manifest.json", manifest, content_type="application/json", metadata={"run-id": "r-42"}
    )

    head = store.head("postgres_main/manifest.json")
    assert head is not None
    assert head.sha256 == stored.sha256 == hashlib.sha256(manifest).hexdigest()
    assert head.content_type == "application/json"
    assert dict(head.metadata) == {"run-id": "r-42"}
    assert store.get_bytes("postgres_main/manifest.json") == manifest


def test_empty_object(store: ObjectStore) -> None:
    stored = store.put_bytes("markers/empty", b"")

    assert (stored.size, stored.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert store.get_bytes("markers/empty") == b""


def test_list_takes_a_plain_prefix_and_answers_in_key_order(store: ObjectStore) -> None:
    for key in ["redis/x", "pg/2024-06-01/c", "pg/2024-05-02/b", "pg/2024-05-01/a"]:
        store.put_bytes(key, key.encode())

    assert [o.key for o in store.list()] == ["pg/2024-05-01/a", "pg/2024-05-02/b", "pg/2024-06-01/c", "redis/x"]
    assert [o.key for o in store.list("pg/2024-05")] == ["pg/2024-05-01/a", "pg/2024-05-02/b"]
    assert [o.key for o in store.list("pg/2024-06-01/")] == ["pg/2024-06-01/c"]
    assert list(store.list("nothing/")) == []
    assert all(o.sha256 is None and o.last_modified is not None for o in store.list())


def test_listing_follows_pages_and_hides_the_staging_area(s3_client: Any, s3_bucket: str) -> None:
    store = S3ObjectStore(s3_client, s3_bucket, prefix="backups", list_page_size=2)
    for day in range(1, 6):
        store.put_bytes(f"pg/2024-05-0{day}/base.tar", b"x")
    s3_client.put_object(Bucket=s3_bucket, Key="backups/.staging/0123abcd", Body=b"left by a killed run")

    keys = [o.key for o in store.list()]

    assert keys == [f"pg/2024-05-0{day}/base.tar" for day in range(1, 6)]


def test_failed_put_leaves_the_existing_object(store: ObjectStore) -> None:
    good = store.put_bytes("redis/dump.rdb", b"the good backup")

    with pytest.raises(UploadFailedError, match="pipe from pg_dump closed"):
        store.put("redis/dump.rdb", PatternStream(200_000, fail_after=100_000))

    assert store.get_bytes("redis/dump.rdb") == b"the good backup"
    head = store.head("redis/dump.rdb")
    assert head is not None and head.sha256 == good.sha256
    assert [o.key for o in store.list()] == ["redis/dump.rdb"]


BAD_KEYS = ["../outside", "/etc/passwd", "a/../../b", "", "a//b", "a/", ".hidden", "a/.staging/x", "a\\b"]


def test_keys_outside_the_store_are_refused(store: ObjectStore) -> None:
    for key in BAD_KEYS:
        with pytest.raises(InvalidKeyError, match="not allowed"):
            store.put_bytes(key, b"x")
        with pytest.raises(InvalidKeyError):
            store.head(key)
        with pytest.raises(InvalidKeyError):
            store.get(key)
        with pytest.raises(InvalidKeyError):
            store.delete(key)
    assert list(store.list()) == []


def test_listing_prefix_outside_the_store_is_refused(store: ObjectStore) -> None:
    with pytest.raises(InvalidKeyError):
        list(store.list("../"))


def test_metadata_names_the_store_owns_are_refused(store: ObjectStore) -> None:
    with pytest.raises(ValueError, match="sha256"):
        store.put_bytes("a", b"x", metadata={"sha256": "0" * 64})
    with pytest.raises(ValueError, match="ASCII"):
        store.put_bytes("a", b"x", metadata={"note": "백업"})
    assert store.head("a") is None


def test_large_put_streams_one_part_at_a_time(s3_client: Any, s3_bucket: str) -> None:
    store = S3ObjectStore(s3_client, s3_bucket, prefix="backups", part_size=PART)
    size = 20 * MiB + 12_345
    store.put_bytes("warm-up", b"x")  # botocore loads its lazy parts outside the measurement

    tracemalloc.start()
    try:
        stored = store.put("postgres_main/base.tar", PatternStream(size, seed="big"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB while storing {size / MiB:.0f} MiB"
    expected = sha256_of(PatternStream(size, seed="big"))
    assert (stored.size, stored.sha256) == (size, expected)
    head = store.head("postgres_main/base.tar")
    assert head is not None and (head.size, head.sha256) == (size, expected)
    with store.get("postgres_main/base.tar") as stream:
        assert sha256_of(stream) == expected
    assert pending_uploads(s3_client, s3_bucket) == []
    assert sorted(bucket_keys(s3_client, s3_bucket)) == ["backups/postgres_main/base.tar", "backups/warm-up"]


def test_objects_above_the_single_copy_limit_are_published_in_part_copies(s3_client: Any, s3_bucket: str) -> None:
    store = S3ObjectStore(s3_client, s3_bucket, part_size=PART, max_single_copy=6 * MiB, copy_part_size=PART)

    stored = store.put("etcd/snapshot.db", PatternStream(12 * MiB, seed="copy"))

    raw = s3_client.head_object(Bucket=s3_bucket, Key="etcd/snapshot.db")
    assert raw["ETag"].endswith('-3"'), "published by a 3-part UploadPartCopy"
    assert raw["Metadata"]["sha256"] == stored.sha256 == sha256_of(PatternStream(12 * MiB, seed="copy"))
    assert pending_uploads(s3_client, s3_bucket) == []
    assert bucket_keys(s3_client, s3_bucket) == ["etcd/snapshot.db"]


def test_source_failing_after_two_parts_leaves_no_object_and_no_upload(s3_client: Any, s3_bucket: str) -> None:
    store = S3ObjectStore(s3_client, s3_bucket, part_size=PART)
    store.put_bytes("postgres_main/base.tar", b"yesterday's backup")

    with pytest.raises(UploadFailedError) as failure:
        store.put("postgres_main/base.tar", PatternStream(20 * MiB, fail_after=2 * PART + 1000))

    message = str(failure.value)
    assert "rolled back" in message and "pipe from pg_dump closed" in message
    assert f"s3://{s3_bucket}/postgres_main/base.tar" in message
    assert pending_uploads(s3_client, s3_bucket) == []
    assert bucket_keys(s3_client, s3_bucket) == ["postgres_main/base.tar"]
    assert store.get_bytes("postgres_main/base.tar") == b"yesterday's backup"


def test_interrupted_upload_is_aborted_and_the_interrupt_goes_on(s3_client: Any, s3_bucket: str) -> None:
    store = S3ObjectStore(s3_client, s3_bucket, part_size=PART)

    with pytest.raises(KeyboardInterrupt):
        store.put("redis/dump.rdb", PatternStream(20 * MiB, fail_after=2 * PART, error=KeyboardInterrupt()))

    assert pending_uploads(s3_client, s3_bucket) == []
    assert bucket_keys(s3_client, s3_bucket) == []


class AbortingStream(PatternStream):
    """Aborts the pending upload from outside (as a lifecycle rule would) once two parts are read."""

    def __init__(self, size: int, client: Any, bucket: str) -> None:
        super().__init__(size)
        self.client, self.bucket = client, bucket

    def read(self, n: int = -1) -> bytes:
        if self.position == 2 * PART:
            for upload in pending_uploads(self.client, self.bucket):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        return super().read(n)


def test_part_refused_by_s3_fails_the_put_cleanly(s3_client: Any, s3_bucket: str) -> None:
    store = S3ObjectStore(s3_client, s3_bucket, part_size=PART)

    with pytest.raises(UploadFailedError, match="NoSuchUpload"):
        store.put("redis/dump.rdb", AbortingStream(20 * MiB, s3_client, s3_bucket))

    assert pending_uploads(s3_client, s3_bucket) == []
    assert bucket_keys(s3_client, s3_bucket) == []


@pytest.fixture
def kms_key_id(aws_env: Any) -> str:
    return boto3.client("kms").create_key(Description="ops backups")["KeyMetadata"]["KeyId"]


@pytest.mark.parametrize("size", [1000, 11 * MiB], ids=["single-put", "multipart"])
def test_sse_kms_with_the_configured_key(s3_client: Any, s3_bucket: str, kms_key_id: str, size: int) -> None:
    # The production wiring passes sse="AES256" too: a key id wins.
    store = S3ObjectStore(s3_client, s3_bucket, kms_key_id=kms_key_id, sse="AES256", part_size=PART)

    stored = store.put("pg/base.tar", PatternStream(size))

    raw = s3_client.head_object(Bucket=s3_bucket, Key="pg/base.tar")
    assert raw["ServerSideEncryption"] == "aws:kms"
    assert kms_key_id in raw["SSEKMSKeyId"]
    assert stored.encryption == "aws:kms"
    head = store.head("pg/base.tar")
    assert head is not None and head.encryption == "aws:kms" and kms_key_id in (head.kms_key_id or "")


@pytest.mark.parametrize("size", [1000, 11 * MiB], ids=["single-put", "multipart"])
def test_sse_aes256(s3_client: Any, s3_bucket: str, size: int) -> None:
    store = S3ObjectStore(s3_client, s3_bucket, sse="AES256", part_size=PART)

    store.put("pg/base.tar", PatternStream(size))

    assert s3_client.head_object(Bucket=s3_bucket, Key="pg/base.tar")["ServerSideEncryption"] == "AES256"


def test_unknown_sse_mode_is_refused(s3_client: Any) -> None:
    with pytest.raises(ValueError, match="sse"):
        S3ObjectStore(s3_client, "any-bucket", sse="aws:kms:dsse-typo")


def test_missing_bucket_names_the_bucket_and_the_setting(s3_client: Any, aws_env: Any) -> None:
    store = S3ObjectStore(s3_client, "no-such-backup-bucket", part_size=PART)

    for action in (
        lambda: store.put_bytes("a", b"x"),
        lambda: store.put("big", PatternStream(6 * MiB)),
        lambda: store.head("a"),
        lambda: store.get("a"),
        lambda: list(store.list()),
    ):
        with pytest.raises(BucketNotFoundError) as failure:
            action()
        message = str(failure.value)
        assert "no-such-backup-bucket" in message and "OPS_BACKUP_BUCKET" in message and aws_env.url in message


def test_endpoint_down_fails_fast_naming_endpoint_and_setting(aws_env: Any) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = ObjectStoreResource(bucket="ops-backups", endpoint_url=endpoint).get_store()

    for action in (lambda: store.put_bytes("a", b"x"), lambda: store.head("a"), lambda: list(store.list())):
        started = time.monotonic()
        with pytest.raises(ServerUnreachableError) as failure:
            action()
        assert time.monotonic() - started < 5
        assert endpoint in str(failure.value) and "AWS_ENDPOINT_URL" in str(failure.value)


class NotS3Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b"<html><body>corporate proxy login</body></html"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_GET  # noqa: N815

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def not_s3_endpoint() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotS3Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_endpoint_that_is_not_s3_is_named(aws_env: Any, not_s3_endpoint: str) -> None:
    store = ObjectStoreResource(bucket="ops-backups", endpoint_url=not_s3_endpoint).get_store()

    with pytest.raises(ObjectStoreError) as failure:
        list(store.list())

    assert not_s3_endpoint in str(failure.value) and "AWS_ENDPOINT_URL" in str(failure.value)


def test_resource_picks_s3_when_a_bucket_is_set(s3_client: Any, s3_bucket: str, tmp_path: Path) -> None:
    store = ObjectStoreResource(bucket=s3_bucket, prefix="ops/backups/", local_dir=str(tmp_path)).get_store()

    stored = store.put_bytes("pg/manifest.json", b"{}")

    assert isinstance(store, S3ObjectStore)
    assert stored.url == f"s3://{s3_bucket}/ops/backups/pg/manifest.json"
    assert bucket_keys(s3_client, s3_bucket) == ["ops/backups/pg/manifest.json"]
    assert list(tmp_path.iterdir()) == []


def test_resource_picks_the_local_directory_without_a_bucket(tmp_path: Path) -> None:
    store = ObjectStoreResource(local_dir=str(tmp_path / "store")).get_store()

    stored = store.put_bytes("pg/manifest.json", b"{}")

    assert isinstance(store, LocalObjectStore)
    assert stored.url == (tmp_path / "store" / "pg" / "manifest.json").as_uri()
    assert (tmp_path / "store" / "pg" / "manifest.json").read_bytes() == b"{}"


def test_resource_without_credentials_names_the_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "empty").write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    with pytest.raises(MissingSettingError, match="AWS_ACCESS_KEY_ID.*AWS_PROFILE"):
        ObjectStoreResource(bucket="ops-backups", region="ap-northeast-2").get_store()


def test_local_store_refuses_a_link_out_of_its_root(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "pg").symlink_to(tmp_path / "outside")
    store = LocalObjectStore(tmp_path / "store")

    with pytest.raises(InvalidKeyError, match="outside"):
        store.put_bytes("pg/base.tar", b"x")

    assert list((tmp_path / "outside").iterdir()) == []


def test_local_failed_put_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)

    with pytest.raises(UploadFailedError):
        store.put("pg/base.tar", PatternStream(3 * MiB, fail_after=2 * MiB))

    assert list((tmp_path / "pg").iterdir()) == []


def test_local_object_changed_behind_the_store_has_no_checksum(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    store.put_bytes("pg/base.tar", b"original")

    with open(tmp_path / "pg" / "base.tar", "ab") as file:
        file.write(b" and more")

    head = store.head("pg/base.tar")
    assert head is not None and head.size == len(b"original and more") and head.sha256 is None


def test_local_key_cannot_also_be_a_folder(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    store.put_bytes("pg/base", b"x")

    with pytest.raises(ObjectStoreError, match="existing object"):
        store.put_bytes("pg/base/part-1", b"y")

    assert store.get_bytes("pg/base") == b"x"


def test_local_delete_removes_emptied_folders(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    store.put_bytes("pg/2024-05-01/base.tar", b"x")

    store.delete("pg/2024-05-01/base.tar")

    assert list((tmp_path / "store").iterdir()) == []
