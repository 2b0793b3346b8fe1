"""``rolebot prepare`` on novels: detection, the rule pass, and the LLM pass against a scripted
OpenAI-compatible server (validation, retries, cache and resume, dry run, errors) and against a
real ``rolebot serve`` on the builtin model."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.cli import main
from emulators.chat import FakeLLM, Reply, llm  # noqa: F401 (llm is a fixture)
from training.novel import SAMPLE_NOVEL, detect, read_novel
from training.novel_llm import parse_items
from training.screenplay import SAMPLE_SCRIPT, read_script_text

CHECK_SET = Path(__file__).parent / "data" / "novel_check.jsonl"
CHARACTER = ["--character", "甄嬛", "--alias", "嬛嬛", "--alias", "莞贵人", "--alias", "甄常在"]

# Two chapters; three lines the rule pass cannot attribute (有人…道, 那宫女…, a bare reply).
NOVEL = """第一章　雨夜

雨下了一夜，碧梧轩的灯一直亮着。小福子在门外守着。

青竹端了茶进来，轻声道：“小主，该歇了。”

“再等等。”我说，“皇上说过今夜会来。”

门外忽然有人高声道：“皇上驾到——”

我忙起身迎了出去：“臣妾恭迎皇上。”

皇上扶起我，笑道：“嬛嬛，朕说过的话，几时不算数？”

第二章　晨起

那宫女福了福身：「娘娘请小主过去。」

青竹替莞贵人理好衣襟。莞贵人淡淡地问：「哪位娘娘？」

「回小主，是皇后娘娘。」

「知道了。」
"""


def speakers(text: str, names=("甄嬛", "嬛嬛", "莞贵人"), narrator="甄嬛") -> list[tuple[str, str]]:
    return [(q.text, q.speaker) for q in read_novel(text, "novel.txt", names, narrator).lines]


def prepare(tmp_path: Path, source: Path, *extra: str) -> int:
    return main(["--config", str(tmp_path / "config.toml"), "prepare", str(source), *CHARACTER,
                 "--output", str(tmp_path / "out" / "pairs.json"), *extra])


@pytest.fixture
def novel(tmp_path: Path) -> Path:
    (tmp_path / "config.toml").write_text("[console]\nenabled = false\n", encoding="utf-8")
    path = tmp_path / "novel.txt"
    path.write_text(NOVEL, encoding="utf-8")
    return path


def pairs(tmp_path: Path) -> list[dict]:
    """The pairs the file's dialogue made: the identity pairs prepare adds after them left out."""
    return [p for p in written(tmp_path) if p.get("source") != "identity"]


def written(tmp_path: Path) -> list[dict]:
    return json.loads((tmp_path / "out" / "pairs.json").read_text(encoding="utf-8"))


# Detection and encodings


def test_a_novel_and_a_screenplay_are_told_apart_and_the_report_says_which(tmp_path, capsys):
    assert detect(read_script_text(SAMPLE_NOVEL)).kind == "novel"
    assert detect(read_script_text(SAMPLE_SCRIPT)).kind == "script"
    (tmp_path / "config.toml").write_text("", encoding="utf-8")
    assert prepare(tmp_path, SAMPLE_NOVEL) == 0
    out = capsys.readouterr().out
    assert f"{SAMPLE_NOVEL}: read as a novel (301 quoted passages, 0 「名字：台词」 lines" in out
    assert "first-person narration: 我 is 甄嬛" in out
    assert prepare(tmp_path, SAMPLE_SCRIPT) == 0
    assert f"{SAMPLE_SCRIPT}: read as a screenplay" in capsys.readouterr().out


def test_a_screenplay_that_quotes_its_lines_is_still_a_screenplay():
    assert detect("甄嬛：“臣妾告退。”\n皇后：“去吧。”\n").kind == "script"
    assert detect("甄嬛笑道：“臣妾告退。”\n皇后道：“去吧。”\n").kind == "novel"


