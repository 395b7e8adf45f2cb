"""What a user hands Vamba's processor, checked: chat conversations (every message and content item, errors naming
the path of what is wrong, e.g. `conversation[0]["content"][1]`), prompts and their `<|vision_start|><|vision_end|>`
placeholders against the images or videos given, a call's keyword arguments against its typed kwargs, and the chat
template's variables and assistant spans.

Served as Hub remote code, so it imports only transformers, torch, numpy, PIL, jinja2 and the standard library at top
level.
"""

import dataclasses
import os
import re
import typing
from collections.abc import Mapping

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import numpy as np
import PIL.Image
import torch

from .video_processing_vamba import VideoItem, type_name
from .video_vamba import VideoFrames, VideoSampling

__all__ = ["assistant_masks", "check_call_kwargs", "check_placeholders", "check_placeholders_kept",
           "check_template_options", "per_prompt_images", "plain_conversations", "prompt_list",
           "refuse_pad_token_options", "split_template_kwargs", "template_variables", "validated_conversations",
           "visual_inputs"]

VISION_PLACEHOLDER = "<|vision_start|><|vision_end|>"
VISION_START = "<|vision_start|>"
VISUAL_PAD_TOKENS = ("<|image_pad|>", "<|video_pad|>")
CONTENT_TYPES = ("text", "image", "video")
MODALITY_KWARGS = ("text_kwargs", "images_kwargs", "videos_kwargs")
SOURCE_TYPES = {"image": (str, os.PathLike, PIL.Image.Image, np.ndarray, torch.Tensor),
                "video": (str, os.PathLike, np.ndarray, torch.Tensor, list, tuple, VideoFrames)}


def _check_item(item, path: str) -> None:
    if not isinstance(item, dict):
        raise TypeError(f"{path} is a {type_name(item)}; a content item is a dict such as "
                        "{'type': 'text', 'text': '...'} or {'type': 'video', 'video': 'clip.mp4'}.")
    kind = item.get("type")
    if kind not in CONTENT_TYPES:
        hint = f" (did you mean {kind.lower()!r}?)" if isinstance(kind, str) and kind.lower() in CONTENT_TYPES else ""
        raise ValueError(f"{path}[\"type\"] is {kind!r}{hint}; Vamba reads items of type "
                         f"{', '.join(map(repr, CONTENT_TYPES))}.")
    if kind == "text" and not isinstance(item.get("text"), str):
        raise TypeError(f"{path}[\"text\"] is {type_name(item.get('text'))}; a text item needs a string.")
    if kind == "text":
        return
    key = next((key for key in (kind, "path", "url") if item.get(key) is not None), None)
    if key is None:
        raise ValueError(f"{path} has no `{kind}`, `path` or `url`: say which {kind} it is.")
    if not isinstance(item[key], SOURCE_TYPES[kind]):
        raise TypeError(f"{path}[{key!r}] is a {type_name(item[key])}; give a path or URL, or the {kind} itself "
                        f"({', '.join(cls.__name__ for cls in SOURCE_TYPES[kind][2:])}).")
    allowed = {"type", kind, "path", "url"} | (set(VideoSampling.option_names()) if kind == "video" else set())
    unknown = sorted(map(str, set(item) - allowed))
    if unknown:
        raise ValueError(f"{path} has unknown key(s) {', '.join(unknown)}; a {kind} item takes "
                         f"{', '.join(sorted(allowed))}.")


def _check_message(message, path: str) -> None:
    if not isinstance(message, dict):
        raise TypeError(f"{path} is a {type_name(message)}; a message is a dict with \"role\" and \"content\".")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise TypeError(f"{path}[\"role\"] is {role!r}; give a role string such as 'user' or 'assistant'.")
    content = message.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise TypeError(f"{path}[\"content\"] is a {type_name(content)}; give a string or a list of items.")
    for index, item in enumerate(content):
        _check_item(item, f"{path}[\"content\"][{index}]")


def _check_conversation(messages, path: str) -> None:
    if not isinstance(messages, list):
        raise TypeError(f"{path} is a {type_name(messages)}; a conversation is a list of messages (dicts).")
    if not messages:
        raise ValueError(f"{path} is empty; give at least one message.")
    for index, message in enumerate(messages):
        _check_message(message, f"{path}[{index}]")


