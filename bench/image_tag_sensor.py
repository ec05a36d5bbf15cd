"""One image_tag_sensor tick over many ECR repositories on moto's server.

Goal: a tick over 200 repositories x 1,000 tags in under 20 s, cursor under
64 KB. Images are created with PutImage (small manifests, 8 threads) on a
moto server started here. ``--repos`` / ``--tags`` scale the run down when
creating 200,000 images takes too long; the tick time is then extrapolated
linearly in the number of images listed (printed as such).

Ticks measured: the first (no cursor: every image is new), then a second
(nothing new) and the cursor sizes right after the push (newest second's
digests kept) and once settled.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import boto3  # noqa: E402

from ops_platform.local_servers.process import ServerProcess, free_port  # noqa: E402
from ops_platform.resources.ecr import EcrRegistry  # noqa: E402
from ops_platform.sensing.image_tags import cursor_size, dump_cursor, scan_image_tags  # noqa: E402
from ops_platform.spec import Service  # noqa: E402

GOAL_SECONDS = 20.0
GOAL_CURSOR_BYTES = 64 * 1024
FULL_REPOS, FULL_TAGS = 200, 1000


def manifest(layer: str) -> str:
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 100,
                   "digest": "sha256:" + hashlib.sha256(f"c-{layer}".encode()).hexdigest()},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 1000,
                    "digest": "sha256:" + hashlib.sha256(layer.encode()).hexdigest()}],
    })


def create_images(client: object, repository: str, tags: int) -> None:
    client.create_repository(repositoryName=repository)  # type: ignore[attr-defined]
    for n in range(tags):
        client.put_image(repositoryName=repository, imageTag=f"{n:07x}", imageManifest=manifest(f"{repository}-{n}"))  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repos", type=int, default=FULL_REPOS)
    parser.add_argument("--tags", type=int, default=FULL_TAGS)
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true")
    home = Path(tempfile.mkdtemp(prefix="bench-moto-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=1) as response:
            return response.status == 200

    server = ServerProcess("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                           log_path=home / "moto.log", ready=ready, port=port)
    with server.start():
        client = boto3.client("ecr", region_name="ap-northeast-2", endpoint_url=url)
        services = [Service(name=f"svc{n:03d}", environments=["dev"]) for n in range(args.repos)]
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda s: create_images(client, s.repository("dev"), args.tags), services))
        print(f"created {args.repos} repositories x {args.tags} tags on moto in {time.perf_counter() - started:.1f} s")

        registry = EcrRegistry(client)
        now = datetime.now(UTC)
        started = time.perf_counter()
        first = scan_image_tags(registry, services, lambda s: s.environments, None, now=now)
        raw = dump_cursor(first.cursor)
        first_seconds = time.perf_counter() - started
        started = time.perf_counter()
        second = scan_image_tags(registry, services, lambda s: s.environments, first.cursor, now=datetime.now(UTC))
        second_seconds = time.perf_counter() - started
        settled = scan_image_tags(registry, services, lambda s: s.environments, second.cursor,
                                  now=datetime.now(UTC) + timedelta(minutes=2))

        images = args.repos * args.tags
        print(f"first tick: {first_seconds:.2f} s, {len(first.requests)} release requests for {images} images")
        print(f"second tick (nothing new): {second_seconds:.2f} s, {len(second.requests)} requests")
        scale = (FULL_REPOS * FULL_TAGS) / images
        if scale != 1:
            print(f"  EXTRAPOLATED to {FULL_REPOS} x {FULL_TAGS} (x{scale:g}, linear in images listed): "
                  f"first tick ~{first_seconds * scale:.1f} s")
        figure = first_seconds * scale
        verdict = "PASS" if figure < GOAL_SECONDS else "MISS"
        print(f"tick time: {figure:.2f} s{' (extrapolated)' if scale != 1 else ''} (goal < {GOAL_SECONDS:.0f} s) {verdict}")
        fresh, quiet = cursor_size(raw), cursor_size(settled.cursor)
        print(f"cursor right after the pushes (newest second's digests kept): {fresh} bytes; settled: {quiet} bytes")
        if args.repos != FULL_REPOS:
            fresh = fresh * FULL_REPOS // args.repos
            print(f"  EXTRAPOLATED to {FULL_REPOS} repositories: {fresh} bytes")
        verdict = "PASS" if fresh < GOAL_CURSOR_BYTES else "MISS"
        print(f"cursor: {fresh} bytes (goal < {GOAL_CURSOR_BYTES} bytes) {verdict}")


if __name__ == "__main__":
    main()
