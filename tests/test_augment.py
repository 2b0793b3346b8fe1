"""``rolebot augment`` against a scripted OpenAI-compatible server on loopback (429, 500, bodies
that are not JSON, replies slower than the timeout, malformed and good answers) and against a
real ``rolebot serve`` on the builtin model."""

from __future__ import annotations

import json
import os
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
from training.augment import Pair, Retriever, Seen, parse_answer, parse_pairs
from training.dataset import load_samples

KEY_ENV = "ROLEBOT_TEST_AUGMENT_KEY"
KEY = "sk-test-do-not-print-1234"

REAL = [
    {"instruction": "小主，别的秀女都在求中选，唯有咱们小主想被撂牌子。", "input": "", "output": "嘘——都说许愿说破是不灵的。"},
    {"instruction": "温太医十天半月便往咱们府里跑。", "input": "", "output": "你们俩话太多了，我该和温太医要一剂药，好好治治你们。"},
    {"instruction": "嬛妹妹，刚刚我去府上请脉，听说你来这里进香了。", "input": "", "output": "出来走走，也是散心。", "source": "script"},
    {"instruction": "小主平日里都读些什么书？", "input": "", "output": "不过是些诗词闲书，打发辰光罢了。"},
    {"instruction": "今日天气晴好，小主可要去御花园走走？", "input": "", "output": "也好，总闷在屋里，人也要闷坏了。"},
    {"instruction": "皇上驾到——", "input": "", "output": "臣妾恭迎皇上，皇上万福金安。"},
]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A config and the real pairs in a fresh folder; the API key in the environment."""
    (tmp_path / "config.toml").write_text("[console]\nenabled = false\n", encoding="utf-8")
    (tmp_path / "real.json").write_text(json.dumps(REAL, ensure_ascii=False), encoding="utf-8")
    monkeypatch.setenv(KEY_ENV, KEY)
    return tmp_path


def augment(project: Path, llm: FakeLLM, *extra: str) -> int:
    return main(["--config", str(project / "config.toml"), "augment", "--data", str(project / "real.json"),
                 "--output", str(project / "aug.json"), "--base-url", llm.url, "--model", "test-model",
                 "--api-key-env", KEY_ENV, *extra])


def pairs_json(*pairs: tuple[str, str]) -> str:
    return json.dumps([{"instruction": i, "output": o} for i, o in pairs], ensure_ascii=False)


def counts(report: str) -> dict[str, int]:
    """The report's totals; every total must be the sum of its parts."""
    requests = re.search(r"Requests: (\d+) requested = (\d+) received \+ (\d+) failed(?: \+ (\d+) cancelled)?", report)
    answers = re.search(r"Answers: (\d+) received = (\d+) parsed \+ (\d+) malformed; (\d+) prompt", report)
    pairs = re.search(r"Pairs: (\d+) in the answers = (\d+) kept \+ (\d+) dropped", report)
    found = dict(zip(("requested", "received", "failed", "cancelled"), map(int, requests.groups(0))))
    assert found["requested"] == found["received"] + found["failed"] + found["cancelled"], report
    received, parsed, malformed, gave_up = map(int, answers.groups())
    assert received == found["received"] == parsed + malformed, report
    candidates, kept, dropped = map(int, pairs.groups())
    reasons = sum(int(n) for n in re.findall(r"^ +(\d+)  dropped: ", report, re.M))
    assert candidates == kept + dropped and dropped == reasons, report
    return {**found, "parsed": parsed, "malformed": malformed, "gave_up": gave_up, "kept": kept, "dropped": dropped}


def examples_in(prompt: str) -> list[dict]:
    return json.loads(re.search(r"^\[\n.*?\n\]$", prompt, re.S | re.M).group(0))


# Reading answers


