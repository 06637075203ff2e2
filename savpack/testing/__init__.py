"""What the demo, the tests and the tools build offline: tiny random-weight models of every supported family
(`build_fixture`) and generated labelled tasks (`write_colour_task`). Not used by building or classifying."""

from .fixtures import CHATML_TEMPLATE, FIXTURES, build_fixture, build_tokenizer, save_model_folder, text_config
from .tasks import COLOURS, QUESTION, write_colour_task

__all__ = ["CHATML_TEMPLATE", "COLOURS", "FIXTURES", "QUESTION", "build_fixture", "build_tokenizer", "save_model_folder",
           "text_config", "write_colour_task"]
