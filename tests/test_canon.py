"""The canon index: written by `rolebot prepare`, searched in training (never a sample's own
scene) and serving (within the prompt budget), and a missing or broken index said in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_asyncio

from bot.cli import main
from bot.config import load_config
from training.bm25 import BM25, terms
from training.canon import CanonIndex, canon_path, fit, served_canon, with_canon
from training.character import role_confusion
from training.dataset import load_samples
from training.errors import UserError
from training.prompts import CANON_HEADING, Exchange, PromptStyle, Sample
from training.screenplay import SAMPLE_SCRIPT

NAMES = ("甄嬛", "嬛嬛", "莞贵人")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The sample script prepared as a user would, its last episode held out."""
    out = tmp_path_factory.mktemp("canon") / "data" / "huanhuan.json"
    assert main(["prepare", str(SAMPLE_SCRIPT), "--character", "甄嬛", "--alias", "嬛嬛",
                 "--alias", "莞贵人", "--val-episodes", "1", "--output", str(out)]) == 0
    return out


def test_prepare_writes_the_training_episodes_exchanges_beside_the_pairs(prepared, capsys):
    index_file = canon_path(prepared)
    assert index_file == prepared.with_name("huanhuan.canon.jsonl") and index_file.exists()
    records = [json.loads(line) for line in index_file.read_text(encoding="utf-8").splitlines()]
    pairs = json.loads(prepared.read_text(encoding="utf-8"))
    # The script's pairs, not the identity pairs prepare adds after them: those are no exchange of the script.
    script = [p for p in pairs if p.get("source") != "identity"]
    assert len(script) == len(pairs) - 4  # the sample's training episodes get the least identity pairs
    assert [(r["said"], r["reply"]) for r in records] == [(p["instruction"], p["output"]) for p in script]
    held_out = {r["output"] for r in json.loads(prepared.with_name("huanhuan.val.json").read_text(encoding="utf-8"))}
    assert not held_out & {r["reply"] for r in records}  # the held-out episode stays unseen
    first = records[0]
    assert set(first) == {"file", "episode", "scene", "scene_label", "speaker", "said", "replier", "reply"}
    assert first["replier"] in NAMES and first["speaker"] not in NAMES and first["scene_label"].startswith("第")


def test_terms_are_cjk_characters_and_bigrams_and_words_elsewhere():
    assert terms("皇上吉祥！") == ["皇", "上", "吉", "祥", "皇上", "上吉", "吉祥"]
    assert terms("Hello, World's end 甄嬛") == ["hello", "world", "s", "end", "甄", "嬛", "甄嬛"]
    assert BM25(["皇后娘娘万福", "hello world", ""]).top("World", 3) == [1]


def test_retrieval_returns_the_exchange_a_query_is_built_from(prepared):
    index = CanonIndex.load(canon_path(prepared))
    assert len(index) > 20
    for record in index.records:
        best = index.search(f"{record.said}\n{record.reply}", 1)[0]
        assert (best.said, best.reply) == (record.said, record.reply)
        assert record in index.search(record.said, 5) or any(r.said == record.said for r in index.search(record.said, 5))


def test_training_never_gets_an_exchange_of_the_samples_own_scene(prepared):
    index = CanonIndex.load(canon_path(prepared))
    style = PromptStyle("alpaca", "你是甄嬛。", "甄嬛", canon_k=3)
    everything = with_canon(load_samples(prepared), index, style, len)
    scene_of = {(r.speaker, r.said, r.reply): (r.file, r.scene) for r in index.records}
    own_scene = {(r.said, r.reply): (r.file, r.scene) for r in index.records}
    # The script's samples; the 4 identity pairs come from no scene (they get canon as any message would).
    samples = [s for s in everything if (s.instruction, s.output) in own_scene]
    assert len(samples) == len(everything) - 4
    assert sum(bool(s.canon) for s in samples) > 0.9 * len(samples)
    for sample in samples:
        mine = own_scene[(sample.instruction, sample.output)]
        assert all(scene_of[(c.speaker, c.said, c.reply)] != mine for c in sample.canon), sample
        assert (sample.instruction, sample.output) not in {(c.said, c.reply) for c in sample.canon}
    # Without the exclusion the sample's own exchange is what BM25 finds first.
    first = load_samples(prepared)[0]
    assert index.search(f"{first.instruction}\n{first.output}", 1)[0].reply == first.output


