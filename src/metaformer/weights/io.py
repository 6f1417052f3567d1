"""Reading weight files: local paths or URLs (downloaded once, checksummed), torch or safetensors,
raw or wrapped state dicts. A weights file never runs code: torch files are read with
``weights_only=True``."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import urllib.parse
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import MetaFormerError

EXTENSIONS = (".pth", ".pth.tar", ".pt", ".bin", ".safetensors")
_LIST_LIMIT = 10  # keys shown per list in an error message


class WeightsError(MetaFormerError):
    """A weights file that cannot be read, or does not fit the model it is loaded into."""


class DownloadError(WeightsError):
    """Weights that could not be downloaded (offline, a proxy, the server): says where to put the file by hand.

    ``how`` says how the caller passes a local file instead, ``{}`` standing for its path (default: Python's
    ``pretrained=``); on the command line, :meth:`cli_message` names the verb's flag."""

    PYTHON = "pretrained='{}' (or load_weights(model, '{}'))"

    def __init__(self, url: str, dest: Path, reason: str, how: str = PYTHON):
        self.url, self.dest, self.reason, self.how = url, Path(dest), reason, how
        super().__init__(self.message(how))

    def cli_message(self, args) -> str:
        return self.message((getattr(args, "weights_flag", None) or "--checkpoint") + " {}")

    def message(self, how: str) -> str:
        return (f"cannot download {self.url} ({self.reason}); is this machine offline? Download that file on one that "
                f"is online and copy it to {self.dest} (it is used from there, with no network), or pass its path: "
                + how.replace("{}", f"/path/to/{self.dest.name}"))


