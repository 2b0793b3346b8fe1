"""``rolebot prepare``: the command a user runs, the files it writes and the report it prints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bot.cli import main
from training.pairs import Character, find_pairs
from training.screenplay import SAMPLE_SCRIPT, parse_script, strip_directions

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_SCRIPT = SHARED / "data" / "zhenhuan" / "甄嬛传剧本01-10.txt"
CHARACTER = ["--character", "甄嬛", "--alias", "嬛嬛", "--alias", "莞贵人"]

# Every pair of the sample script, in story order; episode 3 starts at index 29.
EXPECTED = [
    ("小主又说笑了。内务府说这儿清静，离御花园也近。",
     "清静是好事。越清静，越看得清人心。"),
    ("奴才小福子，给小主请安。碧梧轩上下六个人，都在外头候着了。",
     "起来吧。你在宫里几年了？"),
    ("回小主，七年了。先前在浣衣局当差，去年才调到这儿。",
     "七年，比我懂的规矩多。往后哪里我做得不周到，你只管提点。"),
    ("奴才不敢！小主折煞奴才了。",
     "有什么不敢的？你提点我，是帮我；我听不听，是我的事。"),
    ("小主，这些人咱们一个都不认得，真要放心用吗？",
     "青竹，你记着一句话：宫里的话，只可信三分，剩下七分要自己看。"),
    ("那小主看小福子，信几分？",
     "他进门先看了我的鞋。知道先看鞋的人，心细，也知道怕。先用着吧。"),
    ("都起来吧。新来的妹妹们住得可还习惯？",
     "谢娘娘记挂。碧梧轩窗下有梧桐，嫔妾每日听着叶声，倒像在家里一样。"),
    ("听叶声？甄常在好雅兴。只怕秋天一到，叶子落光，就没什么可听的了。",
     "叶子落了，还有枝干；枝干静了，还有来年。嫔妾不急。"),
    ("好了，容贵妃也是关心新人。甄常在，本宫听说你读过书？",
     "不过认得几个字，看过几本闲书，不敢在娘娘面前称读书。"),
    ("针线好啊，宫里正缺个缝缝补补的。",
     "贵妃娘娘说笑了。针线细密的人，心思也细密，这可是读书读不来的本事。"),
    ("甄姐姐……今日多谢你替我说话。",
     "谢什么。她笑你，是笑给所有人看的，我不过是不肯陪着笑罢了。"),
    ("可你得罪了贵妃，往后她会记着你的。",
     "她今日不记我，明日也会记别人。与其人人自危，不如站得直些。"),
    ("姐姐不怕吗？",
     "怕。所以才要两个人一起怕，一个人怕，就只剩下怕了。"),
    ("姐姐这话，真不像是在宫里说的。",
     "那就只在这亭子里说。出了亭子，你我都是规规矩矩的小主。"),
    ("小主，歇一歇吧，都写了一个时辰了。",
     "这茶是谁沏的？"),
    ("是奴婢沏的。小主尝着不对吗？",
     "水滚过了头，茶便苦。人也一样，逼得太急，说出的话就不好听。"),
    ("小主,不好了!外头都在传,说容贵妃宫里丢了一支金凤簪。",
     "丢了东西，与我们碧梧轩何干？"),
    ("说是……说是有人看见昨儿夜里，咱们这边的人在长春宫外头转悠。",
     "昨儿夜里我在御花园，和林答应在一处，亭子里的灯亮了半宿，守园的太监都看见了。"),
    ("是。",
     "去吧。"),
    ("小主，要不要先去跟皇后娘娘说一声？",
     "现在去说，倒像是心虚。等她们先开口，我们再答。"),
    ("这池子里的荷花还没开，你倒来得早。",
     "花未开时来看，才看得见它怎么开。等开满了，人人都来，就只看得见热闹了。"),
    ("这话有意思。你是哪一宫的？",
     "碧梧轩甄氏。看你的衣裳，是在御前当差的？"),
    ("算是吧。日日在御前，一刻也走不开。",
     "那可辛苦。御前的人，说一句话要想三遍，走一步路要看三回，难得今日偷闲。"),
    ("你不怕我把这话告诉皇上？",
     "皇上若连这一句体贴话都听不得，也就不必叫这样多的人日日在御前辛苦了。"),
    ("皇上，皇后娘娘请您过去用膳。",
     "嫔妾有眼无珠，冲撞了皇上，请皇上恕罪。"),
    ("起来。方才的话说得很好。",
     "嫔妾不敢"),
    ("朕说好，就是好。明日朕还来看荷花。",
     "恭送皇上。"),
    ("小主，皇上说明日还来看荷花，是不是……是不是要召小主侍寝了？",
     "皇上说来看荷花，就是来看荷花。话只听一半，心里才安稳。"),
    ("小主就一点都不欢喜？",
     "欢喜。可欢喜得太早，就像这灯芯挑得太高，烧得亮，也烧得快。"),
    ("人赃并获，簪子就是在你碧梧轩宫女的枕头底下搜出来的，你还有什么话说？",
     "嫔妾只有一问：簪子是几时丢的？"),
    ("前日夜里。",
     "前日夜里，嫔妾宫里的人全在御花园伺候，守园太监和林答应都可作证。一个人分不成两半，一半在御花园掌灯，一半去长春宫偷簪子。"),
    ("你们姐妹情深，自然互相遮掩。",
     "娘娘若不信嫔妾，也该信这支簪子。请娘娘看簪尾。"),
    ("簪尾有一道新磨的痕迹。",
     "御赐的金凤簪，簪尾都刻着各宫的字号。偷簪子的人若只想藏起来，何必磨去字号？除非有人原本就想让人以为，这簪子是从别处来的。"),
    ("你血口喷人！",
     "嫔妾不敢。嫔妾只说簪子，不说人。是谁磨的，娘娘宫里的人最清楚。"),
    ("簪子的事，朕都听说了。你倒沉得住气。",
     "嫔妾不是沉得住气，是知道急也没有用。急了，话就多；话多了，破绽就多。"),
    ("朕今日晋你为贵人，封号为“莞”，莞尔的莞。朕喜欢你说话时那三分笑意。",
     "嫔妾谢皇上恩典。只是嫔妾怕这个“莞”字，往后不是笑出来的，是被人看出来的。"),
    ("有朕在，谁敢多看你一眼？",
     "皇上在前朝看的是天下，后宫的眼睛，皇上看不过来，嫔妾自己看着便是。"),
    ("嬛嬛，你呀。",
     "皇上叫嫔妾什么？"),
    ("嬛嬛。往后没有旁人的时候，朕就这样叫你。",
     "那嬛嬛也有一个请求：皇上往后来碧梧轩，别再扮成御前当差的人了。"),
    ("给莞贵人道喜！",
     "快别这样。你叫我一声姐姐，比叫多少声贵人都好听。"),
    ("姐姐如今升了位分，容贵妃只怕更恨你了。",
     "恨我的人，不会因为我低头就少恨一分，那我又何必低头。"),
    ("小主，内务府送来了贵人的份例，还有两匹云锦。",
     "一匹送去林答应那里，另一匹留着，给你和小福子各做一身新衣裳。"),
    ("这怎么使得！",
     "使得。那天夜里一个一个去问话，你们谁也没有慌。这份稳当，值两身衣裳。"),
    ("姐姐，往后的路还长着呢。",
     "路长才好。路长，就有地方种梧桐，也有地方等荷花。"),
]
EPISODE_3 = 29


def prepare(*args: object) -> int:
    return main(["prepare", *map(str, args)])


def load(path: Path) -> list:
    return json.loads(path.read_text(encoding="utf-8"))


# The identity pairs prepare adds to the sample script's training file by default (--identity 32
# at most, one per 12 script pairs, at least 4), after the script's pairs; tests/test_identity.py
# checks them.
IDENTITY = 4


def script_pairs(path: Path) -> list:
    """The training file's records made from the script: all but the identity pairs."""
    return [r for r in load(path) if r.get("source") != "identity"]


