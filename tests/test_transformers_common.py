"""transformers' own common test suites run on Vamba: ModelTesterMixin (with a video and with an image tester),
ConfigTester, ProcessorTesterMixin and the ExecuTorch recipes' tests, plus GenerationTesterMixin and ExportTesterMixin
where the folder holds them.

The suites are transformers' test code and are never copied here: VAMBA_TRANSFORMERS_TESTS names the `tests` folder
of the installed release's source distribution, e.g.
    pip download --no-binary :all: --no-deps transformers==5.25.0 && tar xzf transformers-5.25.0.tar.gz
    VAMBA_TRANSFORMERS_TESTS=$PWD/transformers-5.25.0/tests python -m pytest -q tests/test_transformers_common.py
(and transformers' test requirement `parameterized`). Without it every test here is skipped, saying why.

This module holds what a model's test file in transformers holds: the tester that builds Vamba's inputs, and the
tests whose premise does not fit Vamba, each declared with its reason as transformers' model tests declare them.
What Vamba does not support is declared on the model classes themselves (`_supports_*`, `_can_compile_fullgraph`),
where the suites read it."""

import atexit
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
import types
import unittest
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import transformers
from transformers.models.auto import modeling_auto

SUITES_ENV = "VAMBA_TRANSFORMERS_TESTS"
SUITES = Path(os.environ[SUITES_ENV]) if os.environ.get(SUITES_ENV) else None
PACKAGE = "transformers_common_suites"


def _skip_reason():
    if SUITES is None:
        return (f"{SUITES_ENV} is not set: transformers' common test suites are not run (point it at the `tests` "
                "folder of the installed transformers' sdist: pip download --no-binary :all: --no-deps "
                f"transformers=={transformers.__version__})")
    if not (SUITES / "test_modeling_common.py").is_file():
        return f"{SUITES_ENV}={SUITES} holds no test_modeling_common.py: it must name the sdist's `tests` folder"
    release = re.fullmatch(r"transformers-(.+)", SUITES.resolve().parent.name)
    if release and release.group(1) != transformers.__version__:
        return (f"{SUITES_ENV} holds the suites of transformers {release.group(1)}, the installed transformers is "
                f"{transformers.__version__}: the suites test the release they come with")
    try:
        importlib.import_module("parameterized")
    except ImportError:
        return "transformers' common suites need their test requirement `parameterized` (pip install parameterized)"
    return None


SKIP_REASON = _skip_reason()
if SKIP_REASON:
    pytest.skip(SKIP_REASON, allow_module_level=True)

# What the sdist leaves out (it ships only the top level of `tests`): the mixins of tests/generation and
# tests/exporters, the common config kwargs and the Hub-fixture lookup. Each is stood in for by an empty one when
# absent, and the tests below that would have run them say so.
ABSENT_STAND_INS = {
    "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
    "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
    # Read only for configs without sub-configs; Vamba's has sub-configs.
    "utils.test_configuration_utils": {"config_common_kwargs": {}},
}
STOOD_IN = set()


