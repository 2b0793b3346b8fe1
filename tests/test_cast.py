"""A cast: several characters of one script on one base model, each with its own adapter.

Config mistakes are one line each; the shared engine routes every token to its request's
adapter, so a character's greedy reply in a mixed batch is byte-identical to its reply in a batch
of its own; a character's hot swap leaves the other's replies in flight alone; conversations,
ratings and retraining data are per character."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import pytest_asyncio

from bot.cli import main
from bot.config import GenerationSettings, load_config, parse_config
from bot.engine.base import make_engines
from bot.engine.cast import CastEngine
from bot.store import ReplyCost, Store
from training.errors import UserError
from training.logs import open_snapshot
from training.prompts import Sample
from training.registry import Registry, Version

CAST = """
[[cast]]
name = "甄嬛"
aliases = ["嬛嬛", "莞贵人"]

[[cast]]
name = "皇帝"
aliases = ["皇上"]
persona = "你是大清皇帝，威严而多疑。"

[model]
max_seq_length = 512

[generation]
max_new_tokens = 12
temperature = 0.0
max_batch_size = 8

[adapters]
dir = "adapters"
"""


# -- config ------------------------------------------------------------------------------

@pytest.mark.parametrize(("toml", "message"), [
    ('[[cast]]\nname = "甄嬛"\n[[cast]]\nname = "甄嬛"\n',
     "bad.toml:3: [[cast]] #2: name '甄嬛' twice in the cast"),
    ('[[cast]]\nname = "甄嬛"\naliases = ["皇上"]\n[[cast]]\nname = "皇帝"\naliases = ["皇上"]\n',
     "bad.toml:4: [[cast]] #2: alias '皇上' already names '甄嬛'"),
    # a [[cast]] has no aliases unless it gives them ([character]'s default ones are 甄嬛's)
    ('[[cast]]\nname = "甄嬛"\n[[cast]]\nname = "嬛嬛"\n', None),
    ('[[cast]]\naliases = ["x"]\n', "bad.toml:1: [[cast]] #1: name is missing"),
    ('[character]\nname = "皇帝"\n[[cast]]\nname = "皇帝"\n', "bad.toml:3: [[cast]] #1: name '皇帝' twice in the cast"),
    ('[character]\nname = "甄嬛"\n[[cast]]\nname = "皇帝"\naliases = ["莞贵人"]\n',
     "bad.toml:3: [[cast]] #1: alias '莞贵人' already names '甄嬛'"),
    ('[[cast]]\nname = "甄嬛"\nmood = 3\n', "bad.toml:3: [cast] mood: unknown key"),
    ('cast = 3\n', "cast must be [[cast]] tables"),
    ('[[cast]]\nname = "甄嬛"\n[[cast]]\nname = "皇帝"\n[training]\ndata = "x.json"\n',
     "bad.toml:6: [training] data names one character's pairs"),
])
def test_a_bad_cast_is_one_clear_line(tmp_path, capsys, toml, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(toml, encoding="utf-8")
    if message is None:
        assert [m.name for m in load_config(str(bad)).members] == ["甄嬛", "嬛嬛"]
        return
    with pytest.raises(UserError) as caught:
        load_config(str(bad))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert main(["--config", str(bad), "chat", "--once", "hi"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_cast_member_who_never_speaks_stops_the_start(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text('[[cast]]\nname = "甄嬛"\n[[cast]]\nname = "华妃"\n[web]\nenabled = false\n'
                      '[console]\nenabled = false\n', encoding="utf-8")
    assert main(["--config", str(config), "chat", "--once", "hi"]) == 2
    err = capsys.readouterr().err
    assert "[[cast]] '华妃': never speaks in sample_script.txt" in err and "甄嬛" in err and "Traceback" not in err


def test_a_cast_resolves_names_and_aliases(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(CAST, encoding="utf-8")
    config = load_config(str(path))
    assert [m.name for m in config.members] == ["甄嬛", "皇帝"] and config.character.name == "甄嬛"
    emperor = config.for_character("皇上")
    assert emperor.character.name == "皇帝" and emperor.store_key == "皇帝" and not emperor.first
    assert config.store_key == "" and config.first
    assert "威严" in emperor.prompt_style().persona and emperor.prompt_style().character == "皇帝"
    assert config.member(None).name == "甄嬛"
    with pytest.raises(UserError, match="no character '华妃' in the cast — known: 甄嬛, 皇帝"):
        config.member("华妃")
    # [character] beside [[cast]] tables is the cast's first
    path.write_text('[character]\nname = "甄嬛"\n[[cast]]\nname = "皇帝"\n', encoding="utf-8")
    both = load_config(str(path))
    assert [m.name for m in both.members] == ["甄嬛", "皇帝"] and both.character.aliases[:1] == ["嬛嬛"]
    assert both.for_character("皇帝").character.aliases == []
    # a member with no persona gets one in its own name, not 甄嬛's
    path.write_text(CAST.replace('persona = "你是大清皇帝，威严而多疑。"\n', ""), encoding="utf-8")
    assert load_config(str(path)).for_character("皇帝").character.persona.startswith("你是皇帝")


# -- the store: a conversation per chat and character --------------------------------------------

async def test_each_character_has_its_own_conversation_in_a_chat(tmp_path):
    async with Store.open(tmp_path / "bot.db") as store:
        first = await store.add_user_message("web", "alice", "alice", "皇上吉祥")
        other = await store.add_user_message("web", "alice", "alice", "皇上万福", character="皇帝")
        assert first.conversation_id != other.conversation_id
        assert (await store.current_conversation("web", "alice")).id == first.conversation_id
        assert (await store.current_conversation("web", "alice", "皇帝")).id == other.conversation_id
        await store.new_conversation("web", "alice", "皇帝")  # /reset with 皇帝 leaves 甄嬛's chat open
        assert (await store.current_conversation("web", "alice")).id == first.conversation_id
        for user in (first, other):
            reply = await store.start_reply(user.id, adapter_version="v0001", prompt="p", sampling={})
            await store.finish_reply(reply.id, "臣妾在", ReplyCost())
            await store.rate(reply.id, "web", "alice", 1)
        assert await store.ratings_since(0) == 2
        assert await store.ratings_since(0, "甄嬛", first=True) == 1
        assert await store.ratings_since(0, "皇帝", first=False) == 1
    with open_snapshot(tmp_path / "bot.db", "皇帝", first=False) as snapshot:
        rated = snapshot.rated_replies()
    assert [r.user_text for r in rated] == ["皇上万福"]
    with open_snapshot(tmp_path / "bot.db", "甄嬛", first=True) as snapshot:
        assert [r.user_text for r in snapshot.rated_replies()] == ["皇上吉祥"]


# -- the engine: one base, an adapter per request ------------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory, builtin_path) -> Path:
    root = tmp_path_factory.mktemp("cast")
    (root / "config.toml").write_text(CAST, encoding="utf-8")
    return root


def _adapter(registry: Registry, builtin_path, seed: int, rank: int = 8) -> Version:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(builtin_path)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    with registry.writing() as draft:
        model.save_pretrained(draft.path)
        return draft.commit({"base_model": "builtin:smollm2-135m"})


@pytest.fixture(scope="module")
def adapters(project, builtin_path) -> dict[str, list[Version]]:
    """Different non-zero weights per character; 皇帝 has a second version of the same shape."""
    root = project / "adapters"
    return {"甄嬛": [_adapter(Registry(root, "甄嬛"), builtin_path, 1)],
            "皇帝": [_adapter(Registry(root, "皇帝"), builtin_path, 2), _adapter(Registry(root, "皇帝"), builtin_path, 3)]}


def _config(project):
    return parse_config((project / "config.toml").read_text(encoding="utf-8"), project / "config.toml")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cast(project, adapters):
    engine, voices = make_engines(_config(project), {"甄嬛": adapters["甄嬛"][0], "皇帝": adapters["皇帝"][0]})
    assert isinstance(engine, CastEngine)
    await engine.start()
    yield engine, voices
    await engine.close()


async def _text(stream) -> str:
    return "".join([piece async for piece in stream])


PROMPTS = ["皇上吉祥！", "你今天怎么样？", "嬛嬛，你可知罪？", "今晚月色真美。"]
GREEDY = GenerationSettings(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_mixed_batch_gives_each_character_its_own_replies(cast):
    engine, voices = cast
    zhen, emperor = voices["甄嬛"], voices["皇帝"]
    prompts = {name: [voice.render(Sample(instruction=p)) for p in PROMPTS] for name, voice in voices.items()}
    alone = {}
    for name, voice in voices.items():  # each character's batch alone
        alone[name] = await asyncio.gather(*(_text(voice.generate(p, GREEDY)) for p in prompts[name]))
    mixed = await asyncio.gather(*(_text(voices[name].generate(p, GREEDY))
                                   for i in range(len(PROMPTS)) for name in ("甄嬛", "皇帝")
                                   for p in [prompts[name][i]]))
    assert mixed[0::2] == alone["甄嬛"] and mixed[1::2] == alone["皇帝"]  # byte-identical on the CPU
    assert alone["甄嬛"] != alone["皇帝"]  # the adapters differ, and so do their replies
    assert engine.status().largest_batch >= 4
    assert "2 characters' adapters on one base" in zhen.status().batching
    assert (zhen.adapter_version, emperor.adapter_version) == ("v0001", "v0001")  # each its own registry's


@pytest.mark.asyncio(loop_scope="module")
async def test_one_characters_swap_leaves_the_others_replies_in_flight(cast, adapters):
    engine, voices = cast
    zhen, emperor = voices["甄嬛"], voices["皇帝"]
    long = GenerationSettings(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0)
    prompt = zhen.render(Sample(instruction="讲讲你入宫的故事吧。"))
    before = await _text(zhen.generate(prompt, long))
    flight = zhen.generate(prompt, long)
    swaps = engine.counters.swaps
    await emperor.swap_adapter(adapters["皇帝"][1])  # 皇帝 has nothing in flight: no wait for 甄嬛
    assert engine.counters.swaps == swaps + 1 and emperor.adapter_version == adapters["皇帝"][1].name
    during = await _text(flight)
    assert during == before and flight.stats.adapter_version == adapters["甄嬛"][0].name
    assert zhen.adapter_version == adapters["甄嬛"][0].name
    # 皇帝's new version speaks now, and its cached prompt blocks of the old version are not reused
    after = await _text(emperor.generate(emperor.render(Sample(instruction=PROMPTS[0])), GREEDY))
    await emperor.swap_adapter(adapters["皇帝"][0])
    again = await _text(emperor.generate(emperor.render(Sample(instruction=PROMPTS[0])), GREEDY))
    assert after != again


# -- the bot: who answers where ------------------------------------------------------------------

async def test_the_api_routes_by_model_and_each_character_keeps_its_own_conversation(project, adapters):
    import aiohttp

    from served import rows, serving

    from bot.datasets import dataset_files

    for name in ("甄嬛", "皇帝"):  # each character's pairs and canon, as a first training prepares them
        dataset_files(_config(project).for_character(name), quiet=True)
    async with serving(project, CAST + '\n[web]\nport = 0\n') as (app, url):
        assert [s.character for s in app.cast] == ["甄嬛", "皇帝"]
        # canon per character: the scenes where that character answers
        assert {r.replier for r in app.cast.get("皇帝").canon.index.records} == {"皇帝"}
        assert {r.replier for r in app.cast.default.canon.index.records} <= {"甄嬛", "嬛嬛", "莞贵人"}
        assert "甄嬛" in app.cast.get("皇帝").engine.hygiene.speakers  # his reply ends where she would begin
        assert (app.cast.get("皇上").engine.adapter_version, app.cast.default.engine.adapter_version) == ("v0002", "v0001")
        async with aiohttp.ClientSession() as http:
            models = await (await http.get(f"{url}/v1/models")).json()
            assert [m["id"] for m in models["data"]] == ["甄嬛", "皇帝"]
            chat = {"messages": [{"role": "user", "content": "朕的江山如何？"}], "user": "alice"}
            answer = await http.post(f"{url}/v1/chat/completions", json={**chat, "model": "皇上"})
            body = await answer.json()
            assert answer.status == 200 and body["model"] == "皇帝" and body["choices"][0]["message"]["content"]
            unknown = await http.post(f"{url}/v1/chat/completions", json={**chat, "model": "华妃"})
            error = (await unknown.json())["error"]
            assert unknown.status == 404 and error["code"] == "model_not_found" and "甄嬛, 皇帝" in error["message"]
            emperor = await (await http.get(f"{url}/api/conversation", params={"user": "alice", "character": "皇帝"})).json()
            assert emperor["character"] == "皇帝" and emperor["cast"] == ["甄嬛", "皇帝"]
            assert [t["text"] for t in emperor["turns"] if t["id"] is not None] == ["朕的江山如何？"]
            default = await (await http.get(f"{url}/api/conversation", params={"user": "alice"})).json()
            assert default["character"] == "甄嬛" and not [t for t in default["turns"] if t["id"] is not None]
            admin = await http.post(f"{url}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "/status"}], "user": "alice"})
            assert admin.status == 200
        logged = [tuple(r) for r in rows(
            app, "SELECT c.character, m.role FROM messages AS m JOIN conversations AS c ON c.id = m.conversation_id")]
        assert ("皇帝", "user") in logged and ("皇帝", "assistant") in logged and not any(c == "" for c, _ in logged)


async def test_a_chats_choice_of_character_survives_a_restart(tmp_path):
    async with Store.open(tmp_path / "bot.db") as store:
        assert await store.chat_character("telegram", "42") is None
        await store.set_chat_character("telegram", "42", "皇帝")
        await store.set_chat_character("telegram", "42", "甄嬛")
        await store.set_chat_character("telegram", "7", "皇帝")
    async with Store.open(tmp_path / "bot.db") as store:
        assert (await store.chat_character("telegram", "42"), await store.chat_character("telegram", "7")) == ("甄嬛", "皇帝")


# -- the loop per character -----------------------------------------------------------------------

async def _rated(store: Store, config, count: int) -> None:
    """``count`` 👍-rated replies of ``config.character`` in its own conversations, as the bot logs them."""
    from bot.datasets import dataset_files
    from training.dataset import load_samples

    style = config.prompt_style()
    pairs = load_samples(dataset_files(config, quiet=True).train)
    for i in range(count):
        pair = pairs[i % len(pairs)]
        asked = await store.add_user_message("web", f"chat{i}", f"user{i}", pair.instruction, character=config.store_key)
        reply = await store.start_reply(asked.id, adapter_version=None, prompt=style.prompt(Sample(pair.instruction), None),
                                        sampling={})
        await store.finish_reply(reply.id, pair.output, ReplyCost(completion_tokens=8))
        await store.rate(reply.id, "web", f"rater{i}", 1)


@pytest.mark.slow
async def test_a_characters_ratings_retrain_that_character_alone(tmp_path):
    """Ratings of 皇帝's replies retrain 皇帝 on them (not on 甄嬛's), promote his new version,
    and leave 甄嬛's adapters as they were; runs and pending ratings are per character, and one
    training process runs at a time."""
    from bot.retrain import Retrainer
    from test_retrain import TINY

    cast = CAST[:CAST.index("[model]")]  # the characters; the rest as the retrain tests have it
    (tmp_path / "config.toml").write_text(cast + TINY, encoding="utf-8")
    config = load_config(str(tmp_path / "config.toml"))
    zhen, emperor = config, config.for_character("皇帝")
    async with Store.open(config.database) as store:
        await _rated(store, emperor, 6)
        await _rated(store, zhen, 2)
        lock = asyncio.Lock()
        his, hers = Retrainer(emperor, store, lock=lock), Retrainer(zhen, store, lock=lock)
        assert (await his.new_ratings(), await hers.new_ratings()) == (6, 2)
        await his.request(trigger="admin", requested_by="test")
        with pytest.raises(UserError, match="already running"):
            await hers.request(trigger="admin")
        done = await his.wait()
        assert done.status == "succeeded", done.reason
        assert done.character == "皇帝" and done.metrics["liked"] == 5  # 6 rated, the latest held out for the gate
        assert Registry(config.adapter_root, "皇帝").active().name == "v0001"
        assert Registry(config.adapter_root, "甄嬛").versions() == []
        assert await his.new_ratings() == 0 and await hers.new_ratings() == 2
        assert await store.last_run(character="") is None


@pytest.mark.slow
async def test_serve_trains_the_characters_without_an_adapter_in_the_background(tmp_path, builtin_path):
    """甄嬛 has an adapter, 皇帝 none: the bot serves at once (皇帝 on the base model), trains 皇帝's
    first version in the background and hot-swaps it in; 甄嬛 keeps hers."""
    from bot.app import App
    from served import QUIET

    text = CAST + QUIET + "\n[web]\nenabled = false\n[training]\nfirst_run_steps = 2\nbatch_size = 1\n" \
        "grad_accum = 1\nwarmup_steps = 0\npack_length = 512\n"
    (tmp_path / "config.toml").write_text(text, encoding="utf-8")
    config = load_config(str(tmp_path / "config.toml"))
    hers = _adapter(Registry(config.adapter_root, "甄嬛"), builtin_path, 7)
    Registry(config.adapter_root, "甄嬛").activate(hers.name)
    app = await App.start(config, train=True)
    try:
        emperor = app.cast.get("皇帝")
        assert app.cast.default.engine.adapter_version == hers.name
        for _ in range(600):  # until the background training has swapped his version in
            if emperor.engine.adapter_version is not None:
                break
            await asyncio.sleep(0.5)
        assert emperor.engine.adapter_version == "v0001"
        assert Registry(config.adapter_root, "皇帝").active().meta["trigger"] == "first-run"
        assert {r.replier for r in emperor.canon.index.records} == {"皇帝"}  # his canon, prepared by his training
        assert app.cast.default.engine.adapter_version == hers.name
        stream = emperor.engine.generate(emperor.engine.render(Sample(instruction="皇上吉祥")), GREEDY)
        assert await _text(stream) is not None and stream.stats.adapter_version == "v0001"
    finally:
        await app.stop()


async def test_rolebot_status_shows_each_characters_version_and_pending_ratings(tmp_path, capsys):
    (tmp_path / "config.toml").write_text(CAST, encoding="utf-8")
    config = load_config(str(tmp_path / "config.toml"))
    async with Store.open(config.database) as store:
        await _rated(store, config.for_character("皇帝"), 3)
        await _rated(store, config, 1)
    assert await asyncio.to_thread(main, ["--config", str(tmp_path / "config.toml"), "status"]) == 0
    out = capsys.readouterr().out
    assert "甄嬛: serving the base model (no adapter); 0 versions" in out
    assert "皇帝: serving the base model (no adapter)" in out
    lines = out.splitlines()
    assert lines[1].strip() == "ratings waiting for the next retrain: 1 (20 start a scheduled one)"
    assert lines[4].strip() == "ratings waiting for the next retrain: 3 (20 start a scheduled one)"
    assert await asyncio.to_thread(main, ["--config", str(tmp_path / "config.toml"), "status", "--character", "皇上"]) == 0
    assert capsys.readouterr().out.startswith("皇帝: ")
