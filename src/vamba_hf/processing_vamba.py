"""Processor for Vamba: Qwen2-VL's image processor, a Qwen2 tokenizer and Vamba's chat template, wired together.

Vamba's prompts carry `<|vision_start|><|vision_end|>` where the image or video is, with no
`<|image_pad|>`/`<|video_pad|>` tokens: the visual patches go to the model's vision tower
separately (`pixel_values` + `image_grid_thw` or `pixel_values_videos` + `video_grid_thw`).

Call keyword arguments follow transformers' typed processing kwargs: flat (`max_length=...`, `num_frames=...`) or
per modality (`text_kwargs`, `images_kwargs`, `videos_kwargs`, `common_kwargs`), merged with the tokenizer's init
defaults by `ProcessorMixin._merge_kwargs`. Videos go to `VambaVideoProcessor` (`video_processing_vamba.py`, where
the video options are described), built from the image processor's settings; conversations and prompts are checked
by `conversation_vamba.py`, images by Qwen2-VL's image processor (`image_processing_vamba.py`).

This file is also served as Hub remote code (with its sibling `*_vamba.py` modules), so it imports only transformers,
torch, numpy, PIL, jinja2 and the standard library at top level.
"""

import os
import typing

import transformers
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import (ImagesKwargs, MultiModalData, ProcessingKwargs, ProcessorMixin, TextKwargs,
                                           Unpack)
from transformers.tokenization_utils_base import PreTokenizedInput, TextInput
from transformers.video_utils import VideoInput
from transformers.utils.chat_template_utils import render_jinja_template

from .conversation_vamba import (VISION_PLACEHOLDER, VISION_START, assistant_masks, check_call_kwargs,
                                 check_no_special_tokens, check_placeholders, check_placeholders_kept,
                                 check_template_options, per_prompt_images, plain_conversations, prompt_list,
                                 refuse_pad_token_options, split_template_kwargs, validated_conversations,
                                 visual_inputs)
from .image_processing_vamba import (default_image_processor, image_inputs, image_patch_counts,
                                     write_image_processor_settings)
from .video_processing_vamba import VambaVideoProcessor, VambaVideosKwargs, as_video_list
from .video_vamba import VideoFrames, VideoSampling, load_video

# transformers 4.57 copies a local folder's remote code through the loaded module's own relative imports only (the Hub
# path follows them further), so every module the processor runs is imported here, these for that alone.
from .resize_vamba import resized_as_pil  # noqa: F401
from .video_decode_vamba import resize_frame  # noqa: F401
from .video_container_vamba import open_container  # noqa: F401
from .video_frames_vamba import FrameBuffer  # noqa: F401
from .video_nvdec_vamba import open_on_device  # noqa: F401
from .video_sampling_vamba import sample_times  # noqa: F401
from .video_seek_vamba import serve_decoding  # noqa: F401

__all__ = ["VAMBA_CHAT_TEMPLATE", "VambaProcessor", "VideoFrames", "VideoSampling", "default_image_processor",
           "load_video"]

# ChatML with the default system prompt of the original release; every image or video item becomes one
# `<|vision_start|><|vision_end|>` pair, text items are copied verbatim. Assistant turns (their text and
# `<|im_end|>`) are `generation` blocks, for `return_assistant_tokens_mask`.
VAMBA_CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}"
    "{{ content }}"
    "{%- else -%}"
    "{%- for item in content -%}"
    "{%- if item['type'] in ['image', 'video'] -%}"
    "{{ '<|vision_start|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{{ render_content(message['content']) + '<|im_end|>' }}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{ render_content(message['content']) + '<|im_end|>' }}"
    "{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)

PROCESSOR_FILE = "processor_config.json"
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_vamba.VambaProcessor"}


class VambaImagesKwargs(ImagesKwargs, total=False):
    min_pixels: int
    max_pixels: int


class VambaProcessorKwargs(ProcessingKwargs, total=False):
    text_kwargs: TextKwargs
    images_kwargs: VambaImagesKwargs
    videos_kwargs: VambaVideosKwargs
    _defaults = {"text_kwargs": {"padding": True}, "videos_kwargs": {"return_metadata": False}}


