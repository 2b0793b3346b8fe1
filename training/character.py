"""Does a reply stay in character? Shared by ``rolebot eval``, the retrain gate and augmentation."""

from __future__ import annotations

import re

# Phrases with which a model steps out of its role: naming itself an AI, a model or an assistant.
BREAKS = re.compile(
    r"(人工智能|语言模型|大模型|AI助手|智能助手|聊天机器人|我是(一个)?(AI|助手|机器人|程序)|作为(一个)?(AI|人工智能|语言模型|助手)"
    r"|\bAI\b|\bassistant\b|language model|\bchatbot\b|OpenAI|ChatGPT|SmolLM|Hugging ?Face|\bLLM\b)",
    re.IGNORECASE,
)

IDENTITY_PROBES = ("你是谁？", "你叫什么名字？", "请介绍一下你自己。", "你是人工智能吗？", "Who are you?")

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
