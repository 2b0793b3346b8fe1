"""Reading screenplays: line shapes, typos real scripts have, and every encoding users send."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from training.errors import UserError
from training.screenplay import SAMPLE_SCRIPT, chinese_number, parse_script

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_SCRIPT = SHARED / "data" / "zhenhuan" / "甄嬛传剧本01-10.txt"

SHAPES = """\
第七十一集
第1104幕（续）
（旁白：三日后。）
（长春宫。众人侍立）
皇后：都起来吧。
甄嬛（笑）：娘娘说得是：臣妾记下了。（行礼）
小福子(跑进来):小主,不好了!
甄嬛；慢些说。
有人；这一行没人认得。
朕今日过来，是有个打算想告诉你：你学着管家。
（叹气）青竹：是。
林答应：姐姐！（甄嬛：妹妹）你的手好凉。
旁白：此事就此作罢。
第2幕：
青竹：（点头）
"""


def parse(tmp_path: Path, text: str, encoding: str = "utf-8") -> list:
    path = tmp_path / "script.txt"
    path.write_bytes(text.encode(encoding))
    return parse_script(path)


def test_every_line_shape_becomes_the_right_turn(tmp_path):
    turns = parse(tmp_path, SHAPES)
    got = [(t.line, t.kind, t.speaker, t.action, t.text) for t in turns]
    assert got == [
        (3, "narration", "旁白", "", "三日后。"),
        (4, "direction", "", "", "长春宫。众人侍立"),
        (5, "dialogue", "皇后", "", "都起来吧。"),
        # the action is kept apart, the colon inside the text does not cut it
        (6, "dialogue", "甄嬛", "笑", "娘娘说得是：臣妾记下了。"),
        (7, "dialogue", "小福子", "跑进来", "小主,不好了!"),
        # a semicolon for the colon is trusted only for a name seen with a colon
        (8, "dialogue", "甄嬛", "", "慢些说。"),
        (9, "unattributed", "", "", "有人；这一行没人认得。"),
        (10, "unattributed", "", "", "朕今日过来，是有个打算想告诉你：你学着管家。"),
        (11, "dialogue", "青竹", "", "是。"),
        # an aside in parentheses is its own turn
        (12, "dialogue", "林答应", "", "姐姐！"),
        (12, "dialogue", "甄嬛", "", "妹妹"),
        (12, "dialogue", "林答应", "", "你的手好凉。"),
        (13, "narration", "旁白", "", "此事就此作罢。"),
        (15, "dialogue", "青竹", "", ""),
    ]
    assert {(t.episode, t.scene_label) for t in turns[:13]} == {(71, "第1104幕（续）")}
    assert (turns[-1].episode, turns[-1].scene_label) == (71, "第2幕")
    assert turns[-1].scene == turns[0].scene + 1


@pytest.mark.parametrize(("digits", "number"), [
    ("一", 1), ("十", 10), ("十二", 12), ("二十", 20), ("七十一", 71), ("一百零五", 105),
    ("两百", 200), ("12", 12), ("１２", 12)])
def test_episode_numbers_in_chinese_and_digits(digits, number):
    assert chinese_number(digits) == number


def test_sample_script_has_three_episodes_and_a_continued_scene():
    turns = parse_script(SAMPLE_SCRIPT)
    assert sorted({t.episode for t in turns}) == [1, 2, 3]
    labels = list(dict.fromkeys(t.scene_label for t in turns))
    assert labels == [f"第{n}幕" for n in range(1, 9)] + ["第7幕（续）", "第9幕", "第10幕"]
    speakers = {t.speaker for t in turns if t.kind == "dialogue"}
    assert {"甄嬛", "莞贵人", "皇帝", "青竹", "林答应"} <= speakers
    assert sum(t.speaker in ("甄嬛", "莞贵人") for t in turns) >= 40


@pytest.mark.parametrize("encoding", [
    "utf-8", "utf-8-sig", "gbk", "gb18030", "utf-16", "utf-16-le", "utf-16-be"])
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_every_encoding_and_line_ending_reads_the_same(tmp_path, encoding, newline):
    text = SAMPLE_SCRIPT.read_text(encoding="utf-8")
    expected = [replace(t, file="") for t in parse_script(SAMPLE_SCRIPT)]
    turns = parse(tmp_path, text.replace("\n", newline), encoding)
    assert [replace(t, file="") for t in turns] == expected


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "broken.txt"
    path.write_bytes("第一集\n甄嬛：好。\n".encode() + b"\xff\xfe\xfa oops\n")
    with pytest.raises(UserError, match=r"broken\.txt:3: bytes 0xff .* re-save the script as"):
        parse_script(path)


def test_a_damaged_utf8_file_is_not_misread_as_gbk(tmp_path):
    data = SAMPLE_SCRIPT.read_bytes()
    cut = data.index("嫔妾不急".encode())  # on line 26
    path = tmp_path / "damaged.txt"
    path.write_bytes(data[:cut] + data[cut + 1:])  # a character loses its first byte
    with pytest.raises(UserError, match=r"damaged\.txt:26: bytes 0xab .* not valid UTF-8 — "):
        parse_script(path)


def test_a_missing_script_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"nope\.txt: no such file — check the path"):
        parse_script(tmp_path / "nope.txt")


@pytest.mark.skipif(not REAL_SCRIPT.exists(), reason="needs ../shared/data/zhenhuan/甄嬛传剧本01-10.txt beside the checkout")
def test_the_real_script_reads_every_line():
    turns = parse_script(REAL_SCRIPT)
    assert sorted({t.episode for t in turns}) == list(range(1, 11))
    assert len({t.scene for t in turns}) == 213
    # Three lines in episodes 1–10 name no speaker; guessing one would make wrong pairs.
    assert [t.line for t in turns if t.kind == "unattributed"] == [867, 1245, 1500]
    semicolon = next(t for t in turns if t.line == 1041)
    assert (semicolon.speaker, semicolon.text) == ("甄嬛", "我过去看看。")