def test_from_novel_reads_a_file_as_a_novel_whatever_it_looks_like(tmp_path, capsys):
    (tmp_path / "config.toml").write_text("", encoding="utf-8")
    script_like = tmp_path / "short.txt"
    script_like.write_text("第一章\n青竹：小主。\n甄嬛：嗯。\n青竹问：“小主在想什么？”\n我笑道：“想你。”\n",
                           encoding="utf-8")
    assert prepare(tmp_path, script_like, "--from", "novel") == 0
    out = capsys.readouterr().out
    assert "read as a novel (--from novel)" in out
    assert pairs(tmp_path)[0] == {"instruction": "小主在想什么？", "input": "", "output": "想你。",
                                  "source": "novel", "chapter": "第一章"}


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "gbk", "gb18030"])
def test_every_encoding_gives_the_same_pairs(tmp_path, capsys, encoding):
    (tmp_path / "config.toml").write_text("", encoding="utf-8")
    path = tmp_path / "novel.txt"
    path.write_bytes(SAMPLE_NOVEL.read_text(encoding="utf-8").replace("\n", "\r\n").encode(encoding))
    assert prepare(tmp_path, path) == 0
    expected_dir = tmp_path / "expected"
    assert main(["--config", str(tmp_path / "config.toml"), "prepare", str(SAMPLE_NOVEL), *CHARACTER,
                 "--output", str(expected_dir / "pairs.json")]) == 0
    assert written(tmp_path) == json.loads((expected_dir / "pairs.json").read_text(encoding="utf-8"))


# The rule pass


def test_attribution_before_after_split_and_action_beats():
    text = ("第一章\n"
            "皇后含笑道：“都起来吧。”\n"
            "“嘴倒是伶俐。”容贵妃冷笑道。\n"
            "“好了，”皇后道，“贵妃也是关心新人。”\n"
            "“臣妾告退。”容贵妃站起来，敷衍地行了个礼。\n"
            "林答应红了脸。\n"
            "林答应攥着帕子，半晌才道：“姐姐……”\n")  # a name the text holds twice is learned
    assert speakers(text) == [("都起来吧。", "皇后"), ("嘴倒是伶俐。", "容贵妃"), ("好了，", "皇后"),
                              ("贵妃也是关心新人。", "皇后"), ("臣妾告退。", "容贵妃"), ("姐姐……", "林答应")]


def test_pronouns_are_the_last_named_person_of_their_gender_and_我_the_narrator():
    text = ("第一章\n"
            "青竹道：“奴婢这就去。”\n"
            "皇上笑道：“朕也去。”\n"
            "她抿嘴一笑：“皇上说笑了。”\n"
            "他摆摆手：“去吧。”\n"
            "我笑道：“你们都去，我一个人看家。”\n")
    assert speakers(text, narrator="甄嬛") == [
        ("奴婢这就去。", "青竹"), ("朕也去。", "皇上"), ("皇上说笑了。", "青竹"), ("去吧。", "皇上"),
        ("你们都去，我一个人看家。", "甄嬛")]


def test_turn_taking_and_the_addressee_give_bare_lines_a_speaker():
    text = ("第一章\n"
            "青竹问：“小主，信几分？”\n"
            "“三分。”我说。\n"
            "“只三分？”\n"
            "“剩下七分要自己看。”\n"
            "温实初说：“甄常在，请伸手。”\n"
            "“有劳温太医。”\n")
    assert speakers(text, names=("甄嬛", "甄常在")) == [
        ("小主，信几分？", "青竹"), ("三分。", "甄嬛"), ("只三分？", "青竹"), ("剩下七分要自己看。", "甄嬛"),
        ("甄常在，请伸手。", "温实初"), ("有劳温太医。", "甄常在")]


def test_a_time_before_the_subject_is_not_a_stranger():
    text = ("第一章\n温实初道：“微臣告退。”\n皇上道：“朕不送了。”\n"
            "那天晚上，温实初又来了。诊完了脉，他收拾药箱，说了一句：“药要趁热喝。”\n")
    assert speakers(text)[-1] == ("药要趁热喝。", "温实初")


def test_a_speech_over_several_paragraphs_is_one_speakers_line(tmp_path, capsys):
    (tmp_path / "config.toml").write_text("", encoding="utf-8")
    path = tmp_path / "speech.txt"
    path.write_text("第一章\n青竹道：“小主，奴婢有一事要说。”\n"
                    "我叹道：“你听着。入宫那年，我才十五岁，什么都不懂。\n"
                    "“后来才明白，这宫里的话，只可信三分。\n"
                    "“剩下七分，要自己看。”\n"
                    "“奴婢记下了。”\n", encoding="utf-8")
    assert [s for _, s in speakers(path.read_text(encoding="utf-8"))] == ["青竹", "甄嬛", "甄嬛", "甄嬛", "青竹"]
    assert prepare(tmp_path, path) == 0
    assert [p["output"] for p in pairs(tmp_path)] == [
        "你听着。入宫那年，我才十五岁，什么都不懂。后来才明白，这宫里的话，只可信三分。剩下七分，要自己看。"]


