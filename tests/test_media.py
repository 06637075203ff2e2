"""Items with several images interleaved with text, and video items: the data format, frame sampling, prompt
rendering, and what reaches the model (batched == one by one; video frames == the same pictures given as images)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from savpack.cli import main
from savpack.data import Example, load_examples
from savpack.errors import DataError
from savpack.extract import extract
from savpack.media import frame_indices, load_media, sample_video_frames
from savpack_runtime import Pack

from conftest import IMAGE_FIXTURES

av = pytest.importorskip("av")

TOLERANCE = 1e-5


def write_video(path, colours: list[tuple[int, int, int]], size: int = 32, codec: str = "libx264", noise: int = 0, seed: int = 0):
    """A short video whose frame i is filled with colours[i] (plus optional noise), at 6 frames per second."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=6)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv444p" if codec == "ffv1" else "yuv420p"
        for colour in colours:
            pixels = np.clip(np.array(colour) + rng.normal(0, noise, (size, size, 3)), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


RAMP = [(20 * i, 255 - 20 * i, 128) for i in range(12)]  # frame i is told apart by its red value 20 * i


# -- frame sampling ---------------------------------------------------------------------------------------------


def test_frame_indices_are_uniform_with_both_ends_and_repeat_when_short():
    assert frame_indices(12, 4) == [0, 4, 7, 11]
    assert frame_indices(12, 1) == [0]
    assert frame_indices(3, 5) == [0, 0, 1, 2, 2]
    assert frame_indices(1, 3) == [0, 0, 0]


@pytest.mark.parametrize("suffix, codec", [(".mp4", "libx264"), (".mkv", "ffv1")])  # .mkv stores no frame count
def test_sampled_frames_are_the_right_frames(tmp_path, suffix, codec):
    video = write_video(tmp_path / f"ramp{suffix}", RAMP, codec=codec)
    frames = sample_video_frames(video, 4)
    assert [frame.size for frame in frames] == [(32, 32)] * 4 and all(frame.mode == "RGB" for frame in frames)
    reds = [int(np.asarray(frame)[..., 0].mean()) for frame in frames]
    assert np.abs(np.array(reds) - [0, 80, 140, 220]).max() <= 6
    assert len(sample_video_frames(video, 20)) == 20  # fewer frames than asked: frames repeat, the count holds


def test_video_errors_name_the_file(tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 50)
    with pytest.raises(DataError, match="garbage.mp4: cannot decode video"):
        sample_video_frames(garbage)
    with pytest.raises(DataError, match="missing.mp4: video file does not exist"):
        sample_video_frames(tmp_path / "missing.mp4")
    sound = tmp_path / "sound.wav"
    with av.open(str(sound), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(DataError, match="sound.wav: holds no video stream"):
        sample_video_frames(sound)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(DataError, match=r"needs PyAV: pip install 'savpack\[video\]'"):
        sample_video_frames(garbage)


# -- the data format -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    colours = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200)}
    rng = np.random.default_rng(3)
    for name, rgb in colours.items():
        for size in (40, 90):
            noise = rng.normal(0, 30, (size, size + 20, 3))
            Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)).save(folder / f"{name}{size}.png")
    write_video(folder / "ramp.mp4", RAMP)
    write_video(folder / "short.mkv", RAMP[:5], codec="ffv1")
    return folder


