"""Create the project's bucket and prefixes: the same command on the local S3 server and on AWS.

    infra/local-s3.sh 9000 &
    export AWS_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
    .venv/bin/python infra/bootstrap_bucket.py s3://ray-qlora-dev/ray-qlora

    # AWS, bucket made by infra/aws/cloudformation.yaml: no endpoint, credentials from the
    # environment or the node's instance role; --no-create refuses to make an unmanaged bucket
    .venv/bin/python infra/bootstrap_bucket.py s3://my-ray-qlora/ray-qlora --no-create

The URI is what ``run.output_uri`` will be. Under it go ``raw/`` (input data:
``data.sources``), ``runs/`` (run folders) and ``adapters/`` (the registry).
Nothing that exists is changed, so a second run is a no-op. A bucket this
script creates gets the same protections as the CloudFormation one: default
encryption, public access blocked, ACLs off, versioning, and (on an https
endpoint, where it can be met) a policy refusing plain-HTTP requests.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ray_qlora import storage
from ray_qlora.config import StorageConfig

__all__ = ["PREFIXES", "bootstrap", "split_uri"]

PREFIXES = ("raw", "runs", "adapters")


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``; the prefix may be empty."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r}: give an s3:// URI (s3://bucket/prefix), the run.output_uri to prepare")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket")
    return bucket, prefix.strip("/")


def _client(cfg: StorageConfig) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=storage.endpoint_url(cfg), region_name=cfg.region)


def _bucket_exists(s3: Any, bucket: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
        return True
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            return False
        if code in ("403", "AccessDenied", "Forbidden"):
            raise PermissionError(f"bucket {bucket!r} exists but these credentials may not use it (owned by "
                                  "another account, or the role lacks s3:ListBucket)") from None
        raise


def _harden(s3: Any, bucket: str, tls_only: bool) -> None:
    """The CloudFormation bucket's protections, for a bucket made here."""
    s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True, "RestrictPublicBuckets": True})
    s3.put_bucket_ownership_controls(Bucket=bucket, OwnershipControls={
        "Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]})
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={
        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    if tls_only:
        arn = f"arn:aws:s3:::{bucket}"
        s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
            "Sid": "DenyInsecureTransport", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
            "Resource": [arn, f"{arn}/*"], "Condition": {"Bool": {"aws:SecureTransport": "false"}}}]}))


def bootstrap(uri: str, cfg: StorageConfig | None = None, create: bool = True) -> dict[str, Any]:
    """Make sure the bucket of ``uri`` exists and has the project's prefixes under ``uri``.

    Returns what it found and did: ``created_bucket``, ``created_prefixes``, ``output_uri``.
    """
    import pyarrow.fs as pafs

    cfg = cfg or StorageConfig()
    bucket, prefix = split_uri(uri)
    s3 = _client(cfg)
    created = False
    if not _bucket_exists(s3, bucket):
        if not create:
            raise FileNotFoundError(f"bucket {bucket!r} does not exist (deploy infra/aws/cloudformation.yaml, "
                                    "or drop --no-create to make it here)")
        kwargs: dict[str, Any] = {}
        if cfg.region != "us-east-1":  # us-east-1 is the one region that refuses a LocationConstraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": cfg.region}
        s3.create_bucket(Bucket=bucket, **kwargs)
        endpoint = storage.endpoint_url(cfg) or "https://"
        _harden(s3, bucket, tls_only=not endpoint.startswith("http://"))
        created = True
    # The prefixes go through the stages' own filesystem code (pyarrow, same endpoint and credentials),
    # so a success here means a node with these credentials can write where the stages will.
    root = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    made = []
    for name in PREFIXES:
        target = storage.join(root, name)
        fs, path = storage.resolve(target, cfg)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            fs.create_dir(path, recursive=True)
            made.append(name)
    return {"bucket": bucket, "prefix": prefix, "created_bucket": created, "created_prefixes": made,
            "output_uri": root}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("uri", help="s3://bucket/prefix: the run.output_uri to prepare")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL, else AWS itself)")
    parser.add_argument("--region", default="us-east-1", help="bucket region (default: us-east-1)")
    parser.add_argument("--no-create", action="store_true",
                        help="fail when the bucket is missing instead of creating it (AWS, CloudFormation-managed)")
    args = parser.parse_args(argv)
    try:
        result = bootstrap(args.uri, StorageConfig(endpoint_url=args.endpoint_url, region=args.region),
                           create=not args.no_create)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        print(f"bootstrap-bucket: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