@pytest.mark.parametrize("answer, expected", [
    ('```json\n[{"instruction": "皇上吉祥", "output": "臣妾给皇上请安。"}]\n```', [("皇上吉祥", "臣妾给皇上请安。")]),
    ('Here you are: {"pairs": [{"question": "q1", "answer": "a1"}]}', [("q1", "a1")]),
    # Cut off by the token limit: the complete objects survive.
    ('[{"instruction": "甲", "output": "乙"}, {"instruction": "丙", "output": "丁', [("甲", "乙")]),
    ("1. 问：今日可好？\n   答：一切都好。\n2. 问：去哪里？ 答：御花园。", [("今日可好？", "一切都好。"), ("去哪里？", "御花园。")]),
    ("1. Instruction: 你去哪\nOutput: 我去碎玉轩\n\n2. 小主，用膳吧。\n甄嬛：「端上来吧。」", [("你去哪", "我去碎玉轩"), ("小主，用膳吧。", "端上来吧。")]),
    ("I'm sorry, I cannot write that.", []),
    ("Sure!\nHere they are:", []),  # two lines of chatter are not a pair
    ("Here are some:\nEnjoy!\n1. 问：甲\n答：乙", [("甲", "乙")]),
    ('[{"instruction": "只有一半"}]', []),
])
def test_answers_are_read_from_json_or_numbered_text(answer, expected):
    assert parse_pairs(answer, "甄嬛") == [Pair(i, o) for i, o in expected]


@pytest.mark.parametrize("answer, expected", [
    ("甄嬛：「臣妾明白。」", "臣妾明白。"), ('{"output": "好"}', "好"), ("```\n罢了。\n```", "罢了。"),
    ("   ", ""), ('{"output": ', ""),
])
def test_one_answer_is_read_as_the_characters_words(answer, expected):
    assert parse_answer(answer, "甄嬛") == expected


def test_near_duplicates_are_caught_by_character_trigrams():
    seen = Seen()
    seen.add("臣妾恭迎皇上，皇上万福金安。", "real")
    assert seen.duplicate("臣妾恭迎皇上 皇上万福金安！") == "exact duplicate of a real pair"
    assert seen.duplicate("臣妾恭迎皇上，皇上万福金安呀。") == "near duplicate of a real pair"
    assert seen.duplicate("臣妾恭迎皇上，今日怎么得空过来？") == ""


def test_retrieval_finds_the_real_lines_most_like_a_question():
    import random

    retriever = Retriever([Pair(r["instruction"], r["output"]) for r in REAL])
    assert retriever.top("你平时喜欢读什么书？", 1, random.Random(0))[0].instruction == "小主平日里都读些什么书？"
    assert retriever.top("今天天气好，想出去走走吗？", 1, random.Random(0))[0].instruction.startswith("今日天气晴好")
    assert len(retriever.top("xyz", 3, random.Random(0))) == 3  # nothing in common: random examples


# Against the scripted server