def _as_dict(value):
    """A message or content-block object as the dict transformers 5 reads it as: a dataclass by its fields, a
    pydantic model by `model_dump()`; anything else unchanged."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return value.model_dump()
    return value


def _image_url_block(item):
    """An OpenAI-style `{"type": "image_url", "image_url": {"url": ...}}` block as the image item it names."""
    if not (isinstance(item, Mapping) and item.get("type") == "image_url" and "image_url" in item):
        return item
    url = item["image_url"].get("url") if isinstance(item["image_url"], Mapping) else item["image_url"]
    return {"type": "image", "url": url}


def _plain_message(message):
    message = _as_dict(message)
    if not isinstance(message, Mapping):
        return message
    plain = {key: value for key, value in message.items() if value is not None}
    if isinstance(plain.get("content"), (list, tuple)):
        plain["content"] = [_image_url_block(_as_dict(item)) for item in plain["content"]]
    return plain


def plain_conversations(conversation):
    """Message objects (dataclasses, pydantic models, a conversation object with `.messages`) as the dicts they hold,
    keys set to None dropped and OpenAI `image_url` blocks read as image items, as transformers 5 renders them; the
    caller's objects are left as they are."""
    def plain(messages):
        messages = getattr(messages, "messages", messages)
        return [_plain_message(message) for message in messages] if isinstance(messages, (list, tuple)) else messages

    if isinstance(conversation, (list, tuple)) and conversation and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")):
        return [plain(messages) for messages in conversation]
    return plain(conversation)


def validated_conversations(conversation) -> tuple:
    """(list of conversations, whether a batch was given), after checking every message and item; errors name
    the path of what is wrong, e.g. `conversation[0]["content"][1]`."""
    if isinstance(conversation, tuple):
        conversation = list(conversation)
    if not isinstance(conversation, list) or not conversation:
        _check_conversation(conversation, "conversation")
    if isinstance(conversation[0], (list, tuple)):
        conversations = [list(messages) if isinstance(messages, tuple) else messages for messages in conversation]
        for index, messages in enumerate(conversations):
            _check_conversation(messages, f"conversation[{index}]")
        return conversations, True
    _check_conversation(conversation, "conversation")
    return [conversation], False


def _message_texts(conversations: list, batched: bool):
    """(path, text) of every text in the conversations' messages, the path named as the errors name it."""
    for number, messages in enumerate(conversations):
        prefix = f"conversation[{number}]" if batched else "conversation"
        for index, message in enumerate(messages):
            content = message["content"]
            if isinstance(content, str):
                yield f"{prefix}[{index}][\"content\"]", content
                continue
            for position, item in enumerate(content):
                if item["type"] == "text":
                    yield f"{prefix}[{index}][\"content\"][{position}][\"text\"]", item["text"]


def special_token_in(text: str, tokenizer) -> typing.Optional[str]:
    """The first of the tokenizer's special tokens (`<|im_end|>`, `<|im_start|>`, a vision token) in `text`."""
    specials = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    specials = sorted(specials | set(tokenizer.all_special_tokens), key=len, reverse=True)
    found = re.search("|".join(map(re.escape, specials)), text) if specials else None
    return found.group() if found else None


def check_no_special_tokens(conversations: list, batched: bool, tokenizer) -> None:
    """A message's text holding one of the tokenizer's special tokens is refused: the tokenizer would read it as
    that token, ending the turn or opening another one that the writer of the message could forge."""
    for path, text in _message_texts(conversations, batched):
        found = special_token_in(text, tokenizer)
        if found is not None:
            raise ValueError(f"{path} holds {found!r}, one of the tokenizer's special tokens: in a message it would "
                             f"end the turn or open another. Remove it from the text (the chat template writes "
                             f"every special token itself).")


def _visual_items(messages: list) -> list:
    return [item for message in messages if isinstance(message["content"], list)
            for item in message["content"] if item["type"] in ("image", "video")]


def _item_source(item: dict):
    kind = item["type"]
    return next(item[key] for key in (kind, "path", "url") if item.get(key) is not None)


