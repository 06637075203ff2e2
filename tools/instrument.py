"""What a build really computes: model forwards counted, time spent in the LM head and the vision tower, and the
floating-point operations of every linear and convolution layer, by hooks on the model's own modules, whatever code
drives the model (savpack's extraction or the reference procedure).

FLOPs are 2 x multiply-adds of the weight layers, padding included: what the matrix multiplications cost, which is
89% of savpack's CPU time on Gemma-3-270M (torch.profiler). Attention scores (QK^T, AV) are not counted: at the
sequence lengths benchmarked they are a few percent (short text) to ~15% (1500 tokens) of the layers' work."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from savpack.models import LoadedModel

VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model")


@dataclass
class ForwardLog:
    calls: int = 0  # model forwards (batched or not)
    rows: int = 0  # items through the model, summed over forwards
    tokens: int = 0  # token positions through the model (padding included)
    lm_head_calls: int = 0  # forwards that reached the LM head (full-vocabulary logits)
    lm_head_seconds: float = 0.0
    vision_seconds: float = 0.0
    flops: dict[str, int] = field(default_factory=lambda: {"vision": 0, "language": 0, "lm_head": 0})  # language: + projector
    batches: list[int] = field(default_factory=list)  # rows of each forward

    def snapshot(self) -> dict[str, Any]:
        return {"calls": self.calls, "rows": self.rows, "tokens": self.tokens, "lm_head_calls": self.lm_head_calls,
                "lm_head_seconds": self.lm_head_seconds, "vision_seconds": self.vision_seconds, "flops": dict(self.flops)}


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The shallowest submodule named like a vision tower (Qwen2-VL `visual`, LLaVA `vision_tower`), if any."""
    found = [(name.count("."), module) for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1] in VISION_TOWER_NAMES]
    return min(found, key=lambda item: item[0])[1] if found else None


@contextmanager
def count_forwards(loaded: LoadedModel) -> Iterator[ForwardLog]:
    """Every forward embeds its tokens once: a hook on the input embeddings counts forwards, rows and tokens."""
    log = ForwardLog()
    started: dict[str, float] = {}

    def embedded(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        rows, length = args[0].shape[:2]  # input_ids (batch, seq)
        log.calls += 1
        log.rows += int(rows)
        log.tokens += int(rows) * int(length)
        log.batches.append(int(rows))

    def timed(name: str):
        def before(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            started[name] = time.perf_counter()

        def after(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            elapsed = time.perf_counter() - started.pop(name)
            if name == "lm_head":
                log.lm_head_calls += 1
                log.lm_head_seconds += elapsed
            else:
                log.vision_seconds += elapsed
        return before, after

    handles = [loaded.model.get_input_embeddings().register_forward_hook(embedded)]
    lm_head, vision = loaded.model.get_output_embeddings(), vision_tower(loaded.model)
    for name, module in (("lm_head", lm_head), ("vision", vision)):
        if module is not None:
            before, after = timed(name)
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    vision_modules = set(vision.modules()) if vision is not None else set()
    for module in loaded.model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            part = "lm_head" if module is lm_head else "vision" if module in vision_modules else "language"
            handles.append(module.register_forward_hook(_count_flops(log, part)))
    try:
        yield log
    finally:
        for handle in handles:
            handle.remove()


def _count_flops(log: ForwardLog, part: str):
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Linear):  # rows x in x out multiply-adds
            log.flops[part] += 2 * args[0].numel() * module.out_features
        else:  # every output value sums in_channels / groups x kernel products
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            log.flops[part] += 2 * output.numel() * per_output
    return hook
