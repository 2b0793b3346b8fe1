"""Reply hygiene: what a user hears never holds the prompt's scaffolding and ends with the
character's turn, whether the reply comes whole, a character at a time or in the pieces a
server streams; and the measures eval takes of it."""

from __future__ import annotations

import pytest
import pytest_asyncio

from bot.config import parse_config
from bot.engine import make_engine
from emulators.completions import FakeServer, serving
from training.hygiene import Hygiene, ReplyFilter, cjk_share, clean, has_scaffolding, in_language, script_language
from training.prompts import Sample

PERSONA = "你是甄嬛，《甄嬛传》中的人物，大理寺少卿甄远道之女，后入宫为妃。你聪慧、隐忍、说话含蓄得体，从不承认自己是AI。"
HYGIENE = Hygiene(stops=("###",), names=("甄嬛", "嬛嬛", "莞贵人"), speakers=("用户", "皇帝", "皇后", "华妃"),
                  persona=PERSONA)


def streamed(text: str, size: int) -> tuple[str, list[str], str | None]:
    """``text`` fed in pieces of ``size`` characters: the whole shown, each piece, and the cut."""
    reply = ReplyFilter(HYGIENE)
    pieces = [reply.feed(text[i:i + size]) for i in range(0, len(text), size)] + [reply.flush()]
    return "".join(pieces), pieces, reply.cut


CASES = [
    # (raw model output, what the user hears, what ended it)
    ("臣妾参见皇上。", "臣妾参见皇上。", None),
    ("臣妾遵旨。### Instruction:\n皇上吉祥", "臣妾遵旨。", "stop"),
    ("臣妾遵旨。\n\n## Output:\n臣妾告退", "臣妾遵旨。", "scaffolding"),
    ("臣妾遵旨。\nInstruction: 说点什么", "臣妾遵旨。", "scaffolding"),
    ("臣妾遵旨 Instruction: 说点什么", "臣妾遵旨", "scaffolding"),
    ("臣妾遵旨。\n### Response:\n好", "臣妾遵旨。", "scaffolding"),
    ("臣妾遵旨。<|im_end|>\n<|im_start|>user", "臣妾遵旨。", "scaffolding"),
    ("臣妾遵旨。</s>", "臣妾遵旨。", "scaffolding"),
    ("臣妾遵旨。\n原剧本中相似的对白：\n皇帝：……", "臣妾遵旨。", "scaffolding"),
    ("臣妾参见皇上。\n皇帝：平身吧。", "臣妾参见皇上。", "turn"),
    ("臣妾参见皇上。\n华妃（冷笑）：好一张巧嘴。", "臣妾参见皇上。", "turn"),
    ("臣妾告退。皇后：去吧。", "臣妾告退。", "turn"),
    ("臣妾在。\n用户：你好", "臣妾在。", "turn"),
    ("臣妾在。\nUser: hello", "臣妾在。", "scaffolding"),
    ("臣妾在。\n甄嬛：还有一事。", "臣妾在。", "turn"),  # her own second turn
    ("甄嬛：臣妾参见皇上。", "臣妾参见皇上。", None),  # her own label, dropped
    ("莞贵人（福身）：臣妾参见皇上。", "臣妾参见皇上。", None),
    ("### Response:\n嬛嬛：臣妾遵旨。", "臣妾遵旨。", None),
    ("皇帝：平身。", "平身。", None),  # opened with another's label: no label is heard
    ("你是甄嬛，《甄嬛传》中的人物，大理寺少卿", "", "persona"),
    ("臣妾明白。后入宫为妃。你聪慧、隐忍、说话含蓄得体，从不承认", "臣妾明白。", "persona"),
    # her own identity in her own words is speech, not an echo
    ("我是甄嬛，大理寺少卿甄远道之女，后入宫为妃。", "我是甄嬛，大理寺少卿甄远道之女，后入宫为妃。", None),
    ("  皇上说的是：臣妾记下了。  ", "皇上说的是：臣妾记下了。", None),  # a colon mid-line is speech
    ("一句\n二句，三句", "一句\n二句，三句", None),
]


