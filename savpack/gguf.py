"""Convert a GGUF checkpoint once into a plain transformers folder (config, safetensors weights, tokenizer).

transformers loads a .gguf file by dequantising every tensor (about 90 s for Gemma-3-270M on 2 CPU cores) and then
refuses to `save_pretrained` the result ("quantized with gguf and is not serializable"). The dequantised weights are
ordinary float tensors, so we drop the GGUF quantizer and its quantization_config and save a normal folder, which
later loads in seconds and gives the same activations (and the same savpack fingerprint) as the .gguf file.
"""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from savpack_runtime.files import check_file, check_output_folder, file_sha256, staged_folder

from .errors import ModelError
from .models import dequantised_load_kwargs, model_errors, quiet_transformers

CONVERSION_RECORD = "savpack_conversion.json"


@contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """Parse the GGUF file once for the config, the weights and the tokenizer: transformers opens a new
    gguf.GGUFReader for each (measured on Gemma-3-270M: 57 s of CPU for the three loads with a reader each, 27 s with
    one shared). The reader only maps the file read-only, so sharing it changes nothing else."""
    import gguf

    original = gguf.GGUFReader
    gguf.GGUFReader = functools.lru_cache(maxsize=1)(original)
    try:
        yield
    finally:
        gguf.GGUFReader = original


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, force: bool = False,
                 echo: Callable[[str], None] = lambda message: None) -> Path:
    """Dequantise `gguf_path` and write a float32 transformers folder at `out_dir` (atomically: a temporary folder
    beside it, renamed when complete). Refuses to replace an existing folder unless `force`."""
    import torch
    import transformers

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    check_file(gguf_path, ModelError, "GGUF file")
    check_output_folder(out_dir, force, marker=CONVERSION_RECORD, inputs=[gguf_path])

    source, name = str(gguf_path.parent), gguf_path.name
    echo(f"dequantising {gguf_path} (this takes a minute or two)")
    with quiet_transformers(), model_errors(str(gguf_path)), _one_gguf_parse():
        config = transformers.AutoConfig.from_pretrained(source, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32,
                                                                  **dequantised_load_kwargs())
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=name)
    # The weights are already dequantised floats; only the quantizer's bookkeeping blocks saving them.
    model.hf_quantizer = None
    for holder in (model.config, config):
        if hasattr(holder, "quantization_config"):
            del holder.quantization_config
    record = {"source": name, "source_bytes": gguf_path.stat().st_size, "source_sha256": file_sha256(gguf_path),
              "model_type": config.model_type, "dtype": "float32", "transformers": transformers.__version__}

    with staged_folder(out_dir, force, marker=CONVERSION_RECORD, inputs=[gguf_path]) as temporary:
        with quiet_transformers():
            model.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
        saved = json.loads((temporary / "config.json").read_text())
        if "quantization_config" in saved:
            raise ModelError(f"{gguf_path}: conversion kept a quantization_config; transformers changed how GGUF loads")
        (temporary / CONVERSION_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    echo(f"wrote {out_dir}")
    return out_dir
