"""Rebuild everything the offline tiny default ships in data/: task data, tokenizer, and the pre-trained base model.

    python -m rlhf.tiny.build --out data            # data + tokenizer + base model (a few minutes on 2 CPU cores)
    python -m rlhf.tiny.build --out data --skip-pretraining

Every step is seeded, so the same command rebuilds the same files. The base model is saved with save_pretrained
(safetensors) so it loads through AutoModelForCausalLM.from_pretrained like any real model.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from rlhf.tiny import task

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024

# ChatML with {% generation %} markers around the assistant text *and* its <|im_end|>, so TRL's assistant-only loss
# trains the model to stop. The newline between turns goes before <|im_start|>, not after <|im_end|>: a rendered
# conversation then ends on <|im_end|>, which is where a reward model reads its score (a trailing newline after the
# end of a turn carries little about the response) and exactly what a sampled response ends with. Rendering a
# prompt with add_generation_prompt is a prefix of the full conversation.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '\\n<|im_start|>assistant\\n' }}{%- endif %}"
)

# A Llama-style model of about 2M parameters: big enough to learn the task, small enough to train in minutes on CPU.
MODEL_CONFIG = dict(
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=6,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def build_task_data(out: Path, seed: int) -> tuple[list[str], list[list[dict]]]:
    """Write data/tiny/*.jsonl; return the pre-training corpus (plain documents and chat transcripts).
    Each file has its own seeded generator, so changing one file's recipe leaves the others as they were."""
    train_prompts, test_prompts = task.split_prompts(seed)
    tiny = out / "tiny"
    for split, prompts, n_sft, n_pairs, n_prompts, label_noise in [
        ("train", train_prompts, 2000, 2000, 512, 10.0),  # noisy labels, like human annotators
        ("test", test_prompts, 200, 400, 128, None),  # gold ranking: measures what a reward model really learned
    ]:
        rng = random.Random(f"{seed}-sft-{split}")
        write_jsonl(tiny / f"sft_{split}.jsonl", [task.sft_example(rng, rng.choice(prompts)) for _ in range(n_sft)])
        rng = random.Random(f"{seed}-prefs-{split}")
        pairs: list[dict] = []
        while len(pairs) < n_pairs:
            pair = task.preference_example(rng, rng.choice(prompts), noise_scale=label_noise)
            if pair is not None:
                pairs.append(pair)
        write_jsonl(tiny / f"prefs_{split}.jsonl", pairs)
        # Prompt-only sets cycle through every prompt so each is seen equally often.
        prompt_records = [{"prompt": prompts[i % len(prompts)], "item": task.item_of(prompts[i % len(prompts)])}
                          for i in range(n_prompts)]
        random.Random(f"{seed}-prompts-{split}").shuffle(prompt_records)
        write_jsonl(tiny / f"prompts_{split}.jsonl", prompt_records)
    rng = random.Random(f"{seed}-pretraining")
    documents = [task.pretraining_document(rng) for _ in range(16000)]
    conversations = [task.pretraining_conversation(rng) for _ in range(4000)]
    return documents, conversations


def build_tokenizer(corpus: list[str], out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: user text never hits <unk>
        show_progress=False,
    )
    # Chat-style text too, so role names and the prompt wording are single tokens.
    chat_text = [f"user\n{task.make_prompt(random.Random(i))}\nassistant\nsystem\n" for i in range(2000)]
    tokenizer.train_from_iterator(corpus + chat_text, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token=None,
        model_max_length=512,
        padding_side="right",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(out_dir)
    return wrapped


def pretrain_base(corpus: list[str], tokenizer, out_dir: Path, seed: int, steps: int, batch_size: int, block: int) -> None:
    """Plain next-token pre-training on the task's text, packed into fixed blocks."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream: list[int] = []
    for document in corpus:
        stream += tokenizer(document, add_special_tokens=False)["input_ids"] + [end_of_text]
    n_blocks = len(stream) // block
    blocks = torch.tensor(stream[: n_blocks * block]).view(n_blocks, block)
    print(f"pre-training corpus: {len(stream):,} tokens in {n_blocks} blocks of {block}")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_of_text],
        bos_token_id=None,
        **MODEL_CONFIG,
    )
    model = LlamaForCausalLM(config)
    print(f"base model: {sum(p.numel() for p in model.parameters()):,} parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.time()
    for step in range(1, steps + 1):
        batch = blocks[torch.randint(0, n_blocks, (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == 1:
            print(f"step {step}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f}s)")
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, end_of_text], pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data"), help="folder to write tiny/ and tiny-base/ into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=800, help="pre-training steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block", type=int, default=128, help="pre-training sequence length")
    parser.add_argument("--skip-pretraining", action="store_true", help="write data and tokenizer only")
    args = parser.parse_args(argv)

    documents, conversations = build_task_data(args.out, args.seed)
    base_dir = args.out / "tiny-base"
    tokenizer = build_tokenizer(documents, base_dir)
    # Chat transcripts go in rendered with the template, special tokens included, as a real base model sees them.
    corpus = documents + [tokenizer.apply_chat_template(messages, tokenize=False) for messages in conversations]
    random.Random(args.seed).shuffle(corpus)
    print(f"tokenizer: {len(tokenizer)} tokens -> {base_dir}")
    if not args.skip_pretraining:
        pretrain_base(corpus, tokenizer, base_dir, args.seed, args.steps, args.batch_size, args.block)
    print(f"wrote {args.out / 'tiny'} and {base_dir}")


if __name__ == "__main__":
    main()
