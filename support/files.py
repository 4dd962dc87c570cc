# Reading files that a user passes or a run wrote, so that damage has a name: a missing, truncated or unparsable
# file (a partial copy between machines, a full disk) raises DamagedFileError naming the file, what it should hold
# and the fix, instead of a library's message that names neither (safetensors' "invalid header length", torch's
# "failed finding central directory"). Checkpoint directories also carry a manifest (sizes and sha256 of every
# file) that catches what no parser notices, such as a flipped bit inside a tensor.
import contextlib
import hashlib
import json
import os
import pickle
import zipfile

import yaml
from safetensors import SafetensorError

MANIFEST = "manifest.json"
# What the libraries raise on a damaged or unreadable file. Callers wrap only the read itself, so a RuntimeError
# here is torch's zip reader, not a model's shape check.
READ_ERRORS = (OSError, EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, json.JSONDecodeError,
               UnicodeDecodeError, yaml.YAMLError, SafetensorError)


class DamagedFileError(ValueError):
    def __init__(self, path, expected, problem, fix, details=""):
        self.path, self.expected, self.problem, self.fix, self.details = str(path), expected, problem, fix, details
        super().__init__(f"cannot read {path}: expected {expected}; {problem}. Fix: {fix}"
                         + (f"\n{details}" if details else ""))

    def __str__(self):  # (MissingFileError would otherwise print OSError's form)
        return self.args[0]


class MissingFileError(DamagedFileError, FileNotFoundError):
    pass  # also a FileNotFoundError, for callers that already catch that


def _describe(error):
    # The library's message on one line (YAML's says where over several), without torch's paragraph of advice.
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = text.split(". This is an internal miniz error")[0]
    text = text if len(text) <= 300 else text[:300] + "..."
    return f"{type(error).__name__}: {text}" if text else f"{type(error).__name__} (empty or cut short?)"


@contextlib.contextmanager
def read_or_explain(path, expected, fix):
    """Wrap the read of `path` (and only the read): any library read failure becomes one DamagedFileError."""
    try:
        yield
    except DamagedFileError:
        raise
    except READ_ERRORS as e:
        cls = MissingFileError if isinstance(e, FileNotFoundError) else DamagedFileError
        raise cls(path, expected, _describe(e), fix) from None  # the message carries the cause


@contextlib.contextmanager
def fix_hint(fix):
    """A caller that knows the better repair (delete this checkpoint) replaces the loader's generic fix."""
    try:
        yield
    except DamagedFileError as e:
        raise type(e)(e.path, e.expected, e.problem, fix, e.details) from None


def read_json(path, expected, fix):
    with read_or_explain(path, expected, fix), open(path) as f:
        return json.load(f)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory):
    """Name, size and sha256 of every file in `directory`, written last, just before the directory is renamed into
    place: a later copy or disk fault that changes any byte is then caught when the directory is read."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != MANIFEST:
                files[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump({"files": dict(sorted(files.items()))}, f, indent=1)


def check_manifest(directory, fix, names=None, expected=None):
    """-> False if `directory` has no manifest (written before manifests existed); else checks the listed files
    (or only `names`) and returns True, raising DamagedFileError on the first that is missing or differs.
    expected: {name: what the file holds}, for the error."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return False
    manifest = read_json(path, "the checkpoint's manifest (JSON: file names, sizes, sha256)", fix)
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict):
        raise DamagedFileError(path, "the checkpoint's manifest (JSON: file names, sizes, sha256)",
                               "it has no 'files' mapping", fix)
    for rel, entry in listed.items():
        if names is not None and rel not in names:
            continue
        file = os.path.join(directory, rel)
        what = f"{(expected or {}).get(rel, 'the file')}, {entry['bytes']:,} bytes as {MANIFEST} lists"
        if not os.path.isfile(file):
            raise MissingFileError(file, what, "it is missing", fix)
        size = os.path.getsize(file)
        if size != entry["bytes"]:
            raise DamagedFileError(file, what, f"it has {size:,} bytes (cut short or overwritten)", fix)
        if _sha256(file) != entry["sha256"]:
            raise DamagedFileError(file, what, f"its sha256 differs from {MANIFEST}'s (changed after it was "
                                   f"written)", fix)
    return True