def visual_inputs(conversations: list) -> tuple:
    """(images, videos) of checked conversations, in order; a video as a `VideoItem` with its item's options."""
    images, videos = [], []
    for index, messages in enumerate(conversations):
        items = _visual_items(messages)
        if len(items) > 1:
            raise ValueError(
                f"conversation {index} has {len(items)} images/videos; Vamba takes at most one per conversation. "
                "Split it into separate conversations."
            )
        if items and items[0]["type"] == "image":
            images.append(_item_source(items[0]))
        elif items:
            options = {key: items[0][key] for key in VideoSampling.option_names() if key in items[0]}
            videos.append(VideoItem(_item_source(items[0]), options))
    return images, videos


class _GenerationBlocks(jinja2.ext.Extension):
    """Parses `{% generation %}...{% endgeneration %}` (rendered by transformers), to read a template's variables."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def template_variables(template: str) -> set:
    return jinja2.meta.find_undeclared_variables(jinja2.Environment(extensions=[_GenerationBlocks]).parse(template))


def check_template_options(return_assistant_tokens_mask: bool, tokenize: bool, return_dict: bool,
                           continue_final_message: bool) -> None:
    if return_assistant_tokens_mask and not (tokenize and return_dict):
        raise ValueError("return_assistant_tokens_mask=True needs tokenize=True and return_dict=True.")
    if return_assistant_tokens_mask and continue_final_message:
        raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask.")


def split_template_kwargs(template: str, processor_kwargs: dict, kwargs: dict) -> tuple:
    """(processor kwargs, template variables) of a chat template call: a keyword is a variable the template reads,
    else a processor option (which the caller checks)."""
    variables = template_variables(template)
    template_kwargs = {key: value for key, value in kwargs.items() if key in variables}
    processor_kwargs = {**processor_kwargs, **{key: value for key, value in kwargs.items() if key not in variables}}
    return processor_kwargs, template_kwargs


def assistant_masks(offsets, attention_mask, spans: list, input_ids):
    """1 for each token whose text starts inside one of its row's generation spans (character ranges), of the type
    of `input_ids` (a tensor, an array or lists)."""
    offsets, attention_mask = np.asarray(offsets), np.asarray(attention_mask)
    starts, ends = offsets[..., 0], offsets[..., 1]
    masks = np.zeros(attention_mask.shape, dtype=np.int64)
    for row, row_spans in enumerate(spans):
        for first, last in row_spans:
            masks[row] |= (starts[row] >= first) & (starts[row] < last) & (ends[row] > starts[row])
    masks = masks * (attention_mask != 0)
    if isinstance(input_ids, torch.Tensor):
        return torch.from_numpy(masks)
    return masks if isinstance(input_ids, np.ndarray) else masks.tolist()


def valid_call_keys(kwargs_class, image_processor) -> dict:
    """Per modality (`text_kwargs`, ...), the keyword names a call may use: the typed kwargs `kwargs_class` names,
    and the image processor's own."""
    annotations = kwargs_class.__annotations__
    keys = {modality: set(annotations[modality].__annotations__) for modality in MODALITY_KWARGS}
    image_processor_kwargs = getattr(image_processor, "valid_kwargs", None)
    keys["images_kwargs"] |= set(getattr(image_processor_kwargs, "__annotations__", {}))
    if "common_kwargs" in annotations:  # transformers 4.x: return_tensors is a common kwarg
        keys = {modality: names | set(annotations["common_kwargs"].__annotations__)
                for modality, names in keys.items()}
    return keys


def check_call_kwargs(kwargs: dict, kwargs_class, image_processor) -> None:
    """A processor call's keyword arguments, flat or per modality, are options of `kwargs_class` (typed kwargs);
    anything else is refused with the options it could have been."""
    valid = valid_call_keys(kwargs_class, image_processor)
    flat_keys = set().union(*valid.values()) | {
        key for key, value in kwargs_class.__annotations__.items()
        if key not in MODALITY_KWARGS and not typing.is_typeddict(value)}
    for key, value in kwargs.items():
        if key in MODALITY_KWARGS or key == "common_kwargs":
            if not isinstance(value, dict):
                raise TypeError(f"{key} must be a dict of options, got a {type_name(value)}.")
            allowed = flat_keys if key == "common_kwargs" else valid[key]
            unknown = sorted(set(value) - allowed)
            if unknown:
                raise TypeError(f"{key} has unknown option(s) {', '.join(unknown)} for VambaProcessor; its "
                                f"options are: {', '.join(sorted(allowed))}.")
        elif key not in flat_keys:
            raise TypeError(f"VambaProcessor got an unknown keyword argument {key!r}. Video sampling options: "
                            f"{', '.join(VideoSampling.option_names())}; tokenizer, image and video options as "
                            "in transformers' TextKwargs, ImagesKwargs and VideosKwargs.")