def alpaca(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"instruction": i, "input": "", "output": o} for i, o in pairs]


def test_the_sample_script_gives_the_expected_pairs_and_report(tmp_path, capsys):
    output = tmp_path / "data" / "huanhuan.json"
    assert prepare(SAMPLE_SCRIPT, *CHARACTER, "--output", output) == 0
    records = load(output)
    assert records[:len(EXPECTED)] == alpaca(EXPECTED)
    assert [r["source"] for r in records[len(EXPECTED):]] == ["identity"] * IDENTITY
    report = capsys.readouterr().out
    assert "3 episodes · 11 scenes · 107 dialogue turns · 49 by 甄嬛 (嬛嬛, 莞贵人)" in report
    assert f"Wrote 48 pairs (alpaca):\n      48  {output}\n" in report
    assert "Added 4 identity pairs to the training file, its last records (source: identity; " \
           "--identity 0 for none)" in report
    for count, reason in [(2, "first line of a scene"), (1, "previous line is the same speaker"),
                          (1, "exact duplicate of an earlier pair"),
                          (1, "reply shorter than 2 characters"),
                          (1, "spoken together with others under a group name")]:
        assert re.search(rf"^ +{count}  {re.escape(reason)}", report, re.M), reason
    assert "Top interlocutors (whose lines 甄嬛 answers):\n      11  皇帝\n      10  青竹" in report


