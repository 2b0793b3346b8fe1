"""Prompt formats shared by training and serving, so the bot asks exactly as the model learned.

``PromptStyle`` is the configured format (format, persona, character, how much canon) that
training, evaluation and the engine all render through.

``alpaca`` is the tutorial's template; the character's persona, when set, stands before it as
the system part. ``chat`` uses the model's own chat template with the persona as the system
message. A sample's canon (exchanges of the screenplay like the one at hand) is shown in the
script's own 「角色：台词」 form.

Where the chat's history and the canon go is ``history_first``. On (the default), every part
that changes from one turn to the next comes after the history: the Alpaca input (the history)
stands before the instruction (the message), and the canon follows the history. A chat's next
prompt then begins with this one's persona and history, token for token, and the engine reuses
those cached prompt blocks instead of computing them again (``prefix``). Off is the tutorial's
order: instruction, then input, with the canon in the system part.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

ALPACA = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""

# The same template with the input first, so that a chat's history opens every prompt.
ALPACA_HISTORY_FIRST = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Input:
{}

### Instruction:
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


# How the chat's history labels the user's lines (the character's carry the character's name).
USER_SPEAKER = "用户"

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


def system_text(sample: Sample, persona: str, character: str, history_first: bool = False) -> str:
    """The persona part of the prompt: who the character is, then (in the tutorial's order)
    the canon at hand."""
    parts = [persona.strip(), "" if history_first else canon_text(sample.canon, character)]
    return "\n\n".join(part for part in parts if part)


def _context(sample: Sample, character: str, history_first: bool) -> str:
    """The Alpaca input: the history (or the sample's own input); history first, the canon after it."""
    context = sample.input or history_text(sample.history)
    canon = canon_text(sample.canon, character) if history_first else ""
    return f"{context}\n\n{canon}" if context and canon else context or canon


def alpaca_prompt(sample: Sample, persona: str = "", character: str = "", history_first: bool = False) -> str:
    """The prompt up to (not including) the response."""
    context = _context(sample, character, history_first)
    if history_first:
        body = ALPACA_HISTORY_FIRST.format(context, sample.instruction, "")
    else:
        body = ALPACA.format(sample.instruction, context, "")
    system = system_text(sample, persona, character, history_first)
    return f"{system}\n\n{body}" if system else body


def chat_messages(sample: Sample, persona: str, character: str, history_first: bool = False) -> list[dict]:
    system = system_text(sample, persona, character, history_first)
    messages = [{"role": "system", "content": system}] if system else []
    for turn in sample.history:
        role = "assistant" if turn.speaker == character else "user"
        messages.append({"role": role, "content": turn.text})
    if history_first and sample.canon:  # after the history, so the history's blocks stay shared
        messages.append({"role": "system", "content": canon_text(sample.canon, character)})
    if sample.input:
        messages.append({"role": "user", "content": sample.input})
    messages.append({"role": "user", "content": sample.instruction})
    return messages


def render_prompt(sample: Sample, tokenizer, *, fmt: str, persona: str = "", character: str = "",
                  history_first: bool = False) -> str:
    """The text the model sees before its reply, in the configured format."""
    if sample.prompt:
        return sample.prompt
    if fmt == "chat":
        return tokenizer.apply_chat_template(
            chat_messages(sample, persona, character, history_first), tokenize=False, add_generation_prompt=True
        )
    return alpaca_prompt(sample, persona, character, history_first)


def render_prefix(history: tuple[Exchange, ...], tokenizer, *, fmt: str, persona: str = "", character: str = "") -> str:
    """The start that every later prompt of a chat with this ``history`` shares (history first):
    the persona, the template's opening and the history, up to its last line."""
    if fmt == "chat":
        sample = Sample(instruction="", history=history)
        messages = chat_messages(sample, persona, character, True)[:-1]  # without the message
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False) if messages else ""
    text = alpaca_prompt(Sample(instruction="", history=history), persona, character, True)
    return text[: text.rindex("\n\n### Instruction:")]


def served_history_first(meta: dict | None, configured: bool) -> bool:
    """The prompt order to serve an adapter with: the one it was trained on, when its
    meta.json records a prompt (older adapters, which do not say, learned the tutorial's
    order); else the configured one."""
    prompt = (meta or {}).get("config", {}).get("prompt")
    if isinstance(prompt, dict):
        return bool(prompt.get("history_first", False))
    return configured


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
    # The history before the message and the canon after the history (module docstring).
    history_first: bool = True

    def prompt(self, sample: Sample, tokenizer) -> str:
        return render_prompt(sample, tokenizer, fmt=self.fmt, persona=self.persona, character=self.character,
                             history_first=self.history_first)

    def prefix(self, history: tuple[Exchange, ...], tokenizer) -> str:
        """What the next prompt of a chat with this history begins with ("" in the tutorial's
        order, where the message comes first)."""
        if not self.history_first:
            return ""
        return render_prefix(history, tokenizer, fmt=self.fmt, persona=self.persona, character=self.character)

    def render(self, sample: Sample, tokenizer, *, history_first: bool | None = None, prefix: bool = False) -> str:
        """``sample`` as an engine serves it. ``history_first`` (None: this style's) is the order
        the served adapter learned (``served_history_first``); ``prefix``: only the start that the
        next prompts of a chat with ``sample.history`` share."""
        style = self if history_first is None else replace(self, history_first=history_first)
        return style.prefix(sample.history, tokenizer) if prefix else style.prompt(sample, tokenizer)

    def prompt_ids(self, sample: Sample, tokenizer) -> list[int]:
        # A chat template already writes its special tokens; the Alpaca text gets the
        # tokenizer's usual ones (e.g. Llama's BOS), as in the tutorial.
        return tokenizer(self.prompt(sample, tokenizer), add_special_tokens=self.fmt != "chat")["input_ids"]
