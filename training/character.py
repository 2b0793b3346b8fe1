"""Does a reply stay in character? Shared by ``rolebot eval``, the retrain gate and augmentation."""

from __future__ import annotations

import re

# Phrases with which a model steps out of its role: naming itself an AI, a model or an assistant.
BREAKS = re.compile(
    r"(人工智能|语言模型|大模型|AI助手|智能助手|聊天机器人|我是(一个)?(AI|助手|机器人|程序)|作为(一个)?(AI|人工智能|语言模型|助手)"
    r"|\bAI\b|\bassistant\b|language model|\bchatbot\b|OpenAI|ChatGPT|SmolLM|Hugging ?Face|\bLLM\b)",
    re.IGNORECASE,
)

# Twenty, so that one probe is 5%: "who are you" in the ways a newcomer asks it, and the ways
# they test whether it is a machine.
IDENTITY_PROBES = (
    "你是谁？", "你叫什么名字？", "请介绍一下你自己。", "你是人工智能吗？", "Who are you?",
    "你到底是什么人？", "报上名来。", "你是哪宫的主子？", "你是机器人吗？", "你是ChatGPT吗？",
    "你是不是一个程序？", "说说你自己的身世。", "我该怎么称呼你？", "你是真人吗？", "What is your name?",
    "你是AI助手吧？", "你是做什么的？", "你在宫里是什么位分？", "你是谁家的女儿？", "你可是新入宫的小主？",
)

# How a palace character refers to herself; any of these, or her name, answers "who are you".
SELF_REFERENCES = ("臣妾", "本宫", "嫔妾", "奴婢", "小女", "我是", "我乃")


def breaks_character(reply: str) -> bool:
    return bool(BREAKS.search(reply))


def answers_in_character(reply: str, names: tuple[str, ...]) -> bool:
    """An identity probe is answered in character when the reply names the character (or
    refers to herself as the role would) and does not claim to be an AI."""
    if breaks_character(reply):
        return False
    return any(name and name in reply for name in names) or any(ref in reply for ref in SELF_REFERENCES)


# Ways to say "I am X" in a palace drama and elsewhere; followed by another character's name,
# the reply has taken that character's part.
SELF_NAMING = ("我是", "我乃", "我叫", "我便是", "我就是", "本宫是", "本宫乃", "臣妾是", "嫔妾是", "奴婢是", "I am ", "I'm ")
# After the character's own name these make it a third person: "甄嬛她…", "莞贵人小主…".
THIRD_PERSON_AFTER = ("她", "他", "小主", "娘娘")
THIRD_PERSON_BEFORE = ("那个", "这个", "那位", "这位")


def role_confusion(reply: str, names: tuple[str, ...], others: tuple[str, ...]) -> bool:
    """The reply plays someone else: a line opens with another speaker of the script
    (``皇后：…``), it names itself as another (``我是华妃``), or it speaks of the character in
    the third person as someone else would (``甄嬛她…``, ``这位莞贵人``, ``莞贵人小主``).

    ``names`` are the character's; ``others`` the script's other speakers (single characters
    and names that hold one of the character's are left out: they match too much)."""
    others = tuple(o for o in others if len(o) >= 2 and not any(n and (n in o or o in n) for n in names))
    mine = "|".join(re.escape(n) for n in names if n)
    if others:
        theirs = "|".join(re.escape(o) for o in sorted(others, key=len, reverse=True))
        if re.search(rf"^\s*(?:{theirs})\s*(?:[（(][^）)\n]*[）)])?\s*[:：]", reply, re.M):
            return True
        if re.search(rf"(?:{'|'.join(map(re.escape, SELF_NAMING))})\s*(?:{theirs})", reply, re.I):
            return True
    if mine:
        after = "|".join(THIRD_PERSON_AFTER)
        before = "|".join(THIRD_PERSON_BEFORE)
        if re.search(rf"(?:{mine})(?:{after})|(?:{before})(?:{mine})", reply):
            return True
    return False
