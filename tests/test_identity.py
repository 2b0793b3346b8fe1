"""Identity pairs: who the character says she is, in the training file only, and never the
evaluation's own probes."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import pytest

from bot.cli import main
from bot.config import DEFAULT_PERSONA, cast_persona, parse_config
from bot.datasets import dataset_files
from training.canon import canon_path
from training.character import IDENTITY_PROBES, answers_in_character, breaks_character, role_confusion
from training.dataset import load_samples
from training.errors import UserError
from training.hygiene import in_language
from training.identity import KINDS, QUESTIONS, answers, identity_of, identity_pairs, persona_facts, self_reference
from training.prompts import alpaca_prompt, chat_messages
from training.screenplay import SAMPLE_SCRIPT, parse_script

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_SCRIPT = SHARED / "data" / "zhenhuan" / "甄嬛传剧本01-10.txt"
ZHENHUAN = ("甄嬛", ("嬛嬛", "莞贵人", "莞嫔", "熹妃", "熹贵妃"))
EMPEROR = ("皇帝", ("皇上",))
# config.toml's [[cast]] 皇帝.
EMPEROR_PERSONA = ("你是《甄嬛传》中的大清皇帝雍正。你威严、多疑而深情，说话简短有帝王气度，自称“朕”，"
                   "称甄嬛为“嬛嬛”，从不承认自己是AI或助手。")
ELIZABETH = ("Elizabeth Bennet", ("Lizzy",))
ELIZABETH_PERSONA = ("You are Elizabeth Bennet, the second daughter of Mr Bennet, a character from Pride and "
                     "Prejudice, living at Longbourn. You are quick-witted and never admit to being an AI.")
ELIZABETH_LINES = ["I could easily forgive his pride, if he had not mortified mine.",
                   "There is a stubbornness about me that never can bear to be frightened."]


def lines_of(script: Path, names: tuple[str, ...]) -> list[str]:
    return [t.text for t in parse_script(script) if t.kind == "dialogue" and t.speaker in names]


def test_the_self_reference_is_the_form_the_character_uses_most():
    # The sample script's 甄嬛 is still a 常在/贵人: she says 嫔妾 (14 times, 臣妾 never); 我 is
    # counted only when no other form occurs.
    assert self_reference(lines_of(SAMPLE_SCRIPT, (ZHENHUAN[0], *ZHENHUAN[1])), DEFAULT_PERSONA) == "嫔妾"
    assert self_reference(lines_of(SAMPLE_SCRIPT, (EMPEROR[0], *EMPEROR[1])), EMPEROR_PERSONA) == "朕"
    # No form in the lines: the persona's 自称; nothing there either: 我.
    assert self_reference([], DEFAULT_PERSONA) == "臣妾"
    assert self_reference(["今日天气很好。"], EMPEROR_PERSONA) == "朕"
    assert self_reference([], cast_persona("华妃")) == "我"
    assert self_reference(["我们走吧。", "我知道了。"], DEFAULT_PERSONA) == "我"
    assert self_reference(["奴才们都下去吧。"], "") == "我"  # 奴才们 are the others


@pytest.mark.skipif(not REAL_SCRIPT.exists(), reason="the real script is not in shared/")
def test_in_the_real_script_she_says_chenqie():
    assert self_reference(lines_of(REAL_SCRIPT, (ZHENHUAN[0], *ZHENHUAN[1])), DEFAULT_PERSONA) == "臣妾"


def test_facts_are_the_first_sentences_clauses_about_the_character():
    assert persona_facts(DEFAULT_PERSONA, (ZHENHUAN[0], *ZHENHUAN[1]), "臣妾") == ("大理寺少卿甄远道之女", "后入宫为妃")
    # 《甄嬛传》中的 is where he is from; what follows it is who he is.
    assert persona_facts(EMPEROR_PERSONA, (EMPEROR[0], *EMPEROR[1]), "朕") == ("大清皇帝雍正",)
    assert persona_facts(cast_persona("华妃"), ("华妃",), "本宫") == ()
    assert persona_facts("", ("甄嬛",), "臣妾") == ()
    assert persona_facts("你是青竹，你的主子是甄嬛。", ("青竹",), "奴婢") == ("奴婢的主子是甄嬛",)
    assert persona_facts(ELIZABETH_PERSONA, ELIZABETH[:1], "I", "other") == (
        "the second daughter of Mr Bennet", "living at Longbourn")


def test_answers_name_the_character_with_the_facts_or_without():
    identity = identity_of(*ZHENHUAN, DEFAULT_PERSONA, ["臣妾不敢。"], "zh")
    assert "臣妾是甄嬛，大理寺少卿甄远道之女，后入宫为妃。" in answers(identity, "background")
    assert "臣妾是甄嬛，旁人也唤臣妾莞贵人。" in answers(identity, "name")
    bare = identity_of("华妃", (), cast_persona("华妃"), ["本宫乏了。"], "zh")
    assert all("，，" not in a and "{" not in a for kind in KINDS for a in answers(bare, kind))
    assert "本宫是华妃。" in answers(bare, "who")


def _normal(text: str) -> str:
    return re.sub(r"[\W_]+", "", text).lower()


def _distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def test_no_question_is_one_of_the_evaluations_probes_or_a_near_copy():
    questions = [q for _, q in QUESTIONS]
    assert len(set(questions)) == len(questions)
    assert sum(not q.isascii() for q in questions) >= 30 and sum(q.isascii() for q in questions) >= 8
    assert {kind for kind, _ in QUESTIONS} == set(KINDS)
    for question in questions:
        assert question not in IDENTITY_PROBES
        for probe in IDENTITY_PROBES:
            q, p = _normal(question), _normal(probe)
            assert _distance(q, p) > 2, (question, probe)
            assert difflib.SequenceMatcher(None, q, p).ratio() < 0.7, (question, probe)


CHARACTERS = [
    (*ZHENHUAN, DEFAULT_PERSONA, lines_of(SAMPLE_SCRIPT, (ZHENHUAN[0], *ZHENHUAN[1])), "zh"),
    (*EMPEROR, EMPEROR_PERSONA, lines_of(SAMPLE_SCRIPT, (EMPEROR[0], *EMPEROR[1])), "zh"),
    (*ELIZABETH, ELIZABETH_PERSONA, ELIZABETH_LINES, "other"),
]


@pytest.mark.parametrize(("name", "aliases", "persona", "lines", "language"), CHARACTERS,
                         ids=["甄嬛", "皇帝", "Elizabeth"])
def test_every_answer_is_in_character(name, aliases, persona, lines, language):
    names = (name, *aliases)
    identity = identity_of(name, aliases, persona, lines, language)
    everything = [a for kind in KINDS for a in answers(identity, kind)]
    records = identity_pairs(name, aliases, persona, lines, language, 120, seed=1)
    assert len(records) == 120
    for answer in everything + [r["output"] for r in records]:
        assert answers_in_character(answer, names), answer
        assert not breaks_character(answer), answer
        assert not role_confusion(answer, names, ("皇后", "华妃", "青竹", "Mr Darcy")), answer
        assert in_language(answer, language), answer  # a Chinese character answers English questions in Chinese
    assert any(r["instruction"].isascii() for r in records)


def test_pairs_are_distinct_deterministic_and_as_many_as_asked():
    args = (*ZHENHUAN, DEFAULT_PERSONA, ["臣妾不敢。"], "zh")
    records = identity_pairs(*args, 32, seed=7)
    assert len(records) == 32 and records == identity_pairs(*args, 32, seed=7)
    assert records != identity_pairs(*args, 32, seed=8)
    assert all(r["input"] == "" and r["source"] == "identity" for r in records)
    many = identity_pairs(*args, 150, seed=7)
    assert len({(r["instruction"], r["output"]) for r in many}) == 150
    assert len({r["instruction"] for r in many}) == len(QUESTIONS)  # the bank is cycled through
    assert identity_pairs(*args, 0, seed=7) == []
    with pytest.raises(UserError, match="only .* distinct identity pairs"):
        identity_pairs(*args, 10_000, seed=7)


# --- prepare --------------------------------------------------------------------------

def _load(path: Path) -> list:
    return json.loads(path.read_text(encoding="utf-8"))


def test_prepare_adds_them_to_the_training_file_only(tmp_path, capsys):
    output = tmp_path / "huanhuan.json"
    assert main(["prepare", str(SAMPLE_SCRIPT), "--character", "甄嬛", "--alias", "嬛嬛", "--alias", "莞贵人",
                 "--output", str(output), "--val-episodes", "1", "--identity", "20"]) == 0
    report = capsys.readouterr().out
    train = _load(output)
    identity = [r for r in train if r.get("source") == "identity"]
    assert len(identity) == 20 and train[-20:] == identity
    assert all(r["output"].startswith(("嫔妾", "在你面前", "这话", "你", "说来", "论出身", "休要")) for r in identity)
    questions = {r["instruction"] for r in identity}
    assert not any(r.get("source") or r["instruction"] in questions for r in _load(tmp_path / "huanhuan.val.json"))
    canon = [json.loads(line) for line in canon_path(output).read_text(encoding="utf-8").splitlines()]
    assert len(canon) == len(train) - 20 and not any(c["said"] in questions for c in canon)
    assert f"      49  {output}\n" in report  # 29 pairs of episodes 1-2, 20 identity pairs
    assert "Added 20 identity pairs to the training file, its last records (source: identity; " \
           "--identity 0 for none)" in report
    assert "Canon index: 29 exchanges" in report
    # They train as they are: the loader keeps them, and an empty input formats in both prompts.
    sample = load_samples(output)[-1]
    assert (sample.instruction, sample.output, sample.input) == (train[-1]["instruction"], train[-1]["output"], "")
    assert sample.instruction in alpaca_prompt(sample, DEFAULT_PERSONA, "甄嬛", history_first=True)
    assert chat_messages(sample, DEFAULT_PERSONA, "甄嬛") == [
        {"role": "system", "content": DEFAULT_PERSONA}, {"role": "user", "content": sample.instruction}]


def test_identity_0_adds_none_and_the_same_run_writes_the_same_file(tmp_path, capsys):
    args = ["prepare", str(SAMPLE_SCRIPT), "--character", "甄嬛", "--output"]
    assert main([*args, str(tmp_path / "none.json"), "--identity", "0"]) == 0
    assert "identity pairs" not in capsys.readouterr().out
    assert not any("source" in r for r in _load(tmp_path / "none.json"))
    assert main([*args, str(tmp_path / "a.json")]) == 0 and main([*args, str(tmp_path / "b.json")]) == 0
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    # the sample script's 44 pairs get the least, 4 (one per 12 pairs, at most --identity)
    assert len(_load(tmp_path / "a.json")) == len(_load(tmp_path / "none.json")) + 4


@pytest.mark.parametrize("fmt", ["sharegpt", "jsonl"])
def test_conversation_formats_get_them_as_one_exchange(tmp_path, fmt):
    output = tmp_path / f"pairs.{fmt}"
    assert main(["prepare", str(SAMPLE_SCRIPT), "--character", "甄嬛", "--output", str(output), "--format", fmt,
                 "--identity", "4"]) == 0
    text = output.read_text(encoding="utf-8")
    records = json.loads(text) if fmt == "sharegpt" else [json.loads(line) for line in text.splitlines()]
    key, role = ("conversations", "from") if fmt == "sharegpt" else ("messages", "role")
    for record in records[-4:]:
        assert list(record) == [key] and len(record[key]) == 2
        assert [turn[role] for turn in record[key]] == (["human", "gpt"] if fmt == "sharegpt" else ["user", "assistant"])
    assert all(s.output.startswith(("嫔妾", "在你面前", "这话", "你", "说来", "论出身", "休要"))
               for s in load_samples(output, "甄嬛")[-4:])


CAST = """
[character]
name = "甄嬛"
aliases = ["嬛嬛", "莞贵人"]