def _register(name, attrs, path=None):
    module = types.ModuleType(name)
    if path is not None:
        module.__path__ = [str(path)]
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _load_suites():
    """The sdist's tests folder as a package, with a stand-in for each module it lacks. Its top-level modules are
    copied to a temporary folder with an __init__.py, which the sdist lacks and the config suite imports; the
    sub-packages (a full checkout's generation/, exporters/, utils/) are read where they are."""
    package = Path(tempfile.mkdtemp(prefix="transformers-suites-"))
    atexit.register(shutil.rmtree, package, True)
    for source in SUITES.glob("*.py"):
        shutil.copy(source, package)
    (package / "__init__.py").touch()
    _register(PACKAGE, {}, package).__path__.append(str(SUITES))
    for dotted, attrs in ABSENT_STAND_INS.items():
        parent, leaf = dotted.split(".")
        if (SUITES / parent / f"{leaf}.py").is_file():
            continue
        STOOD_IN.add(dotted)
        if f"{PACKAGE}.{parent}" not in sys.modules:
            _register(f"{PACKAGE}.{parent}", {}, SUITES / parent)
        _register(f"{PACKAGE}.{dotted}", attrs)
    if not (SUITES.parent / "utils" / "fetch_hub_objects_for_ci.py").is_file():
        # The URL stays a URL: nothing here downloads, the tests that would read it are declared below. 5.x imports
        # the module from the repository's utils/ folder, 4.57 as utils.fetch_hub_objects_for_ci.
        lookup = {"url_to_local_path": lambda url, **kwargs: url}
        _register("fetch_hub_objects_for_ci", lookup)
        if "utils" not in sys.modules and importlib.util.find_spec("utils") is None:
            _register("utils", {}, SUITES.parent / "utils")
            _register("utils.fetch_hub_objects_for_ci", lookup)
        STOOD_IN.add("fetch_hub_objects_for_ci")
    return {name: importlib.import_module(f"{PACKAGE}.{name}")
            for name in ("test_modeling_common", "test_configuration_common", "test_processing_common",
                         "test_executorch")}


from parameterized import parameterized  # noqa: E402  (transformers' test requirement, checked above)

_suites = _load_suites()
ModelTesterMixin = _suites["test_modeling_common"].ModelTesterMixin
floats_tensor = _suites["test_modeling_common"].floats_tensor
ids_tensor = _suites["test_modeling_common"].ids_tensor
ConfigTester = _suites["test_configuration_common"].ConfigTester
ProcessorTesterMixin = _suites["test_processing_common"].ProcessorTesterMixin
GenerationTesterMixin = sys.modules[f"{PACKAGE}.generation.test_utils"].GenerationTesterMixin
EAGER_SDPA_CASES = _suites["test_modeling_common"].TEST_EAGER_MATCHES_SDPA_INFERENCE_PARAMETERIZATION

from vamba_hf import VambaConfig, VambaForConditionalGeneration, VambaModel  # noqa: E402
from vamba_hf.tiny import TINY_MODEL_SETTINGS, build_tiny_processor, build_tiny_tokenizer, tiny_config  # noqa: E402
from vamba_hf.processing_vamba import VambaProcessor, default_image_processor  # noqa: E402

MAJOR = int(transformers.__version__.split(".")[0])


@pytest.mark.parametrize("dotted", sorted(ABSENT_STAND_INS) + ["fetch_hub_objects_for_ci"])
def test_every_suite_module_is_transformers_own(dotted):
    if dotted in STOOD_IN:
        pytest.skip(f"transformers' sdist has no {dotted}: its tests did not run (an empty stand-in took its place)")
    names = [f"{PACKAGE}.{dotted}"] if dotted in ABSENT_STAND_INS else [dotted, f"utils.{dotted}"]
    module = next(sys.modules[name] for name in names if name in sys.modules)
    assert Path(module.__file__).resolve().is_relative_to(SUITES.resolve().parent)


