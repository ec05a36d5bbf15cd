"""moto's server, started with ECR repositories already full of images.

Creating 200,000 images through PutImage takes moto ~17 minutes (about 200
requests a second), so the image-tag benchmark seeds moto's own ECR backend in
the server process and then serves it unchanged over HTTP: the sensor under
test still talks to moto's server through boto3 like it talks to ECR.

    python bench/seeded_moto_ecr.py --port 5000 --repos 200 --tags 1000

Repository ``svcNNN-dev`` gets ``--tags`` images, each with its own manifest and
one 7-hex-digit tag, pushed one a minute before the seeding time (oldest first).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

ACCOUNT = "123456789012"


def manifest(layer: str) -> str:
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 100,
                   "digest": "sha256:" + hashlib.sha256(f"c-{layer}".encode()).hexdigest()},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 1000,
                    "digest": "sha256:" + hashlib.sha256(layer.encode()).hexdigest()}],
    })


def repository_name(n: int) -> str:
    return f"svc{n:03d}-dev"


def seed(region: str, repos: int, tags: int) -> None:
    from moto.ecr.models import Image, ecr_backends

    backend = ecr_backends[ACCOUNT][region]
    newest = int(time.time()) - 60
    for n in range(repos):
        name = repository_name(n)
        repository = backend.create_repository(
            repository_name=name, registry_id=None, encryption_config=None,
            image_scan_config=None, image_tag_mutability=None, image_tag_mutability_exclusion_filters=None,
            tags=[],
        )
        for t in range(tags):
            # Appended directly: PutImage's duplicate search is quadratic in a repository's size.
            image = Image(ACCOUNT, f"{t:07x}", manifest(f"{name}-{t}"), name,
                          "application/vnd.docker.distribution.manifest.v2+json")
            image.image_pushed_at = newest - (tags - 1 - t) * 60
            repository.images.append(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--region", default="ap-northeast-2")
    parser.add_argument("--repos", type=int, default=200)
    parser.add_argument("--tags", type=int, default=1000)
    args = parser.parse_args()
    started = time.perf_counter()
    seed(args.region, args.repos, args.tags)
    print(f"seeded {args.repos} x {args.tags} images in {time.perf_counter() - started:.1f} s", flush=True)
    from moto.server import main as serve

    serve(["-H", "127.0.0.1", "-p", str(args.port)])


if __name__ == "__main__":
    main()