def test_val_episodes_hold_out_the_last_episodes_in_story_order(tmp_path, capsys):
    output = tmp_path / "huanhuan.json"
    assert prepare(SAMPLE_SCRIPT, *CHARACTER, "--output", output, "--val-episodes", 1) == 0
    assert script_pairs(output) == alpaca(EXPECTED[:EPISODE_3])
    assert load(tmp_path / "huanhuan.val.json") == alpaca(EXPECTED[EPISODE_3:])
    assert "huanhuan.val.json  validation: episode(s) 3" in capsys.readouterr().out


def test_history_goes_into_input_with_the_character_under_one_name(tmp_path):
    output = tmp_path / "huanhuan.json"
    assert prepare(SAMPLE_SCRIPT, *CHARACTER, "--output", output, "--history", 2) == 0
    by_output = {r["output"]: r for r in load(output)}
    assert by_output["叶子落了，还有枝干；枝干静了，还有来年。嫔妾不急。"]["input"] == (
        "皇后：都起来吧。新来的妹妹们住得可还习惯？\n"
        "甄嬛：谢娘娘记挂。碧梧轩窗下有梧桐，嫔妾每日听着叶声，倒像在家里一样。")
    # The script calls her 莞贵人 after the promotion; the data calls her 甄嬛 throughout.
    record = by_output["那嬛嬛也有一个请求：皇上往后来碧梧轩，别再扮成御前当差的人了。"]
    assert record["input"] == "皇帝：嬛嬛，你呀。\n甄嬛：皇上叫嫔妾什么？"
    assert record["instruction"] == "嬛嬛。往后没有旁人的时候，朕就这样叫你。"


def test_sharegpt_keeps_history_as_turns(tmp_path):
    output = tmp_path / "huanhuan.json"
    assert prepare(SAMPLE_SCRIPT, *CHARACTER, "--output", output, "--format", "sharegpt",
                   "--history", 2) == 0
    records = load(output)
    # Two "是。" → "去吧。" exchanges differ once their history is kept: both stay.
    assert len(records) == len(EXPECTED) + 1 + IDENTITY
    assert records[7]["conversations"] == [
        {"from": "human", "value": "都起来吧。新来的妹妹们住得可还习惯？"},
        {"from": "gpt",
         "value": "谢娘娘记挂。碧梧轩窗下有梧桐，嫔妾每日听着叶声，倒像在家里一样。"},
        {"from": "human",
         "value": "听叶声？甄常在好雅兴。只怕秋天一到，叶子落光，就没什么可听的了。"},
        {"from": "gpt", "value": "叶子落了，还有枝干；枝干静了，还有来年。嫔妾不急。"},
    ]


def test_jsonl_writes_one_messages_object_a_line_starting_with_the_user(tmp_path):
    output = tmp_path / "huanhuan.jsonl"
    assert prepare(SAMPLE_SCRIPT, *CHARACTER, "--output", output, "--format", "jsonl",
                   "--history", 3) == 0
    lines = output.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(EXPECTED) + 1 + IDENTITY
    # The scene opens with 甄嬛's own line: a chat sample cannot start with the assistant.
    assert json.loads(lines[0]) == {"messages": [
        {"role": "user", "content": EXPECTED[0][0]},
        {"role": "assistant", "content": EXPECTED[0][1]}]}


def test_length_filters_apply_to_the_reply(tmp_path, capsys):
    output = tmp_path / "huanhuan.json"
    assert prepare(SAMPLE_SCRIPT, *CHARACTER, "--output", output, "--min-chars", 1) == 0
    assert {"instruction": "那奴婢把灯芯剪短些。", "input": "", "output": "嗯"} in load(output)
    assert len(script_pairs(output)) == len(EXPECTED) + 1
    capsys.readouterr()
    assert prepare(SAMPLE_SCRIPT, *CHARACTER, "--output", output, "--max-chars", 10) == 0
    assert script_pairs(output) == alpaca([(i, o) for i, o in EXPECTED if len(o) <= 10])
    assert re.search(r"^ +\d+  reply longer than 10 characters$", capsys.readouterr().out, re.M)


