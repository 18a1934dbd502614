"""Local folders and object-store URLs (s3://, gs://, ...), told apart the same way everywhere, and
the one S3 client both halves use."""

import os


def is_remote(path: str) -> bool:
    return "://" in str(path)


def s3_client():
    """boto3's S3 client for the endpoint in the environment (S3_ENDPOINT_URL, as Composer and
    streaming read it; AWS_ENDPOINT_URL otherwise). boto3 is imported only when a bucket is used."""
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL"))