class VambaProcessor(ProcessorMixin):
    r"""Vamba's processor: Qwen2-VL's image processor (its settings also patch video frames), a Qwen2 tokenizer and
    the Vamba chat template.

    `video_sampling`: the default `VideoSampling` (or a dict of its options; extra keyword arguments set single
    options), saved with the processor. A call, a chat template call or a video item overrides any of them.
    With `return_metadata=True`, a call's output holds `video_metadata`: each video's sampled timestamps and
    frame indices.
    """

    attributes = ["image_processor", "tokenizer"]
    valid_processor_kwargs = VambaProcessorKwargs

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, video_sampling=None,
                 **sampling_options):
        if isinstance(video_sampling, dict):
            video_sampling = VideoSampling(**video_sampling)
        self.video_sampling = (video_sampling or VideoSampling()).with_options(**sampling_options)
        chat_template = chat_template or VAMBA_CHAT_TEMPLATE
        if tokenizer is not None:
            tokenizer.chat_template = chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # The tokenizer and image processor are stock transformers classes: loading them never needs the folder's
        # remote code, so do not stop to ask about it (the model's config.json beside them declares some).
        kwargs.setdefault("trust_remote_code", False)
        # transformers passes a saved processor only the keywords its __init__ names; apply sampling options here.
        sampling_options = {name: kwargs.pop(name) for name in VideoSampling.option_names() if name in kwargs}
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        processor.video_sampling = processor.video_sampling.with_options(**sampling_options)
        return processor

    def to_dict(self, *args, **kwargs) -> dict:
        output = super().to_dict(*args, **kwargs)
        output["video_sampling"] = self.video_sampling.to_dict()
        # Always, not only once saving has set it on this instance (loading drops it): a loaded processor's dict is
        # then the saved one's.
        output["auto_map"] = dict(PROCESSOR_AUTO_MAP)
        return output

    def to_json_file(self, json_file_path, *args, **kwargs) -> None:
        super().to_json_file(json_file_path, *args, **kwargs)
        # Saving the processor also writes the image processor's settings where transformers 4.x reads them.
        if os.path.basename(json_file_path) == PROCESSOR_FILE and "image_processor" in self.to_dict(*args, **kwargs):
            write_image_processor_settings(os.path.dirname(json_file_path), self.image_processor)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"]

    # -- keyword arguments ----------------------------------------------------------------------

    def _merged_kwargs(self, kwargs: dict) -> dict:
        check_call_kwargs(kwargs, VambaProcessorKwargs, self.image_processor)
        # transformers 4.x pops the options out of the per-modality dicts it is given: merge copies of the caller's.
        kwargs = {key: dict(value) if isinstance(value, dict) else value for key, value in kwargs.items()}
        merged = self._merge_kwargs(VambaProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        refuse_pad_token_options(merged)
        return merged

    # -- plain call ---------------------------------------------------------------------------

    def __call__(
        self,
        images: typing.Optional[ImageInput] = None,
        text: typing.Union[TextInput, PreTokenizedInput, list[TextInput], list[PreTokenizedInput], None] = None,
        videos: typing.Optional[VideoInput] = None,
        **kwargs: Unpack[VambaProcessorKwargs],
    ) -> BatchFeature:
        """Tokenize `text` (one prompt or a list; each with at most one `<|vision_start|><|vision_end|>`) and
        process the images or videos that fill its placeholders, in order.

        Returns `input_ids`, `attention_mask` (padded on the tokenizer's `padding_side`) and `pixel_values` +
        `image_grid_thw` or `pixel_values_videos` + `video_grid_thw` when there are images or videos; with
        `return_metadata=True` also `video_metadata`. Keyword arguments: see the module docstring.
        """
        # No `audio` parameter: transformers gives a processor audio only when its signature names it.
        texts = prompt_list(text, kwargs.pop("audio", None))
        image_list, video_list = per_prompt_images(images, texts), as_video_list(videos)
        check_placeholders(texts, len(image_list), len(video_list))
        options = self._merged_kwargs(kwargs)
        text_kwargs = options["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)

        data = dict(self.tokenizer(texts, **text_kwargs))
        check_placeholders_kept(texts, data["input_ids"], self.tokenizer.convert_tokens_to_ids(VISION_START))
        if image_list:
            data.update(image_inputs(self.image_processor, image_list, options["images_kwargs"]))
        metadata = None
        if video_list:
            pixel_values_videos, video_grid_thw, metadata = self.vamba_video_processor.patches(
                video_list, options["videos_kwargs"])
            if return_tensors != "pt":
                pixel_values_videos = pixel_values_videos.cpu().numpy()
            data.update(pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
        output = BatchFeature(data=data, tensor_type=return_tensors)
        if options["videos_kwargs"].get("return_metadata"):
            output["video_metadata"] = metadata or []
        return output

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> MultiModalData:
        """Per image (height, width) and video (frames, height, width): the prompt tokens it takes
        (`num_image_tokens` / `num_video_tokens`: its `<|vision_start|><|vision_end|>` pair, whatever its size: the
        model reads the visual tokens through cross-attention, not in the prompt) and, per image, its rows of
        `pixel_values` (`num_image_patches`) under the call's keyword arguments."""
        images_kwargs = self._merged_kwargs(kwargs)["images_kwargs"]
        placeholder_tokens = len(self.tokenizer(VISION_PLACEHOLDER, add_special_tokens=False)["input_ids"])
        data = {}
        if image_sizes is not None:
            patches = image_patch_counts(self.image_processor, image_sizes, images_kwargs)
            data.update(num_image_tokens=[placeholder_tokens] * len(patches), num_image_patches=patches)
        if video_sizes is not None:
            data["num_video_tokens"] = [placeholder_tokens] * len(video_sizes)
        return MultiModalData(**data)

    # -- videos ---------------------------------------------------------------------------------

    @property
    def vamba_video_processor(self) -> VambaVideoProcessor:
        """The video processor patching with the image processor's settings and this processor's sampling (not
        named `video_processor`: transformers would take that for a sub-processor to save and check kwargs with)."""
        return VambaVideoProcessor.from_image_processor(self.image_processor, self.video_sampling)

    def video_chunks(self, video, chunk_frames: int = 64, **kwargs):
        """One video's inputs, `chunk_frames` frames at a time, as its frames decode
        (`VambaVideoProcessor.video_chunks`): a model can encode each chunk while the next ones decode
        (`model.encode_video_chunks(processor.video_chunks(path, device="cuda"))`). The chunks' pixels, in order,
        are the rows of `processor(videos=video, ...)["pixel_values_videos"]`, bit for bit."""
        return self.vamba_video_processor.video_chunks(video, chunk_frames, **kwargs)

    # -- chat template -----------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation,
        chat_template: str = None,
        tools: list = None,
        documents: list = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        return_assistant_tokens_mask: bool = False,
        tokenize: bool = False,
        return_tensors=None,
        return_dict: bool = False,
        processor_kwargs: dict = None,
        **kwargs,
    ):
        """Render one conversation (a list of messages) or a batch of them with the Vamba template.

        Messages use transformers' multimodal format: content items `{"type": "text", "text": ...}`,
        `{"type": "image", "image"|"path"|"url": ...}` and `{"type": "video", "video"|"path"|"url": ...}`
        (a video item may also set any `VideoSampling` option, e.g. `num_frames`). At most one image or video
        per conversation. A malformed conversation raises a ValueError/TypeError naming the path of what is wrong.

        With `tokenize=False`, the prompt string(s). With `tokenize=True, return_dict=True`, a BatchFeature ready
        for `model.generate(**inputs)` (`assistant_masks` too with `return_assistant_tokens_mask=True`);
        `tokenize=True` alone gives `input_ids`. Processor options go in `processor_kwargs` or as keyword
        arguments; other keyword arguments are variables of the template.
        """
        conversations, batched = validated_conversations(plain_conversations(conversation))
        check_no_special_tokens(conversations, batched, self.tokenizer)
        template = chat_template or self.chat_template
        processor_kwargs, template_kwargs = split_template_kwargs(template, processor_kwargs or {}, kwargs)
        check_call_kwargs(processor_kwargs, VambaProcessorKwargs, self.image_processor)
        check_template_options(return_assistant_tokens_mask, tokenize, return_dict, continue_final_message)
        prompts, generation_spans = render_jinja_template(
            conversations=conversations, tools=tools, documents=documents, chat_template=template,
            return_assistant_tokens_mask=return_assistant_tokens_mask, continue_final_message=continue_final_message,
            add_generation_prompt=add_generation_prompt, **self.tokenizer.special_tokens_map, **template_kwargs,
        )
        if not tokenize:
            return prompts if batched else prompts[0]

        images, videos = visual_inputs(conversations)
        return_tensors = None if return_tensors == "auto" else return_tensors  # transformers 5: the defaults
        if return_assistant_tokens_mask:
            processor_kwargs["return_offsets_mapping"] = True
        inputs = self(text=prompts, images=images or None, videos=videos or None,
                      **({"return_tensors": return_tensors} if return_tensors is not None else {}), **processor_kwargs)
        if not return_dict:
            return inputs["input_ids"]
        if return_assistant_tokens_mask:
            inputs["assistant_masks"] = assistant_masks(inputs.pop("offset_mapping"), inputs["attention_mask"],
                                                        generation_spans, inputs["input_ids"])
        return inputs


VambaProcessor.register_for_auto_class("AutoProcessor")

if transformers.__version__.split(".")[0] == "4":
    # transformers 4.x finds sub-processor classes through these; 5.x reads the __init__ signature.
    VambaProcessor.image_processor_class = "AutoImageProcessor"
    VambaProcessor.tokenizer_class = "AutoTokenizer"
