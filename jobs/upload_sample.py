"""Put the sample dataset where a config reads its data: `python jobs/upload_sample.py CONFIG`.

For trying a cluster job on the local S3 server (infra/local-s3.sh): creates
the buckets of the config's input and output on that server when missing,
then uploads the sample medication-order files under data.input_uris[0].
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ray_qlora import storage  # noqa: E402
from ray_qlora.config import load_config  # noqa: E402
from ray_qlora.demo import upload_sample  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="the pipeline YAML the job will run")
    cfg = load_config(p.parse_args().config)
    raw = cfg.data.input_uris[0]
    if raw.startswith("s3://"):
        import boto3

        s3 = boto3.client("s3", endpoint_url=storage.endpoint_url(cfg.storage))
        have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for uri in (raw, cfg.run.output_uri):
            bucket = uri.removeprefix("s3://").split("/", 1)[0]
            if uri.startswith("s3://") and bucket not in have:
                s3.create_bucket(Bucket=bucket)
                have.add(bucket)
    for uri in upload_sample(raw, cfg.storage):
        print(f"uploaded {uri}")


if __name__ == "__main__":
    main()