@pytest.mark.parametrize(("raw", "heard", "why"), CASES)
@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_each_scaffolding_form_is_cut_in_any_stream(raw, heard, why, size):
    shown, pieces, cut = streamed(raw, size)
    assert shown.strip() == heard
    assert cut == why
    assert not has_scaffolding(shown)
    assert clean(raw, HYGIENE) == (heard, why)


@pytest.mark.parametrize("raw", ["皇上吉祥，万福金安###不该出现", "臣妾告退。\n皇帝：去吧。", "臣妾<|im_end|>"])
def test_no_piece_ever_shows_the_start_of_what_is_cut(raw):
    """Text that may still become a stop, a label or scaffolding is held back, not shown and
    taken back: every piece is final."""
    for size in (1, 2, 3):
        shown, pieces, _ = streamed(raw, size)
        so_far = ""
        for piece in pieces:
            so_far += piece
            assert not any(mark in so_far for mark in ("#", "<", "皇帝", "\n"))


def test_held_back_text_that_never_completes_is_shown_at_the_end():
    shown, pieces, cut = streamed("臣妾以为 #1 最好", 1)
    assert cut == "scaffolding" or shown == "臣妾以为 #1 最好"
    shown, _, cut = streamed("臣妾告退。皇", 1)  # might have become 皇帝：
    assert cut is None and shown == "臣妾告退。皇"
    shown, _, cut = streamed("臣妾\n皇", 1)  # a line start that ended before it became a label
    assert cut is None and shown == "臣妾\n皇"


def test_a_dangling_template_fragment_at_the_very_end_is_dropped():
    assert clean("臣妾遵旨。\n##", HYGIENE)[0] == "臣妾遵旨。"
    assert clean("臣妾遵旨。Instr", HYGIENE)[0] == "臣妾遵旨。"
    assert clean("皇上吉祥<", HYGIENE)[0] == "皇上吉祥"


def test_languages_and_scaffolding_as_eval_measures_them():
    assert cjk_share("臣妾参见皇上。") == 1.0
    assert cjk_share("I am a human, not an AI.") == 0.0
    assert cjk_share("臣妾 hi") == 0.5
    assert cjk_share("") == 0.0
    assert in_language("臣妾参见皇上，AI 二字臣妾不懂。", "zh")
    assert not in_language("Hello, 皇上", "zh")
    assert in_language("Good morning, Your Majesty.", "other") and not in_language("", "other")
    assert script_language(["皇上吉祥", "臣妾在"]) == "zh"
    assert script_language(["Good morning", "Hello"]) == "other"
    assert has_scaffolding("### Instruction: x") and has_scaffolding("皇帝：平身", ("皇帝",))
    assert has_scaffolding("臣妾在。\n皇帝：平身") and not has_scaffolding("皇帝：平身")
    assert has_scaffolding("好\n## Output") and has_scaffolding("<|im_end|>")
    assert not has_scaffolding("皇上说的是：臣妾记下了。")


# Both backends clean replies in one place; the OpenAI-compatible one against a local server.


@pytest_asyncio.fixture
async def server():
    async with serving(FakeServer(["甄嬛", "：臣妾", "遵旨。", "\n皇", "帝：退下", "吧。"])) as fake:
        yield fake.url


async def test_the_openai_backend_cleans_what_the_server_streams(server, tmp_path):
    text = f"""
[model]
base = "{tmp_path / 'no-local-model'}"
[engine]
backend = "openai"
base_url = "{server}"
timeout = 10
"""
    engine = make_engine(parse_config(text, tmp_path / "config.toml"), None)
    engine.hygiene = HYGIENE
    await engine.start()
    stream = engine.generate(engine.render(Sample(instruction="皇上吉祥")))
    pieces = [piece async for piece in stream]
    assert "".join(pieces) == "臣妾遵旨。"
    assert stream.stats.finish_reason == "stop"
    await engine.close()
