"""Object storage: every MODEL, DATA, INPUT, --labels, --classes and --out may be a URL.

``s3://``, ``gs://``, ``az://`` / ``abfs://`` and (read-only) ``https://`` go through fsspec
(s3fs, gcsfs, adlfs: ``pip install "cvtool[cloud]"``), imported here only, lazily; ``file://``
is a local path. Everything else in cvtool keeps working on local files:

- reading: :func:`walk` lists a prefix as :func:`cvtool.images.list_images` lists a folder, and
  :func:`read_bytes` fetches one object (called by the decode threads, so reads are parallel and
  streamed: no bucket is downloaded whole);
- models, label and class files, shards, training data: :func:`fetch` copies a file or a prefix
  once into a local cache keyed by the objects' ETag/size/mtime (``CVTOOL_CACHE_DIR``, default
  ``~/.cache/cvtool``), refusing keys that would land outside it;
- writing: :func:`stages_output` runs a command on a local staging copy of a remote ``--out``
  and mirrors it to the bucket: partial files at flush points (:func:`flushed`), each result
  with one put at the end (complete or not at all), partial objects removed when done.

Errors are one line: a missing bucket or key is a usage error (exit 2), access denied is
exit 3 naming the URL and where credentials were looked for (never a secret); transient
errors are retried with backoff by the cloud libraries (botocore's ``standard`` retry mode).

Example: ``with stages_output("out")(predict)(...)``; ``fetch("s3://bucket/runs/clothes")``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from cvtool.errors import CvtoolError, ImageError, UnusableError, UsageError, env_int

REMOTE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https"})
READ_ONLY_SCHEMES = frozenset({"http", "https"})
CLOUD_EXTRA = 'pip install "cvtool[cloud]"'
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
F = TypeVar("F", bound=Callable)
_DENIED = re.compile(
    r"access ?denied|forbidden|\b403\b|not authori[sz]ed|InvalidAccessKeyId|SignatureDoesNotMatch", re.I
)
_QUERY = re.compile(r"(\w+://[^\s?'\"]+)\?[^\s'\"]*")
_SKIPPED_IN_MODELS = ("logs",)  # a run's TensorBoard events: never needed to load it, often large
_MISSING = re.compile(r"NoSuchBucket|NoSuchKey|\b404\b|not found", re.I)


def scheme(location: Any) -> str | None:
    """``"s3"`` for ``s3://b/k``; None for a local path (a :class:`~pathlib.Path` is always local)."""
    if not isinstance(location, str):
        return None
    match = _URL.match(location)
    return match[1].lower() if match else None


def is_url(location: Any) -> bool:
    """Is ``location`` a remote URL (``s3://``, ``gs://``, ``az://``, ``abfs://``, ``https://``)?

    ``file://`` URLs are local paths (see :func:`local_path`). An unknown scheme is a usage error.

    Example: ``is_url("s3://bucket/photos")`` is True, ``is_url("photos/")`` False.
    """
    found = scheme(location)
    if found is None or found == "file":
        return False
    if found not in REMOTE_SCHEMES and found != "abfss":
        raise UsageError(
            f"unsupported URL scheme {found}:// in {redact(location)}; use s3://, gs://, az://, abfs://, "
            "file:// or https://"
        )
    return True


def local_path(location: Any) -> Any:
    """``file:///data/x`` -> ``/data/x``; anything else is returned unchanged."""
    if scheme(location) == "file":
        parts = urlsplit(location)
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"file:// URLs name this machine's files: {location}")
        return unquote(parts.path)
    return location