def test_a_line_calling_out_a_name_is_not_that_persons():
    text = "第一章\n皇上看了看天色。\n“皇上，时辰不早了。”皇上身后的人道。\n"
    assert speakers(text, names=("皇上",)) == [("皇上，时辰不早了。", "")]


def test_nested_quotes_stay_inside_the_line_and_quoted_names_are_not_lines():
    text = ("第一章\n"
            "匾额上写着“碧梧轩”三个字。\n"
            "小福子笑嘻嘻地说：“这一招，叫作‘闷声发大财’。”\n"
            "林答应道：「我娘说『进了宫，谁也不能信』，可我信你。」\n"
            '青竹说："小主，用膳吧。"\n')
    assert speakers(text) == [("这一招，叫作‘闷声发大财’。", "小福子"),
                              ("我娘说『进了宫，谁也不能信』，可我信你。", "林答应"), ("小主，用膳吧。", "青竹")]


def test_strangers_and_titles_are_left_unknown_rather_than_guessed():
    text = "第一章\n门外有人高声道：“皇上驾到——”\n那宫女福了福身：「娘娘请小主过去。」\n娘娘冷冷地道：“退下。”\n"
    assert speakers(text) == [("皇上驾到——", ""), ("娘娘请小主过去。", ""), ("退下。", "")]


def test_aliases_are_the_character_and_the_report_counts_the_unknown(novel, tmp_path, capsys):
    assert prepare(novel.parent, novel) == 0
    out = capsys.readouterr().out
    assert "2 chapters · rule pass: 6 of 10 quoted lines attributed, 4 unknown" in out
    assert "3 by 甄嬛 (嬛嬛, 莞贵人, 甄常在)" in out  # 莞贵人's line is hers
    # A line after an unknown one makes no pair: it may have been her own.
    assert [(p["instruction"], p["output"]) for p in pairs(tmp_path)] == [("小主，该歇了。", "再等等。皇上说过今夜会来。")]
    assert "previous line has no speaker" in out


def test_the_sample_novel_meets_its_check_set():
    """The rule pass on the sample novel against the 200 hand-checked lines (bench/novel.py
    prints the same numbers): what it attributes is mostly right."""
    names = ("甄嬛", "嬛嬛", "莞贵人", "甄常在")
    novel = read_novel(read_script_text(SAMPLE_NOVEL), str(SAMPLE_NOVEL), names, "甄嬛")
    found = {(q.chapter_label, q.text): q.speaker for q in novel.lines}
    check = [json.loads(line) for line in CHECK_SET.read_text(encoding="utf-8").splitlines()]
    assert len(check) == 200 and all((c["chapter"], c["line"]) in found for c in check)
    said = [(found[(c["chapter"], c["line"])], c["speaker"]) for c in check if found[(c["chapter"], c["line"])]]
    right = sum(("甄嬛" if got in names else got) == truth for got, truth in said)
    assert len(said) >= 150 and right / len(said) >= 0.9, (len(said), right)