class VambaModelTester:
    """The tiny Vamba of the common tests: one visual item per row, `kind` "video" (two frames) or "image";
    `one_patch_items`: each item a single patch (no spatial merge), as transformers' Qwen2-VL tester builds them."""

    def __init__(self, parent, kind, batch_size=2, seq_length=9, is_training=True, one_patch_items=False):
        self.parent, self.kind, self.one_patch_items = parent, kind, one_patch_items
        self.batch_size, self.seq_length, self.is_training = batch_size, seq_length, is_training
        config = self.get_config()
        self.hidden_size = config.hidden_size
        self.num_hidden_layers = config.num_hidden_layers
        self.num_attention_heads = config.num_attention_heads
        self.vocab_size = config.vocab_size
        self.pad_token_id = config.pad_token_id
        # The generation suite keeps these tokens out of what it samples.
        self.vision_start_token_id = config.vision_start_token_id
        self.image_token_id, self.video_token_id = config.image_token_id, config.video_token_id

    def get_config(self):
        # The vision tower as deep as the text model and as wide: the shapes the common feature tests expect.
        vision = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=2, mlp_ratio=2)
        return tiny_config(vision_config={**vision, **({"spatial_merge_size": 1} if self.one_patch_items else {})})

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        # Text ids below the special tokens, then one visual item: <|vision_start|><|vision_end|> (Vamba's visual
        # tokens are not in the text; they are cross-attention keys).
        ids = ids_tensor([self.batch_size, self.seq_length], config.vision_start_token_id - 2)
        ids[:, 2] = config.vision_start_token_id
        ids[:, 3] = config.vision_end_token_id
        return config, {"input_ids": ids, "attention_mask": torch.ones_like(ids), **self.visual_inputs(self.batch_size)}

    def visual_inputs(self, items):
        """`items` visual items of the tester's kind: their grids, and their pixels, one row per patch."""
        frames = 2 if self.kind == "video" else 1
        grid = torch.tensor([[1, 1, 1] if self.one_patch_items else [frames, 4, 4]] * items)
        pixels = floats_tensor([int(grid.prod(-1).sum()), 3 * 2 * 14 * 14])
        if self.kind == "video":
            return {"pixel_values_videos": pixels, "video_grid_thw": grid}
        return {"pixel_values": pixels, "image_grid_thw": grid}


def declared(reason):
    """A test whose premise does not fit Vamba, declared as transformers' model tests declare one."""
    return unittest.skip(reason=reason)


# The suites know a model's base and task classes by their names in transformers' own auto mappings (which base
# model a training test leaves out, which head gets labels, which class the RoPE tests build); a remote-code model's
# are named by its config's auto_map instead.
AUTO_MAPPING_NAMES = {"AutoModel": "MODEL_MAPPING_NAMES",
                      "AutoModelForImageTextToText": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
                      "AutoModelForVision2Seq": "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES"}


def named_as_in_auto_map(testcase):
    """Enter Vamba's classes in transformers' auto-mapping names for the duration of `testcase`."""
    config = VambaConfig()
    for auto_class, reference in config.auto_map.items():
        names = getattr(modeling_auto, AUTO_MAPPING_NAMES.get(auto_class, ""), None)
        if names is not None:
            testcase.enterContext(patch.dict(names, {config.model_type: reference.rsplit(".", 1)[-1]}))


PLACEHOLDERS_WITHOUT_PIXELS = ("it feeds token ids without the pixels (random ids over the whole vocabulary, or the "
                              "tester's ids alone), so <|vision_start|> comes without its visual item, which Vamba "
                              "refuses by design (tests/test_contracts.py)")


class VambaModelTestBase(ModelTesterMixin, GenerationTesterMixin):
    all_model_classes = (VambaModel, VambaForConditionalGeneration)
    all_generative_model_classes = (VambaForConditionalGeneration,)
    pipeline_model_mapping = {}
    _is_composite = True
    # The suite saves `model.base_model` on its own: Vamba's base_model_prefix names the text model (the checkpoint's
    # `model.*` keys, VAMBA_SPEC.md section 2), a module inside VambaModel, not a model of its own.
    test_missing_keys = False
    # The last decoder layer's Mamba-2 block is in the checkpoint, but no later layer reads the visual stream it
    # would produce: the forward skips it, and its parameters get no gradient.
    test_all_params_have_gradient = False
    # transformers 4.x: Vamba's attention has no head pruning and takes no head mask (transformers 5 removed both).
    test_pruning = False
    test_head_masking = False
    kind = None

    def setUp(self):
        named_as_in_auto_map(self)
        self.model_tester = VambaModelTester(self, self.kind)

    def prepare_config_and_inputs_for_generate(self, batch_size=2):
        """The suite's, whose first `batch_size` rows of every tensor would cut the pixels short (one row per patch of
        every item): the rows kept get pixels of their own, as transformers' GLM-4V test overrides it."""
        config, inputs = super().prepare_config_and_inputs_for_generate(batch_size)
        inputs.update(self.model_tester.visual_inputs(inputs["input_ids"].shape[0]))
        return config, inputs

    if hasattr(GenerationTesterMixin, "test_generate_compile_model_forward_fullgraph"):

        def test_generate_compile_model_forward_fullgraph(self):
            # It halves every input tensor along its first dimension, the pixels too: they halve with their rows
            # when each visual item is one patch.
            self.model_tester = VambaModelTester(self, self.kind, one_patch_items=True)
            super().test_generate_compile_model_forward_fullgraph()

    # parameterized.expand names one test per case in the class it decorates in: the declaration repeats the cases.
    @parameterized.expand(EAGER_SDPA_CASES)
    @declared(PLACEHOLDERS_WITHOUT_PIXELS + "; eager and SDPA are compared with the original implementation in "
              "tests/test_modeling.py")
    def test_eager_matches_sdpa_inference(self, *args):
        pass

    @parameterized.expand([("linear",), ("dynamic",), ("yarn",)])
    @declared(PLACEHOLDERS_WITHOUT_PIXELS)
    def test_model_rope_scaling_from_config(self, *args):
        pass

    @declared("it loads the vision tower and the language model as models with sub-configs and attention settings "
              "of their own; Vamba's are modules of one model under one config (VAMBA_SPEC.md section 2)")
    def test_sdpa_can_dispatch_composite_models(self):
        pass


