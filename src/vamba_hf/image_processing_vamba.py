"""Images for Vamba: Qwen2-VL's image processor (stock transformers) with its defaults, the settings it saves so that
transformers 4.x and 5.x read them alike, images to `pixel_values` + `image_grid_thw`, and the patch rows an image
of a given size takes.

Served as Hub remote code, so it imports only transformers, torch, numpy, PIL and the standard library at top level.
"""

import json
import math
import os

import transformers

from .video_processing_vamba import PatchLayout
from .video_vamba import frame_array

__all__ = ["IMAGE_PROCESSOR_FILE", "default_image_processor", "image_inputs", "image_patch_counts",
           "image_processor_settings", "write_image_processor_settings"]

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"


def default_image_processor(**kwargs):
    """Qwen2-VL's image processor with its defaults (min_pixels 56*56, max_pixels 28*28*1280, CLIP mean/std).

    The PIL backend is preferred: its bicubic resize is the one the original Vamba release used.
    """
    image_processor_class = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    return image_processor_class(**kwargs)


def image_processor_settings(image_processor) -> dict:
    """The image processor's saved settings, readable by transformers 4.x and 5.x alike: Qwen2-VL's image processor
    in 4.x takes its pixel budget from `min_pixels` / `max_pixels` only (it resets `size` to its defaults)."""
    settings = json.loads(image_processor.to_json_string())
    size = settings.get("size") or {}
    if "shortest_edge" in size and "longest_edge" in size:
        settings.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    return settings


def write_image_processor_settings(folder, image_processor) -> None:
    """`preprocessor_config.json` in `folder`, where transformers 4.x reads the image processor's settings (5.x keeps
    them inside processor_config.json, which 4.x does not read: it would take Qwen2-VL's defaults)."""
    with open(os.path.join(folder, IMAGE_PROCESSOR_FILE), "w", encoding="utf-8") as f:
        json.dump(image_processor_settings(image_processor), f, indent=2, sort_keys=True)
        f.write("\n")


def image_inputs(image_processor, images: list, images_kwargs: dict) -> dict:
    """`pixel_values` and `image_grid_thw` (numpy) of images (PIL images, arrays, tensors, paths or URLs) under a
    call's image options; `min_pixels` / `max_pixels` set the pixel budget of the image processor's `size`."""
    images = [frame_array(image, "image") for image in images]
    options = {key: value for key, value in images_kwargs.items() if key != "return_tensors"}
    min_pixels, max_pixels = options.pop("min_pixels", None), options.pop("max_pixels", None)
    if min_pixels is not None or max_pixels is not None:
        size = dict(options.get("size") or image_processor.size)
        size["shortest_edge"] = size["shortest_edge"] if min_pixels is None else min_pixels
        size["longest_edge"] = size["longest_edge"] if max_pixels is None else max_pixels
        options["size"] = size
    output = image_processor(images=images, return_tensors="np", **options)
    return {"pixel_values": output["pixel_values"], "image_grid_thw": output["image_grid_thw"]}


def image_patch_counts(image_processor, image_sizes, images_kwargs: dict) -> list:
    """Per image (height, width): its rows of `pixel_values` under a call's image options."""
    size = dict(images_kwargs.get("size") or image_processor.size)
    layout = PatchLayout.of(image_processor, images_kwargs.get("min_pixels", size["shortest_edge"]),
                            images_kwargs.get("max_pixels", size["longest_edge"]))
    return [math.prod(layout.frame_size(width, height)) // layout.patch_size ** 2 for height, width in image_sizes]
