"""Text generation from a causal LM checkpoint: sampling or greedy, streamed to the terminal; and the
flags that control it (predict.py --prompt)."""
from dataclasses import dataclass

import torch

from engine.device import autocast_for_pass
from engine.settings import setting
from models.limits import check_positions


@dataclass(frozen=True)
class SamplingSettings:
    """text generation from a causal LM checkpoint (--task clm)"""

    max_new_tokens: int = setting(100, "tokens to generate", at_least=1)
    do_sample: bool = setting(True, "sample (default) or, with --no-do-sample / --greedy, take the most likely token")
    temperature: float = setting(0.8, "sampling temperature")
    top_k: int = setting(50, "sample among the k most likely tokens (0 for no limit)")
    top_p: float = setting(0.95, "sample among the most likely tokens that make up this probability")
    num_return_sequences: int = setting(1, "texts to generate (more than 1 are printed at the end)", at_least=1)
    seed: int = setting(0, "sampling seed: the same seed gives the same text")


def check_max_new_tokens(config, model: str, max_new_tokens: int, prompt_tokens: int = 1) -> None:
    """The generated tokens follow the prompt in the positions of `model` (models/limits.py); before the
    prompt is known, it has at least one token (see `prompt_ids`)."""
    check_positions(config, model, {"--max-new-tokens": max_new_tokens,
                                    "prompt token" if prompt_tokens == 1 else "prompt tokens": prompt_tokens})


def prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    """The prompt where a document starts in training, right after the EOS that ends the one before
    (data/text_blocks.py). With `chat`, the text is the user turn of the model's chat template."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()  # as evaluation's generation; inference_mode gains nothing measurable here
def generate_text(model, tokenizer, ids: list[int], settings: SamplingSettings, device, precision: str,
                  stream: bool) -> list[str]:
    """Continuations of the prompt `ids`; with `stream`, tokens are printed as they are produced
    (one sequence only)."""
    from transformers import TextStreamer

    model.eval()
    torch.manual_seed(settings.seed)
    input_ids = torch.tensor([ids]).to(device, non_blocking=True)
    sampling = ({"temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p}
                if settings.do_sample else {})
    with autocast_for_pass(model, device, precision):
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample, num_return_sequences=settings.num_return_sequences,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None, **sampling,
        )
    return [tokenizer.decode(row[len(ids):], skip_special_tokens=True) for row in output.tolist()]