def fmt_list(items: list, limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where downloads are kept: ``override``, else ``$METAFORMER_CACHE``, else ``~/.cache/metaformer``."""
    return Path(override or os.environ.get("METAFORMER_CACHE") or Path.home() / ".cache" / "metaformer")


def is_url(source: Any) -> bool:
    return isinstance(source, str) and source.split("://", 1)[0].lower() in ("http", "https", "file")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A fingerprint of weights: sha256 over every tensor's name, dtype, shape and bytes (in name order), so two
    files that load the same numbers into a model have the same one, whatever their layout."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _record_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256.json")


def download(url: str, sha256: str | None = None, cache: str | os.PathLike | None = None) -> Path:
    """``url`` in the cache (:func:`cache_dir`), downloaded once.

    The sha256 of every download is computed and recorded beside the file; a later use re-hashes a
    file whose size or time changed since, and a file that no longer matches (or does not match a
    published ``sha256``) is downloaded again rather than used.
    """
    name = os.path.basename(urllib.parse.urlparse(url).path) or "weights.pth"
    dest = cache_dir(cache) / name
    record = _record_path(dest)
    if dest.is_file() and dest.stat().st_size > 0 and _cached_ok(dest, record, sha256):
        return dest
    made = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]  # removed again if it fails
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        # download_url_to_file writes to a temporary file and renames it, so an interrupted
        # download never leaves a truncated file in the cache.
        torch.hub.download_url_to_file(url, str(dest), progress=True)
    except Exception as e:  # urllib raises URLError, HTTPError, socket errors, ...
        for folder in made:  # deepest first: no empty cache folders left behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise DownloadError(url, dest, f"{type(e).__name__}: {reason}") from None
    digest = file_sha256(dest)
    if sha256 and digest != sha256:
        dest.unlink()
        raise WeightsError(f"{url}: the download's sha256 is {digest}, not the published {sha256}: the file is "
                           "corrupt or was replaced upstream; nothing was kept")
    st = dest.stat()
    record.write_text(json.dumps({"url": url, "sha256": digest, "size": st.st_size, "mtime": st.st_mtime}))
    return dest


def _cached_ok(dest: Path, record: Path, expected: str | None) -> bool:
    try:
        rec = json.loads(record.read_text())
    except (OSError, ValueError):
        rec = None
    st = dest.stat()
    if rec is None or rec.get("size") != st.st_size or rec.get("mtime") != st.st_mtime:
        digest = file_sha256(dest)  # copied in by hand, or changed since: hash it now
        if rec is not None and rec.get("sha256") not in (None, digest):
            return False  # changed since it was downloaded: get it again
        record.write_text(json.dumps({"url": rec.get("url") if rec else None, "sha256": digest,
                                      "size": st.st_size, "mtime": st.st_mtime}))
        rec = {"sha256": digest}
    return expected is None or rec["sha256"] == expected


HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repositories hold, in timm's order


def hub_file(repo_id: str, filename: str | None = None, cache: str | os.PathLike | None = None) -> Path:
    """The weights file of a Hugging Face hub repository (``filename``, else the first of :data:`HUB_FILES`
    it has), downloaded once by ``huggingface_hub`` into its cache (or ``cache``)."""
    from huggingface_hub import hf_hub_download

    errors = []
    for name in [filename] if filename else HUB_FILES:
        try:
            return Path(hf_hub_download(repo_id, name, cache_dir=cache))
        except Exception as e:  # offline, unknown repository or file, auth: one clear line either way
            errors.append(f"{name}: {type(e).__name__}")
    raise WeightsError(f"cannot fetch weights from the Hugging Face hub repository {repo_id!r} ({'; '.join(errors)}); "
                       "if this machine is offline, download the file elsewhere and pass its local path")


def resolve(source: Any, sha256: str | None = None, cache: str | os.PathLike | None = None) -> Path:
    """A local file for ``source`` (a path, or a URL downloaded into the cache)."""
    if is_url(source):
        return download(source, sha256, cache)
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise WeightsError(f"{path}: no such file. Pass the path of a weights file ({', '.join(EXTENSIONS)}) "
                           "or a URL.")
    if path.is_dir():
        inside = sorted(q.name for q in path.iterdir() if q.name.endswith(EXTENSIONS))
        hint = f" (e.g. {path / inside[0]})" if inside else ""
        raise WeightsError(f"{path} is a folder, not a weights file: pass the path of the file inside it{hint}")
    return path


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object.
    return len(head) >= 9 and head[8:9] == b"{"


def unreadable(path: Path, err: Exception) -> WeightsError:
    size = path.stat().st_size if path.exists() else 0
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return WeightsError(
        f"{path}: not a readable weights file ({size} bytes; {type(err).__name__}: {reason}). It is probably "
        f"truncated or corrupt, e.g. an interrupted download: download or save it again. Supported: "
        f"{', '.join(EXTENSIONS)}.")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError, ... from inside the Rust reader
        raise unreadable(path, e) from None
    return tensors, metadata


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise unreadable(path, e) from None


def read_torch(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise WeightsError(
                f"{path}: refused to load. The file contains Python objects other than tensors and plain "
                f"containers, and unpickling them could run arbitrary code. Only load files you trust; "
                f"to use a trusted one, re-save its state dict (torch.save(obj['state_dict'], ...)) or convert "
                f"it to safetensors. ({str(e).splitlines()[0]})") from None
        raise unreadable(path, e) from None
    except Exception as e:  # RuntimeError from the zip reader, EOFError, ...
        raise unreadable(path, e) from None


def _all_tensors(d: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


EMA_KEYS = ("ema", "state_dict_ema", "model_ema")  # ours, timm's train.py, DeiT's and the authors'


def unwrap(obj: Any, path: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint (timm: 'state_dict', DeiT/ours: 'model'), DDP prefix off;
    with ``ema``, the checkpoint's exponential moving average of the weights instead."""
    if ema:
        found = [k for k in EMA_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)]
        if not found:
            raise WeightsError(f"{path} holds no EMA weights (looked for {', '.join(EMA_KEYS)}): train with --ema "
                               "to keep them, or evaluate without --ema")
        obj = obj[found[0]]
    for _ in range(3):
        if isinstance(obj, dict) and not _all_tensors(obj):
            for key in ("state_dict", "model", "model_state_dict"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path}: holds {type(obj).__name__}, not a state dict (a dict of tensors, possibly "
                           "wrapped in {'state_dict': ...} or {'model': ...}).")
    if not _all_tensors(obj):
        bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        raise WeightsError(f"{path}: not a state dict: entries {fmt_list(bad)} are not tensors (a training "
                           "checkpoint? its weights should be under 'state_dict' or 'model').")
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def read_state_dict(source: Any, sha256: str | None = None,
                    ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    """``(state_dict, safetensors metadata, local path)`` of any supported file, keys as stored (``ema``: the
    training checkpoint's EMA weights). A dict already in memory is read as the contents of a file."""
    if isinstance(source, dict):
        where = Path("<state dict in memory>")
        return unwrap(source, where, ema), {}, where
    path = resolve(source, sha256)
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: the file is empty (an interrupted download or save?): get it again.")
    with open(path, "rb") as f:
        head = f.read(9)
    if path.name.endswith(".safetensors") or (_looks_like_safetensors(head) and not zipfile.is_zipfile(path)):
        tensors, metadata = read_safetensors(path)
    else:
        tensors, metadata = read_torch(path), {}
    return unwrap(tensors, path, ema), metadata, path