def test_several_scripts_are_one_story_in_the_order_given(tmp_path):
    text = SAMPLE_SCRIPT.read_text(encoding="utf-8")
    cut = text.index("第三集")
    (tmp_path / "ep01-02.txt").write_text(text[:cut], encoding="utf-8")
    (tmp_path / "ep03.txt").write_text(text[cut:], encoding="gbk")
    output = tmp_path / "huanhuan.json"
    assert prepare(tmp_path / "ep01-02.txt", tmp_path / "ep03.txt", *CHARACTER,
                   "--output", output, "--val-episodes", 1) == 0
    assert script_pairs(output) == alpaca(EXPECTED[:EPISODE_3])
    assert load(tmp_path / "huanhuan.val.json") == alpaca(EXPECTED[EPISODE_3:])


def test_a_line_without_a_speaker_is_reported_not_guessed(tmp_path, capsys):
    script = tmp_path / "script.txt"
    script.write_text("第一集\n第1幕\n青竹：小主。\n甄嬛：嗯，进来。\n青竹：茶来了。\n"
                      "这茶真香啊。\n甄嬛：是新茶。\n", encoding="utf-8")
    output = tmp_path / "out.json"
    assert prepare(script, *CHARACTER, "--output", output) == 0
    assert script_pairs(output) == alpaca([("小主。", "嗯，进来。")])
    report = capsys.readouterr().out
    assert f"1 spoken line(s) name no speaker and were not used: {script}:6" in report
    assert re.search(r"^ +1  previous line has no speaker$", report, re.M)


@pytest.mark.parametrize(("encoding", "newline"), [
    ("utf-8-sig", "\n"), ("utf-8", "\r\n"), ("gbk", "\r\n"), ("utf-16", "\r\n"),
    ("utf-16-le", "\n")])
def test_every_encoding_gives_the_same_dataset(tmp_path, encoding, newline):
    script = tmp_path / "script.txt"
    text = SAMPLE_SCRIPT.read_text(encoding="utf-8").replace("\n", newline)
    script.write_bytes(text.encode(encoding))
    assert prepare(script, *CHARACTER, "--output", tmp_path / "out.json") == 0
    assert script_pairs(tmp_path / "out.json") == alpaca(EXPECTED)


# --- bad input: one line on stderr, exit 2, nothing written ---------------------------

