"""S3-compatible object storage behind ``mailferry.storage.BlobStore`` (``storage_url =
s3://BUCKET/PREFIX``): the backend for installations whose consumers and API processes run
on more than one host, so that none of them reads another's disk.

The client is obstore (Apache Arrow's Rust ``object_store``, with Python bindings): on this
machine one PUT costs it ~0.2 ms of CPU where boto3 spends ~1.8 ms and the MinIO SDK ~0.8
(docs/BENCHMARKS.md, "Object storage"), and the consumer pays that per raw source and per
attachment.

Integrity both ways: every PUT carries the object's SHA-256 (``x-amz-checksum-sha256``),
which the server checks before it keeps the object, and an object served is checked against
its key by the reader (``mailferry.storage`` keys are content hashes; the API checks an
attachment as it streams it). A PUT is ``If-None-Match: *``: a key already present is the
same bytes (its name is their hash), so "already exists" means "stored". A batch's PUTs run
side by side (``storage_concurrency``); ``write_new`` returns when the server has
acknowledged every one, which is when S3 makes an object durable.
"""

from __future__ import annotations

import datetime as dt
import errno
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import AlreadyExistsError, PreconditionError
from obstore.store import S3Store as _Client

from mailferry.errors import ConfigError
from mailferry.storage import CHUNK, DAY, DAY_FILED, Blob, BlobStore, StoredObject, checked_key

STREAM_CHUNK = 256 * 1024  # bytes obstore gathers per chunk when an object is streamed
# A request is retried for seconds, not obstore's default three minutes: a consumer's batch
# (and its held messages) should go back to the broker and be retried whole instead.
RETRY = {"max_retries": 3, "retry_timeout": dt.timedelta(seconds=15),
         "backoff": {"init_backoff": dt.timedelta(milliseconds=100),
                     "max_backoff": dt.timedelta(seconds=2), "base": 2}}


class StorageUnavailable(OSError):
    """The object store refused or did not answer (the batch is retried, like a full disk)."""

    def __init__(self, what: str, exc: BaseException):
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        super().__init__(errno.EIO, f"object storage: {what}: {first_line[:300]}")


class S3Store(BlobStore):
    def __init__(self, bucket: str, prefix: str, *, endpoint: str = "", region: str = "us-east-1",
                 access_key_id: str = "", secret_access_key: str = "", concurrency: int = 16):
        self.bucket, self.prefix, self.endpoint = bucket, prefix, endpoint
        options = {"region": region, "checksum_algorithm": "sha256"}
        if endpoint:
            options.update(endpoint=endpoint, virtual_hosted_style_request=False)
        if access_key_id:  # else obstore finds credentials as the AWS SDKs do (AWS_*, a role)
            options.update(access_key_id=access_key_id, secret_access_key=secret_access_key)
        self._client = _Client(bucket, prefix=prefix or None,
                               client_options={"allow_http": endpoint.startswith("http://"),
                                               "timeout": "30s", "connect_timeout": "5s"},
                               retry_config=RETRY, **options)
        self._concurrency = concurrency
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, settings) -> "S3Store":
        parts = urlsplit(url)
        if not parts.netloc:
            raise ConfigError(f"storage URL {url!r}: name the bucket (s3://BUCKET/PREFIX)")
        return cls(parts.netloc, parts.path.strip("/"), endpoint=settings.s3_endpoint,
                   region=settings.s3_region, access_key_id=settings.s3_access_key_id,
                   secret_access_key=settings.s3_secret_access_key,
                   concurrency=settings.storage_concurrency)

    def describe(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def write_new(self, items: list[tuple[str, Blob]]) -> int:
        if not items:
            return 0
        if len(items) == 1:
            return int(self._put(*items[0]))
        return sum(self._executor().map(lambda item: self._put(*item), items))

    def _put(self, key: str, blob: Blob) -> bool:
        """PUT one object unless it is there; whether it was written."""
        try:
            obstore.put(self._client, key, blob.bytes(), mode="create", use_multipart=False)
        except (AlreadyExistsError, PreconditionError, FileExistsError):
            return False  # stored before: the key is the hash of the bytes
        except Exception as exc:  # noqa: BLE001 - obstore raises its own and OSError-like kinds
            raise StorageUnavailable(f"PUT {key}", exc) from exc
        return True

    def open(self, key: str) -> StoredObject:
        try:
            result = obstore.get(self._client, checked_key(key))
        except FileNotFoundError:  # obstore raises the built-in for a missing object
            raise FileNotFoundError(errno.ENOENT, f"no object {key} in {self.describe()}") from None
        except Exception as exc:  # noqa: BLE001
            raise StorageUnavailable(f"GET {key}", exc) from exc
        return StoredObject(result.meta["size"], _chunks(result, key))

    def keys(self) -> Iterator[str]:
        for batch in self._listing():
            for meta in batch:
                yield meta["path"]

    def _listing(self, prefix: str | None = None) -> Iterator[list]:
        """The objects under ``prefix`` (all, if None), a batch of metadata at a time."""
        try:
            yield from obstore.list(self._client, prefix, chunk_size=1000)
        except Exception as exc:  # noqa: BLE001
            raise StorageUnavailable(f"LIST {prefix}" if prefix else "LIST", exc) from exc

    def days(self) -> set[str]:
        found = set()
        for kind in DAY_FILED:
            try:
                listed = obstore.list_with_delimiter(self._client, f"{kind}/")
            except Exception as exc:  # noqa: BLE001
                raise StorageUnavailable(f"LIST {kind}/", exc) from exc
            found |= {day for day in (p.rstrip("/").rpartition("/")[2] for p in listed["common_prefixes"])
                      if DAY.fullmatch(day)}
        return found

    def delete_day(self, day: str) -> int:
        if not DAY.fullmatch(day):
            raise ValueError(f"not a day: {day!r}")
        deleted = 0
        for kind in DAY_FILED:
            for batch in self._listing(f"{kind}/{day}/"):
                self._delete([meta["path"] for meta in batch])
                deleted += len(batch)
        return deleted

    def delete(self, keys: list[str]) -> None:
        self._delete([checked_key(key) for key in keys])

    def _delete(self, keys: list[str]) -> None:
        if not keys:
            return
        try:
            # S3: DeleteObjects, 1,000 keys a request (obstore splits them); a missing key is no error.
            obstore.delete(self._client, keys)
        except Exception as exc:  # noqa: BLE001
            raise StorageUnavailable(f"DELETE {len(keys)} objects", exc) from exc

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="s3-put")
            return self._pool


def _chunks(result, key: str) -> Iterator[bytes]:
    try:
        for chunk in result.stream(min_chunk_size=max(CHUNK, STREAM_CHUNK)):
            yield bytes(chunk)
    except Exception as exc:  # noqa: BLE001 - a connection lost halfway is the reader's error
        raise StorageUnavailable(f"GET {key} (while reading)", exc) from exc