def test_canon_is_rendered_after_the_history_and_within_its_token_share(prepared):
    index = CanonIndex.load(canon_path(prepared))
    found = index.search("皇上", 3)
    canon = fit(found, "甄嬛", 60, len)
    assert 0 < len(canon) < 3 or sum(len(c.said) + len(c.reply) for c in canon) < 60
    block = f"{CANON_HEADING}\n{canon[0].speaker}：{canon[0].said}\n甄嬛：{canon[0].reply}"
    sample = Sample("皇上万福", canon=canon, history=(Exchange("用户", "你好"), Exchange("甄嬛", "嗯。")))
    prompt = PromptStyle("alpaca", "你是甄嬛。", "甄嬛", canon_k=3).prompt(sample, None)
    assert prompt.index("### Input:\n用户：你好\n甄嬛：嗯。\n\n" + block) < prompt.index("### Instruction:\n皇上万福")
    # The tutorial's order: the canon joins the persona.
    tutorial = PromptStyle("alpaca", "你是甄嬛。", "甄嬛", canon_k=3, history_first=False).prompt(sample, None)
    assert tutorial.startswith(f"你是甄嬛。\n\n{block}")
    assert tutorial.index("### Instruction:\n皇上万福") < tutorial.index("### Input:\n用户：你好")


def test_serving_asks_in_the_format_the_adapter_learned():
    trained = {"config": {"prompt": {"canon_k": 2, "canon_max_tokens": 128}}}
    assert served_canon(trained, 3, 384) == (2, 128)
    assert served_canon({"config": {"prompt": {"canon_k": 0}}}, 3, 384) == (0, 384)
    assert served_canon({}, 3, 384) == (3, 384)  # an adapter from before canon; or the base
    assert served_canon(trained, 0, 384) == (0, 384)  # [canon] k = 0 turns it off


def test_role_confusion_is_playing_another_character():
    others = ("皇后", "华妃", "皇帝", "甄嬛眉庄", "小")
    assert role_confusion("皇后：你来了。", NAMES, others)
    assert role_confusion("臣妾明白。\n华妃（冷笑）：那又如何？", NAMES, others)
    assert role_confusion("我是华妃。", NAMES, others)
    assert role_confusion("甄嬛她今日不在宫中。", NAMES, others)
    assert role_confusion("这位莞贵人好生标致。", NAMES, others)
    for in_role in ("臣妾甄嬛给皇上请安。", "嬛嬛明白。", "华妃娘娘吉祥。", "皇上说的是。", "小允子，去吧。"):
        assert not role_confusion(in_role, NAMES, others), in_role


