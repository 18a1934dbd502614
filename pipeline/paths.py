"""Local folders and object-store URLs (s3://, gs://, ...), told apart the same way everywhere."""


def is_remote(path: str) -> bool:
    return "://" in str(path)