def redact(url: str) -> str:
    """The URL without a password or query string (SAS tokens, signatures): what logs and job files record."""
    if scheme(url) is None:
        return str(url)
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc and ":" in netloc.split("@", 1)[0]:  # user:password@host
        netloc = netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def join(base: Any, *names: str) -> Any:
    """``base/name`` for a URL (a string) or a local path (a :class:`~pathlib.Path`)."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return Path(base).joinpath(*names)


def _import_fsspec():
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"URLs need the cloud extra: {CLOUD_EXTRA}") from None
    return fsspec


@functools.cache
def _filesystem(protocol: str, options: str):
    fsspec = _import_fsspec()
    try:
        return fsspec.filesystem(protocol, **json.loads(options))
    except ImportError:
        package = _PACKAGES.get(protocol, "a filesystem package")
        raise UsageError(f"{protocol}:// URLs need {package}: {CLOUD_EXTRA}") from None
    except ValueError as exc:  # unknown protocol
        raise UsageError(f"cannot open {protocol}:// URLs: {exc}") from None


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL.

    Credentials and endpoints come from each library's own settings (``AWS_PROFILE``,
    ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``...). S3 requests
    are retried with backoff (botocore's ``standard`` mode, ``CVTOOL_STORAGE_RETRIES`` attempts).
    """
    protocol = scheme(url)
    options: dict = {}
    if protocol in ("s3", "s3a"):
        protocol = "s3"
        attempts = env_int("CVTOOL_STORAGE_RETRIES", 5, minimum=1)
        options = {"config_kwargs": {"retries": {"max_attempts": attempts, "mode": "standard"}}}
    elif protocol == "gcs":
        protocol = "gs"
    elif protocol == "abfss":
        protocol = "abfs"
    fs = _filesystem(protocol, json.dumps(options, sort_keys=True))
    with errors(url):
        path = fs._strip_protocol(url) if protocol not in ("http", "https") else url
    return fs, path.rstrip("/") if protocol not in ("http", "https") else path


def credential_source(url: str) -> str:
    """Where the cloud library looks for credentials for ``url``: names of settings, never their values."""
    found = scheme(url)
    env = os.environ
    if found in ("s3", "s3a"):
        if env.get("AWS_PROFILE"):
            return f"AWS_PROFILE={env['AWS_PROFILE']}"
        if env.get("AWS_ACCESS_KEY_ID"):
            return "environment AWS_ACCESS_KEY_ID"
        shared = env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
        if Path(shared).expanduser().is_file():
            return shared
        return "no AWS credentials found (environment, ~/.aws/credentials, instance role)"
    if found in ("gs", "gcs"):
        if env.get("GOOGLE_APPLICATION_CREDENTIALS"):
            return f"GOOGLE_APPLICATION_CREDENTIALS={env['GOOGLE_APPLICATION_CREDENTIALS']}"
        return "gcloud application-default credentials or the metadata server"
    if found in ("az", "abfs", "abfss"):
        for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN"):
            if env.get(name):
                return f"environment {name}"
        return "DefaultAzureCredential (environment, managed identity, az login)"
    return "none (anonymous)"


@contextlib.contextmanager
def errors(url: str, what: str = "") -> Iterator[None]:
    """Turn the cloud libraries' exceptions into cvtool's one-line errors for ``url``.

    Missing bucket or key: :class:`UsageError` (exit 2). Access denied: :class:`UnusableError`
    (exit 3) naming the URL and the credential source. Other failures (after the library's
    retries): exit 3 with the library's first line.
    """
    shown = redact(url)
    try:
        yield
    except (UsageError, UnusableError, ImageError, KeyboardInterrupt):
        raise
    except FileNotFoundError as exc:
        reason = _reason(exc)
        bucket = " (no such bucket)" if "bucket" in reason.lower() else ""
        raise UsageError(f"{what or 'not found'}: {shown}{bucket}") from None
    except PermissionError:
        raise UnusableError(f"access denied to {shown} (credentials from {credential_source(url)})") from None
    except ImportError as exc:
        raise UsageError(f"{shown}: a package is missing ({exc.name or exc}): {CLOUD_EXTRA}") from None
    except Exception as exc:  # noqa: BLE001 - any library error is one line, never a traceback
        reason = scrub(_reason(exc), url)
        if _DENIED.search(reason):
            raise UnusableError(f"access denied to {shown} (credentials from {credential_source(url)})") from None
        if _MISSING.search(reason):
            raise UsageError(f"{what or 'not found'}: {shown}") from None
        raise UnusableError(f"cannot use {shown}: {reason}") from None