def refuse_pad_token_options(merged: dict) -> None:
    """Options that count a prompt's image or video pad tokens (merged kwargs; popped from `text_kwargs`)."""
    for key in ("return_mm_token_type_ids", "return_text_replacement_offsets"):
        if merged["text_kwargs"].pop(key, None) or merged.get(key):
            raise ValueError(f"{key}=True is not supported: Vamba prompts hold no image or video pad tokens.")


def prompt_list(text, audio) -> list:
    """A processor call's `text` (one prompt or a list) as a list of prompts; `audio` is refused."""
    if audio is not None:
        raise ValueError("Vamba reads no audio: leave `audio` out.")
    if text is None:
        raise ValueError("text is required: the prompt, with `<|vision_start|><|vision_end|>` where the image or "
                         "video goes")
    texts = [text] if isinstance(text, str) else list(text)
    if not all(isinstance(prompt, str) for prompt in texts):
        raise TypeError("text must be a string or a list of strings.")
    return texts


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def per_prompt_images(images, texts: list) -> list:
    """The images in prompt order: a flat list, or transformers' nested form, one list per prompt (empty for a
    prompt without an image), checked against the prompts' placeholders."""
    if not (isinstance(images, (list, tuple)) and images and all(isinstance(item, (list, tuple)) for item in images)):
        return _as_list(images)
    if len(images) != len(texts):
        raise ValueError(f"images is nested per prompt but has {len(images)} lists for {len(texts)} prompts: give one "
                         "list per prompt (empty for a prompt without an image).")
    for index, (prompt_images, prompt) in enumerate(zip(images, texts)):
        if len(prompt_images) != prompt.count(VISION_START):
            raise ValueError(f"prompt {index} has {prompt.count(VISION_START)} vision placeholder(s) "
                             f"`{VISION_PLACEHOLDER}` but its list holds {len(prompt_images)} image(s): give one image "
                             "per placeholder (Vamba takes at most one per prompt).")
    return [image for prompt_images in images for image in prompt_images]


def check_placeholders(texts: list, num_images: int, num_videos: int) -> None:
    """Prompts mark each image or video with one `<|vision_start|><|vision_end|>`, at most one per prompt."""
    for index, prompt in enumerate(texts):
        for pad in VISUAL_PAD_TOKENS:
            if pad in prompt:
                raise ValueError(
                    f"prompt {index} contains {pad}: Vamba prompts mark an image or video with "
                    f"`{VISION_PLACEHOLDER}` only. Remove the pad tokens, or build the prompt with "
                    "processor.apply_chat_template."
                )
        if prompt.count(VISION_START) > 1:
            raise ValueError(
                f"prompt {index} has {prompt.count(VISION_START)} vision placeholders; Vamba takes at most one image "
                "or video per conversation. Split it into separate conversations."
            )
    if num_images and num_videos:
        raise ValueError(
            "a batch mixes images and videos, but the prompts' placeholders cannot say which row gets which. "
            "Process image conversations and video conversations in separate batches."
        )
    placeholders = sum(prompt.count(VISION_START) for prompt in texts)
    visuals = num_images + num_videos
    if placeholders != visuals:
        kind = "video(s)" if num_videos else "image(s)"
        raise ValueError(
            f"got {visuals} {kind} but the text has {placeholders} vision placeholder(s) `{VISION_PLACEHOLDER}`. "
            "Put one placeholder where each image or video goes (one per prompt at most), or build the prompt "
            "with processor.apply_chat_template."
        )


def check_placeholders_kept(texts: list, input_ids, vision_start_id: int) -> None:
    for index, (prompt, ids) in enumerate(zip(texts, input_ids)):
        if prompt.count(VISION_START) != list(ids).count(vision_start_id):
            raise ValueError(f"prompt {index} lost its `{VISION_PLACEHOLDER}` to truncation; raise max_length "
                             "or turn truncation off.")
