"""What a user hears: a reply without the prompt's scaffolding, ending with the character's turn.

A small model continues the prompt's pattern past its own turn: Alpaca's ``### Instruction:``,
``## Output:``, the next speaker's ``皇帝：`` line, special-token text, its own persona. The
engine's stream (both backends) passes every reply through one ``ReplyFilter``: it strips a
leading label of the character's own (``甄嬛：``), ends the reply where scaffolding or another
turn begins, and never shows text that might still become one (it holds that back until it can
tell). ``rolebot eval`` and the retrain gate count what the filter had to cut and what a user
would still see (``scaffolding``), and how much of a reply is in the script's language
(``cjk_share``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Text that is the prompt's structure, never speech: where one begins, the reply ends.
SCAFFOLD_LITERALS = (
    "###", "<|", "|>", "</s>", "<s>", "[INST]", "[/INST]", "原剧本中相似的对白",
)
# Template headers: at a line's start, or (``Instruction:``) anywhere; case-insensitive.
SCAFFOLD_HEADER = re.compile(
    r"(?:^|\n)[ \t]*#{1,6}[ \t]*\S|(?:^|\n)[ \t]*(?:Instruction|Input|Response|Output|System|User|Assistant)[ \t]*[:：]"
    r"|(?:Instruction|Response)[ \t]*[:：]",
    re.IGNORECASE,
)
# The template's last header echoed at the reply's start (``### Response:``): dropped.
LEADING_WORDS = ("response", "output", "answer", "assistant")
LEADING_HEADER = re.compile(r"^(?:#{1,6}[ \t]*)?(?:" + "|".join(LEADING_WORDS) + r")[ \t]*[:：]\s*", re.IGNORECASE)
# A line that opens with a speaker's label: ``皇帝：``, ``林答应（低头）：``, ``User:``.
LABEL = r"[^\s，。！？、,.!?：:（）()“”\"'「」《》]{1,12}(?:[ \t]*[（(][^）)\n]{0,24}[）)])?[ \t]*[:：]"
LINE_LABEL = re.compile(r"\n[ \t]*" + LABEL)
# What may follow a name while it can still become a label: an action in brackets, spaces.
_LABEL_REST = re.compile(r"[ \t]*(?:[（(][^）)\n]{0,24}[）)]?)?[ \t]*")
# A line's start that can still become a speaker's label.
_UNDECIDED_LINE = re.compile(r"\n[ \t]*[^\s，。！？、,.!?：:“”\"'「」《》]{0,12}(?:[ \t]*[（(][^）)\n]{0,24}[）)]?)?[ \t]*$")
# Characters of the script's language (CJK ideographs, kana, full-width punctuation excluded).
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff]")
LATIN_WORD = re.compile(r"[A-Za-z]{2,}")
# Which reason a cut gives where several begin at the same place.
PRIORITY = {"stop": 0, "scaffolding": 1, "persona": 2, "turn": 3}
# How much of the persona, verbatim, makes a reply its echo rather than speech.
PERSONA_ECHO = 20


@dataclass(frozen=True)
class Hygiene:
    """What one character's replies must not contain."""

    stops: tuple[str, ...] = ()  # [generation] stop
    names: tuple[str, ...] = ()  # the character's name and aliases
    speakers: tuple[str, ...] = ()  # the script's other speakers (and the user's label)
    persona: str = ""