def secrets_of(url: str) -> list[str]:
    """The parts of ``url`` that are secrets: a password, a query string and its values (SAS tokens, signatures)."""
    if scheme(url) is None:
        return []
    parts = urlsplit(str(url))
    found = [parts.password] if parts.password else []
    if parts.query:
        found += [parts.query, *(value for _, value in parse_qsl(parts.query) if len(value) >= 4)]
    return sorted(found, key=len, reverse=True)  # the longest first, so a value inside the query goes with it


def scrub(text: str, url: str) -> str:
    """``text`` with the secrets of ``url`` (:func:`secrets_of`) replaced by ``***``."""
    for secret in secrets_of(url):
        text = text.replace(secret, "***")
    return text


def _reason(exc: BaseException) -> str:
    """The library's message on one line, with query strings (SAS tokens, signatures) cut from any URL in it."""
    text = _QUERY.sub(r"\1", " ".join(str(exc).split()))[:300]
    return text or type(exc).__name__


# ---------------------------------------------------------------- reading


def walk(url: str) -> tuple[bool, list[tuple[str, str]]]:
    """(is a prefix, [(relative path, URL)...]) of every object under ``url``, or of the one object it names.

    Relative paths use forward slashes, as :class:`cvtool.images.InputItem` ``rel``; the caller
    filters and sorts them as it does a local folder's files. A missing bucket, key or prefix is
    a usage error (exit 2).
    """
    fs, path = filesystem(url)
    base = url.rstrip("/")
    with errors(url, "input not found"):
        if scheme(url) in READ_ONLY_SCHEMES:
            return False, [(base.rsplit("/", 1)[-1].split("?", 1)[0], url)]
        info = fs.info(path)
        if info.get("type") != "directory":
            return False, [(path.rsplit("/", 1)[-1], url)]
        found = fs.find(path, withdirs=False, detail=False)
    prefix = path + "/"
    out = []
    for key in found:
        if not key.startswith(prefix) or key.endswith("/"):
            continue
        rel = key[len(prefix) :]
        out.append((rel, f"{base}/{rel}"))
    return True, out


def read_bytes(url: str) -> bytes:
    """The bytes of one object (called in the decode threads). Failures are :class:`ImageError` (an errors row)."""
    try:
        fs, path = filesystem(url)
        return fs.cat_file(path)
    except (UsageError, UnusableError) as exc:
        raise ImageError(str(exc)) from None
    except FileNotFoundError:
        raise ImageError("object not found (removed since it was listed?)") from None
    except PermissionError:
        raise ImageError(f"access denied (credentials from {credential_source(url)})") from None
    except Exception as exc:  # noqa: BLE001 - one bad object never stops a batch
        raise ImageError(f"cannot read: {_reason(exc)}") from None


def cache_dir() -> Path:
    """``CVTOOL_CACHE_DIR``, default ``~/.cache/cvtool``: fetched models and files, staged outputs."""
    return Path(os.environ.get("CVTOOL_CACHE_DIR") or Path.home() / ".cache" / "cvtool").expanduser()


def _safe_rel(rel: str, url: str) -> str:
    parts = rel.split("/")
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel) or any(p in ("..", "") for p in parts) or "\\" in rel:
        raise UnusableError(
            f"refusing {redact(url)}: its object key {rel!r} has '..' or absolute parts and would be written "
            "outside the cache"
        )
    return rel