def test_fewshot_survives_429_500_timeouts_bad_bodies_and_malformed_answers(project, llm, capsys):
    good1 = ("小主，内务府送来了新制的秋衣。", "先收着吧，替我谢过内务府的公公。")
    llm.script.extend([
        Reply(status=429, headers={"Retry-After": "1"}),
        Reply(status=500),
        Reply("```json\n" + pairs_json(
            good1,
            ("皇上来了。", "臣妾恭迎皇上，皇上万福金安呀。"),  # near copy of a real reply
            ("你是谁？", "作为一个AI助手，我无法扮演这个角色。"),  # out of character
            ("说说话吧。", "臣妾" * 36),  # too long
        ) + "\n```"),
        Reply(delay=2.5),  # slower than --timeout: the client gives up and retries
        Reply("Sorry, I can't write that."),  # malformed: asked again
        Reply(body='{"choices": ['),  # not JSON: asked again, then the prompt is given up
        Reply("1. 问：小主，碎玉轩的海棠开了。\n   答：开得这样好，折两枝来插瓶吧。\n"
              "2. 问：小主可要用些点心？\n   答：不必了，我这会儿没什么胃口。\n"
              "3. 问：内务府又送秋衣来了。\n   答：先收着吧，替我谢过内务府的公公。\n"),  # the last one is a copy
        Reply(pairs_json(
            ("小主在做什么？", "臣妾今日抄了一卷佛经，为太后祈福。"),
            ("小主又在抄经？", "臣妾今日抄了一卷佛经，为太后祈福了。"),  # near copy of the line before
            ("夜里风大。", "槿汐，去把那件月白的披风取来。"),
            ("奴婢听说了一件事。", "这话你们私下说说便罢了，切莫传出去。"),
            ("明日再议？", "罢了，明日再说吧。"),  # the 7th: beyond --n
        )),
    ])
    rc = augment(project, llm, "--n", "6", "--per-request", "3", "--examples", "3", "--concurrency", "1",
                 "--timeout", "1", "--max-retries", "2", "--malformed-retries", "1", "--max-chars", "60")
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert counts(out) == {"requested": 5, "received": 4, "failed": 1, "cancelled": 0, "parsed": 3,
                           "malformed": 1, "gave_up": 1, "kept": 6, "dropped": 6}
    assert "HTTP attempts: 8 (200 ×5, 429 ×1, 500 ×1, no reply ×1); the client retried 3" in out
    for reason in ("near duplicate of a real pair", "breaks character", "output longer than 60 characters",
                   "exact duplicate of a generated pair", "near duplicate of a generated pair", "beyond --n"):
        assert re.search(rf"^ +1  dropped: {re.escape(reason)}$", out, re.M), (reason, out)
    assert "failed: unreadable response" in out

    written = json.loads((project / "aug.json").read_text(encoding="utf-8"))
    assert written[:len(REAL)] == REAL  # the real pairs, unchanged
    generated = written[len(REAL):]
    assert [g["output"] for g in generated] == [
        good1[1], "开得这样好，折两枝来插瓶吧。", "不必了，我这会儿没什么胃口。", "臣妾今日抄了一卷佛经，为太后祈福。",
        "槿汐，去把那件月白的披风取来。", "这话你们私下说说便罢了，切莫传出去。"]
    assert {g["source"] for g in generated} == {"generated:fewshot"}
    assert len(load_samples(project / "aug.json")) == len(REAL) + 6

    # The 429's Retry-After was honoured; every attempt carried the key; no output shows it.
    assert llm.requests[1].at - llm.requests[0].at >= 0.95
    assert {r.authorization for r in llm.requests} == {f"Bearer {KEY}"}
    assert KEY not in out + err
    # Each request showed three real pairs, drawn anew for each prompt.
    prompts = list(dict.fromkeys(r.prompt for r in llm.requests))
    assert len(prompts) == 4 and all("You are writing lines for 甄嬛" in p for p in prompts)
    shown = [examples_in(p) for p in prompts]
    real = {(r["instruction"], r["output"]) for r in REAL}
    assert all(len(s) == 3 and {(e["instruction"], e["output"]) for e in s} <= real for s in shown)
    assert len({json.dumps(s) for s in shown}) > 1
    # Independent requests never share a conversation on servers that keep one per user.
    assert len({r.body["user"] for r in llm.requests if "user" in r.body}) == 5


