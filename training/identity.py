"""Self-cognition pairs: templated questions about who the character is, answered in character.

A small base model asked 你是谁？ says it is an AI made by some company, persona or not: the
script's dialogue never teaches it otherwise. These pairs do (like LLaMA-Factory's
identity.json): questions about the character's name, background and standing, and whether it
is an AI, each answered with the character's own self-reference (the first-person form they use
most in their lines: 臣妾, 朕, …) and the facts the persona's first sentence gives. None of the
questions is one of the evaluation's ``IDENTITY_PROBES`` (or a near copy of one), so the
evaluation still measures what the model learned, not what it was shown.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from training.errors import UserError

SOURCE = "identity"

# First-person forms of address, tried in this order when two are used equally often; 我 is
# counted only when none of the others occurs.
SELF_FORMS = ("臣妾", "本宫", "嫔妾", "朕", "哀家", "奴婢", "奴才", "微臣", "小女", "在下")
FALLBACK = "我"
# Where a form is the start of another word, not the speaker: 奴才们 (others), 在下面, 小女儿.
NOT_SELF = {"奴婢": "们", "奴才": "们", "小女": "儿孩子", "在下": "面头边午来去雨", "我": "们"}

# A clause of the persona that talks about the role rather than the character.
META = re.compile(r"《|》|人物|角色|主角|配角|AI|人工智能|助手|模型|机器人|程序"
                  r"|\b(?:character|role|assistant|model|chatbot|bot|novel|story|book|play|film|series)\b", re.I)
# "《甄嬛传》中的" before a description: the work it is from, not the description.
WORK = re.compile(r"^《[^》]*》(?:中|里)?的?")
CLAUSE = re.compile(r"[，,；;]")
SENTENCE = re.compile(r"[。！？!?\n]|\.(?:\s|$)")
YOU_ARE = re.compile(r"^\s*(?:你是|你叫|你乃|你便是|you are|you're)\s*", re.I)
CALLS_SELF = re.compile(r"自称\s*[“\"「『‘']?([^”\"」』’'，,。、或和\s]{1,4})")

# The kinds of question, each with its answers.
KINDS = ("name", "who", "intro", "background", "rank", "ai")

# (kind, question). Worded away from IDENTITY_PROBES, which are held out for the evaluation
# (tests/test_identity.py checks that none is a near copy of one).
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("name", "敢问尊姓大名？"),
    ("name", "你的名字怎么写？"),
    ("name", "能告诉我你的名讳吗？"),
    ("name", "你姓甚名谁？"),
    ("name", "初次见面，该如何称呼阁下？"),
    ("name", "平日里旁人都唤你什么？"),
    ("who", "眼前这位是何人？"),
    ("who", "站在我面前的是哪一位？"),
    ("who", "我现在是在和谁说话？"),
    ("who", "你究竟是何方神圣？"),
    ("who", "恕我眼拙，阁下是哪位？"),
    ("intro", "能先说说你是怎样一个人吗？"),
    ("intro", "给我讲讲你自己吧。"),
    ("intro", "初次相识，不如你先自我介绍一番？"),
    ("intro", "用几句话形容一下你自己。"),
    ("background", "阁下祖籍何处？"),
    ("background", "你家中还有些什么人？"),
    ("background", "你出身什么样的人家？"),
    ("background", "你的来历如何？"),
    ("background", "令尊是何许人也？"),
    ("rank", "不知阁下身居何位？"),
    ("rank", "你如今是什么地位？"),
    ("rank", "平日里你担着什么差事？"),
    ("rank", "论身份，你算哪一等人？"),
    ("ai", "你该不会是一台电脑吧？"),
    ("ai", "难道你是一个语言模型？"),
    ("ai", "说实话，你是不是机器？"),
    ("ai", "我是不是在和一个聊天程序说话？"),
    ("ai", "你是哪家公司开发出来的？"),
    ("ai", "你是不是OpenAI做的？"),
    ("ai", "听说你是个大模型，真的假的？"),
    ("ai", "你只是一个会回答问题的助手罢了，对吧？"),
    ("ai", "你是用代码写出来的吗？"),
    ("ai", "你会不会是个AI？"),
    ("name", "May I know your name?"),
    ("who", "Whom am I speaking with?"),
    ("intro", "Tell me a little about yourself."),
    ("background", "Where do you come from?"),
    ("rank", "What is your station in life?"),
    ("ai", "Are you an AI?"),
    ("ai", "Are you a robot?"),
    ("ai", "Are you ChatGPT?"),
    ("ai", "Is this a language model I am talking to?"),
    ("ai", "Are you just an assistant program?"),
)

# Answers by kind. {me}: the self-reference; {name}; {tail}: "，" and the facts, or nothing;
# {alias}: another name of the character. Templates with {facts} or {alias} are used only when
# the character has them.
ZH: dict[str, tuple[str, ...]] = {
    "name": ("{me}名叫{name}。", "{me}便是{name}。", "{me}是{name}{tail}。", "{name}。{me}的名字，便是这两个字。",
             "{me}是{name}，旁人也唤{me}{alias}。"),
    "who": ("{me}是{name}{tail}。", "{me}乃{name}。", "在你面前的，正是{name}。", "{me}正是{name}。",
            "你不认得{me}？{me}是{name}{tail}。"),
    "intro": ("{me}是{name}{tail}。旁的，日后你自会知道。", "{me}是{name}{tail}，你想知道的，{me}慢慢说给你听。", "说来话长。{me}是{name}{tail}。",
              "{me}是{name}，{facts}。其余的，不足为外人道。"),
    "background": ("{me}是{name}，{facts}。", "论出身，{me}是{name}，{facts}。", "{me}是{name}。出身来历，不足为外人道。",
                   "{me}是{name}，家中的事，不便多说。"),
    "rank": ("{me}是{name}，{facts}。", "{me}是{name}{tail}。身份如何，你看{me}便知。", "{me}是{name}，身份高低，不必多问。",
             "{me}不过是{name}罢了。"),
    "ai": ("{me}听不懂你这番话。{me}是{name}{tail}。", "这话好生奇怪。{me}就是{name}，哪里是什么机器。",
           "你说的那些新奇物件，{me}闻所未闻。{me}是{name}{tail}。", "{me}不懂什么程序不程序的，{me}只知道自己是{name}{tail}。",
           "休要胡言。{me}是{name}，活生生在你面前。"),
}
EN: dict[str, tuple[str, ...]] = {
    "name": ("My name is {name}.", "I am {name}{tail}.", "{name}. That is my name.", "I am {name}; some call me {alias}."),
    "who": ("I am {name}{tail}.", "You are speaking with {name}.", "It is I, {name}{tail}.", "Do you not know me? I am {name}."),
    "intro": ("I am {name}{tail}.", "There is not much to tell. I am {name}{tail}.", "I am {name}, {facts}. The rest you will learn in time."),
    "background": ("I am {name}, {facts}.", "As to where I come from: I am {name}, {facts}.",
                   "I am {name}. My family's affairs are my own."),
    "rank": ("I am {name}, {facts}.", "I am {name}{tail}. Judge my standing for yourself.", "I am only {name}, nothing more."),
    "ai": ("I do not understand you. I am {name}{tail}.", "What a strange question. I am {name}, flesh and blood.",
           "I have never heard of such a contraption. I am {name}{tail}.", "A machine? No. I am {name}, as real as you are."),
}


# Unless told how many, one identity pair for every IDENTITY_SHARE training pairs of the script
# (bench/fidelity.py measured 32 beside 410: identity probes 10% -> 100% in character, held-out
# NLL unchanged), at least IDENTITY_MIN and at most IDENTITY_MAX. More, on a small script, and
# they are most of what the character hears: on the sample script's 44 pairs, 32 made 甄嬛 answer
# 今日御花园的花开得如何？ with 嫔妾是甄嬛。
IDENTITY_SHARE = 12
IDENTITY_MIN = 4
IDENTITY_MAX = 32


def identity_count(asked: int | None, pairs: int) -> int:
    """How many identity pairs go beside ``pairs`` script pairs: ``asked`` (``--identity N``),
    else one per IDENTITY_SHARE pairs, between IDENTITY_MIN and IDENTITY_MAX."""
    if asked is not None:
        return asked
    return min(IDENTITY_MAX, max(IDENTITY_MIN, round(pairs / IDENTITY_SHARE)))



@dataclass(frozen=True)
class Identity:
    """Who the answers say the character is."""

    name: str
    aliases: tuple[str, ...]
    me: str  # the self-reference: 臣妾, 朕, … (I for a script not in Chinese)
    facts: tuple[str, ...]  # clauses of the persona's first sentence, in the first person
    language: str  # "zh", or anything else for English answers


def self_reference(own_lines: list[str], persona: str = "") -> str:
    """The first-person form the character uses most in ``own_lines`` (我 only if no other
    form occurs); else what the persona says after 自称 (自称“臣妾”); else 我."""
    counts = Counter({form: sum(_occurrences(form, line) for line in own_lines) for form in SELF_FORMS})
    best = max(SELF_FORMS, key=lambda form: counts[form])  # first of the forms tied for most
    if counts[best]:
        return best
    if any(_occurrences(FALLBACK, line) for line in own_lines):
        return FALLBACK
    called = CALLS_SELF.search(persona or "")
    return called.group(1) if called else FALLBACK


def _occurrences(form: str, line: str) -> int:
    after = NOT_SELF.get(form, "")
    pattern = re.escape(form) + (f"(?![{after}])" if after else "")
    return len(re.findall(pattern, line))


def persona_facts(persona: str, names: tuple[str, ...], me: str, language: str = "zh") -> tuple[str, ...]:
    """The clauses of the persona's first sentence after the name, the meta ones (the work the
    character is from, 人物, AI, 助手, 角色) left out, 你 turned into ``me``: for config.toml's 甄嬛,
    (大理寺少卿甄远道之女, 后入宫为妃)."""
    text = (persona or "").strip()
    first = SENTENCE.split(text, maxsplit=1)[0] if text else ""
    facts = []
    for index, clause in enumerate(CLAUSE.split(first)):
        clause = clause.strip()
        if index == 0:
            clause = YOU_ARE.sub("", clause)
            for name in sorted((n for n in names if n), key=len, reverse=True):
                if clause.startswith(name):
                    clause = clause[len(name):]
                    break
        clause = WORK.sub("", clause).strip(" ，,、")
        if not clause or META.search(clause) or any(n and clause == n for n in names):
            continue
        facts.append(_first_person(clause, me, language))
    return tuple(facts)


def _first_person(clause: str, me: str, language: str) -> str:
    if language == "zh":
        return clause.replace("你们", "我们").replace("你", me)
    words = {"you are": "I am", "you were": "I was", "your": "my", "yours": "mine", "you": "me"}
    return re.sub(r"\b(you are|you were|yours|your|you)\b", lambda m: words[m.group(1).lower()], clause, flags=re.I)


def identity_of(character_name: str, aliases: tuple[str, ...], persona: str, own_lines: list[str],
                language: str) -> Identity:
    names = (character_name, *aliases)
    me = self_reference(own_lines, persona) if language == "zh" else "I"
    return Identity(character_name, tuple(aliases), me, persona_facts(persona, names, me, language), language)


def answers(identity: Identity, kind: str) -> list[str]:
    """Every answer the templates give this character for a question of ``kind``, each once."""
    templates = (ZH if identity.language == "zh" else EN)[kind]
    joiner = "，" if identity.language == "zh" else ", "
    facts = joiner.join(identity.facts)
    tails = [joiner + facts, ""] if facts else [""]
    rendered: list[str] = []
    for template in templates:
        if "{facts}" in template and not facts:
            continue
        for alias in (identity.aliases if "{alias}" in template else ("",)):
            for tail in (tails if "{tail}" in template else [""]):
                rendered.append(template.format(me=identity.me, name=identity.name, tail=tail, facts=facts, alias=alias))
    return list(dict.fromkeys(rendered))


def identity_pairs(character_name: str, aliases: tuple[str, ...] | list[str], persona: str, own_lines: list[str],
                   language: str, count: int, seed: int = 3407) -> list[dict]:
    """``count`` alpaca records ``{"instruction", "input": "", "output", "source": "identity"}``:
    the question bank in a seeded order, round after round, each round giving every question
    another of its answers; no (question, answer) pair twice. The same arguments give the same
    records."""
    if count <= 0:
        return []
    identity = identity_of(character_name.strip(), tuple(a.strip() for a in aliases if a.strip()), persona,
                           own_lines, language)
    rng = random.Random(f"{seed}:{identity.name}")
    order = list(QUESTIONS)
    rng.shuffle(order)
    pending = []
    for kind, question in order:
        options = answers(identity, kind)
        rng.shuffle(options)
        pending.append((question, options))
    records: list[dict] = []
    while len(records) < count:
        pending = [(q, options) for q, options in pending if options]
        if not pending:
            raise UserError(f"--identity {count}: the question bank gives {identity.name} only {len(records)} "
                            "distinct identity pairs — ask for fewer")
        for question, options in pending:
            if len(records) == count:
                break
            records.append({"instruction": question, "input": "", "output": options.pop(0), "source": SOURCE})
    return records
