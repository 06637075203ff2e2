"""What a build really computes: model forwards counted, and time spent in the LM head and the vision tower, by hooks
on the model's own modules, whatever code drives the model (savpack's extraction or the reference procedure)."""

from __future__ import annotations

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
    batches: list[int] = field(default_factory=list)  # rows of each forward

    def snapshot(self) -> dict[str, Any]:
        return {"calls": self.calls, "rows": self.rows, "tokens": self.tokens, "lm_head_calls": self.lm_head_calls,
                "lm_head_seconds": self.lm_head_seconds, "vision_seconds": self.vision_seconds}


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
    for name, module in (("lm_head", loaded.model.get_output_embeddings()), ("vision", vision_tower(loaded.model))):
        if module is not None:
            before, after = timed(name)
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield log
    finally:
        for handle in handles:
            handle.remove()
