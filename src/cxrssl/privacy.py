"""Pseudonymous image ids for sites whose file names identify patients (config section ``privacy``).

Image ids come from file names (a VinDr image id is its DICOM's stem), and ids travel into PNG
names, metadata, quarantine reports, logs and submissions. Where file names carry patient
identifiers, ``privacy.pseudonymize_ids: true`` replaces every id by ``p`` + the first 20 hex
digits of HMAC-SHA256(salt, id): the same file gets the same id in every stage and every run, and
nothing under ``results/`` leads back to the file without the salt. Files are then named in
reports as ``<folder>/<pseudonym><suffix>`` (``train/p3f0....dicom``).

The salt (random, made once) and the tables mapping pseudonyms back to the original ids and files
(``ids_<stage>.csv``) live in ``privacy.private_dir``, which must lie outside ``results_dir`` (a
config check). Keep that folder like a key: without it the ids of a new run differ (and with them
the seeded split); with it anyone can re-identify the results.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from pathlib import Path

import pandas as pd

from cxrssl.errors import BadInputError
from cxrssl.io import atomic_write_csv

log = logging.getLogger(__name__)

SALT_NAME = "salt.txt"
#: Folder names that may appear in reports with pseudonyms (VinDr's splits); others could identify.
SAFE_FOLDERS = ("train", "test")
MAPPING_COLUMNS = ["image_id", "original_id", "source"]
#: What a pseudonym looks like (``p`` + 20 hex digits = 80 bits of the HMAC).
PSEUDONYM = re.compile(r"p[0-9a-f]{20}")


def _load_salt(private_dir: Path) -> bytes:
    """The folder's salt, created once (atomically: concurrent stages agree on one salt)."""
    path = private_dir / SALT_NAME
    if not path.exists():
        private_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = private_dir / f".{SALT_NAME}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (secrets.token_hex(32) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another job made the salt first: then use theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    text = path.read_text(errors="replace").strip()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise BadInputError(str(path), "not a salt written by cxrssl (64 hex digits): restore the private folder "
                                       "from its backup, or remove the file to start new pseudonyms")
    return bytes.fromhex(text)


class Pseudonymizer:
    """Maps original image ids to pseudonyms (or leaves them as they are when not ``enabled``)."""

    def __init__(self, enabled: bool = False, private_dir: str | Path | None = None):
        self.enabled = bool(enabled)
        self.private_dir = Path(private_dir) if private_dir is not None else None
        self._salt = b""
        self._seen: dict[str, tuple[str, str]] = {}  # pseudonym -> (original id, source)
        if self.enabled:
            if self.private_dir is None:
                raise ValueError("privacy.pseudonymize_ids needs privacy.private_dir")
            self._salt = _load_salt(self.private_dir)

    def image_id(self, original: str, source: str | Path = "") -> str:
        """The id to use for ``original`` (recorded for the mapping table when pseudonymising)."""
        if not self.enabled:
            return original
        digest = hmac.new(self._salt, original.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
        pseudo = "p" + digest[:20]
        self._seen.setdefault(pseudo, (original, str(source)))
        return pseudo

    def file_label(self, path: str | Path) -> str:
        """How a source file is named in reports and logs: as given, or ``<folder>/<pseudonym><suffix>``
        (the folder only when it is ``train`` or ``test``; any other name is left out)."""
        path = Path(path)
        if not self.enabled:
            return str(path)
        folder = path.parent.name if path.parent.name in SAFE_FOLDERS else "(folder)"
        return f"{folder}/{self.image_id(path.stem, path)}{path.suffix}"

    def scrub(self, text: str, path: str | Path) -> str:
        """``text`` with every spelling of ``path`` (full, name, stem) replaced by its label."""
        if not self.enabled:
            return text
        path = Path(path)
        label = self.file_label(path)
        for spelling in sorted({str(path), str(path.resolve()), path.name}, key=len, reverse=True):
            text = text.replace(spelling, label)
        if not path.stem:
            return text
        word = re.compile(rf"(?<![A-Za-z0-9]){re.escape(path.stem)}(?![A-Za-z0-9])")
        return word.sub(self.image_id(path.stem, path), text)

    def write_mapping(self, stage: str) -> Path | None:
        """Merge this run's pseudonyms into ``<private_dir>/ids_<stage>.csv``; None when not pseudonymising."""
        if not self.enabled:
            return None
        path = self.private_dir / f"ids_{stage}.csv"
        rows = {}
        if path.exists():
            try:
                old = pd.read_csv(path, dtype=str, keep_default_na=False)
                rows = {r["image_id"]: (r["original_id"], r["source"]) for r in old.to_dict("records")}
            except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, UnicodeDecodeError) as exc:
                log.warning("%s unreadable (%s): rewritten with this run's ids only", path, exc)
        rows.update(self._seen)
        frame = pd.DataFrame([(k, *v) for k, v in sorted(rows.items())], columns=MAPPING_COLUMNS)
        atomic_write_csv(frame, path)
        os.chmod(path, 0o600)
        return path


def restore_ids(frame: pd.DataFrame, mapping_csv: str | Path, column: str = "image_id") -> pd.DataFrame:
    """``frame`` with the pseudonyms in ``column`` replaced by the original ids of ``mapping_csv``.

    For handing on results that need the real ids (a Kaggle submission of pseudonymised
    predictions). A pseudonym the table does not know is a BadInputError naming it.
    """
    table = pd.read_csv(mapping_csv, dtype=str, keep_default_na=False)
    back = dict(zip(table["image_id"], table["original_id"]))
    unknown = sorted(set(frame[column].astype(str)) - set(back))
    if unknown:
        raise BadInputError(str(mapping_csv), f"{len(unknown)} id(s) not in the table, e.g. {unknown[:3]}")
    out = frame.copy()
    out[column] = out[column].astype(str).map(back)
    return out