def test_questions_are_answered_with_the_most_similar_real_lines_as_examples(project, llm, capsys):
    (project / "q.txt").write_text("\ufeff你平时喜欢读什么书？\n今天天气好，想出去走走吗？\n\n你平时喜欢读什么书？\n"
                                   "你是谁？\n皇上来了，你高兴吗？\n", encoding="utf-8")
    answers = {"读什么书": "甄嬛：「闲时翻翻诗词罢了。」", "天气好": '{"output": "也好，去园子里透透气。"}',
               "你是谁": "I am an AI assistant.", "皇上来了": "```\n臣妾恭迎皇上，皇上万福金安。\n```"}
    llm.answer = lambda prompt: Reply(next(a for q, a in answers.items() if q in prompt), delay=1.0)

    rc = augment(project, llm, "--mode", "questions", "--questions", str(project / "q.txt"),
                 "--examples", "2", "--concurrency", "3")
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert counts(out) == {"requested": 4, "received": 4, "failed": 0, "cancelled": 0, "parsed": 4,
                           "malformed": 0, "gave_up": 0, "kept": 2, "dropped": 2}
    assert re.search(r"^ +1  dropped: breaks character$", out, re.M)
    assert re.search(r"^ +1  dropped: exact duplicate of a real pair$", out, re.M)
    assert llm.max_inflight == 3

    by_question = {next(q for q in answers if q in r.prompt): r.prompt for r in llm.requests}
    assert examples_in(by_question["读什么书"])[0]["instruction"] == "小主平日里都读些什么书？"
    assert examples_in(by_question["天气好"])[0]["instruction"].startswith("今日天气晴好")
    written = json.loads((project / "aug.json").read_text(encoding="utf-8"))
    expected = [("你平时喜欢读什么书？", "闲时翻翻诗词罢了。"), ("今天天气好，想出去走走吗？", "也好，去园子里透透气。")]
    assert sorted(written[len(REAL):], key=lambda r: r["instruction"]) == sorted(
        ({"instruction": q, "input": "", "output": o, "source": "generated:questions"} for q, o in expected),
        key=lambda r: r["instruction"])