def fails(capsys, tmp_path: Path, *args: object) -> str:
    """Run prepare expecting a user error; return its one line."""
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert prepare(*args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("rolebot: error: ") and captured.err.count("\n") == 1
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "a failed run must leave the files as they were"
    return captured.err


def test_a_missing_script(tmp_path, capsys):
    err = fails(capsys, tmp_path, tmp_path / "missing.txt", *CHARACTER, "--output",
                tmp_path / "out.json")
    assert "missing.txt: no such file — check the path" in err


def test_a_folder_instead_of_a_script(tmp_path, capsys):
    err = fails(capsys, tmp_path, tmp_path, *CHARACTER, "--output", tmp_path / "out.json")
    assert "is a folder, not a script" in err


def test_undecodable_bytes(tmp_path, capsys):
    script = tmp_path / "script.txt"
    script.write_bytes(SAMPLE_SCRIPT.read_bytes() + b"\xff\xfe\xfa\n")
    last = SAMPLE_SCRIPT.read_bytes().count(b"\n") + 1
    err = fails(capsys, tmp_path, script, *CHARACTER, "--output", tmp_path / "out.json")
    assert f"script.txt:{last}: bytes 0xff" in err and "re-save the script as UTF-8" in err


def test_a_character_nobody_plays_suggests_close_names(tmp_path, capsys):
    output = tmp_path / "out.json"
    output.write_text("[]\n", encoding="utf-8")  # an earlier dataset survives the failure
    err = fails(capsys, tmp_path, SAMPLE_SCRIPT, "--character", "甄环", "--output", output)
    assert "no line is spoken by 甄环 — speakers with close names: 甄嬛" in err
    assert "pass one as --character or --alias" in err
    err = fails(capsys, tmp_path, SAMPLE_SCRIPT, "--character", "Bob", "--output", output)
    assert "no line is spoken by Bob — the main speakers are 甄嬛、青竹、皇帝" in err


def test_a_script_without_dialogue(tmp_path, capsys):
    script = tmp_path / "notes.txt"
    script.write_text("第一集\n第1幕\n（空无一人的大殿）\n", encoding="utf-8")
    err = fails(capsys, tmp_path, script, *CHARACTER, "--output", tmp_path / "out.json")
    assert "no dialogue lines found" in err


def test_filters_that_leave_nothing(tmp_path, capsys):
    err = fails(capsys, tmp_path, SAMPLE_SCRIPT, *CHARACTER, "--output",
                tmp_path / "out.json", "--min-chars", 1000)
    assert "none of 甄嬛's lines made a pair" in err and "lower --min-chars" in err


def test_holding_out_every_episode(tmp_path, capsys):
    err = fails(capsys, tmp_path, SAMPLE_SCRIPT, *CHARACTER, "--output",
                tmp_path / "out.json", "--val-episodes", 3)
    assert "--val-episodes 3: the scripts have only 3 episode(s)" in err


def test_an_output_path_that_cannot_be_written(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder", encoding="utf-8")
    err = fails(capsys, tmp_path, SAMPLE_SCRIPT, *CHARACTER, "--output",
                tmp_path / "afile" / "out.json", "--val-episodes", 1)
    assert "cannot write" in err and "choose a writable --output path" in err


def test_a_negative_count_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        prepare(SAMPLE_SCRIPT, *CHARACTER, "--output", tmp_path / "o.json", "--history", "-1")
    assert exit_.value.code == 2
    assert "'-1' is not a whole number ≥ 0" in capsys.readouterr().err


# --- the real script ------------------------------------------------------------------

needs_shared = pytest.mark.skipif(not REAL_SCRIPT.exists(), reason="needs ../shared/data/zhenhuan/甄嬛传剧本01-10.txt beside the checkout")
NAIVE = re.compile(r"(.+?)：(.+)")
WITH_ACTION = re.compile(r"([^（：]+)(（[^）]*）)?：(.+)")


def naive_pairs(path: Path, character: str) -> list[tuple[int, int, str, str]]:
    """The tutorial's rule: two adjacent 「X：…」 lines, the second the character's."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    pairs = []
    for number in range(2, len(lines) + 1):
        before, line = NAIVE.fullmatch(lines[number - 2]), NAIVE.fullmatch(lines[number - 1])
        if before and line and line[1] == character and before[1] != character:
            pairs.append((number - 1, number, before[2], line[2]))
    return pairs


@needs_shared
def test_every_naive_pair_of_the_real_script_is_found():
    naive = naive_pairs(REAL_SCRIPT, "甄嬛")
    pairs, _ = find_pairs(parse_script(REAL_SCRIPT), Character("甄嬛", ("嬛嬛", "莞贵人")))
    found = {(p.prompt.line, p.reply.line): p for p in pairs}
    assert len(naive) == 473 and len(found) == 532
    for before, line, prompt, reply in naive:
        pair = found[(before, line)]
        # rolebot's texts lack stage directions, and an aside splits a line in two
        assert pair.prompt.text in strip_directions(prompt)
        assert pair.reply.text in strip_directions(reply)


@needs_shared
def test_the_real_scripts_lines_with_an_action_are_found():
    lines = [line.strip() for line in REAL_SCRIPT.read_text(encoding="utf-8-sig").splitlines()]
    pairs, _ = find_pairs(parse_script(REAL_SCRIPT), Character("甄嬛"))
    replies = {p.reply.line for p in pairs}
    acted = []
    for number in range(2, len(lines) + 1):
        before = WITH_ACTION.fullmatch(lines[number - 2])
        line = WITH_ACTION.fullmatch(lines[number - 1])
        if before and line and line[1] == "甄嬛" and line[2] and before[1] != "甄嬛":
            acted.append(number)
    assert len(acted) == 28
    assert [n for n in acted if n not in replies] == []


@needs_shared
def test_the_report_for_the_real_script(tmp_path, capsys):
    output = tmp_path / "huanhuan.json"
    assert prepare(REAL_SCRIPT, *CHARACTER, "--output", output, "--val-episodes", 1) == 0
    report = capsys.readouterr().out
    assert "10 episodes · 213 scenes · 2891 dialogue turns · 559 by 甄嬛" in report
    assert f"     488  {output}\n      76  {tmp_path / 'huanhuan.val.json'}" in report  # 456 + 32 identity
    # The tutorial's own three examples open the dataset.
    assert load(output)[:3] == alpaca([
        ("小姐，别的秀女都在求中选，唯有咱们小姐想被撂牌子，菩萨一定记得真真儿的——",
         "嘘——都说许愿说破是不灵的。"),
        ("这个温太医啊，也是古怪，谁不知太医不得皇命不能为皇族以外的人请脉诊病，"
         "他倒好，十天半月便往咱们府里跑。",
         "你们俩话太多了，我该和温太医要一剂药，好好治治你们。"),
        ("嬛妹妹，刚刚我去府上请脉，听甄伯母说你来这里进香了。", "出来走走，也是散心。"),
    ])