def test_a_missing_or_broken_index_says_which_file_and_what_to_do(tmp_path):
    with pytest.raises(UserError, match=r"missing\.canon\.jsonl: canon index not found — run `rolebot prepare`"):
        CanonIndex.load(tmp_path / "missing.canon.jsonl")
    broken = tmp_path / "broken.canon.jsonl"
    broken.write_text('{"said": "x"}\nnot json\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"broken\.canon\.jsonl:1: not a canon exchange .*\[canon\] k = 0"):
        CanonIndex.load(broken)
    empty = tmp_path / "empty.canon.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match="holds no exchanges"):
        CanonIndex.load(empty)


def test_training_without_an_index_trains_without_canon_and_says_so(prepared, tmp_path, capsys):
    """Hand-written pairs, or pairs prepared before indexes, have no index beside them: the run
    says so in one line and trains without canon (meta.json records canon_k = 0, so the version
    is served the same way; tests/test_train.py trains such a version). A broken index still
    stops the run before any model loads."""
    from training.canon import training_index

    style = PromptStyle("alpaca", "你是甄嬛。", "甄嬛", canon_k=3)
    assert training_index(tmp_path / "pairs.canon.jsonl", style) is None
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{tmp_path / 'pairs.canon.jsonl'}: no canon index beside the pairs" in err
    assert "training without canon" in err and "rolebot prepare" in err
    pairs = tmp_path / "pairs.json"
    pairs.write_text(prepared.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "pairs.canon.jsonl").write_text("not json\n", encoding="utf-8")
    (tmp_path / "config.toml").write_text("[training]\nmax_steps = 1\n\n[canon]\ntrain = true\n", encoding="utf-8")
    assert main(["--config", str(tmp_path / "config.toml"), "train", "--data", str(pairs)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert f"{tmp_path / 'pairs.canon.jsonl'}:1: not a canon exchange" in err and "[canon] train = false" in err


# Serving: the real engine on the builtin model, a real store.

SERVING = """
[model]
max_seq_length = 256

[character]
persona = "你是甄嬛，说话含蓄得体。"

[canon]
k = 3
max_tokens = 200

[generation]
max_new_tokens = 8
temperature = 0.0
history_turns = 8

[console]
enabled = false
"""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(tmp_path_factory, builtin_path):
    from bot.engine import make_engine

    root = tmp_path_factory.mktemp("served")
    (root / "config.toml").write_text(SERVING, encoding="utf-8")
    engine = make_engine(load_config(str(root / "config.toml")), None)
    await engine.start()
    yield engine
    await engine.close()


def serving_config(tmp_path: Path, prepared: Path):
    (tmp_path / "config.toml").write_text(SERVING + f'\n[training]\ndata = "{prepared.as_posix()}"\n', encoding="utf-8")
    config = load_config(str(tmp_path / "config.toml"))
    config.store.path = str(tmp_path / "bot.db")
    return config


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_served_prompts_hold_canon_and_fit_the_budget(engine, prepared, tmp_path):
    from bot.canon import ServedCanon
    from bot.service import IncomingMessage, Service
    from bot.store import Store
    from training.registry import Registry

    config = serving_config(tmp_path, prepared)
    canon = ServedCanon.load(config, Registry(config.adapter_root, config.character.name))
    assert canon is not None and len(canon.index) > 20
    line = canon.index.records[0]
    async with Store.open(config.database) as store:
        service = Service(config, store, engine, canon=canon)
        reply = await service.handle(IncomingMessage("web", "c1", "u1", line.said))
        await reply.result()
        prompt = stored_prompt(config, reply.message_id)
        assert CANON_HEADING in prompt and line.reply in prompt
        assert engine.count_tokens(prompt) <= engine.max_prompt_tokens
        # A long chat: its history goes first, then the least similar canon; the prompt fits.
        for n in range(6):
            await (await service.handle(IncomingMessage("web", "c2", "u2", "前情" * 30 + str(n)))).result()
        reply = await service.handle(IncomingMessage("web", "c2", "u2", line.said))
        await reply.result()
        prompt = stored_prompt(config, reply.message_id)
        assert engine.count_tokens(prompt) <= engine.max_prompt_tokens
        assert CANON_HEADING in prompt and line.reply in prompt  # the best exchange stays
        full = canon.lookup(line.said, None, engine.count_tokens)
        kept = [c for c in full if f"{c.speaker}：{c.said}\n甄嬛：{c.reply}" in prompt]
        assert len(kept) == len(full) or "前情" not in prompt
        await service.close()


def stored_prompt(config, message_id: int) -> str:
    import sqlite3

    with sqlite3.connect(config.database) as conn:
        return conn.execute("SELECT prompt FROM messages WHERE id = ?", (message_id,)).fetchone()[0]


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_broken_index_is_one_line_and_the_bot_serves_without_canon(engine, prepared, tmp_path, capsys):
    from bot.canon import ServedCanon
    from bot.service import IncomingMessage, Reply, Service
    from bot.store import Store
    from training.registry import Registry

    data = tmp_path / "pairs.json"
    data.write_text(prepared.read_text(encoding="utf-8"), encoding="utf-8")
    canon_path(data).write_text("{broken\n", encoding="utf-8")
    config = serving_config(tmp_path, data)
    assert ServedCanon.load(config, Registry(config.adapter_root, config.character.name)) is None
    err = capsys.readouterr().err.strip()
    assert err == (f"rolebot: {canon_path(data)}:1: not a canon exchange (Expecting property name enclosed in "
                   "double quotes: line 1 column 2 (char 1)) — run `rolebot prepare` again (it writes the index "
                   "next to the pairs), or turn canon off: [canon] k = 0 (or [canon] train = false for training "
                   "only); serving without canon until then")
    async with Store.open(config.database) as store:
        service = Service(config, store, engine, canon=None)
        reply = await service.handle(IncomingMessage("web", "c1", "u1", "皇上吉祥"))
        assert isinstance(reply, Reply) and (await reply.result()).status == "complete"
        await service.close()


def test_bm25s_is_kept_from_starting_jax_on_the_gpu():
    """bm25s runs a JAX top-k when it is imported wherever JAX is installed; JAX would then take
    75% of the GPU's memory. The retriever keeps JAX on the CPU (rolebot never uses JAX)."""
    code = ("import os, sys; sys.modules.pop('jax', None); os.environ.pop('JAX_PLATFORMS', None)\n"
            "from training.bm25 import BM25\n"
            "BM25(['宫中', '御花园'])\n"
            "print(os.environ.get('JAX_PLATFORMS'))")
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "JAX_PLATFORMS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cpu"
