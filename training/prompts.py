"""Prompt formats shared by training and serving, so the bot asks exactly as the model learned.

``PromptStyle`` is the configured format (format, persona, character) that training,
evaluation and the engine all render through.

``alpaca`` is the tutorial's template; the character's persona, when set, stands before it as
the system part. ``chat`` uses the model's own chat template with the persona as the system
message.
"""

from __future__ import annotations

from dataclasses import dataclass

ALPACA = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""


@dataclass(frozen=True)
class Exchange:
    """One earlier turn of the conversation: who spoke and what they said."""

    speaker: str
    text: str


@dataclass(frozen=True)
class Sample:
    """One training or serving example: the last line said to the character and the reply."""

    instruction: str
    output: str = ""
    input: str = ""
    history: tuple[Exchange, ...] = ()
    # The exact prompt text, when known: a logged reply is retrained on the prompt the bot used.
    prompt: str = ""


def history_text(history: tuple[Exchange, ...]) -> str:
    """Earlier turns as ``说话人：台词`` lines: the screenplay's own form, used in Alpaca's input."""
    return "\n".join(f"{turn.speaker}：{turn.text}" for turn in history)


def alpaca_prompt(sample: Sample, persona: str = "") -> str:
    """The prompt up to (not including) the response."""
    context = sample.input or history_text(sample.history)
    body = ALPACA.format(sample.instruction, context, "")
    return f"{persona.strip()}\n\n{body}" if persona.strip() else body


def chat_messages(sample: Sample, persona: str, character: str) -> list[dict]:
    messages = [{"role": "system", "content": persona}] if persona.strip() else []
    for turn in sample.history:
        role = "assistant" if turn.speaker == character else "user"
        messages.append({"role": role, "content": turn.text})
    if sample.input:
        messages.append({"role": "user", "content": sample.input})
    messages.append({"role": "user", "content": sample.instruction})
    return messages


def render_prompt(sample: Sample, tokenizer, *, fmt: str, persona: str = "", character: str = "") -> str:
    """The text the model sees before its reply, in the configured format."""
    if sample.prompt:
        return sample.prompt
    if fmt == "chat":
        return tokenizer.apply_chat_template(
            chat_messages(sample, persona, character), tokenize=False, add_generation_prompt=True
        )
    return alpaca_prompt(sample, persona)


@dataclass(frozen=True)
class PromptStyle:
    """How samples become text: the same for training, evaluation and serving."""

    fmt: str = "alpaca"
    persona: str = ""
    character: str = ""

    def prompt(self, sample: Sample, tokenizer) -> str:
        return render_prompt(sample, tokenizer, fmt=self.fmt, persona=self.persona, character=self.character)

    def prompt_ids(self, sample: Sample, tokenizer) -> list[int]:
        # A chat template already writes its special tokens; the Alpaca text gets the
        # tokenizer's usual ones (e.g. Llama's BOS), as in the tutorial.
        return tokenizer(self.prompt(sample, tokenizer), add_special_tokens=self.fmt != "chat")["input_ids"]
