"""Score conversations with a reward model (a sequence classifier with one output), batched, across processes.

Conversations are rendered with the chat template exactly as TRL's RewardTrainer renders them for training, so a
score at evaluation (or PPO) time means what it meant in training.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from rlhf.generation import pad_batch


def render(tokenizer, conversation: list[dict]) -> list[int]:
    return list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False))


@torch.no_grad()
def score_token_ids(reward_model, pad_token_id: int, sequences: list[list[int]]) -> torch.Tensor:
    """One reward per sequence, read by the classifier at the last non-pad token (pad is distinct from EOS, so the
    EOS a response ends with is included). Right padding keeps positions identical to training."""
    device = next(reward_model.parameters()).device
    ids, mask = pad_batch(sequences, pad_token_id, side="right")
    logits = reward_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    return logits[:, 0].float()


def score_conversations(reward_model, tokenizer, conversations: list[list[dict]], batch_size: int = 32,
                        show_progress: bool = True) -> tuple[list[float], list[int]]:
    """Rewards and token lengths of conversations, in order."""
    was_training = reward_model.training
    reward_model.eval()
    scores: list[float] = []
    lengths: list[int] = []
    batches = range(0, len(conversations), batch_size)
    for start in tqdm(batches, desc="scoring", disable=not show_progress):
        sequences = [render(tokenizer, conversation) for conversation in conversations[start:start + batch_size]]
        scores += score_token_ids(reward_model, tokenizer.pad_token_id, sequences).tolist()
        lengths += [len(sequence) for sequence in sequences]
    reward_model.train(was_training)
    return scores, lengths


def score_pairs(reward_model, tokenizer, pairs: list[dict], batch_size: int = 32, accelerator=None,
                show_progress: bool = True) -> dict:
    """Score chosen and rejected of every preference pair. With an accelerator, each process scores a contiguous
    share and the results are gathered in order, so the output equals a single-process run."""
    indices = list(range(len(pairs)))
    if accelerator is not None and accelerator.num_processes > 1:
        with accelerator.split_between_processes(indices) as share:
            local = _score_share(reward_model, tokenizer, [pairs[i] for i in share], batch_size, accelerator.is_main_process)
            local["index"] = list(share)
        from accelerate.utils import gather_object

        gathered = gather_object([local])
        merged = {key: [value for part in gathered for value in part[key]] for key in local}
        order = sorted(range(len(merged["index"])), key=merged["index"].__getitem__)
        return {key: [merged[key][i] for i in order] for key in local if key != "index"}
    return _score_share(reward_model, tokenizer, pairs, batch_size, show_progress)


def _score_share(reward_model, tokenizer, pairs: list[dict], batch_size: int, show_progress: bool) -> dict:
    chosen, chosen_lengths = score_conversations(
        reward_model, tokenizer, [pair["prompt"] + pair["chosen"] for pair in pairs], batch_size, show_progress)
    rejected, rejected_lengths = score_conversations(
        reward_model, tokenizer, [pair["prompt"] + pair["rejected"] for pair in pairs], batch_size, show_progress)
    return {"chosen": chosen, "rejected": rejected, "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
