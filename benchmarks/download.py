"""Model download speed from S3: LMC's s3:// source against sequential per-object downloads.

A local S3-compatible server (moto, on loopback) holds a model of random safetensors shards.
The baseline is what `aws s3 sync`-style scripts do: plain boto3 `download_file` per object, one
object at a time (boto3's default transfer settings). LMC mirrors the prefix with several objects
in flight, each through the transfer manager with ranged GETs. Both runs start from an empty
cache in the same process; the server's CPU time per run shows when the server is the limit.

    .venv/bin/python benchmarks/download.py                 # 1 GiB in 8 shards
    .venv/bin/python benchmarks/download.py --size-mb 256 --shards 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

BUCKET = "bench"
PREFIX = "model/"


def upload(client, size_mb: int, shards: int) -> int:
    shard = size_mb * 1024 * 1024 // shards
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key=PREFIX + "config.json", Body=b"{}")
    block = os.urandom(shard)
    for i in range(shards):
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}model-{i + 1:05d}-of-{shards:05d}"
                                             f".safetensors", Body=block)
    return shard * shards


def sequential(client, out: Path) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX):
        for o in page.get("Contents", ()):
            dest = out / o["Key"][len(PREFIX):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(BUCKET, o["Key"], str(dest))


def timed(server, fn) -> tuple[float, float]:
    cpu0, t0 = server.cpu_s(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, server.cpu_s() - cpu0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each, alternating")
    args = ap.parse_args()

    from server_utils import MotoServer

    from engines.sources import s3

    server = MotoServer()
    with server:
        client = s3.client()
        total = upload(client, args.size_mb, args.shards)
        mb = total / 1e6
        print(f"{mb:.0f} MB in {args.shards} shards on a local moto server")
        work = Path(tempfile.mkdtemp(prefix="lmc-download-"))
        try:
            for run in range(args.repeat):
                out = work / f"seq{run}"
                wall, cpu = timed(server, lambda: sequential(client, out))
                print(f"sequential download_file: {mb / wall:7.1f} MB/s  ({wall:.1f} s, server "
                      f"CPU {cpu:.1f} s)")
                shutil.rmtree(out)
                cache = work / f"lmc{run}"
                wall2, cpu2 = timed(server, lambda: s3.fetch_prefix(f"s3://{BUCKET}/{PREFIX}",
                                                                     cache))
                print(f"LMC s3:// source        : {mb / wall2:7.1f} MB/s  ({wall2:.1f} s, "
                      f"server CPU {cpu2:.1f} s)  x{wall / wall2:.2f}")
                shutil.rmtree(cache)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
