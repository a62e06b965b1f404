"""Text generation from a causal LM checkpoint: sampling or greedy, streamed to the terminal."""
import torch

from engine.device import autocast_for_pass


def prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    """The prompt where a document starts in training, right after the EOS that ends the one before
    (data/text_blocks.py). With `chat`, the text is the user turn of the model's chat template."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()  # as evaluation's generation; inference_mode gains nothing measurable here
def generate_text(model, tokenizer, ids: list[int], settings: dict, device, precision: str, stream: bool) -> list[str]:
    """`settings`: max_new_tokens, do_sample, temperature, top_k, top_p, num_return_sequences, seed.
    With `stream`, tokens are printed as they are produced (one sequence only)."""
    from transformers import TextStreamer

    model.eval()
    torch.manual_seed(settings["seed"])
    input_ids = torch.tensor([ids]).to(device, non_blocking=True)
    sampling = {k: settings[k] for k in ("temperature", "top_k", "top_p")} if settings["do_sample"] else {}
    with autocast_for_pass(model, device, precision):
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=settings["max_new_tokens"],
            do_sample=settings["do_sample"], num_return_sequences=settings["num_return_sequences"],
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None, **sampling,
        )
    return [tokenizer.decode(row[len(ids):], skip_special_tokens=True) for row in output.tolist()]
