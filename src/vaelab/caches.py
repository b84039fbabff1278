"""Caches read from disk, one mechanism for all of them: the image folder's decoded pixels, torchvision's converted
arrays and the Fréchet classifier's weights.

A cache is one torch file holding a flat dict of plain data: its content, plus `cache` (its kind), `version` (bumped
when what it holds changes) and `key`, a content hash of everything it was made from (`content_key`, `files_key`),
so that changed content is never served. It is written whole or not at all (vaelab.files.atomic_write) and, read
back with torch.load(weights_only=True) (no pickle), trusted only when its kind, version and key are the expected
ones and its content matches a schema: every tensor of the expected dtype and shape, and finite. Anything else is
one warning line saying why, and the caller builds the cache again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from vaelab.errors import UserError, one_line
from vaelab.files import atomic_write

ENVELOPE = ("cache", "version", "key")  # the keys every cache has beside its content


@dataclass(frozen=True)
class Tensor:
    """A tensor of this dtype and shape, finite, and no value below `low` when given: each size an int, or a name that
    must be the same size wherever it appears in the record (e.g. the images' and the labels' "n")."""

    dtype: torch.dtype
    shape: tuple[int | str, ...]
    low: float | None = None


@dataclass(frozen=True)
class Value:
    """A plain value that passes `test`; `expected` says what it should be."""

    test: Callable[[object], bool]
    expected: str


NAMES = Value(lambda v: v is None or (isinstance(v, list) and all(isinstance(s, str) for s in v)), "a list of names or None")
TEXT = Value(lambda v: isinstance(v, str), "a string")
NUMBER = Value(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number")


def equal(value: object) -> Value:
    return Value(lambda v: v == value, repr(value))


def content_key(*parts: object) -> str:
    """sha256 of the parts in order: tensors by dtype, shape and bytes, bytes as they are, anything else as JSON."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            head, raw = f"tensor {t.dtype} {list(t.shape)}".encode(), t.numpy().tobytes()
        elif isinstance(part, bytes):
            head, raw = b"bytes", part
        else:
            head, raw = b"json", json.dumps(part, sort_keys=True).encode()
        digest.update(b"%s %d\n" % (head, len(raw)))
        digest.update(raw)
    return digest.hexdigest()


def files_key(root: Path, names: list[str], *parts: object) -> str:
    """content_key of the parts, the names and every file's bytes: it changes whenever a file's content does, even
    when its size and modification time stay the same. Files that cannot be read are one line naming the first."""
    digests, failures, top = [], [], str(root)
    for name in names:
        path, digest = os.path.join(top, name), hashlib.sha256()
        try:
            with open(path, "rb") as file:
                while chunk := file.read(1 << 20):
                    digest.update(chunk)
        except OSError as err:
            link = f", a symbolic link to {os.readlink(path)}" if os.path.islink(path) else ""
            failures.append(f"{path}: cannot be read ({err.strerror or err}{link})")
            continue
        digests.append(digest.digest())
    if failures:
        more = f" ({len(failures)} files in all cannot be read)" if len(failures) > 1 else ""
        raise UserError(f"{failures[0]}{more}; delete or fix it, then run again")
    return content_key(*parts, names, b"".join(digests))


def problem(value: object, schema: object, where: str, sizes: dict[str, int]) -> str | None:
    """What is wrong with value against the schema (a dict or tuple of schemas, a Tensor, a Value), or None."""
    if isinstance(schema, Mapping):
        if not isinstance(value, Mapping) or set(value) != set(schema):
            found = sorted(map(str, value)) if isinstance(value, Mapping) else type(value).__name__
            return f"{where or 'the record'} holds {found}, expected {sorted(schema)}"
        return next((p for k in schema if (p := problem(value[k], schema[k], f"{where}{k}.", sizes))), None)
    where = where.rstrip(".")
    if isinstance(schema, tuple):
        if not isinstance(value, (tuple, list)) or len(value) != len(schema):
            return f"{where} is not a sequence of {len(schema)}"
        return next((p for i, s in enumerate(schema) if (p := problem(value[i], s, f"{where}.{i}.", sizes))), None)
    if isinstance(schema, Value):
        return None if schema.test(value) else f"{where} is {one_line(repr(value))[:80]}, expected {schema.expected}"
    if not (isinstance(value, torch.Tensor) and value.layout == torch.strided):
        return f"{where} is a {type(value).__name__}, expected a tensor"
    if value.dtype != schema.dtype:
        return f"{where} is {value.dtype}, expected {schema.dtype}"
    want = tuple(sizes.setdefault(s, got) if isinstance(s, str) else s for s, got in zip(schema.shape, value.shape))
    if len(value.shape) != len(schema.shape) or tuple(value.shape) != want:
        expected = tuple(sizes.get(s, s) if isinstance(s, str) else s for s in schema.shape)
        return f"{where} has the shape {tuple(value.shape)}, expected {expected}"
    if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
        return f"{where} holds {int((~torch.isfinite(value)).sum())} non-finite values"
    if schema.low is not None and value.numel() and bool(value.min() < schema.low):
        return f"{where} holds values below {schema.low}"
    return None


@dataclass(frozen=True)
class Cache:
    """One kind of cache: `name` and `version` written into each file; `log`, `what` and `then` make the warning
    line for a bad one: "<what> <path> is damaged (<why>); <then>" (or "is out of date": another version or key)."""

    name: str
    version: int
    log: logging.Logger
    what: str  # e.g. "data: the image cache"
    then: str  # e.g. "decoding the images again"

    def pack(self, key: str | None, content: dict) -> bytes:
        """The file's bytes: the content and the envelope, one flat dict."""
        assert not set(content) & set(ENVELOPE), "a content key is one of the envelope's"
        buffer = io.BytesIO()
        torch.save({"cache": self.name, "version": self.version, "key": key, **content}, buffer)
        return buffer.getvalue()

    def write(self, path: Path, packed: bytes) -> None:
        """The file, whole or not at all, its folder made first; OSError for the caller to judge."""
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, packed)

    def read(self, path: Path, key: str | None, schema: dict) -> dict | None:
        """The content of the cache at path, or None: when there is none, and (one warning line) when it is damaged,
        of another version or made from other content than `key` (None: not checked)."""
        try:
            if not path.is_file():
                return None
        except OSError:  # a folder that cannot be searched: no cache to be had there
            return None
        state = "damaged"
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
            envelope = {k: record.get(k) for k in ENVELOPE} if isinstance(record, dict) else {}
            why = None
            if envelope.get("cache") != self.name:
                why = f"kind {envelope.get('cache')!r}, expected {self.name!r}"
            elif envelope["version"] != self.version:
                state, why = "out of date", f"version {envelope['version']}, expected {self.version}"
            elif key is not None and envelope["key"] != key:
                state, why = "out of date", f"made from other content: key {str(envelope['key'])[:12]}, expected {key[:12]}"
            content = {k: v for k, v in record.items() if k not in ENVELOPE} if why is None else None
            why = why or problem(content, schema, "", {})
        except Exception as err:  # unpickling errors, a truncated file, a foreign file: all "damaged"
            why = f"{type(err).__name__}: {one_line(err)[:200]}"
        if why:
            self.log.warning("%s %s is %s (%s); %s", self.what, path, state, why, self.then)
            return None
        return content