PIXELS_IN_ONE_GRAPH = ("it exports the forward on the tester's pixels as one graph (transformers splits only a model "
                       "whose get_encoder/get_decoder name submodules with its own models' interfaces); Vamba's "
                       "forward lays out frame groups and rows by the grid's values on the host, as Qwen2-VL's does, "
                       "and exports as the vision tower per frame size plus the forward on its output, the text "
                       "forward and the decoding step whole (tests/test_compile_export.py)")
# transformers' exporters suite (tests/exporters, mixed into ModelTesterMixin and GenerationTesterMixin), named as
# its parameterizations name them: by shape mode, and for generate by cache too.
PIXEL_EXPORT_TESTS = [f"test_torch_export_{shapes}" for shapes in ("static", "dynamic")] + [
    f"test_torch_export_generate_{shapes}{cache}" for shapes in ("static", "dynamic")
    for cache in ("", "_static_cache")]
for name in PIXEL_EXPORT_TESTS:
    if hasattr(VambaModelTestBase, name):
        setattr(VambaModelTestBase, name, declared(PIXELS_IN_ONE_GRAPH)(lambda self: None))


IMAGE_ONLY = "the suite's image tests read `pixel_values`; this tester feeds videos, the image tester runs them"


class VambaVideoModelTest(VambaModelTestBase, unittest.TestCase):
    kind = "video"

    @parameterized.expand([True, False, None])
    @declared(IMAGE_ONLY)
    def test_get_image_features_output(self, *args):
        pass

    @declared(IMAGE_ONLY)
    def test_get_image_features_pooler_output(self):
        pass

    @declared(IMAGE_ONLY)
    def test_get_image_features_hidden_states(self):
        pass

    @declared(IMAGE_ONLY)
    def test_get_image_features_attentions(self):
        pass

    @declared(IMAGE_ONLY)
    def test_multimodal_outputs_are_returned(self):
        pass


class VambaImageModelTest(VambaModelTestBase, unittest.TestCase):
    kind = "image"


class VambaExecutorchTest(_suites["test_executorch"].ExecutorchTest):
    """transformers' ExecuTorch recipes, on the tiny Vamba's text instead of the suite's Llama from the Hub."""

    def setUp(self):
        torch.manual_seed(42)
        self.model = VambaForConditionalGeneration(VambaModelTester(self, "video").get_config()).eval()
        self.model.generation_config = transformers.GenerationConfig(
            use_cache=True, cache_implementation="static",
            cache_config={"batch_size": 1, "max_cache_len": 32, "device": "cpu"})
        self.input_ids = torch.tensor([[1, 2, 3]], dtype=torch.long)
        self.inputs_embeds = torch.randn(1, 3, self.model.config.hidden_size)
        self.cache_position = torch.arange(3, dtype=torch.long)

    @declared("its exported step keeps a transformers StaticCache across calls and reads how much it holds from the "
              "cache's values; Vamba's cache also holds the cross-attention K/V and is the one a forward returns "
              "(a step on another is refused), and Vamba's own static-cache step compiles and exports "
              "(tests/test_compile_export.py)")
    def test_decoder_only_lm_export(self):
        pass