def test_ctrl_c_keeps_what_was_generated_and_the_same_command_resumes(project, llm, capsys):
    lines = iter(["先收着吧，替我谢过内务府的公公。", "开得这样好，折两枝来插瓶吧。", "不必了，我这会儿没什么胃口。",
                  "槿汐，去把那件月白的披风取来。", "这话你们私下说说便罢了，切莫传出去。", "罢了，明日再说吧。"])
    # Two answers at once, then one that hangs: Ctrl-C comes while it is in flight.
    llm.answer = lambda prompt: Reply(pairs_json(("小主？", next(lines))), delay=0 if len(llm.requests) <= 2 else 60)
    command = [sys.executable, "-m", "bot", "--config", str(project / "config.toml"), "augment",
               "--data", str(project / "real.json"), "--output", str(project / "aug.json"), "--base-url", llm.url,
               "--api-key-env", KEY_ENV, "--n", "4", "--per-request", "1", "--concurrency", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while len(llm.requests) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "rolebot: interrupted" in err and "Traceback" not in err
    partial = project / "aug.partial.json"
    kept = json.loads(partial.read_text(encoding="utf-8"))
    assert len(kept) == 2 and {k["source"] for k in kept} == {"generated:fewshot"}
    assert f"Kept 2 generated pairs in {partial}; run the same command again to resume" in out
    assert not (project / "aug.json").exists()
    counts(out)

    llm.answer = lambda prompt: Reply(pairs_json(("小主？", next(lines))))
    rc = augment(project, llm, "--n", "4", "--per-request", "1", "--concurrency", "1")
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"resumed 2 generated pairs from {partial}" in out
    written = json.loads((project / "aug.json").read_text(encoding="utf-8"))
    assert written[:len(REAL)] == REAL and written[len(REAL):len(REAL) + 2] == kept
    assert len(written) == len(REAL) + 4 and not partial.exists()
    assert counts(out)["kept"] == 2


def test_a_resumed_questions_run_skips_the_questions_already_answered(project, llm, capsys):
    (project / "q.txt").write_text("下雨天你喜欢做什么？\n你喜欢喝茶吗？\n", encoding="utf-8")
    done = {"instruction": "下雨天你喜欢做什么？", "input": "", "output": "听雨煮茶，也是一桩雅事。", "source": "generated:questions"}
    (project / "aug.partial.json").write_text(json.dumps([done], ensure_ascii=False), encoding="utf-8")
    llm.answer = lambda prompt: Reply("喝茶最好是雨前龙井。")

    assert augment(project, llm, "--mode", "questions", "--questions", str(project / "q.txt")) == 0
    assert [r.prompt for r in llm.requests if "下雨天" in r.prompt] == []
    written = json.loads((project / "aug.json").read_text(encoding="utf-8"))
    assert written[len(REAL):] == [done, {"instruction": "你喜欢喝茶吗？", "input": "", "output": "喝茶最好是雨前龙井。",
                                          "source": "generated:questions"}]
    assert "resumed 1 generated pairs" in capsys.readouterr().out


def test_a_refused_key_stops_the_run_with_one_line_naming_the_variable(project, llm, capsys):
    llm.answer = lambda prompt: Reply(status=401)
    assert augment(project, llm, "--n", "3") == 2
    out, err = capsys.readouterr()
    [line] = [line for line in err.splitlines() if line.startswith("rolebot: error:")]
    assert f"HTTP 401" in line and KEY_ENV in line
    assert KEY not in out + err and "Traceback" not in err
    assert not (project / "aug.json").exists()


def test_an_unreachable_server_is_a_clear_error(project, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    rc = main(["--config", str(project / "config.toml"), "augment", "--data", str(project / "real.json"),
               "--output", str(project / "aug.json"), "--base-url", f"http://127.0.0.1:{port}/v1",
               "--max-retries", "0", "--n", "2", "--per-request", "2", "--malformed-retries", "0"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert re.search(r"rolebot: error: http://127.0.0.1:\d+/v1: none of 2 requests got an answer \(connection failed\)", err)
    assert counts(out)["failed"] == 2


@pytest.mark.parametrize("args, message", [
    (["--output", "{data}"], "--output is the --data file"),
    (["--questions", "{dir}/q.txt"], "add --mode questions"),
    (["--mode", "questions", "--questions", "{dir}/missing.txt"], "questions file not found"),
])
def test_mistakes_get_one_line_saying_what_to_do(project, capsys, args, message):
    args = [a.format(data=project / "real.json", dir=project) for a in args]
    base = ["--config", str(project / "config.toml"), "augment", "--data", str(project / "real.json")]
    if "--output" not in args:
        base += ["--output", str(project / "aug.json")]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# Against rolebot serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def serve(tmp_path, builtin_path):
    """``rolebot serve`` on the builtin base model (no adapter, so no first training), in its own
    process, on a free loopback port that the config names: augment's default endpoint."""
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"[generation]\nmax_new_tokens = 48\ntemperature = 0.7\n\n[console]\nenabled = false\n\n"
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
        yield config
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.slow
def test_both_modes_against_rolebot_serve_on_the_builtin_model(serve, tmp_path, capsys):
    root = tmp_path
    assert main(["--config", str(serve), "prepare", str(Path(__file__).parents[1] / "training/samples/sample_script.txt"),
                 "--character", "甄嬛", "--output", str(root / "real.json")]) == 0
    capsys.readouterr()
    (root / "q.txt").write_text("你平时喜欢读什么书？\n下雨天你最喜欢做什么？\n", encoding="utf-8")
    # Small, one round of two requests per mode: a CPU reply takes seconds (a minute on a busy
    # machine), and this test shows that a run against serve completes, not what it yields.
    runs = {
        "fewshot": ["--n", "1", "--per-request", "1", "--malformed-retries", "0"],
        "questions": ["--mode", "questions", "--questions", str(root / "q.txt")],
    }
    for mode, extra in runs.items():
        output = root / f"{mode}.json"
        rc = main(["--config", str(serve), "augment", "--data", str(root / "real.json"), "--output", str(output),
                   "--examples", "2", "--max-tokens", "24", "--concurrency", "2", "--timeout", "300", *extra])
        out, err = capsys.readouterr()
        assert rc == 0, err
        found = counts(out)
        assert found["requested"] >= 1 and found["failed"] == 0, out
        written = json.loads(output.read_text(encoding="utf-8"))
        real = json.loads((root / "real.json").read_text(encoding="utf-8"))
        assert written[:len(real)] == real
        assert all(w["source"] == f"generated:{mode}" for w in written[len(real):])
        assert len(written) - len(real) == found["kept"]
        load_samples(output)