class ReplyFilter:
    """Feed it a reply's text as it streams; it returns what may be shown now and sets ``done``
    once the character's turn is over (the caller stops generating)."""

    def __init__(self, hygiene: Hygiene):
        self.hygiene = hygiene
        self.stops = tuple(s for s in hygiene.stops if s)
        self.literals = self.stops + SCAFFOLD_LITERALS
        persona = hygiene.persona.strip()
        self.persona = persona
        self.persona_start = persona[:10] if len(persona) >= 10 else ""
        # A label at the reply's start is dropped: the character's own (``甄嬛：``) or, where the
        # model opened with another speaker's, that one too (the user hears no label).
        names = [re.escape(n) for n in sorted({*hygiene.names, *hygiene.speakers} - {""}, key=len, reverse=True)]
        self.leading_label = re.compile(r"^\s*(?:" + "|".join(names) + r")[ \t]*(?:[（(][^）)\n]{0,24}[）)])?[ \t]*[:：]\s*") if names else None
        others = sorted({s for s in hygiene.speakers if s and s not in hygiene.names}, key=len, reverse=True)
        # A known speaker's label after a finished sentence, on the same line: ``…告退。皇帝：``.
        self.inline_label = re.compile(r"(?<=[。！？!?…」”])[ \t]*(?:" + "|".join(map(re.escape, others)) + r")[ \t]*[:：]") if others else None
        # Texts whose start, at the end of what was fed, is held back (compared in lower case).
        self.holdable = tuple(t.lower() for t in (
            *self.literals, "instruction:", "response:", *(f"{o}{c}" for o in others for c in "：:"),
            *((self.persona_start,) if self.persona_start else ())))
        self._echo_from = 0  # persona windows starting before this were checked already
        self.text = ""  # everything fed, after the leading label
        self.sent = 0  # characters of ``text`` released
        self.started = False
        self.done = False
        self.cut: str | None = None  # what ended the reply early: "stop", "scaffolding", "turn", "persona"

    # -- streaming ------------------------------------------------------------------------

    def feed(self, piece: str) -> str:
        if self.done:
            return ""
        self.text += piece
        if not self.started and not self._start():
            return ""
        at, why = self._end()
        if at is not None:
            return self._finish(at, why)
        # Trailing blanks wait for what follows: the reply may end here.
        safe = len(self.text) - self._hold()
        while safe > self.sent and self.text[safe - 1].isspace():
            safe -= 1
        out = self.text[self.sent:max(self.sent, safe)]
        self.sent = max(self.sent, safe)
        return out

    def flush(self) -> str:
        """The end of the reply: release what was held back, less a dangling fragment."""
        if self.done:
            return ""
        if not self.started:
            self.text = self.text.lstrip()
            self.started = True
        at, why = self._end()
        if at is not None:
            return self._finish(at, why)
        self.done = True
        tail = self.text[self.sent:]
        held = self._hold()
        if held and held == len(tail) and tail.strip() and _dangling(tail.strip()):
            tail = ""
        return tail.rstrip()

    # -- rules ----------------------------------------------------------------------------

    def _start(self) -> bool:
        """Strip leading blanks and the character's own label (``甄嬛：``) once it can tell."""
        stripped = self.text.lstrip()
        self.text = stripped
        if not stripped:
            return False
        match = LEADING_HEADER.match(stripped)
        if match:
            stripped = stripped[match.end():]
        elif any(word.startswith(stripped.lower().lstrip("# \t")) for word in LEADING_WORDS) and len(stripped) < 16:
            return False  # wait for more
        if self.leading_label is not None:
            match = self.leading_label.match(stripped)
            if match:
                stripped = stripped[match.end():]
            elif self._may_become_label(stripped):
                return False
        self.text = stripped
        self.started = True
        return True

    def _may_become_label(self, text: str) -> bool:
        for name in (*self.hygiene.names, *self.hygiene.speakers):
            if name and (name.startswith(text) or (text.startswith(name) and _LABEL_REST.fullmatch(text[len(name):]))):
                return True
        return False

    def _end(self) -> tuple[int | None, str | None]:
        """Where the character's turn is over in ``self.text``, and why; (None, None) if not yet."""
        text, best = self.text, (None, None)

        def earlier(at: int, why: str) -> None:
            nonlocal best
            if at < 0:
                return
            # the earliest cut; where two begin together, the more specific reason
            if best[0] is None or at < best[0] or (at == best[0] and PRIORITY[why] < PRIORITY[best[1]]):
                best = (at, why)

        for stop in self.stops:
            earlier(text.find(stop), "stop")
        for literal in SCAFFOLD_LITERALS:
            earlier(text.find(literal), "scaffolding")
        if match := SCAFFOLD_HEADER.search(text):
            earlier(match.start(), "scaffolding")
        if match := LINE_LABEL.search(text):
            label = match.group()
            earlier(match.start(), "scaffolding" if any(lit in label for lit in SCAFFOLD_LITERALS) else "turn")
        if self.inline_label is not None and (match := self.inline_label.search(text)):
            earlier(match.start(), "turn")
        if self.persona_start and (at := text.find(self.persona_start)) >= 0:
            earlier(at, "persona")
        if self.persona and len(text) >= PERSONA_ECHO:
            earlier(self._persona_echo(), "persona")
        return best

    def _persona_echo(self) -> int:
        """Where a verbatim stretch of PERSONA_ECHO characters of the persona begins, or -1."""
        text = self.text
        for start in range(self._echo_from, len(text) - PERSONA_ECHO + 1):
            if text[start:start + PERSONA_ECHO] in self.persona:
                return start
        self._echo_from = max(self._echo_from, len(text) - PERSONA_ECHO + 1)
        return -1

    def _hold(self) -> int:
        """How many characters at the end might still become a stop, scaffolding or a label."""
        text, keep = self.text, 0
        lower = text.lower()
        for literal in self.holdable:
            for k in range(min(len(literal), len(text)), 0, -1):
                if lower.endswith(literal[:k]):
                    keep = max(keep, k)
                    break
        if match := _UNDECIDED_LINE.search(text):
            keep = max(keep, len(text) - match.start())
        if self.persona:
            for k in range(min(PERSONA_ECHO - 1, len(text)), 0, -1):
                if text[-k:] in self.persona:
                    keep = max(keep, k)
                    break
        return min(keep, len(text) - self.sent)

    def _finish(self, at: int, why: str) -> str:
        self.done = True
        self.cut = why
        out = self.text[self.sent:max(self.sent, at)]
        self.sent = max(self.sent, at)
        return out.rstrip()


