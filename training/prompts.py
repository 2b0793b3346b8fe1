"""Prompt formats shared by training and serving, so the bot asks exactly as the model learned.

``PromptStyle`` is the configured format (format, persona, character, how much canon) that
training, evaluation and the engine all render through.

``alpaca`` is the tutorial's template; the character's persona, when set, stands before it as
the system part. ``chat`` uses the model's own chat template with the persona as the system
message. A sample's canon (exchanges of the screenplay like the one at hand) joins the persona
in that system part, in the script's own 「角色：台词」 form.
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
class Canon:
    """One exchange of the screenplay shown as reference: a line said to the character and
    the character's answer."""

    speaker: str
    said: str
    reply: str


# Stands before the canon exchanges in the system part of the prompt.
CANON_HEADING = "原剧本中相似的对白："


@dataclass(frozen=True)
class Sample:
    """One training or serving example: the last line said to the character and the reply."""

    instruction: str
    output: str = ""
    input: str = ""
    history: tuple[Exchange, ...] = ()
    canon: tuple[Canon, ...] = ()
    # The exact prompt text, when known: a logged reply is retrained on the prompt the bot used.
    prompt: str = ""


def history_text(history: tuple[Exchange, ...]) -> str:
    """Earlier turns as ``说话人：台词`` lines: the screenplay's own form, used in Alpaca's input."""
    return "\n".join(f"{turn.speaker}：{turn.text}" for turn in history)


def canon_text(canon: tuple[Canon, ...], character: str) -> str:
    """The canon block: a heading, then each exchange as two script lines, a blank line apart."""
    if not canon:
        return ""
    blocks = [f"{c.speaker}：{c.said}\n{character}：{c.reply}" for c in canon]
    return CANON_HEADING + "\n" + "\n\n".join(blocks)


def system_text(sample: Sample, persona: str, character: str) -> str:
    """The persona part of the prompt: who the character is, then the canon at hand."""
    parts = [persona.strip(), canon_text(sample.canon, character)]
    return "\n\n".join(part for part in parts if part)


def alpaca_prompt(sample: Sample, persona: str = "", character: str = "") -> str:
    """The prompt up to (not including) the response."""
    context = sample.input or history_text(sample.history)
    body = ALPACA.format(sample.instruction, context, "")
    system = system_text(sample, persona, character)
    return f"{system}\n\n{body}" if system else body


def chat_messages(sample: Sample, persona: str, character: str) -> list[dict]:
    system = system_text(sample, persona, character)
    messages = [{"role": "system", "content": system}] if system else []
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
    return alpaca_prompt(sample, persona, character)


@dataclass(frozen=True)
class PromptStyle:
    """How samples become text: the same for training, evaluation and serving."""

    fmt: str = "alpaca"
    persona: str = ""
    character: str = ""
    # Canon exchanges each prompt holds (0: none) and the tokens they may take at most; the
    # caller retrieves them (training.canon), the style only renders what a sample carries.
    canon_k: int = 0
    canon_max_tokens: int = 0

    def prompt(self, sample: Sample, tokenizer) -> str:
        return render_prompt(sample, tokenizer, fmt=self.fmt, persona=self.persona, character=self.character)

    def prompt_ids(self, sample: Sample, tokenizer) -> list[int]:
        # A chat template already writes its special tokens; the Alpaca text gets the
        # tokenizer's usual ones (e.g. Llama's BOS), as in the tutorial.
        return tokenizer(self.prompt(sample, tokenizer), add_special_tokens=self.fmt != "chat")["input_ids"]