def fetch(location: Any, kind: str = "files") -> Any:
    """A local copy of a remote file or prefix (a model, a class file, a shard, a data set); local paths as they are.

    Copied once into ``cache_dir()/kind/<key>/NAME``: the key digests the URL (without secrets)
    and every object's ETag, size and modification time, so a changed object is fetched again and an
    unchanged one never. Keys with ``..`` or absolute parts are refused (exit 3): nothing fetched
    lands outside the cache. The copy is made aside and renamed into place (two processes may
    fetch at once).

    Example: ``load_classifier(fetch("s3://bucket/runs/clothes", "models"))``.
    """
    location = local_path(location)
    if not is_url(location):
        return location
    url = location
    fs, path = filesystem(url)
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or "download"
    _safe_rel(name, url)
    with errors(url):
        if scheme(url) in READ_ONLY_SCHEMES:
            info = fs.info(url)
            entries = {"": info.get("ETag") or info.get("etag") or info.get("size")}
            is_dir = False
        else:
            info = fs.info(path)
            is_dir = info.get("type") == "directory"
            if is_dir:
                found = fs.find(path, withdirs=False, detail=True)
                entries = {
                    key[len(path) + 1 :]: _version(meta)
                    for key, meta in found.items()
                    if key.startswith(path + "/") and not key.endswith("/")
                }
                if kind == "models":
                    entries = {
                        rel: v for rel, v in entries.items() if not set(rel.split("/")[:-1]) & set(_SKIPPED_IN_MODELS)
                    }
            else:
                entries = {"": _version(info)}
    for rel in entries:
        if rel:
            _safe_rel(rel, url)
    key = hashlib.sha256(json.dumps([redact(url), sorted(entries.items())], default=str).encode()).hexdigest()[:32]
    dest = cache_dir() / kind / key
    target = dest / name
    if (dest / ".complete").is_file():
        return str(target)
    dest.parent.mkdir(parents=True, exist_ok=True)
    aside = dest.parent / f".{key}.{os.getpid()}.{threading.get_ident()}.part"
    shutil.rmtree(aside, ignore_errors=True)
    try:
        with errors(url):
            if is_dir:
                for rel in sorted(entries):
                    local = aside / name / rel
                    local.parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(f"{path}/{rel}", str(local))
            else:
                (aside / name).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(url if scheme(url) in READ_ONLY_SCHEMES else path, str(aside / name))
        (aside / ".complete").write_text(redact(url) + "\n", encoding="utf-8")
        try:
            os.rename(aside, dest)
        except OSError:
            if not (dest / ".complete").is_file():  # a half copy left by a killed process: replace it
                shutil.rmtree(dest, ignore_errors=True)
                os.rename(aside, dest)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return str(target)


def fetch_with_siblings(url: str, names: list[str], kind: str = "files") -> Path:
    """A local copy of the object ``url`` with the objects ``names`` of its folder that exist (a shard with its
    errors file and job file), in one cache folder; returns the local path of ``url``'s copy.

    Example: ``fetch_with_siblings("s3://b/parts/p0.csv", ["p0.errors.csv", "p0.job.json"])``.
    """
    fs, path = filesystem(url)
    folder, name = path.rsplit("/", 1)
    versions = {}
    with errors(url, "shard not found"):
        versions[name] = _version(fs.info(path))
        for sibling in names:
            _safe_rel(sibling, url)
            with contextlib.suppress(FileNotFoundError):
                versions[sibling] = _version(fs.info(f"{folder}/{sibling}"))
    key = hashlib.sha256(json.dumps([redact(url), sorted(versions.items())]).encode()).hexdigest()[:32]
    dest = cache_dir() / kind / key
    if not (dest / ".complete").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        with errors(url):
            for sibling in versions:
                tmp = dest / f".{sibling}.{os.getpid()}.part"
                fs.get_file(f"{folder}/{sibling}", str(tmp))
                os.replace(tmp, dest / sibling)
        (dest / ".complete").write_text(redact(url) + "\n", encoding="utf-8")
    return dest / name


def remote_of(path: Any) -> Any:
    """The URL a local path under a staged remote output stands for; any other path unchanged."""
    for staging in list(_stagings.values()):
        mapped = staging.remote_of(path)
        if mapped is not path:
            return mapped
    return path


def _version(meta: dict) -> str:
    """What identifies one version of an object, across s3fs, gcsfs and adlfs: ETag (or MD5), size, mtime."""
    tag = meta.get("ETag") or meta.get("etag") or meta.get("md5Hash") or ""
    mtime = meta.get("LastModified") or meta.get("mtime") or meta.get("updated") or meta.get("last_modified") or ""
    return f"{tag}|{meta.get('size')}|{mtime}"


# ---------------------------------------------------------------- writing

_stagings: dict[Path, Staging] = {}


