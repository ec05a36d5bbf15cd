"""image_tag_sensor ticks over 200 ECR repositories x 1,000 tags on moto's server.

Goal: a tick in under 20 s, cursor under 64 KB. moto's server is started here
with its ECR backend seeded in-process (bench/seeded_moto_ecr.py: PutImage
would take ~17 minutes for 200,000 images); the sensor reads it over HTTP
through boto3, as it reads ECR.

Measured, in order:
- learning: the ticks from an empty cursor until every repository is known
  (each tick stops starting reads after the scan's time budget);
- a tick with nothing new (the usual tick);
- a tick after one new tag was pushed to every repository (200 releases);
- the cursor right after those pushes (their second's digests kept) and settled.
Baseline, same run: reading every image of every repository with plain
boto3 DescribeImages, one repository after another (what a sensor without a
fingerprint does each tick).
"""

from __future__ import annotations

import argparse
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

from bench.seeded_moto_ecr import manifest, repository_name  # noqa: E402
from ops_platform.local_servers.process import ServerProcess, free_port  # noqa: E402
from ops_platform.resources.ecr import EcrRegistry  # noqa: E402
from ops_platform.sensing.image_tags import cursor_size, dump_cursor, load_cursor, scan_image_tags  # noqa: E402
from ops_platform.spec import Service  # noqa: E402

GOAL_SECONDS = 20.0
GOAL_CURSOR_BYTES = 64 * 1024
REGION = "ap-northeast-2"


def timed(function, *args, **kwargs):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repos", type=int, default=200)
    parser.add_argument("--tags", type=int, default=1000)
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true")
    home = Path(tempfile.mkdtemp(prefix="bench-moto-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=1) as response:
            return response.status == 200

    command = [sys.executable, str(REPO_ROOT / "bench" / "seeded_moto_ecr.py"), "--port", str(port),
               "--region", REGION, "--repos", str(args.repos), "--tags", str(args.tags)]
    server = ServerProcess("moto", command, log_path=home / "moto.log", ready=ready, port=port)
    with server.start(start_timeout=600):
        print(f"moto seeded with {args.repos} repositories x {args.tags} tags ({args.repos * args.tags} images)")
        client = boto3.client("ecr", region_name=REGION, endpoint_url=url)
        services = [Service(name=repository_name(n).removesuffix("-dev"), environments=["dev"])
                    for n in range(args.repos)]
        registry = EcrRegistry(client)

        def tick(cursor):  # type: ignore[no-untyped-def]
            scan, seconds = timed(scan_image_tags, registry, services, lambda s: s.environments,
                                  load_cursor(cursor), now=datetime.now(UTC))
            return scan, dump_cursor(scan.cursor), seconds

        def baseline() -> int:
            count = 0
            for service in services:
                for page in client.get_paginator("describe_images").paginate(
                        repositoryName=service.repository("dev"), PaginationConfig={"PageSize": 1000}):
                    count += len(page["imageDetails"])
            return count

        images, baseline_seconds = timed(baseline)
        print(f"baseline: DescribeImages of all {images} images, repository by repository: {baseline_seconds:.2f} s")

        cursor = None
        learning = []
        while True:
            scan, cursor, seconds = tick(cursor)
            learning.append((seconds, len(scan.learned), len(scan.deferred), len(scan.requests)))
            if not scan.deferred:
                break
        for n, (seconds, learned, deferred, requests) in enumerate(learning, 1):
            print(f"learning tick {n}: {seconds:.2f} s, learned {learned}, left for later {deferred}, "
                  f"released {requests}")

        quiet, cursor, quiet_seconds = tick(cursor)
        print(f"tick, nothing new: {quiet_seconds:.2f} s, released {len(quiet.requests)} "
              f"({quiet_seconds / baseline_seconds:.2f}x the baseline)")

        pushed, push_seconds = timed(lambda: list(ThreadPoolExecutor(8).map(
            lambda s: client.put_image(repositoryName=s.repository("dev"), imageTag="f" * 7,
                                       imageManifest=manifest(f"{s.name}-new")), services)))
        print(f"pushed one new tag to each of {len(pushed)} repositories in {push_seconds:.1f} s")
        busy, cursor, busy_seconds = tick(cursor)
        print(f"tick, a new tag in every repository: {busy_seconds:.2f} s, released {len(busy.requests)} "
              f"({busy_seconds / baseline_seconds:.2f}x the baseline)")
        fresh = cursor_size(cursor)
        settled = scan_image_tags(registry, services, lambda s: s.environments, busy.cursor,
                                  now=datetime.now(UTC) + timedelta(minutes=2))
        quiet_size = cursor_size(settled.cursor)

        worst = max(quiet_seconds, busy_seconds, *(seconds for seconds, *_ in learning))
        verdict = "PASS" if worst < GOAL_SECONDS else "MISS"
        print(f"slowest tick: {worst:.2f} s vs baseline full read {baseline_seconds:.2f} s = "
              f"{worst / baseline_seconds:.2f}x (goal < {GOAL_SECONDS:.0f} s) {verdict}")
        verdict = "PASS" if max(fresh, quiet_size) < GOAL_CURSOR_BYTES else "MISS"
        print(f"cursor: {fresh} bytes right after the pushes, {quiet_size} bytes settled "
              f"(goal < {GOAL_CURSOR_BYTES} bytes) {verdict}")


if __name__ == "__main__":
    main()
