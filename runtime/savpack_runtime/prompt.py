"""The pack's prompt object (metadata `savpack.prompt`): its optional fields are written and read only here.

Writers omit an optional field at its default, so packs keep their bytes (and sha256) across savpack versions;
readers therefore never read those fields as bare keys but through `token_position` and `video_frames`.
"""

from __future__ import annotations

from typing import Any, Mapping

from . import format as fmt


def prompt_record(template: str, rendered: str, image_count: int, chat_template_sha256: str | None,
                  token_position: str = fmt.DEFAULT_TOKEN_POSITION, video_frames: int | None = None) -> dict[str, Any]:
    """The prompt object a pack (or activations file) records. video_frames: only for data with videos."""
    prompt: dict[str, Any] = {"template": template, "rendered": rendered, "image_count": image_count,
                              "chat_template_sha256": chat_template_sha256}
    if token_position != fmt.DEFAULT_TOKEN_POSITION:
        prompt[fmt.PROMPT_TOKEN_POSITION] = token_position
    if video_frames is not None:
        prompt[fmt.PROMPT_VIDEO_FRAMES] = video_frames
    return prompt


def token_position(prompt: Mapping[str, Any]) -> str:
    """Which token's head outputs the pack uses: "last" (decoders, the default) or "first" (an encoder's [CLS])."""
    return prompt.get(fmt.PROMPT_TOKEN_POSITION, fmt.DEFAULT_TOKEN_POSITION)


def video_frames(prompt: Mapping[str, Any]) -> int:
    """Frames to sample from each video item: as many as the pack was built with, else the default."""
    return prompt.get(fmt.PROMPT_VIDEO_FRAMES, fmt.DEFAULT_VIDEO_FRAMES)