def write_jsonl(folder, records, name="items.jsonl"):
    path = folder / name
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_jsonl_interleaved_images_and_videos(media_files, tmp_path):
    data = write_jsonl(media_files, [
        {"text": "First <image> then <video> and <image>: which is red?", "images": ["red40.png", "blue90.png"],
         "video": "ramp.mp4", "label": "first"},
        {"question": "Which is red?", "images": ["red40.png", "blue90.png"], "videos": ["short.mkv"], "label": "first"},
    ])
    interleaved, plain = load_examples(data)
    assert interleaved.interleaved and not plain.interleaved
    assert [kind for kind, _ in interleaved.media()] == ["image", "video", "image"]
    assert [kind for kind, _ in plain.media()] == ["video", "image", "image"]  # no markers: videos, then images
    assert interleaved.image_count(3) == plain.image_count(3) == 5
    assert interleaved.prompt_text(3) == "First <image> then <image><image><image> and <image>: which is red?"
    assert plain.prompt_text(3) == "Which is red?"
    pictures = load_media(interleaved, 3)
    assert [picture.size for picture in pictures] == [(60, 40), (32, 32), (32, 32), (32, 32), (110, 90)]
    assert interleaved.digest() != Example(interleaved.text, interleaved.images, interleaved.label).digest()


@pytest.mark.parametrize("record, message", [
    ({"text": "<image> and <image>?", "images": ["red40.png"]}, r"field 'text' holds 2 <image> marker\(s\) but the item gives 1 image"),
    ({"text": "<image> vs the clip", "images": ["red40.png"], "video": "ramp.mp4"}, r"field 'text' holds 0 <video> marker\(s\) but the item gives 1 video"),
    ({"text": "a clip", "video": "nowhere.mp4"}, r"field 'video': video file .*nowhere.mp4 does not exist"),
    ({"text": "clips", "videos": [3]}, "field 'videos' must be a path or a list of paths"),
])
def test_bad_media_records_name_line_and_field(media_files, record, message):
    data = write_jsonl(media_files, [{"text": "fine", "label": "a"}, {**record, "label": "b"}], name="bad.jsonl")
    with pytest.raises(DataError, match=f"bad.jsonl:2: {message}"):
        load_examples(data)


def test_markers_without_media_stay_text(media_files):
    (only_text,) = load_examples(write_jsonl(media_files, [{"text": "an <image> tag in plain text", "label": "a"}], "text.jsonl"))
    assert not only_text.interleaved and only_text.prompt_text(8) == "an <image> tag in plain text"


def test_folder_dataset_takes_videos(media_files, tmp_path):
    (tmp_path / "ramp").mkdir()
    (tmp_path / "ramp" / "clip.mp4").write_bytes((media_files / "ramp.mp4").read_bytes())
    (tmp_path / "still").mkdir()
    (tmp_path / "still" / "red.png").write_bytes((media_files / "red40.png").read_bytes())
    clip, still = load_examples(tmp_path)
    assert (clip.label, clip.videos, clip.images) == ("ramp", (str(tmp_path / "ramp" / "clip.mp4"),), ())
    assert still.images and not still.videos


# -- prompts and activations -------------------------------------------------------------------------------------


def test_interleaved_prompt_places_images_at_the_markers(loaded_model):
    loaded = loaded_model("qwen2_vl")
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    assert loaded.render("Q: {text}", "left <image> right <image> same?", 2) == (
        f"<|im_start|>user\nQ: left {image} right {image} same?<|im_end|>\n<|im_start|>assistant\n")
    assert loaded.render("{text}", "same?", 2) == f"<|im_start|>user\n{image}{image}same?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(DataError, match=r"prompt holds 1 <image> marker\(s\) but the item has 2 image"):
        loaded.render("{text}", "only <image> one", 2)


def two_image_items(media_files) -> list[Example]:
    pairs = [("red40", "blue90"), ("green90", "red90"), ("blue40", "green40")]
    texts = ["Image 1: <image> Image 2: <image> Which one is redder?", "<image><image>Same colour?",
             "Left <image>, right <image>. Is the right picture brighter than the left one, yes or no?"]
    return [Example(text=text, images=tuple(str(media_files / f"{name}.png") for name in pair), label="x")
            for text, pair in zip(texts, pairs)]