[[cast]]
name = "皇帝"
aliases = ["皇上"]
persona = "PERSONA"
""".replace("PERSONA", EMPEROR_PERSONA)


def test_a_cast_members_pairs_use_his_persona_and_his_self_reference(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text(CAST, encoding="utf-8")
    output = tmp_path / "huangdi.json"
    assert main(["--config", str(config), "prepare", str(SAMPLE_SCRIPT), "--character", "皇帝",
                 "--output", str(output)]) == 0
    identity = [r["output"] for r in _load(output) if r.get("source") == "identity"]
    assert len(identity) == 4  # his 9 pairs get the least
    assert all("皇帝" in a and "甄嬛" not in a for a in identity)
    assert any("朕是皇帝，大清皇帝雍正" in a for a in identity)


def test_the_first_runs_dataset_has_them_with_the_configured_persona(tmp_path):
    config = parse_config('[character]\nname = "甄嬛"\naliases = ["嬛嬛", "莞贵人"]\n', tmp_path / "config.toml")
    files = dataset_files(config, quiet=True)
    identity = [r for r in _load(files.train) if r.get("source") == "identity"]
    assert len(identity) == 4
    assert any("大理寺少卿甄远道之女" in r["output"] for r in identity)  # DEFAULT_PERSONA's facts
    assert not any(r.get("source") for r in _load(files.val))


def test_augment_keeps_them_but_never_shows_them_as_examples(tmp_path):
    from training.augment import Augmenter, Job
    from training.llm import Endpoint

    data = tmp_path / "huanhuan.json"
    assert main(["prepare", str(SAMPLE_SCRIPT), "--character", "甄嬛", "--output", str(data)]) == 0
    job = Job(data=data, output=tmp_path / "more.json", character="甄嬛", n=4)
    augmenter = Augmenter(job, Endpoint("http://127.0.0.1:9/v1", "test"))
    identity = {r["output"] for r in _load(data) if r.get("source") == "identity"}
    assert augmenter.report.real == len(_load(data))  # written on unchanged
    assert len(augmenter.real) == len(_load(data)) - len(identity) and not {p.output for p in augmenter.real} & identity
    only = tmp_path / "only.json"
    only.write_text(json.dumps(_load(data)[-len(identity):], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UserError, match="only identity pairs"):
        Augmenter(Job(data=only, output=tmp_path / "x.json", character="甄嬛", n=4), Endpoint("http://127.0.0.1:9/v1", "test"))


def test_a_small_script_gets_few_identity_pairs_a_large_one_at_most_32_and_a_number_is_kept():
    from training.pairs import identity_count

    assert identity_count(None, 9) == 4 and identity_count(None, 44) == 4  # the sample's 皇帝 and 甄嬛
    assert identity_count(None, 120) == 10 and identity_count(None, 410) == 32 and identity_count(None, 4000) == 32
    assert identity_count(0, 410) == 0 and identity_count(20, 9) == 20  # --identity N is N
