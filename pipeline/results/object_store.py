"""An output on an object store (s3://bucket/prefix), checked before a study starts: that the
driver has credentials, that the endpoint answers and that the bucket exists, each failure one
line that says what to fix.

The endpoint and credentials are those every S3 client takes: pyarrow's `?endpoint_override=
host:port&scheme=http` in the URI or AWS_ENDPOINT_URL (AWS_ENDPOINT_URL_S3 first), and the
AWS SDK's chain of credentials (the environment, a profile, a web identity or container role,
or the instance's role).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyarrow.fs as pafs

from pipeline.config import ConfigError, first_line

# What the AWS SDK says when a request never reached a server, and when one refused it.
_UNREACHABLE = ("NETWORK_CONNECTION", "Could not connect", "Couldn't connect", "resolve host")
_DENIED = ("ACCESS_DENIED", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "403")
_CREDENTIAL_FILES = (
    ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
    ("AWS_CONFIG_FILE", "~/.aws/config"),
)
_ROLE_VARIABLES = (
    "AWS_WEB_IDENTITY_TOKEN_FILE",  # Kubernetes service accounts (EKS)
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",  # ECS tasks
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",  # EKS pod identity
)


def endpoint(location: str) -> str:
    """The S3 endpoint a URI is served by, as the user set it, for messages."""
    query = parse_qs(urlsplit(location).query)
    if "endpoint_override" in query:
        scheme = query.get("scheme", ["https"])[0]
        return f"{scheme}://{query['endpoint_override'][0]}"
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def check_object_store(fs: pafs.FileSystem, root: str, location: str) -> None:
    """Raise ConfigError, writing nothing, when a study cannot write to the object-store output
    at `location` (its `fs` and `root`): no credentials, no endpoint, no bucket, no access."""
    if fs.type_name == "s3" and not s3_credentials_found(location):
        raise ConfigError(
            f"output {location}: no S3 credentials: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or a web identity or container role) in "
            "the environment of the study"
        )
    bucket = root.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as error:
        raise ConfigError(_request_failed(location, bucket, error)) from None
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(
            f"output {location}: bucket {bucket!r} does not exist at {endpoint(location)}; "
            "create it first or choose another bucket"
        )


def s3_credentials_found(location: str) -> bool:
    """Whether the AWS SDK's chain can find credentials, as far as this machine can tell
    without asking a server: keys in the URI or the environment, a profile file, a web identity
    or container role, or (unless AWS_EC2_METADATA_DISABLED is true) the instance's role, which
    only the instance metadata service knows of. Without any, the SDK sends unsigned requests:
    an S3 server refuses them, and some stand-ins accept them."""
    if urlsplit(location).username:
        return True
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return True
    if any(os.environ.get(name) for name in _ROLE_VARIABLES):
        return True
    for variable, default in _CREDENTIAL_FILES:
        if Path(os.environ.get(variable) or default).expanduser().is_file():
            return True
    return os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true"


def _request_failed(location: str, bucket: str, error: OSError) -> str:
    text = first_line(error)
    reason = text.split("; Details: ")[-1]
    if any(word in text for word in _UNREACHABLE):
        return (
            f"output {location}: no S3 endpoint answers at {endpoint(location)} ({reason}); "
            "set AWS_ENDPOINT_URL or ?endpoint_override=HOST:PORT&scheme=http to one that runs"
        )
    if any(word in text for word in _DENIED):
        return (
            f"output {location}: access to bucket {bucket!r} denied at {endpoint(location)}; "
            "check the credentials in the environment of the study"
        )
    return f"output {location}: {text}"
