"""Fine-tune Vamba on video question answering with the Hugging Face Trainer.

Data: a folder of videos and a JSONL file, one example per line:

    {"video": "clips/cat.mp4", "question": "What does the cat do?", "answer": "It jumps onto the table."}

(`video` is relative to --video-dir; it may also be a list of frame images). Only the answer tokens and the closing
<|im_end|> are supervised.

    # full fine-tuning of the text side and the Mamba-2 blocks, vision tower frozen, 2 GPUs with FSDP:
    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/finetune.py \\
        --model TIGER-Lab/Vamba-Qwen2-VL-7B --data train.jsonl --video-dir videos --output-dir out \\
        --freeze-vision-tower --gradient-checkpointing --bf16 --num-frames 128 --pack

    # LoRA on one GPU:
    python examples/finetune.py --model TIGER-Lab/Vamba-Qwen2-VL-7B --data train.jsonl --video-dir videos \\
        --output-dir out --lora --gradient-checkpointing --bf16

    # a few CPU steps on a tiny random model (what tests/test_finetune.py runs):
    python examples/finetune.py --tiny --data train.jsonl --video-dir videos --output-dir out --max-steps 8

    # no arguments: the embedded demo model on three synthetic clips, a few CPU steps, saved to a temporary folder
    python examples/finetune.py
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from vamba_hf import VambaConfig, VambaForConditionalGeneration
from vamba_hf.processing_vamba import VambaProcessor

IGNORE_INDEX = -100
# transformers 5 renamed the Trainer's gradient_checkpointing to activation_checkpointing (the old name warns).
CHECKPOINTING_ARGUMENT = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                          else "gradient_checkpointing")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj", "out_proj"]


def read_examples(data: Path, video_dir: Path) -> list[dict]:
    examples = []
    with open(data, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = {"video", "question", "answer"} - set(record)
            if missing:
                raise ValueError(f"{data}:{number} lacks {sorted(missing)}: each line needs video, question, answer.")
            video = record["video"]  # a file, or a list of frame images
            paths = [str(video_dir / frame) for frame in video] if isinstance(video, list) else str(video_dir / video)
            examples.append({**record, "video": paths})
    return examples


class VideoQACollator:
    """Turns (video, question, answer) examples into a training batch for Vamba.

    Each example is the chat prompt (system, user turn with the video and the question, `<|im_start|>assistant\\n`)
    followed by the answer and `<|im_end|>`; labels are -100 except on the answer and that `<|im_end|>`.
    `pack=False`: one example per row, padded at the end (`attention_mask`). `pack=True`: all examples in one row
    with `position_ids` restarting at 0 at each example (VambaModel's packed rows), no padding at all.
    """

    def __init__(self, processor: VambaProcessor, num_frames: int, pack: bool = False):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.num_frames = num_frames
        self.pack = pack
        self.end_of_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_of_turn

    def prompt(self, example: dict) -> str:
        conversation = [{"role": "user", "content": [{"type": "video", "video": example["video"]},
                                                     {"type": "text", "text": example["question"]}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def __call__(self, examples: list[dict]) -> dict:
        encoded = self.processor(text=[self.prompt(e) for e in examples], videos=[e["video"] for e in examples],
                                 num_frames=self.num_frames, return_tensors="pt")
        sequences = []
        for prompt_ids, keep, example in zip(encoded["input_ids"], encoded["attention_mask"], examples):
            answer_ids = self.tokenizer(example["answer"], add_special_tokens=False)["input_ids"] + [self.end_of_turn]
            prompt_ids = prompt_ids[keep.bool()].tolist()  # the processor pads on the left
            sequences.append((prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids))
        rows = self.packed_row(sequences) if self.pack else self.padded_rows(sequences)
        return {**rows, "pixel_values_videos": encoded["pixel_values_videos"],
                "video_grid_thw": encoded["video_grid_thw"]}

    def padded_rows(self, sequences) -> dict:
        width = max(len(ids) for ids, _ in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id)
        labels = torch.full((len(sequences), width), IGNORE_INDEX)
        attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
        for row, (ids, targets) in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(targets)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    @staticmethod
    def packed_row(sequences) -> dict:
        return {
            "input_ids": torch.tensor([[token for ids, _ in sequences for token in ids]]),
            "position_ids": torch.tensor([[i for ids, _ in sequences for i in range(len(ids))]]),
            "labels": torch.tensor([[label for _, targets in sequences for label in targets]]),
        }


def tiny_model_and_processor(seed: int = 0):
    """A random Vamba of a few hundred thousand parameters with the tiny Qwen2-format tokenizer (CPU tests)."""
    from vamba_hf.tiny import TINY_SIZES, build_tiny_processor, special_token_ids

    processor = build_tiny_processor(num_frames=4)
    ids = special_token_ids(processor.tokenizer)
    ids.pop("im_start_token_id")  # not a config field; the chat template writes it
    config = VambaConfig(vocab_size=320, **ids, **TINY_SIZES)
    torch.manual_seed(seed)
    return VambaForConditionalGeneration(config), processor


DEMO_QA = [
    ("What moves across the picture?", "A red square."),
    ("Which way does the square move?", "To the right."),
    ("What color is the background?", "Blue at the top, green at the bottom."),
]


def write_demo_dataset(folder: Path) -> Path:
    """Three synthetic clips (`vamba_hf.demo.write_demo_video`) and a JSONL of questions about them."""
    from vamba_hf.demo import write_demo_video

    with open(folder / "train.jsonl", "w", encoding="utf-8") as jsonl:
        for index, (question, answer) in enumerate(DEMO_QA):
            write_demo_video(folder / f"clip_{index}.mp4", num_frames=16 + 8 * index)
            jsonl.write(json.dumps({"video": f"clip_{index}.mp4", "question": question, "answer": answer}) + "\n")
    return folder / "train.jsonl"


def load_model_and_processor(args):
    if args.tiny:
        return tiny_model_and_processor()
    if args.model is None:
        from vamba_hf.demo import build_demo_model_dir

        args.model = str(build_demo_model_dir())
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = VambaForConditionalGeneration.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
    processor = VambaProcessor.from_pretrained(args.processor or args.model)
    return model, processor


def add_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=LORA_TARGETS,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder or Hub id (official or converted Vamba; default: the "
                                        "embedded demo model, random weights)")
    parser.add_argument("--processor", help="processor folder or Hub id, if not the model's")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and tokenizer instead of --model")
    parser.add_argument("--data", type=Path, default=None,
                        help="JSONL of {video, question, answer} (default: three synthetic clips)")
    parser.add_argument("--video-dir", type=Path, default=Path("."), help="folder the JSONL's video paths start in")
    parser.add_argument("--output-dir", type=Path, default=None, help="where the model is saved (default: a "
                                                                       "temporary folder, deleted at the end)")
    parser.add_argument("--num-frames", type=int, default=None, help="frames sampled per video (processor default)")
    parser.add_argument("--pack", action="store_true", help="pack each batch into one row (no padding)")
    parser.add_argument("--freeze-vision-tower", action="store_true")
    parser.add_argument("--lora", action="store_true", help=f"LoRA on {','.join(LORA_TARGETS)}")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def describe_run(trainer) -> str:
    """How the run was spread: accelerate's DistributedType ("NO", "MULTI_GPU", "FSDP", ...) in words."""
    state = trainer.accelerator.state
    kind = state.distributed_type.value
    spread = ("one process, no distributed training (launch with `accelerate launch` to use several GPUs)"
              if kind == "NO" else f"{state.num_processes} processes, distributed as {kind}")
    return (f"trained {trainer.state.global_step} steps on {spread}; model wrapped as "
            f"{type(trainer.model_wrapped).__name__}")


def main(argv=None) -> Trainer:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        if args.data is None:
            args.data, args.video_dir = write_demo_dataset(Path(scratch)), Path(scratch)
            print(f"No --data: training on {len(DEMO_QA)} synthetic clips ({args.data}).")
        if args.output_dir is None:
            args.output_dir = Path(scratch) / "out"
            print("No --output-dir: the trained model is saved to a temporary folder and deleted at the end.")
        return train(args)


def train(args) -> Trainer:
    if args.model is None and not args.tiny:
        print("No --model: fine-tuning the embedded demo model (tiny, random weights).")
    model, processor = load_model_and_processor(args)
    if args.freeze_vision_tower:
        model.freeze_vision_tower()
    if args.lora:
        model = add_lora(model, args.lora_rank)
    examples = read_examples(args.data, args.video_dir)
    num_frames = args.num_frames or processor.video_sampling.num_frames
    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        **{CHECKPOINTING_ARGUMENT: args.gradient_checkpointing},
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,  # the collator reads the raw examples
        # The last layer's Mamba-2 block feeds nothing (no later layer reads the visual stream): under DDP its
        # parameters would otherwise stop the first backward.
        ddp_find_unused_parameters=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=examples,
                      data_collator=VideoQACollator(processor, num_frames, pack=args.pack))
    trainer.train()
    if trainer.is_world_process_zero():
        print(describe_run(trainer))
    trainer.save_model()
    processor.save_pretrained(str(args.output_dir))
    if trainer.is_world_process_zero():
        print(f"saved the model and processor to {args.output_dir}")
    return trainer


if __name__ == "__main__":
    main()
