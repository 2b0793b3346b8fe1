"""Novels: prose with dialogue in quotes, read into the same turns as a screenplay.

A novel is a sequence of paragraphs (one a line) under chapter headings (``第一章 …``,
``第三回``, ``楔子``). Speech is quoted (“…”, 「…」 or "…"; ‘…’ and 『…』 nest inside). The
*rule pass* here attributes each quoted line from the narration around it, for free:

- before it: ``甄嬛笑道：“…”``, ``林答应攥着帕子，半晌才道：“…”``;
- after it: ``“…”容贵妃冷笑道。``, ``“…，”皇后道，“…”`` (both halves are hers);
- an action beat: ``“好了。”皇后轻轻放下茶盏，…`` (a paragraph belongs to its subject);
- a pronoun: ``她笑道`` is the last person named as the subject of a sentence, ``我笑道`` the
  narrator (a first-person novel's heroine, named by the user);
- turn-taking: a bare quote in a run of two speakers' alternating paragraphs.

Names are the character's and aliases the user gave, plus names learned from the text (the
subjects of ``X道`` / ``X笑道`` / ``X冷冷地道``). Generic titles (娘娘, 小主, 公公…) and
strangers (有人, 那老太监) are left unknown rather than guessed: the LLM pass
(``training.novel_llm``) may resolve them, and a line left unknown never makes a pair.
Quotes that are names or phrases inside a sentence (匾上写着“碧梧轩”三个字) are not lines.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from training.screenplay import Turn, is_script_line

SAMPLE_NOVEL = Path(__file__).parent / "samples" / "sample_novel.txt"

Source = Literal["script", "novel"]

_CJK = "\u4e00-\u9fff"
_NUMBER = r"(?:[0-9０-９]+|[零〇一二两三四五六七八九十百千]+)"
_CHAPTER = re.compile(rf"(?:第\s*{_NUMBER}\s*[章回节卷部篇集]|序章|楔子|引子|尾声|番外\S*|后记)"
                      r"(?:[\s　:：·.、]+.*)?")
_BREAK = re.compile(r"[*＊·•○◇◆—\-~～=\s　]{3,}")  # ***, ——, ◇◇◇: a scene break
_SENTENCE_END = "。！？!?；;…"
_CLAUSE_END = _SENTENCE_END + "，,：:、"
# Speech verbs that end an attribution (the longest forms first, so 笑道 is one verb).
_SAY = ("说道", "问道", "答道", "叹道", "喝道", "嚷道", "喊道", "骂道", "笑道", "哭道", "劝道", "回道", "应道",
        "念道", "接道", "斥道", "怒道", "吩咐道", "接口道", "开口道", "低语道", "解释道", "道", "说", "问", "答",
        "吩咐", "嘟囔", "念叨", "接了一句", "开口", "低语", "喃喃", "叹", "笑骂了一句")
_SAY_AT_END = re.compile(rf"(?:{'|'.join(_SAY)})(?:着)?\s*[：:，,]?\s*$")
_SAY_IN = re.compile("|".join(_SAY))
# What stands between a name and its verb: 笑, 冷笑, 轻声, 冷冷地, 小心翼翼地, 又, 才…
_MANNER = (r"(?:又|也|便|才|却|只|就|忙|连忙|赶忙|急忙|不禁|忍不住|这才|终于|随即|于是|还|仍旧|都|一面|一边)?"
           rf"(?:[{_CJK}]{{1,5}}地|含笑|冷笑|微笑|轻笑|苦笑|轻声|低声|柔声|小声|高声|沉声|笑着|哭着|叹了口气)?")
_NAMED_SAY = re.compile(rf"(?P<rest>{_MANNER}(?:笑|叹|问|答|喝|骂|嚷|喊|哭|劝|接口|接|回|应)?[道说问答])$")
# Leading words of a clause that are not its subject: 正说着，/ 只见 / 这时 …
_LEAD = re.compile(r"^(?:只见|忽然|突然|这时|此时|随即|于是|然后|半晌|过了一会儿|良久|原来|可是|但是|然而|"
                   r"不料|谁知|果然|终于|这才|仍旧|依旧|便|又|却|才|也|就|正|而)+")
# A name does not start with these (they open clauses of verbs, adverbs and numbers).
_NOT_FIRST = set("嘴脸眼手心声头身出进这那只忽正转便又也却就都还然随说笑看听见想走站坐点摇抬低回拉握扶跪起一上下过去来不没把被让叫给"
                 "对向朝在从到与和跟等有是待将若如但可而因所此其各每几另半满全两三四五六七八九十")
# …nor end with these (manner, body and motion words: 轻声, 躬身, 抬头, 回过…).
_NOT_LAST = set("地笑声身头会着了过来去眼手嘴里外内中边旁住起下得完罢毕又也便才却只就忙还都含冷轻低柔微苦")
_MANNER_WORD = re.compile(rf"{_MANNER}")
PRONOUNS = ("她", "他", "我")
_WHEN = re.compile(r"^(?:那|这|有)一?[天日年夜晚时刻回次阵会早]")
# Titles that name no one in particular: left for the LLM pass, or for the user's aliases.
GENERIC = frozenset({"娘娘", "小主", "主子", "公公", "姑娘", "姐姐", "妹妹", "哥哥", "弟弟", "众人", "大家",
                     "有人", "那人", "这人", "太监", "小太监", "老太监", "宫女", "丫头", "丫鬟", "奴才",
                     "奴婢", "夫人", "老爷", "少爷", "小姐", "大人", "先生", "二人", "两人", "对方"})
_GENERIC_LONGEST = sorted(GENERIC, key=len, reverse=True)
_OPEN = {"“": "”", "「": "」", "\"": "\""}


@dataclass(frozen=True)
class Quote:
    """A quoted stretch of a paragraph, and who the rule pass (or the LLM) says spoke it.

    ``how`` is how the speaker was found: ``before``/``after`` (an attribution), ``beat`` (the
    paragraph's subject), ``pronoun``, ``narrator``, ``turns`` (turn-taking), ``llm``; ""
    while unknown. ``mention`` marks a quoted phrase inside a sentence, which is no line.
    """

    file: str
    line: int
    chapter: int
    chapter_label: str
    scene: int
    paragraph: int
    start: int
    end: int
    text: str
    speaker: str = ""
    how: str = ""
    mention: bool = False
    unclosed: bool = False  # runs to the paragraph's end: the speech goes on in the next one
    continues: bool = False  # opens a paragraph right after an unclosed quote: the same speech

    @property
    def spoken(self) -> bool:
        return not self.mention and bool(self.text.strip())


@dataclass(frozen=True)
class Paragraph:
    file: str
    line: int
    chapter: int
    chapter_label: str
    scene: int
    text: str


@dataclass(frozen=True)
class Novel:
    """A novel's paragraphs and quotes in reading order."""

    file: str
    paragraphs: tuple[Paragraph, ...]
    quotes: tuple[Quote, ...]
    names: tuple[str, ...]  # the speaker names known or learned, longest first
    narrator: str

    @property
    def lines(self) -> list[Quote]:
        return [q for q in self.quotes if q.spoken]

    def chapters(self) -> int:
        return len({p.chapter for p in self.paragraphs if p.chapter})


@dataclass(frozen=True)
class Detection:
    """What a file looks like: its ``名字：台词`` lines against its quoted stretches."""

    kind: Source
    script_lines: int
    quotes: int

    def describe(self, file: str) -> str:
        shape = "a novel" if self.kind == "novel" else "a screenplay"
        return (f"{file}: read as {shape} ({self.quotes} quoted passages, {self.script_lines} "
                f"「名字：台词」 lines; --from script|novel to choose)")


def detect(text: str) -> Detection:
    """A novel has many quotes and few ``名字：`` lines; a screenplay the other way round."""
    lines = [line.strip() for line in text.splitlines()]
    script = sum(is_script_line(line) and not _said_before_colon(line) for line in lines)
    quotes = sum(line.count("“") + line.count("「") + line.count('"') // 2 for line in lines)
    return Detection("novel" if quotes > 2 * script else "script", script, quotes)


def _said_before_colon(line: str) -> bool:
    """``甄嬛笑道：“…”`` and ``我低了头：“…”`` are prose with a colon; ``甄嬛：“…”`` is still a
    screenplay's line (a short name, then the quote)."""
    colon = min((i for i in (line.find("："), line.find(":")) if i >= 0), default=-1)
    if colon <= 0:
        return False
    before, after = line[:colon].strip(), line[colon + 1:].lstrip()
    if _SAY_AT_END.search(before):
        return True
    return after[:1] in _OPEN and (len(before) > 4 or before.startswith(PRONOUNS))


# --- reading --------------------------------------------------------------------------

def read_novel(text: str, file: str, names: Iterable[str] = (), narrator: str = "") -> Novel:
    """The novel's paragraphs and quotes, with the rule pass's speakers."""
    paragraphs = _paragraphs(text, file)
    quotes = _continued([q for index, p in enumerate(paragraphs) for q in _quotes(p, index)])
    known = tuple(n for n in dict.fromkeys(names) if n)
    lexicon = _lexicon(paragraphs, quotes, known)
    return Novel(file, tuple(paragraphs), tuple(_attribute(paragraphs, quotes, lexicon, narrator)),
                 lexicon, narrator)


def _paragraphs(text: str, file: str) -> list[Paragraph]:
    out: list[Paragraph] = []
    chapter, label, scene = 0, "", 0
    for number, raw in enumerate(re.split(r"\r\n|\r|\n", text), start=1):
        line = raw.replace("\ufeff", "").strip(" \t　")
        if not line:
            continue
        if len(line) <= 40 and _CHAPTER.fullmatch(line) and not any(c in line for c in _OPEN):
            chapter, label, scene = chapter + 1, line, scene + 1
            continue
        if _BREAK.fullmatch(line):
            scene += 1
            continue
        out.append(Paragraph(file, number, chapter, label, scene, line))
    return out


def _quotes(paragraph: Paragraph, index: int) -> list[Quote]:
    """Top-level quotes; an unclosed one runs to the paragraph's end (a speech that goes on
    in the next paragraph opens it again)."""
    text, found, i = paragraph.text, [], 0
    while i < len(text):
        opener = text[i]
        if opener not in _OPEN:
            i += 1
            continue
        end = _closing(text, i)
        inner = text[i + 1:end]
        quote = Quote(paragraph.file, paragraph.line, paragraph.chapter, paragraph.chapter_label,
                      paragraph.scene, index, i, min(end + 1, len(text)), inner.strip())
        found.append(replace(quote, mention=_is_mention(text, i, min(end + 1, len(text))),
                             unclosed=end >= len(text)))
        i = end + 1
    return found


def _continued(quotes: list[Quote]) -> list[Quote]:
    """Mark the quotes that carry on a speech left open at the end of the paragraph before
    (the novelist's convention: each paragraph of a long speech opens with a quote mark, only
    the last one closes it)."""
    out: list[Quote] = []
    for quote in quotes:
        before = out[-1] if out else None
        if (before and before.unclosed and quote.start == 0 and quote.paragraph == before.paragraph + 1
                and quote.chapter == before.chapter):
            quote = replace(quote, continues=True)
        out.append(quote)
    return out


def _closing(text: str, start: int) -> int:
    opener, closer = text[start], _OPEN[text[start]]
    depth, i = 0, start + 1
    while i < len(text):
        char = text[i]
        if char == closer and (depth == 0 or opener == closer):
            if depth == 0:
                return i
        if char == closer:
            depth -= 1
        elif char == opener and opener != closer:
            depth += 1  # “…“…”…”: a writer's nested double quotes
        i += 1
    return len(text)


def _is_mention(text: str, start: int, end: int) -> bool:
    """A phrase quoted inside a sentence: a word character before it that is not an
    attribution (写着“碧梧轩”, 赐号“莞”, 那句“…”)."""
    before = text[:start].rstrip()
    if not before or before[-1] in _CLAUSE_END or before[-1] in "”」\"":
        return False
    return not _SAY_AT_END.search(before)


# --- names ----------------------------------------------------------------------------

def _narration(paragraph: Paragraph, quotes: list[Quote]) -> str:
    """The paragraph with its quotes blanked (so clause splitting sees only narration)."""
    chars = list(paragraph.text)
    for q in quotes:
        for i in range(q.start, q.end):
            chars[i] = "“" if i == q.start else "\u3000"
    return "".join(chars)


def _lexicon(paragraphs: list[Paragraph], quotes: list[Quote], known: tuple[str, ...]) -> tuple[str, ...]:
    """Known names, then names learned from the text: what opens the first clause of the
    sentences right around quotes (where a speaker is named), in the text at least twice or
    right before a speech verb (``苏培盛笑眯眯地道``)."""
    by_paragraph: dict[int, list[Quote]] = {}
    for q in quotes:
        by_paragraph.setdefault(q.paragraph, []).append(q)
    openings: list[str] = []
    for index, paragraph in enumerate(paragraphs):
        mine = by_paragraph.get(index, [])
        if not mine:
            continue
        text = _narration(paragraph, mine)
        for i in range(len(mine) + 1):
            segment = text[(mine[i - 1].end if i else 0):(mine[i].start if i < len(mine) else len(text))]
            sentences = _sentences(segment)
            around = sentences[:1] if i else []
            around += sentences[-1:] if i < len(mine) and sentences else []
            for sentence in around:
                clauses = _clauses(sentence)
                if clauses:
                    openings.append(_LEAD.sub("", clauses[0]))
    whole = "\n".join(p.text for p in paragraphs)
    seen: dict[str, int] = {}
    places: dict[str, bool] = {}
    learned = Counter()
    for opening in openings:
        names = [opening[:n] for n in range(2, 5) if len(opening) >= n and _could_be_name(opening[:n])]
        if not names:
            continue
        for name in names:
            seen.setdefault(name, whole.count(name))
        # 苏培盛笑眯眯地道 also splits as 苏培|盛笑…: the prefix the whole text holds most
        # often wins, and among equals the longer one.
        best = max(names, key=lambda n: (seen[n], len(n)))
        if best not in places:
            places[best] = _place(best, whole, seen[best])
        if places[best]:
            continue
        if seen[best] >= 2 or _NAMED_SAY.fullmatch(opening[len(best):]):
            learned[best] += 1
    names = [*known, *(n for n in learned if n not in GENERIC and n not in known)]
    return tuple(sorted(dict.fromkeys(names), key=len, reverse=True))


_PLACES = "轩宫殿院园阁楼府局司房门亭堂斋寺庙"


def _place(name: str, whole: str, times: int) -> bool:
    """碧梧 of 碧梧轩 is a place: the text mostly follows it with a building's word."""
    return sum(whole.count(name + c) for c in _PLACES) * 2 >= times


def _could_be_name(text: str) -> bool:
    # 门外有人: no name grows out of a word that is not one (门外).
    return (bool(re.fullmatch(rf"[{_CJK}]+", text)) and text[0] not in _NOT_FIRST
            and not _NOT_LAST.intersection(text[1:]) and not text.startswith(PRONOUNS)
            and "的" not in text and not _SAY_AT_END.search(text) and not _MANNER_WORD.fullmatch(text))


def _clauses(text: str) -> list[str]:
    return [c.strip(" 　") for c in re.split(rf"[{_CLAUSE_END}“”「」\"]", text) if c.strip(" 　")]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(rf"(?<=[{_SENTENCE_END}])", text) if s.strip(" 　")]


def subject(sentence: str, lexicon: tuple[str, ...], backward: bool = False) -> str:
    """Who a sentence of narration is about: the first clause (the last, ``backward``: the
    one nearest a speech verb) that opens with a name, a pronoun or a title; "" when none
    does, "?" for a stranger (一个小太监, 有人)."""
    clauses = _clauses(sentence)
    for clause in reversed(clauses) if backward else clauses:
        clause = _LEAD.sub("", clause)
        for name in lexicon:
            if clause.startswith(name):
                return name
        if clause[:2] in ("她们", "他们", "我们") or clause.startswith(("你", "您")):
            return "?"
        if clause.startswith(PRONOUNS):
            return clause[0]
        generic = next((g for g in _GENERIC_LONGEST if clause.startswith(g)), "")
        if generic:
            return generic
        if _WHEN.match(clause):
            continue  # 那天晚上，温实初来…: a time, the subject comes after it
        if clause.startswith(("一个", "那", "这", "有")):
            return "?"
    return ""


# --- attribution ----------------------------------------------------------------------

def _attribute(paragraphs: list[Paragraph], quotes: list[Quote], lexicon: tuple[str, ...],
               narrator: str) -> list[Quote]:
    """Two passes: the first learns who is a she and who a he from how each speaks of
    themselves (臣妾, 奴才…); the second resolves 她 and 他 with it."""
    first = _Attributor(lexicon, narrator, {}).run(paragraphs, quotes)
    return _Attributor(lexicon, narrator, genders(first, lexicon, narrator)).run(paragraphs, quotes)


_FEMALE_SELF = ("臣妾", "嫔妾", "本宫", "奴婢", "妾身", "哀家", "民女", "小女")
_MALE_SELF = ("奴才", "微臣", "臣弟", "朕", "本王", "下官", "小生", "在下", "老夫")
_FEMALE_TITLES = ("妃", "后", "嫔", "贵人", "答应", "常在", "娘娘", "小主", "格格", "姑娘", "夫人", "嬷嬷",
                  "姐", "妹", "娘", "氏", "女")
_MALE_TITLES = ("皇上", "帝", "王", "爷", "公公", "太医", "大人", "先生", "哥", "弟")


def genders(quotes: list[Quote], lexicon: tuple[str, ...], narrator: str) -> dict[str, str]:
    """"f" or "m" for the names the text reveals: a title (…妃, …公公) or a majority of the
    ways their lines name themselves."""
    votes: dict[str, Counter] = {}
    for q in quotes:
        if q.speaker:
            tally = votes.setdefault(q.speaker, Counter())
            tally["f"] += sum(q.text.count(w) for w in _FEMALE_SELF)
            tally["m"] += sum(q.text.count(w) for w in _MALE_SELF)
    out = {}
    for name in {*lexicon, *votes}:
        if name.endswith(_FEMALE_TITLES):
            out[name] = "f"
        elif name.endswith(_MALE_TITLES):
            out[name] = "m"
        elif (tally := votes.get(name)) and tally["f"] != tally["m"]:
            out[name] = "f" if tally["f"] > tally["m"] else "m"
    return out


class _Attributor:
    """One pass over the novel, paragraph by paragraph, keeping who was named last."""

    def __init__(self, lexicon: tuple[str, ...], narrator: str, gender: dict[str, str]):
        self.lexicon, self.narrator, self.gender = lexicon, narrator, gender
        names = "|".join(map(re.escape, lexicon))  # longest first, so 甄常在 before 甄嬛
        self._vocative = re.compile(rf"(?:^|[。！？…])\s*({names})[，,！!？?]") if lexicon else None
        self.subjects: list[str] = []  # the chapter's named sentence subjects, latest last
        # The chapter's turns: [first paragraph, last paragraph, speaker ("#": narration, "":
        # unknown), who the speaker called out]; a speech over paragraphs is one turn.
        self.turns: list[list] = []

    def run(self, paragraphs: list[Paragraph], quotes: list[Quote]) -> list[Quote]:
        by_paragraph: dict[int, list[Quote]] = {}
        for q in quotes:
            by_paragraph.setdefault(q.paragraph, []).append(q)
        out: list[Quote] = []
        chapter = None
        for index, paragraph in enumerate(paragraphs):
            if paragraph.chapter != chapter:
                chapter, self.subjects, self.turns = paragraph.chapter, [], []
            mine = by_paragraph.get(index, [])
            text = _narration(paragraph, mine)
            if mine and mine[0].continues and self.turns:
                self.turns[-1][1] = index  # the speech before goes on: still its turn
            else:
                self.turns.append([index, index, "#", ""])
            for quote, (who, how) in zip(mine, self._paragraph(text, mine)):
                if quote.continues and not who:
                    who, how = (self.turns[-1][2], "continued") if self.turns[-1][2] != "#" else ("", "")
                elif quote.spoken and not who and _bare(text, quote):
                    who, how = self._by_turns(index)
                if who and who == self._addressee(quote.text):
                    who, how = "", ""  # “皇上，时辰不早了” is not the emperor's line
                out.append(replace(quote, speaker=who, how=how if who else ""))
                if quote.spoken and not (quote.continues and not who):
                    self.turns[-1][2:] = [who, self._addressee(quote.text)]
        return _one_speaker_a_speech(out)

    def _by_turns(self, index: int) -> tuple[str, str]:
        """A bare line answers the turn before it: it is the addressee's, when that turn
        named one, else the speaker's of the turn before that in an A, B, A… exchange."""
        if len(self.turns) < 2 or self.turns[-2][1] != index - 1:
            return "", ""
        b, addressed = self.turns[-2][2], self.turns[-2][3]
        if b and b != "#" and addressed and addressed != b:
            return addressed, "addressed"
        if len(self.turns) < 3 or self.turns[-3][1] != self.turns[-2][0] - 1:
            return "", ""
        a = self.turns[-3][2]
        if a and b and "#" not in (a, b) and a != b:
            return a, "turns"
        return "", ""

    def _addressee(self, line: str) -> str:
        """The name a line calls out (``甄常在，本宫听说…``), as the lexicon has it."""
        found = self._vocative.search(line) if self._vocative else None
        return found[1] if found else ""

    def _resolve(self, who: str, how: str) -> tuple[str, str]:
        if who == "我":
            return (self.narrator, "narrator") if self.narrator else ("", "")
        if who in ("她", "他"):
            unwanted = "m" if who == "她" else "f"
            match = next((n for n in reversed(self.subjects) if self.gender.get(n) != unwanted), "")
            return (match, "pronoun") if match else ("", "")
        if who in ("", "?") or who in GENERIC:
            return "", ""
        return who, how

    def _note(self, sentences: list[str]) -> None:
        for sentence in sentences:
            who = subject(sentence, self.lexicon)
            if who and who not in PRONOUNS and who != "?" and who not in GENERIC:
                if who in self.subjects:
                    self.subjects.remove(who)
                self.subjects.append(who)

    def _paragraph(self, text: str, quotes: list[Quote]) -> list[tuple[str, str]]:
        """(speaker, how) for each quote of one paragraph."""
        found: list[tuple[str, str]] = [("", "")] * len(quotes)
        bounds = [0, *(x for q in quotes for x in (q.start, q.end)), len(text)]
        segments = [text[bounds[2 * i]:bounds[2 * i + 1]] for i in range(len(quotes) + 1)]
        for i, segment in enumerate(segments):  # segment i: the narration before quote i
            sentences = _sentences(segment)
            noted = 0
            if i > 0 and sentences and quotes[i - 1].spoken and not found[i - 1][0]:
                first = sentences[0]
                said = bool(_SAY_IN.search(first))
                # 林答应看着他的背影，小声说：“…” introduces the next quote, not the last one.
                if said or not _ends_in_colon(first) or len(sentences) > 1 or i == len(quotes):
                    who = subject(first, self.lexicon)
                    if who:
                        found[i - 1] = self._resolve(who, "after" if said else "beat")
                        # “A，”皇后道，“B”: one clause between two quotes gives both to her.
                        if i < len(quotes) and len(sentences) == 1 and not re.search(f"[{_SENTENCE_END}]", first):
                            found[i] = found[i - 1]
                    self._note([first])
                    noted = 1
            if i < len(quotes) and quotes[i].spoken and not found[i][0] and sentences[noted:]:
                self._note(sentences[noted:-1])
                last = sentences[-1]
                if _ends_in_colon(last) or _SAY_AT_END.search(last.rstrip(" 　“")):
                    found[i] = self._resolve(subject(last, self.lexicon, backward=True), "before")
                elif i == 0:
                    # An action beat before the paragraph's first quote: 我接过来看了一眼。“收起来吧。”
                    who = next((w for s in sentences if (w := subject(s, self.lexicon))), "")
                    found[i] = self._resolve(who, "beat")
                self._note([last])
            else:
                self._note(sentences[noted:])
        return found


def _one_speaker_a_speech(quotes: list[Quote]) -> list[Quote]:
    """A speech over several paragraphs is its first attributed paragraph's speaker's."""
    out = list(quotes)
    start = 0
    for end in range(1, len(out) + 1):
        if end < len(out) and out[end].continues:
            continue
        speech = range(start, end)
        who = next(((out[i].speaker, out[i].how) for i in speech if out[i].speaker), None)
        if who and len(speech) > 1:
            for i in speech:
                out[i] = replace(out[i], speaker=who[0], how=out[i].how if out[i].speaker == who[0] else "continued")
        start = end
    return out


def _bare(text: str, quote: Quote) -> bool:
    """The paragraph is only this quote (what is left of it is punctuation)."""
    rest = text[:quote.start] + text[quote.end:]
    return not re.search(rf"[{_CJK}A-Za-z]", rest)


def _ends_in_colon(sentence: str) -> bool:
    return sentence.rstrip(" 　“")[-1:] in ("：", ":")


# --- into turns -----------------------------------------------------------------------

def turns_of(novel: Novel) -> list[Turn]:
    """The novel's spoken lines as screenplay turns: chapters are episodes, speakers as
    attributed ("unattributed" when unknown), quotes of one speaker in one paragraph (or one
    speech over several) joined into one line."""
    turns: list[Turn] = []
    previous: Quote | None = None
    for quote in novel.lines:
        kind = "dialogue" if quote.speaker else "unattributed"
        turn = Turn(quote.file, quote.line, quote.chapter, quote.scene, quote.chapter_label, kind,
                    quote.speaker, "", quote.text)
        joined = previous and (previous.paragraph == quote.paragraph or quote.continues)
        if joined and turns and quote.speaker and previous.speaker == quote.speaker:
            turns[-1] = replace(turns[-1], text=turns[-1].text + quote.text)
        else:
            turns.append(turn)
        previous = quote
    return turns


@dataclass(frozen=True)
class RuleCounts:
    lines: int
    attributed: int
    by_how: tuple[tuple[str, int], ...]

    @property
    def unknown(self) -> int:
        return self.lines - self.attributed


def rule_counts(novel: Novel) -> RuleCounts:
    lines = novel.lines
    how = Counter(q.how for q in lines if q.speaker)
    return RuleCounts(len(lines), sum(1 for q in lines if q.speaker), tuple(how.most_common()))