class Staging:
    """A remote output written through a local staging copy (``cache_dir()/staging/<key>/NAME``).

    On entry it locks the staging copy (:class:`cvtool.locks.OutputLock`: one writer per output
    on this machine), empties it and downloads what the remote output already holds (the result,
    its errors file and job file, partial files; for a folder only its top-level files, not the
    images), so the command's refusals and ``--resume`` see what they would see locally.
    :meth:`sync` uploads files that changed (partials at flush points, images as they are
    written); :meth:`finish` uploads the results, the named output last, each with one put
    (an object appears complete or not at all), then removes objects whose local file is gone
    (the partials a finished run renamed away).
    """

    def __init__(self, url: str, *, folder: bool = False):
        if scheme(url) in READ_ONLY_SCHEMES:
            raise UsageError(f"--out {redact(url)}: https:// URLs are read-only; write to s3://, gs:// or az://")
        self.url = url.rstrip("/")
        self.folder = folder
        self.fs, self.remote = filesystem(url)
        name = self.remote.rsplit("/", 1)[-1]
        key = hashlib.sha256(redact(self.url).encode()).hexdigest()[:24]
        self.root = cache_dir() / "staging" / key
        self.local = self.root / name
        self.remote_dir = self.remote.rsplit("/", 1)[0] if not folder else self.remote
        self.local_dir = self.local.parent if not folder else self.local
        self.known: dict[str, tuple[int, int]] = {}  # rel (to local_dir) -> (size, mtime_ns) as last synced
        self.remote_names: set[str] = set()
        self.last_sync = 0.0
        self._lock = None

    def __enter__(self) -> Path:
        from cvtool.locks import OutputLock

        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = OutputLock(self.local, folder=self.folder).acquire()
        try:
            self._clear()
            self._download()
        except BaseException:
            self._lock.release()
            raise
        _stagings[self.local_dir.resolve()] = self
        return self.local

    def __exit__(self, exc_type, exc, tb) -> None:
        _stagings.pop(self.local_dir.resolve(), None)
        try:
            if exc_type is None:
                self.finish()
            else:
                with contextlib.suppress(Exception):  # keep the partials for --resume; the error is the one to show
                    self.sync(force=True, delete=True)
        finally:
            self._clear()  # before the lock goes: the next run on this output may start at once
            self._lock.release()

    def _clear(self) -> None:
        lock = self._lock.path if self._lock is not None else None
        for child in self.root.iterdir() if self.root.is_dir() else ():
            if lock is not None and child.resolve() == lock.resolve():
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)

    def _mine(self, name: str) -> bool:
        """Is a top-level name in the remote folder part of this output (for a file output: NAME's family)?"""
        if self.folder:
            from cvtool.images import is_image_name

            return not is_image_name(name)
        stem = self.local.name.rsplit(".", 1)[0]
        return name == self.local.name or name.startswith(stem + ".")

    def _download(self) -> None:
        with errors(self.url, "output folder not found"):
            try:
                listing = self.fs.ls(self.remote_dir, detail=True)
            except FileNotFoundError:
                if self.remote_dir.count("/") and not self.fs.exists(self.remote_dir.split("/", 1)[0]):
                    raise
                listing = []
            self.local_dir.mkdir(parents=True, exist_ok=True)
            for entry in listing:
                name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
                hidden = name.startswith(".") or name.endswith(".lock")
                if entry.get("type") != "file" or hidden or not self._mine(name):
                    continue
                _safe_rel(name, self.url)
                local = self.local_dir / name
                self.fs.get_file(entry["name"], str(local))
                self.known[name] = _stamp(local)
                self.remote_names.add(name)

    def _changed(self) -> list[str]:
        changed = []
        for dirpath, dirnames, filenames in os.walk(self.local_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith(".") or name.endswith(".lock"):
                    continue
                local = Path(dirpath) / name
                rel = local.relative_to(self.local_dir).as_posix()
                if not self.folder and "/" not in rel and not self._mine(rel):
                    continue
                stamp = _stamp(local)
                if self.known.get(rel) != stamp:
                    changed.append(rel)
        return changed

    def sync(self, *, force: bool = False, delete: bool = False, last: str | None = None) -> None:
        """Upload changed files (``last`` after all others); with ``delete``, remove objects whose file is gone.

        Without ``force``, at most every ``CVTOOL_SYNC_SECONDS`` (default 10): flush points come after
        every batch, and a growing partial is uploaded whole each time.
        """
        now = time.monotonic()
        if not force and now - self.last_sync < env_int("CVTOOL_SYNC_SECONDS", 10):
            return
        self.last_sync = now
        changed = self._changed()
        changed.sort(key=lambda rel: (rel == last, "/" not in rel, rel))  # images first, the named result last
        with errors(self.url, "cannot write"):
            for rel in changed:
                local = self.local_dir / rel
                stamp = _stamp(local)
                self.fs.put_file(str(local), f"{self.remote_dir}/{rel}")
                self.known[rel] = stamp
                if "/" not in rel:
                    self.remote_names.add(rel)
            if delete:
                for name in sorted(self.remote_names):
                    if not (self.local_dir / name).exists():
                        with contextlib.suppress(FileNotFoundError):
                            self.fs.rm_file(f"{self.remote_dir}/{name}")
                        self.remote_names.discard(name)
                        self.known.pop(name, None)

    def finish(self) -> None:
        """The run succeeded: upload the results (the named output last) and remove the partial objects."""
        self.sync(force=True, delete=True, last=None if self.folder else self.local.name)
        self.fs.invalidate_cache()

    def remote_of(self, local: Any) -> Any:
        """The URL of a local path under the staging copy (for messages); other values unchanged."""
        try:
            rel = Path(local).resolve().relative_to(self.local_dir.resolve()).as_posix()
        except (TypeError, ValueError):
            return local
        base = self.url if self.folder else self.url.rsplit("/", 1)[0]
        return base if rel == "." else f"{base}/{rel}"


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def flushed(path: Any) -> None:
    """A job wrote and flushed files under ``path``'s folder: upload them if it is a staged remote output."""
    if not _stagings:
        return
    folder = Path(path).resolve().parent
    for root, staging in list(_stagings.items()):
        if folder == root or root in folder.parents:
            staging.sync()
            return


def stages_output(param: str, *, folder: bool = False) -> Callable[[F], F]:
    """Decorate a command whose argument ``param`` names its output: a URL there is written through :class:`Staging`.

    The command runs on the local staging path; a :class:`cvtool.jobs.RunResult` (or any result
    with ``out``/``errors``/``out_dir`` paths) comes back naming the remote objects. Outermost
    decorator, above :func:`cvtool.locks.holds_output_lock`.

    Example::

        @stages_output("out")
        @holds_output_lock("out")
        def predict(model, input, out, ...): ...
    """

    def decorate(func: F) -> F:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            target = local_path(bound.arguments.get(param))
            bound.arguments[param] = target
            if not is_url(target):
                return func(*bound.args, **bound.kwargs)
            if secrets_of(target):  # it would end up in object names, job files and messages
                raise UsageError(
                    f"{redact(target)}: an output URL takes no password or query string; give credentials "
                    "through the cloud library's standard settings (docs/storage.md)"
                )
            staging = Staging(target, folder=folder)
            try:
                with staging as local:
                    bound.arguments[param] = local
                    result = func(*bound.args, **bound.kwargs)
            except CvtoolError as exc:  # "... already exists" and the like: name the URL, not the staging copy
                base = staging.url if staging.folder else staging.url.rsplit("/", 1)[0]
                message = str(exc).replace(str(staging.local_dir.resolve()), redact(base))
                raise type(exc)(message.replace(str(staging.local_dir), redact(base))) from None
            return _remote_result(result, staging)

        return wrapper  # type: ignore[return-value]

    return decorate


def _remote_result(result: Any, staging: Staging) -> Any:
    import dataclasses

    if not dataclasses.is_dataclass(result):
        return result
    changes = {
        f.name: staging.remote_of(getattr(result, f.name))
        for f in dataclasses.fields(result)
        if isinstance(getattr(result, f.name), Path)
    }
    return dataclasses.replace(result, **changes)
