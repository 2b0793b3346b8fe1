"""The model host: loads the base and the active adapter once and generates replies.

This file starts with single-request streaming (used by ``rolebot chat``); the batched engine
for the service builds on the same loading and sampling code.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from bot.config import Config, GenerationSettings
from training.registry import Registry, Version


def active_version(config: Config) -> Version | None:
    return Registry(config.adapter_root, config.character.name).active()


def load_model(config: Config, version: Version | None):
    """Base plus the given adapter version, in Unsloth's inference mode."""
    from training.modeling import load_for_inference

    return load_for_inference(config.model, str(version.path) if version else None)


def sampling_kwargs(gen: GenerationSettings, tokenizer) -> dict:
    kwargs = {
        "max_new_tokens": gen.max_new_tokens,
        "repetition_penalty": gen.repetition_penalty,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if gen.temperature > 0:
        kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p)
    else:
        kwargs.update(do_sample=False)
    if gen.stop:
        kwargs.update(stop_strings=list(gen.stop), tokenizer=tokenizer)
    return kwargs


class StopFilter:
    """Holds back text that could be the start of a stop string, and ends at one.

    ``generate(stop_strings=...)`` stops the model, but the stop string itself has already
    been produced; the user must never see it.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.done = False

    def feed(self, text: str) -> str:
        if self.done:
            return ""
        self.buffer += text
        for stop in self.stops:
            at = self.buffer.find(stop)
            if at >= 0:
                self.done = True
                out, self.buffer = self.buffer[:at], ""
                return out
        keep = max((k for s in self.stops for k in range(len(s), 0, -1) if self.buffer.endswith(s[:k])), default=0)
        out = self.buffer[: len(self.buffer) - keep]
        self.buffer = self.buffer[len(out):]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.done else self.buffer), ""
        return out


def stream_text(model, tokenizer, prompt: str, gen: GenerationSettings) -> Iterator[str]:
    """Yield the reply to ``prompt`` piece by piece, as the tutorial's TextStreamer prints it."""
    from transformers import TextIteratorStreamer

    inputs = tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            model.generate(**inputs, streamer=streamer, **sampling_kwargs(gen, tokenizer))
        except BaseException as exc:  # re-raised in the caller's thread below
            errors.append(exc)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    stops = StopFilter(gen.stop)
    for piece in streamer:
        text = stops.feed(piece)
        if text:
            yield text
    tail = stops.flush()
    if tail:
        yield tail
    worker.join()
    if errors:
        raise errors[0]