class VambaConfigTest(unittest.TestCase):
    def config_tester(self):
        # The sub-configs in full, as the saved JSON holds them (the suite compares each setting with it).
        saved = json.loads(VambaConfig(**TINY_MODEL_SETTINGS).to_json_string())
        settings = {**TINY_MODEL_SETTINGS, **{key: saved[key] for key in VambaConfig.sub_configs}}
        return ConfigTester(self, config_class=VambaConfig, **settings)

    def test_config(self):
        tester = self.config_tester()
        tester.create_and_test_config_common_properties = lambda: None  # test_config_common_properties runs it
        tester.run_common_tests()

    @unittest.skipIf("config_class(**{name: idx})" in inspect.getsource(ConfigTester),
                     reason="this ConfigTester (transformers 4.57 to 5.1 at least) builds VambaConfig(vocab_size=0), an "
                            "empty vocabulary, which VambaConfig refuses with a message (tests/test_config.py)")
    def test_config_common_properties(self):
        self.config_tester().create_and_test_config_common_properties()


FROM_THE_HUB = ("it reads transformers' image and video fixtures from the Hub (utils/fetch_hub_objects_for_ci.py, "
                "not in the sdist); nothing in these tests downloads")
TWO_VISUALS = ("it puts an image and a video (or two images) in one prompt; Vamba takes one image or video per "
               "conversation and says so (tests/test_processor.py)")


class VambaProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = VambaProcessor
    # Vamba's text holds one <|vision_start|><|vision_end|> pair per visual item, never pad tokens.
    image_token = "<|vision_start|><|vision_end|>"
    video_token = "<|vision_start|><|vision_end|>"

    @classmethod
    def setUpClass(cls):
        if MAJOR >= 5:  # transformers 5 builds the processor from the _setup_* hooks
            super().setUpClass()
        else:
            cls.tmpdirname = tempfile.mkdtemp()
            build_tiny_processor().save_pretrained(cls.tmpdirname)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmpdirname, ignore_errors=True)

    @parameterized.expand([(1, "pt"), (2, "pt")])
    @declared(FROM_THE_HUB)
    def test_apply_chat_template_image(self, *args):
        pass

    @declared(FROM_THE_HUB)
    def test_processor_text_has_no_visual(self):
        pass

    @declared(FROM_THE_HUB)
    def test_apply_chat_template_video_frame_sampling(self):
        pass

    @unittest.skipIf(MAJOR < 5, reason="transformers 4.x's legacy chat_template.json keeps the tokenizer's template "
                                       "apart from the processor's; VambaProcessor shares one template between them "
                                       "on every line, as transformers 5 does")
    def test_chat_template_save_loading(self):
        super().test_chat_template_save_loading()

    @declared(TWO_VISUALS)
    def test_model_input_names(self):
        pass

    @declared(TWO_VISUALS)
    def test_processor_with_multiple_inputs(self):
        pass

    @declared(TWO_VISUALS)
    def test_flat_kwarg_applied_when_modality_dict_lacks_it(self):
        pass

    @declared("it counts the tokens an image's embeddings occupy in the text (vLLM's replacement); Vamba's visual "
              "tokens are cross-attention keys and never enter the text (VAMBA_SPEC.md section 1)")
    def test_get_num_multimodal_tokens_matches_processor_call(self):
        pass

    @classmethod
    def _setup_image_processor(cls):
        return default_image_processor()

    @classmethod
    def _setup_tokenizer(cls):
        return build_tiny_tokenizer()
