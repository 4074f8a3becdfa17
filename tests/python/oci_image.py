#!/usr/bin/env python3
"""Reads an OCI image layout archive (image-spec v1.1) with nothing but Python's standard
library — independently of the writer, `cargo xtask images` — and checks what a runtime
would: oci-layout, index.json, every descriptor's digest and size against its blob, every
layer's uncompressed digest against the config's diff_ids, no blob left unreferenced. Then
extracts the layers in order into --rootfs and prints a JSON summary on stdout. Exits 1 with
the reason on stderr if anything does not hold."""

import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


class Bad(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Bad(msg)


def read_blob(archive, desc, media_type):
    check(desc.get("mediaType") == media_type, f"descriptor {desc} is not {media_type}")
    algo, _, hexd = desc["digest"].partition(":")
    check(algo == "sha256" and len(hexd) == 64, f"digest {desc['digest']!r} is not sha256")
    member = archive.extractfile(f"blobs/sha256/{hexd}")
    check(member is not None, f"blob {desc['digest']} is missing")
    data = member.read()
    check(hashlib.sha256(data).hexdigest() == hexd, f"blob {desc['digest']} has another digest")
    check(len(data) == desc["size"], f"blob {desc['digest']}: size {len(data)} != {desc['size']}")
    return hexd, data


def safe_members(layer):
    for m in layer.getmembers():
        parts = m.name.split("/")
        check(not m.name.startswith("/") and ".." not in parts, f"unsafe path {m.name!r}")
        check(not any(p.startswith(".wh.") for p in parts), f"whiteout {m.name!r} in a layer")
        check(m.isfile() or m.isdir() or m.issym(), f"{m.name!r}: unexpected entry type")
        yield m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("archive")
    ap.add_argument("--rootfs", required=True)
    args = ap.parse_args()
    with tarfile.open(args.archive) as archive:
        layout = json.load(archive.extractfile("oci-layout"))
        check(layout == {"imageLayoutVersion": "1.0.0"}, f"oci-layout is {layout}")
        index = json.load(archive.extractfile("index.json"))
        check(index.get("schemaVersion") == 2, "index.json: schemaVersion is not 2")
        check(index.get("mediaType") == INDEX, "index.json: mediaType")
        check(len(index["manifests"]) == 1, "index.json: not exactly one manifest")
        mdesc = index["manifests"][0]
        used = set()
        h, raw = read_blob(archive, mdesc, MANIFEST)
        used.add(h)
        manifest = json.loads(raw)
        check(manifest.get("schemaVersion") == 2, "manifest: schemaVersion is not 2")
        check(manifest.get("mediaType") == MANIFEST, "manifest: mediaType")
        h, raw = read_blob(archive, manifest["config"], CONFIG)
        used.add(h)
        config = json.loads(raw)
        diff_ids = []
        layers = []
        for ldesc in manifest["layers"]:
            h, raw = read_blob(archive, ldesc, LAYER_GZIP)
            used.add(h)
            plain = gzip.decompress(raw)
            diff_ids.append("sha256:" + hashlib.sha256(plain).hexdigest())
            layers.append(raw)
        check(config["rootfs"] == {"type": "layers", "diff_ids": diff_ids},
              f"config rootfs {config['rootfs']} != layers' diff_ids {diff_ids}")
        present = {n[len("blobs/sha256/"):] for n in archive.getnames()
                   if n.startswith("blobs/sha256/") and len(n) > len("blobs/sha256/")}
        check(present == used, f"unreferenced blobs: {sorted(present - used)}")
    os.makedirs(args.rootfs, exist_ok=True)
    for raw in layers:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as layer:
            members = list(safe_members(layer))
            kw = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
            # The image's owners and modes as they are (we run as root, as a runtime does).
            layer.extractall(args.rootfs, members=members, numeric_owner=True, **kw)
    print(json.dumps({
        "annotations": mdesc.get("annotations", {}),
        "platform": mdesc.get("platform"),
        "architecture": config.get("architecture"),
        "os": config.get("os"),
        "config": config.get("config", {}),
        "layers": len(layers),
        "history": len(config.get("history", [])),
    }))


if __name__ == "__main__":
    try:
        main()
    except (Bad, KeyError, ValueError, tarfile.TarError) as e:
        print(f"oci_image.py: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
