"""Stores behind a network (``s3://``, ``gs://``, ``http://``...): "cannot reach it" as its own error.

An fsspec backend reports a refused connection, a host name that does not resolve, a timeout or
missing credentials in its own types (botocore's ``EndpointConnectionError`` and
``NoCredentialsError``, aiohttp's ``ClientConnectorError``...), which the read path would otherwise
take for a damaged chunk and ``trajstore verify`` report as damage. :class:`RemoteFsspecStore`
turns each of them into a :class:`~trajstore.errors.StoreUnreachableError` naming the store's
URL and the cause, at the store, so every caller above it (Zarr, the commit log, the read path,
Dask tasks) sees one type and lets it through. It also lists without fsspec's listing cache (see
:meth:`RemoteFsspecStore._fresh`): another process's commits must show in the next listing.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore

from .errors import StoreUnreachableError

__all__ = ["RemoteFsspecStore", "unreachable_cause"]

# Matched by name, so that neither botocore nor aiohttp has to be installed: each class and its
# subclasses (botocore's ConnectionError covers EndpointConnectionError, ConnectTimeoutError,
# ProxyConnectionError and SSLError; HTTPClientError covers ReadTimeoutError and
# ConnectionClosedError; aiohttp's ClientConnectionError covers ClientConnectorError, its DNS
# variant, ServerDisconnectedError and ServerTimeoutError).
_UNREACHABLE = frozenset({
    "botocore.exceptions.ConnectionError",
    "botocore.exceptions.HTTPClientError",
    "botocore.exceptions.NoCredentialsError",
    "botocore.exceptions.PartialCredentialsError",
    "botocore.exceptions.CredentialRetrievalError",
    "aiohttp.client_exceptions.ClientConnectionError",
})
# Builtins a network backend raises itself: refused or reset connections, DNS failures, timeouts
# (asyncio's and fsspec's FSTimeoutError are TimeoutError). Only applied to a networked store:
# on a local folder a TimeoutError is not a matter of reaching it.
_BUILTINS = (ConnectionError, socket.gaierror, TimeoutError)
_MAX_CAUSES = 16


def unreachable_cause(error: BaseException) -> BaseException | None:
    """The exception in ``error``'s explicit cause chain (``raise ... from``) that says the
    backend could not be reached, or None. A StoreUnreachableError is never wrapped again."""
    seen = 0
    current: BaseException | None = error
    while current is not None and seen < _MAX_CAUSES:
        if isinstance(current, StoreUnreachableError):
            return None
        names = {f"{k.__module__}.{k.__qualname__}" for k in type(current).__mro__}
        if isinstance(current, _BUILTINS) or names & _UNREACHABLE:
            return current
        current, seen = current.__cause__, seen + 1
    return None


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class RemoteFsspecStore(FsspecStore):
    """Zarr's FsspecStore for a networked file system, whose every operation raises
    StoreUnreachableError (naming the URL, the endpoint when one was given, and the cause) where
    the backend could not be reached. All else is FsspecStore's, unchanged."""

    @property
    def url(self) -> str:
        """The store's URL (``s3://bucket/t.zarr``)."""
        try:
            return str(self.fs.unstrip_protocol(self.path))
        except Exception:  # a file system that cannot say: its protocol and our path
            protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
            return f"{protocol}://{self.path}"

    def _endpoint(self) -> str | None:
        fs = getattr(self.fs, "sync_fs", self.fs)
        client_kwargs = getattr(fs, "client_kwargs", None)
        endpoint = getattr(fs, "endpoint_url", None)
        if endpoint is None and isinstance(client_kwargs, dict):
            endpoint = client_kwargs.get("endpoint_url")
        return endpoint if isinstance(endpoint, str) else None

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            cause = unreachable_cause(e)
            if cause is None:
                raise
            endpoint = self._endpoint()
            at = f" (endpoint {endpoint})" if endpoint else ""
            raise StoreUnreachableError(
                f"store {self.url}{at} is unreachable: {type(cause).__name__}: {_one_line(str(cause))}") from e

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        with self._reachable():
            return await super().get(key, prototype, byte_range)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        with self._reachable():
            return await super().get_partial_values(prototype, key_ranges)

    async def set(self, key: str, value: Buffer, byte_range: tuple[int, int] | None = None) -> None:
        with self._reachable():
            await super().set(key, value, byte_range)

    async def delete(self, key: str) -> None:
        with self._reachable():
            await super().delete(key)

    async def delete_dir(self, prefix: str) -> None:
        with self._reachable():
            await super().delete_dir(prefix)

    def _fresh(self, key: str = "") -> None:
        """Forget what the file system's listing cache holds for ``key`` and the folders above it.

        s3fs (and other fsspec file systems) cache every listing for the life of the file-system
        object, shared by every store opened with the same options, and answer ``exists`` and
        ``info`` from a cached listing of the parent: a reader would never see a commit, a lease
        or a basis another process wrote after its first listing (measured on S3: a reader's
        ``refresh()`` stayed at 1 snapshot while the writer committed 3). trajstore's commit log,
        lease and fencing rely on listings that show every completed write, so each one asks."""
        self.fs.invalidate_cache(f"{self.path}/{key}".rstrip("/") if key else self.path)

    async def exists(self, key: str) -> bool:
        self._fresh(key)
        with self._reachable():
            return await super().exists(key)

    async def getsize(self, key: str) -> int:
        self._fresh(key)
        with self._reachable():
            return await super().getsize(key)

    async def clear(self) -> None:
        with self._reachable():
            await super().clear()

    async def list(self) -> AsyncIterator[str]:
        self._fresh()  # (a find does not read the cache today; a future one might)
        with self._reachable():
            async for key in super().list():
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        self._fresh(prefix.rstrip("/"))
        with self._reachable():
            async for key in super().list_dir(prefix):
                yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        self._fresh(prefix.rstrip("/"))
        with self._reachable():
            async for key in super().list_prefix(prefix):
                yield key