def _dangling(tail: str) -> bool:
    """A reply's last few held-back characters that are only the start of scaffolding."""
    return bool(re.fullmatch(r"[#<|\[]+|(?i:instr\w*|respo\w*)", tail))


def clean(text: str, hygiene: Hygiene) -> tuple[str, str | None]:
    """A whole reply as the engine's stream would show it, and what ended it early (or None)."""
    reply = ReplyFilter(hygiene)
    shown = reply.feed(text) + reply.flush()
    return shown.strip(), reply.cut


# -- what eval measures -----------------------------------------------------------------------

def has_scaffolding(reply: str, speakers: tuple[str, ...] = ()) -> bool:
    """Prompt structure in what a user sees: template headers, special-token text, a speaker's
    label opening a line after the first (``\n皇帝：``), or the reply (one of ``speakers``)."""
    if any(literal in reply for literal in SCAFFOLD_LITERALS) or SCAFFOLD_HEADER.search(reply) or LINE_LABEL.search(reply):
        return True
    named = "|".join(re.escape(s) for s in speakers if s)
    return bool(named and re.match(rf"^\s*(?:{named})[ \t]*(?:[（(][^）)\n]{{0,24}}[）)])?[ \t]*[:：]", reply))


def cjk_share(reply: str) -> float:
    """The share of a reply's letters that are CJK: ideographs against Latin letters (digits,
    punctuation and spaces count for neither). An empty reply is 0."""
    cjk = len(CJK.findall(reply))
    latin = sum(len(w) for w in LATIN_WORD.findall(reply))
    return cjk / (cjk + latin) if cjk + latin else 0.0


def script_language(texts: list[str]) -> str:
    """``zh`` when the script's lines are mostly CJK, else ``other``."""
    shares = [cjk_share(t) for t in texts if t.strip()]
    return "zh" if shares and sum(shares) / len(shares) >= 0.5 else "other"


def in_language(reply: str, language: str) -> bool:
    """Whether a reply is in the script's language: for Chinese, at least 80% of its letters
    are CJK; for other scripts, it has letters and at most 20% are CJK."""
    share = cjk_share(reply)
    if language == "zh":
        return share >= 0.8
    return bool(CJK.search(reply) or LATIN_WORD.search(reply)) and share <= 0.2