def test_chapters_are_episodes_for_val_episodes(tmp_path, capsys):
    (tmp_path / "config.toml").write_text("", encoding="utf-8")
    assert prepare(tmp_path, SAMPLE_NOVEL, "--val-episodes", "1") == 0
    out = capsys.readouterr().out
    assert "validation: chapter(s) 9" in out
    val = json.loads((tmp_path / "out" / "pairs.val.json").read_text(encoding="utf-8"))
    assert {p["chapter"] for p in val} == {"第九章　归春"}
    assert "第九章　归春" not in {p["chapter"] for p in pairs(tmp_path)}
    from training.pairs import identity_count

    # and the identity pairs, in training only
    assert len(written(tmp_path)) == len(pairs(tmp_path)) + identity_count(None, len(pairs(tmp_path)))
    canon = [json.loads(line) for line in (tmp_path / "out" / "pairs.canon.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(canon) == len(pairs(tmp_path)) and canon[0]["scene_label"] == "第一章　梧桐"


def test_a_novel_without_the_characters_lines_suggests_the_llm(tmp_path, capsys):
    (tmp_path / "config.toml").write_text("", encoding="utf-8")
    path = tmp_path / "novel.txt"
    path.write_text("第一章\n有人道：“谁？”\n青竹道：“是我。”\n", encoding="utf-8")
    assert prepare(tmp_path, path) == 2
    err = capsys.readouterr().err
    assert "no line is spoken by 甄嬛" in err and "1 quoted lines have no speaker yet: --llm" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# The LLM pass against the scripted server


def answer(*items: tuple[str, str]) -> str:
    return json.dumps({"lines": [{"speaker": s, "line": line, "addressee": ""} for s, line in items]},
                      ensure_ascii=False)


def good_answer(prompt: str) -> Reply:
    if "雨夜" in prompt:
        return Reply(answer(("小福子", "皇上驾到——"), ("青竹", "小主，该歇了。")))
    return Reply(answer(("宫女", "娘娘请小主过去。"), ("青竹", "回小主，是皇后娘娘。"), ("甄嬛", "知道了。")))


@pytest.mark.parametrize("text, expected", [
    ('{"lines": [{"speaker": "青竹", "line": "是。", "addressee": ""}]}', [{"speaker": "青竹", "line": "是。", "addressee": ""}]),
    ('```json\n[{"speaker": "青竹", "line": "是。"}]\n```', [{"speaker": "青竹", "line": "是。"}]),
    # Cut off by the token limit: the complete items survive.
    ('```json\n{"lines": [{"speaker": "青竹", "line": "是。"}, {"speaker": "甄', [{"speaker": "青竹", "line": "是。"}]),
    ("青竹说：是。", None),
    ('{"speaker": "青竹"}', None),
])
def test_answers_are_read_as_json_even_when_cut_short(text, expected):
    assert parse_items(text) == expected


def prepare_llm(novel: Path, llm: FakeLLM, *extra: str) -> int:
    return prepare(novel.parent, novel, "--llm", "--base-url", llm.url, "--model", "test-model",
                   "--max-retries", "0", *extra)


def test_every_answer_is_checked_and_only_valid_lines_land(novel, llm, tmp_path, capsys):
    chapter_one = answer(
        ("小福子", "皇上驾到——"),
        ("温太医", "臣妾恭迎皇上。"),  # nobody of that name in the chunk
        ("青竹", "小主，今夜不必等了。"),  # a line the novel does not have
        ("她", "臣妾恭迎皇上。"),  # a pronoun names no one
        ("青竹", "小主，该歇了。"),  # the rule pass had it: agreement is counted
        ("皇上", "再等等。"),  # the rule pass had it too, as the narrator's: the rule's stays
        ("甄嬛", "嬛嬛，朕说过的话，几时不算数？"),  # said to her (嬛嬛), so not by her
    )
    llm.script.extend([Reply(chapter_one), Reply("Sorry, I cannot help with that.")])  # then asked again
    llm.answer = good_answer
    assert prepare_llm(novel, llm, "--concurrency", "1") == 0
    out = capsys.readouterr().out
    assert "Items: 10 = 3 accepted + 1 agree with the rule pass + 1 disagree (the rule's kept) + 5 dropped" in out
    assert "1  dropped: speaker is not in the chunk" in out and "1  dropped: line is not in the text" in out
    assert "1  dropped: speaker is the one the line calls out" in out
    assert "2  dropped: speaker is not a name" in out  # 她, and chapter two's 宫女 (a title)
    assert "Chunks: 2 = 0 cached + 2 answered + 0 given up" in out
    assert "answers: 2 parsed + 1 malformed" in out
    assert "after the LLM pass: 9 of 10 attributed, 1 unknown" in out
    got = {(p["instruction"], p["output"]) for p in pairs(tmp_path)}
    assert ("皇上驾到——", "臣妾恭迎皇上。") in got  # the LLM's speaker makes the pair
    assert ("回小主，是皇后娘娘。", "知道了。") in got  # 甄嬛, named 莞贵人 in the chunk
    assert ("小主，该歇了。", "再等等。皇上说过今夜会来。") in got
    assert all(p["source"] == "novel" for p in pairs(tmp_path))


def test_invented_lines_and_strangers_are_dropped_and_counted(novel, llm, tmp_path, capsys):
    llm.answer = lambda prompt: Reply(answer(("温太医", "皇上驾到——"), ("小福子", "朕今夜不来了。"),
                                             ("宫女", "娘娘请小主过去。")))
    assert prepare_llm(novel, llm) == 0
    out = capsys.readouterr().out
    # Each chunk is answered with all three; a line is checked against its own chunk.
    assert "Items: 6 = 0 accepted + 0 agree with the rule pass + 0 disagree (the rule's kept) + 6 dropped" in out
    assert "1  dropped: speaker is not in the chunk" in out  # 温太医, in chapter one
    assert "4  dropped: line is not in the text" in out
    assert "1  dropped: speaker is not a name" in out  # 宫女 is a title, in chapter two
    assert "after the LLM pass: 6 of 10 attributed, 4 unknown" in out


def test_answers_that_are_never_json_are_given_up_and_counted(novel, llm, tmp_path, capsys):
    llm.answer = lambda prompt: Reply("我不知道。")
    assert prepare_llm(novel, llm, "--malformed-retries", "2") == 0
    out = capsys.readouterr().out
    assert "Chunks: 2 = 0 cached + 0 answered + 2 given up + 0 unanswered" in out
    assert "Requests: 6 requested = 6 received + 0 failed; answers: 0 parsed + 6 malformed" in out
    # Given up for good: a re-run asks nothing (deleting the cache asks again).
    assert len((tmp_path / "out" / "pairs.llm-cache.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert prepare_llm(novel, llm) == 0 and len(llm.requests) == 6


def test_429_and_500_are_retried_with_back_off(novel, llm, tmp_path, capsys):
    llm.script.extend([Reply(status=500), Reply(status=429, headers={"Retry-After": "1"})])
    llm.answer = good_answer
    assert prepare(novel.parent, novel, "--llm", "--base-url", llm.url, "--max-retries", "2", "--concurrency", "1") == 0
    out = capsys.readouterr().out
    assert "Requests: 2 requested = 2 received + 0 failed" in out
    assert "HTTP attempts: 4 (200 ×2, 429 ×1, 500 ×1); the client retried 2" in out
    assert llm.requests[2].at - llm.requests[1].at >= 0.95  # it waited as the 429 asked
    assert "after the LLM pass: 9 of 10 attributed" in out


def test_the_schema_is_asked_for_and_a_server_without_it_is_asked_again_plainly(novel, llm, capsys):
    llm.script.append(Reply(status=400))
    llm.answer = good_answer
    assert prepare_llm(novel, llm, "--concurrency", "1") == 0
    out = capsys.readouterr().out
    assert llm.requests[0].body["response_format"]["type"] == "json_schema"
    assert all("response_format" not in r.body for r in llm.requests[1:])
    assert "the server refused response_format" in out and "after the LLM pass: 9 of 10" in out


def test_a_rerun_costs_nothing_and_the_dry_run_says_so(novel, llm, tmp_path, capsys):
    llm.answer = good_answer
    assert prepare_llm(novel, llm, "--price", "1,2") == 0
    first = pairs(tmp_path)
    asked = len(llm.requests)
    out = capsys.readouterr().out
    tokens = re.search(r"Tokens: ([\d,]+) prompt \+ ([\d,]+) completion", out)
    assert asked == 2 and int(tokens[1].replace(",", "")) > 0
    assert prepare_llm(novel, llm) == 0
    assert len(llm.requests) == asked and pairs(tmp_path) == first
    assert "Chunks: 2 = 2 cached + 0 answered" in capsys.readouterr().out
    assert prepare_llm(novel, llm, "--dry-run") == 0
    assert "LLM pass: 2 chunks for 4 unknown lines, 2 cached, 0 to send" in capsys.readouterr().out


def test_dry_run_estimates_tokens_and_cost_and_sends_and_writes_nothing(novel, llm, tmp_path, capsys):
    assert prepare_llm(novel, llm, "--dry-run", "--price", "0.27,1.10") == 0
    out = capsys.readouterr().out
    found = re.search(r"LLM pass: 2 chunks for 4 unknown lines, 0 cached, 2 to send to (\S+) \(model test-model\): "
                      r"≈([\d,]+) prompt \+ ≈([\d,]+) completion tokens ≈ \$([\d.]+) at \$0.27/\$1.1 per million", out)
    assert found, out
    prompt, completion = int(found[2].replace(",", "")), int(found[3].replace(",", ""))
    assert prompt > len(NOVEL) // 2 and completion > 0
    assert float(found[4]) == pytest.approx((prompt * 0.27 + completion * 1.10) / 1e6, abs=1e-4)
    assert "Dry run: nothing sent, nothing written" in out
    assert llm.requests == [] and not (tmp_path / "out").exists()


def test_an_unreachable_endpoint_is_one_line_and_nothing_is_written(novel, tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    rc = prepare(novel.parent, novel, "--llm", "--base-url", f"http://127.0.0.1:{port}/v1", "--max-retries", "0")
    out, err = capsys.readouterr()
    assert rc == 2
    [line] = err.strip().splitlines()[-1:]
    assert re.match(rf"rolebot: error: http://127.0.0.1:{port}/v1: 2 of 2 chunks got no answer \(connection "
                    r"failed\) — nothing was written", line), err
    assert "Traceback" not in err and "Requests: 2 requested = 0 received + 2 failed" in out
    assert not (tmp_path / "out" / "pairs.json").exists() and not (tmp_path / "out" / "pairs.canon.jsonl").exists()


def test_a_killed_run_resumes_from_the_cache_without_asking_again(novel, llm, tmp_path):
    """The first chunk is answered at once, the second never: the run is killed while it waits,
    and the same command finishes from the cache, asking only the second chunk."""
    llm.answer = lambda prompt: Reply(good_answer(prompt).content, delay=0 if "雨夜" in prompt else 120)
    cache = tmp_path / "out" / "pairs.llm-cache.jsonl"
    args = [sys.executable, "-m", "bot", "--config", str(tmp_path / "config.toml"), "prepare", str(novel),
            *CHARACTER, "--output", str(tmp_path / "out" / "pairs.json"), "--llm", "--base-url", llm.url,
            "--model", "test-model", "--concurrency", "1", "--timeout", "300"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 120
        while not (cache.exists() and len(llm.requests) == 2) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert len(llm.requests) == 2 and cache.exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert not (tmp_path / "out" / "pairs.json").exists()
    assert len(cache.read_text(encoding="utf-8").splitlines()) == 1
    llm.answer = good_answer
    assert prepare_llm(novel, llm) == 0
    asked_again = [r.prompt for r in llm.requests[2:]]
    assert len(asked_again) == 1 and "晨起" in asked_again[0] and "雨夜" not in asked_again[0]
    assert ("皇上驾到——", "臣妾恭迎皇上。") in {(p["instruction"], p["output"]) for p in pairs(tmp_path)}


# Against rolebot serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_the_llm_pass_against_rolebot_serve_on_the_builtin_model(tmp_path, builtin_path, novel, capsys):
    """The tiny builtin model answers badly: the point is that the run completes and every
    answer is checked and counted, so nothing invalid lands."""
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"[generation]\nmax_new_tokens = 96\ntemperature = 0.0\n\n[console]\nenabled = false\n\n"
                      f"[web]\nhost = \"127.0.0.1\"\nport = {port}\n", encoding="utf-8")
    log = open(tmp_path / "serve.log", "w", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "bot", "--config", str(config), "serve", "--no-train"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text(encoding="utf-8")
        rc = prepare(tmp_path, novel, "--llm", "--timeout", "300", "--max-tokens", "96", "--malformed-retries", "0")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    out, err = capsys.readouterr()
    assert rc == 0, err
    found = re.search(r"Chunks: (\d+) = 0 cached \+ (\d+) answered \+ (\d+) given up \+ 0 unanswered", out)
    assert found and int(found[1]) == 2 == int(found[2]) + int(found[3]), out
    items = re.search(r"Items: (\d+) = (\d+) accepted \+ (\d+) agree .* \+ (\d+) disagree .* \+ (\d+) dropped", out)
    total, *parts = map(int, items.groups())
    assert total == sum(parts)
    after = re.search(r"after the LLM pass: (\d+) of 10 attributed", out)
    assert int(after[1]) >= 6  # the rule pass's lines are never taken away