@pytest.mark.parametrize("name", IMAGE_FIXTURES)
def test_two_image_items_batched_equal_single(name, loaded_model, media_files):
    loaded = loaded_model(name)
    items = two_image_items(media_files)
    batched = extract(loaded, items, batch_size=len(items), progress=False).vectors
    single = extract(loaded, items, batch_size=1, progress=False).vectors
    assert np.abs(batched - single).max() <= TOLERANCE
    # Both images reach the model, in the markers' order: swapping them changes the heads' view.
    swapped = [Example(item.text, item.images[::-1], item.label) for item in items]
    assert np.abs(extract(loaded, swapped, batch_size=len(items), progress=False).vectors - batched).max() > 1e-4


def test_video_frames_reach_the_model_as_images(loaded_model, media_files, tmp_path):
    """A video item equals the same item with its sampled frames given as image files; batched == single."""
    loaded = loaded_model("qwen2_vl")
    frames = sample_video_frames(media_files / "ramp.mp4", 3)
    paths = []
    for index, frame in enumerate(frames):
        frame.save(tmp_path / f"frame{index}.png")  # PNG is lossless: the same pixels
        paths.append(str(tmp_path / f"frame{index}.png"))
    video_items = [
        Example(text="Clip: <video> What colour is it now?", videos=(str(media_files / "ramp.mp4"),), label="x"),
        Example(text="Colour?", videos=(str(media_files / "short.mkv"),), label="x"),
    ]
    image_item = Example(text="Clip: <image><image><image> What colour is it now?", images=tuple(paths), label="x")
    from_video = extract(loaded, video_items, batch_size=2, progress=False, video_frames=3).vectors
    from_images = extract(loaded, [image_item], progress=False).vectors
    assert np.abs(from_video[0] - from_images[0]).max() <= TOLERANCE
    single = extract(loaded, video_items, batch_size=1, progress=False, video_frames=3).vectors
    assert np.abs(from_video - single).max() <= TOLERANCE


def test_cli_builds_and_evaluates_a_video_pack(model_dir, tmp_path):
    """--video-frames is recorded in the pack, and classify/eval sample videos as the pack was built."""
    rows = []
    for label, colour in (("warm", (210, 60, 30)), ("cold", (30, 80, 210))):
        for index in range(4):
            shade = [(np.array(colour) * (0.7 + 0.1 * step)).astype(int).tolist() for step in range(4 + index)]
            write_video(tmp_path / f"{label}{index}.mp4", [tuple(value) for value in shade], noise=20, seed=index)
            rows.append({"text": "What colour is this clip?", "video": f"{label}{index}.mp4", "label": label})
    train = write_jsonl(tmp_path, [row for row in rows if not row["video"].endswith(("2.mp4", "3.mp4"))], "train.jsonl")
    test = write_jsonl(tmp_path, [row for row in rows if row["video"].endswith(("2.mp4", "3.mp4"))], "test.jsonl")
    pack = tmp_path / "video.pack.safetensors"
    common = ["--model", str(model_dir("llava")), "--device", "cpu"]
    runner = CliRunner()
    built = runner.invoke(main, ["build", *common, "--data", str(train), "--out", str(pack), "--k", "4", "--video-frames", "3"])
    assert built.exit_code == 0, built.output
    prompt = Pack.load(pack).prompt
    assert (prompt["video_frames"], prompt["image_count"]) == (3, 3)
    assert prompt["rendered"].count("<image>") == 3
    evaluated = runner.invoke(main, ["eval", "--pack", str(pack), *common, "--data", str(test), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["examples"] == 4


def test_a_bad_video_fails_before_the_first_forward(loaded_model, media_files, tmp_path):
    loaded = loaded_model("qwen2_vl")
    garbage = tmp_path / "garbage.webm"
    garbage.write_bytes(b"\x1a\x45\xdf\xa3 not really matroska" * 20)
    items = [Example(text="fine", images=(str(media_files / "red40.png"),), label="x"),
             Example(text="broken", videos=(str(garbage),), label="x")]
    forwards = []
    handle = loaded.model.base_model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        with pytest.raises(DataError, match="garbage.webm: cannot decode video"):
            extract(loaded, items, batch_size=1, progress=False)
    finally:
        handle.remove()
    assert forwards == []
