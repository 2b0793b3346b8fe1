"""Character cards through the CLI as a user runs it: import into a commented config.toml,
export back (JSON and PNG), and one clear line for each kind of bad card."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import tomllib
import zlib
from pathlib import Path

import pytest

from bot.cards import parse_card, read_card
from bot.cli import main
from bot.config import load_config
from bot.toml_edit import set_keys
from training.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "tests" / "data" / "aldric-venn.card.json"


def png(width: int = 2, height: int = 2) -> bytes:
    """A real RGB PNG, built by hand: signature, IHDR, one IDAT, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + bytes([200, 30, 30]) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"tEXt", b"Software\0hand") + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.fixture
def project(tmp_path):
    """A copy of the shipped config.toml, comments and all, in an empty folder."""
    shutil.copy(ROOT / "config.toml", tmp_path / "config.toml")
    return tmp_path / "config.toml"


def run(*argv: str) -> int:
    return main(list(argv))


def test_import_writes_the_character_and_keeps_the_rest_of_the_config(project, capsys):
    before_text = project.read_text(encoding="utf-8")
    before = load_config(str(project))

    assert run("--config", str(project), "card", "import", str(CARD)) == 0

    config = load_config(str(project))
    character = config.character
    assert character.name == "Aldric Venn" and character.aliases == []
    assert character.persona.startswith("Write Aldric Venn's next reply in a fictional roleplay with User.")
    assert "Aldric Venn is the keeper of the Saltmarsh lighthouse" in character.persona
    assert "Personality: gruff, patient" in character.persona
    assert "Scenario: A storm has driven User's boat onto the rocks" in character.persona
    assert "Example dialogue:\nUser: Why do you stay out here alone?\nAldric Venn: *He taps" in character.persona
    assert "<START>" not in character.persona and "forgive.\"\n\nUser: Can I whistle" in character.persona
    assert "{{" not in character.persona
    assert character.greeting.startswith("*The door bangs shut against the gale.")
    assert character.greeting_for("Mara").endswith("You're the third fool the Teeth have tried to eat this year, "
                                                   "Mara, and the only one still breathing.\"")
    assert (project.parent / character.card).is_file()
    # Every other setting and every comment line is as it was.
    for section in ("model", "lora", "training", "generation", "retrain", "web"):
        assert getattr(config, section) == getattr(before, section), section
    after_text = project.read_text(encoding="utf-8")
    assert [line for line in before_text.splitlines() if line.startswith("#")] == \
        [line for line in after_text.splitlines() if line.startswith("#")]
    assert character.script == before.character.script
    out = capsys.readouterr().out
    assert "[character] is now Aldric Venn" in out and "alternate_greetings, post_history_instructions" in out


def test_export_round_trips_the_imported_card(project, tmp_path):
    original = json.loads(CARD.read_text(encoding="utf-8"))
    assert run("--config", str(project), "card", "import", str(CARD)) == 0

    assert run("--config", str(project), "card", "export", "--output", str(tmp_path / "out.json")) == 0

    exported = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert (exported["spec"], exported["spec_version"]) == ("chara_card_v2", "2.0")
    assert exported["data"] == original["data"]
    # Importing the export gives the same character.
    first = load_config(str(project)).character
    assert run("--config", str(project), "card", "import", str(tmp_path / "out.json")) == 0
    again = load_config(str(project)).character
    assert (again.name, again.persona, again.greeting) == (first.name, first.persona, first.greeting)


def test_an_edited_persona_and_greeting_are_what_the_export_carries(project, tmp_path):
    assert run("--config", str(project), "card", "import", str(CARD)) == 0
    text = project.read_text(encoding="utf-8")
    character = load_config(str(project)).character
    text = set_keys(text, "character", {"persona": "Aldric keeps the light.", "greeting": "Drink, {{user}}."},
                    {}, project)
    project.write_text(text, encoding="utf-8")

    assert run("--config", str(project), "card", "export", "--output", str(tmp_path / "out.json")) == 0

    data = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))["data"]
    assert (data["description"], data["personality"], data["scenario"], data["mes_example"]) == (
        "Aldric keeps the light.", "", "", "")
    assert data["first_mes"] == "Drink, {{user}}." and data["tags"][:2] == ["male", "sea"]
    assert character.name == data["name"]


def test_png_cards_embed_and_extract(project, tmp_path):
    picture = tmp_path / "aldric.png"
    picture.write_bytes(png())
    assert run("--config", str(project), "card", "import", str(CARD)) == 0

    assert run("--config", str(project), "card", "export", "--image", str(picture),
               "--output", str(tmp_path / "card.png")) == 0

    written = (tmp_path / "card.png").read_bytes()
    assert written.startswith(b"\x89PNG\r\n\x1a\n") and b"tEXtchara\0" in written
    # The picture passes through: without the card chunk, the bytes are the original's.
    card_json = json.dumps(read_card(tmp_path / "card.png").as_v2(), ensure_ascii=False).encode()
    chunk = b"tEXtchara\0" + base64.b64encode(card_json)
    start = written.index(chunk) - 4
    assert written[:start] + written[start + 4 + len(chunk) + 4:] == picture.read_bytes()
    PIL = pytest.importorskip("PIL.Image")
    with PIL.open(tmp_path / "card.png") as image:
        assert image.size == (2, 2) and image.getpixel((0, 0)) == (200, 30, 30)
        assert json.loads(base64.b64decode(image.text["chara"]))["data"]["name"] == "Aldric Venn"

    # Exporting onto a card PNG replaces its card; importing the PNG gives the same character.
    assert run("--config", str(project), "card", "export", "--image", str(tmp_path / "card.png"),
               "--output", str(tmp_path / "again.png")) == 0
    assert (tmp_path / "again.png").read_bytes().count(b"tEXtchara\0") == 1
    imported = tmp_path / "fresh" / "config.toml"
    assert run("--config", str(imported), "card", "import", str(tmp_path / "card.png")) == 0
    assert load_config(str(imported)).character.persona == load_config(str(project)).character.persona


def test_a_v1_card_and_a_chinese_card(tmp_path):
    v1 = parse_card({"name": "沈眉庄", "description": "{{char}}是甄嬛的闺中密友，端庄稳重。", "personality": "温婉、刚烈",
                     "scenario": "{{user}}在御花园遇见{{char}}。", "first_mes": "妹妹来了。", "mes_example": ""},
                    "v1.json")
    assert v1.persona("用户") == "沈眉庄是甄嬛的闺中密友，端庄稳重。\n\n性格：温婉、刚烈\n\n场景：用户在御花园遇见沈眉庄。"
    assert (v1.tags, v1.extensions) == ((), {})
    path = tmp_path / "config.toml"
    (tmp_path / "眉庄.json").write_text(json.dumps(v1.as_v2(), ensure_ascii=False), encoding="utf-8")
    assert run("--config", str(path), "card", "import", str(tmp_path / "眉庄.json")) == 0
    config = load_config(str(path))
    assert (config.character.name, config.character.greeting) == ("沈眉庄", "妹妹来了。")
    assert tomllib.loads(path.read_text(encoding="utf-8"))["character"]["aliases"] == []


def bad_png_crc() -> bytes:
    data = bytearray(png())
    data[20] ^= 0xFF  # inside IHDR
    return bytes(data)


def v2(**data) -> str:
    fields = {"name": "Aldric", "description": "", "personality": "", "scenario": "", "first_mes": "",
              "mes_example": "", **data}
    return json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": fields})


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notjson.json", b"name: Aldric", "notjson.json: not JSON: Expecting value at line 1, column 1"),
        ("list.json", b"[1, 2]", "list.json: a card is a JSON object, got a list"),
        ("missing.json", json.dumps({"spec": "chara_card_v2", "spec_version": "2.0",
                                     "data": {"name": "A", "description": ""}}).encode(),
         "missing.json: field data.personality is missing"),
        ("tags.json", v2(tags="sea").encode(), "tags.json: field data.tags must be a list of strings, got \"sea\""),
        ("greeting.json", v2(first_mes=3).encode(), "greeting.json: field data.first_mes must be a string, got 3"),
        ("noname.json", v2(name=" ").encode(), "noname.json: field data.name is empty"),
        ("v3.json", json.dumps({"spec": "chara_card_v3", "spec_version": "3.0", "data": {}}).encode(),
         "v3.json: field spec is 'chara_card_v3'"),
        ("nodata.json", json.dumps({"spec": "chara_card_v2", "spec_version": "2.0"}).encode(),
         "nodata.json: field data must be an object"),
        ("latin1.json", "{\"name\": \"Ald\xefric\"}".encode("latin-1"), "latin1.json: not UTF-8 text"),
        ("fake.png", b"GIF89a....", "fake.png: not a PNG file"),
        ("crc.png", bad_png_crc(), "crc.png: broken PNG: chunk 'IHDR' at byte 8 fails its CRC check"),
        ("cut.png", png()[:40], "cut.png: broken PNG"),
        ("plain.png", png(), "plain.png: this PNG carries no character card (no 'chara' tEXt chunk)"),
    ],
)
def test_bad_cards_are_one_clear_line_naming_file_and_field(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    config = tmp_path / "config.toml"
    config.write_text("# mine\n[web]\nport = 9000\n", encoding="utf-8")

    assert run("--config", str(config), "card", "import", str(path)) == 2

    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert config.read_text(encoding="utf-8") == "# mine\n[web]\nport = 9000\n"


def png_card(text: bytes) -> bytes:
    """A PNG whose 'chara' chunk carries ``text`` (a card's JSON), as SillyTavern writes one."""
    image, data = png(), b"chara\0" + base64.b64encode(text)
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return image[:-12] + chunk + image[-12:]


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# Cards made to break the importer (issue 27): each is one line naming the card and the field,
# and the config is left as it was, loadable.
HOSTILE = [
    ("deep.json", deep(100_000).encode(), "deep.json: the card's JSON is nested more than 64 deep"),
    ("deep.png", png_card(deep(100_000).encode()),
     "deep.png (PNG chunk 'chara'): the card's JSON is nested more than 64 deep"),
    ("deepext.json", v2(extensions={"x": 0}).replace('{"x": 0}', '{"x": ' + deep(100_000) + "}").encode(),
     "deepext.json: field data.extensions.x[0][0][0][0][0]… is nested more than 64 deep"),
    ("deepext.png", png_card(v2(extensions={"x": 0}).replace('{"x": 0}', '{"a": {"b": ' + deep(100) + "}}").encode()),
     "deepext.png (PNG chunk 'chara'): field data.extensions.a.b[0][0][0][0]… is nested more than 64 deep"),
    ("surrogate.json", v2(name="\ud800").encode(),
     "surrogate.json: field data.name holds a lone UTF-16 surrogate (\\ud800 at character 1)"),
    ("surrogate-ext.json", v2(extensions={"k": ["ok", "bad \udfff"]}).encode(),
     "surrogate-ext.json: field data.extensions.k[1] holds a lone UTF-16 surrogate (\\udfff at character 5)"),
    ("long.json", v2(name="A" * 5_000_000).encode(),
     "long.json: field data.name is 5,000,000 characters; a character's name is at most 64"),
    ("evil.json", v2(name="../../../etc/evil").encode(),
     "evil.json: field data.name '../../../etc/evil' cannot name the character's adapter folder: it holds '/'"),
    ("hidden.json", v2(name=".evil").encode(), "hidden.json: field data.name '.evil' cannot name"),
    ("newline.json", v2(name="Al\ndric").encode(), "newline.json: field data.name 'Al\\ndric' cannot name"),
    ("big.json", v2(description="d" * 50_000_000).encode(),
     "big.json: field data.description is 50,000,000 characters; a card's text fields are at most 100,000"),
    ("greetings.json", v2(alternate_greetings=["hi", "g" * 100_001]).encode(),
     "greetings.json: field data.alternate_greetings[1] is 100,001 characters"),
    ("number.json", v2(extensions={"n": 0}).replace('"n": 0', '"n": 1' + "0" * 5000).encode(),
     "number.json: not JSON: Exceeds the limit (4300 digits)"),
]


@pytest.mark.parametrize(("name", "content", "message"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_cards_are_one_line_and_leave_a_config_that_loads(project, tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    before = project.read_text(encoding="utf-8")

    assert run("--config", str(project), "card", "import", str(path)) == 2

    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1 and len(err) < 400, err[:2000]
    assert project.read_text(encoding="utf-8") == before and not (tmp_path / "cards").exists()
    assert load_config(str(project)).character.name == "甄嬛"


def test_a_card_with_odd_but_valid_text_imports_and_loads_back(project, tmp_path):
    """Characters TOML writes differently from JSON (DEL, other controls, quotes, backslashes)
    and a name at the limit: the config written loads back with the same values."""
    name = "Dr. 王: \"The\" Doctor "
    name += "x" * (64 - len(name))
    greeting = "hi\x7f there \x1b[0m \\ \"quoted\" \u2028 end"
    path = tmp_path / "odd.json"
    path.write_text(v2(name=name, first_mes=greeting, description="line\x7f one\nline two"), encoding="utf-8")

    assert run("--config", str(project), "card", "import", str(path)) == 0

    character = load_config(str(project)).character
    assert (character.name, character.greeting) == (name, greeting) and len(name) == 64
    assert character.persona == "line\x7f one\nline two"


def test_a_hand_edited_name_that_cannot_name_a_folder_is_one_line_naming_the_line(tmp_path):
    path = tmp_path / "config.toml"
    for name, problem in (("../../etc/evil", "holds '/'"), ("A" * 65, "is 65 characters")):
        path.write_text(f'# mine\n[character]\nname = "{name}"\n', encoding="utf-8")
        with pytest.raises(UserError, match=rf"config.toml:3: \[character\] name: .*{re.escape(problem)}"):
            load_config(str(path))


def test_a_chara_chunk_that_is_not_base64_and_a_missing_file_are_named(tmp_path, capsys):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    image = png()
    path = tmp_path / "card.png"
    path.write_bytes(image[:-12] + chunk(b"tEXt", b"chara\0not base64!") + image[-12:])
    with pytest.raises(UserError, match="card.png: the PNG's 'chara' chunk is not base64 text"):
        read_card(path)
    assert run("--config", str(tmp_path / "config.toml"), "card", "import", str(tmp_path / "nowhere.json")) == 2
    assert "nowhere.json: no such card file" in capsys.readouterr().err
    assert not (tmp_path / "config.toml").exists()


def test_export_refuses_a_png_without_a_picture_and_a_bad_picture(project, tmp_path, capsys):
    assert run("--config", str(project), "card", "export", "--output", str(tmp_path / "x.png")) == 2
    assert "x.png: a PNG card needs the character's picture: add --image PNG" in capsys.readouterr().err
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 jpeg")
    assert run("--config", str(project), "card", "export", "--image", str(tmp_path / "photo.jpg"),
               "--output", str(tmp_path / "x.png")) == 2
    assert "photo.jpg: not a PNG file" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_setting_keys_keeps_multiline_values_comments_and_other_sections(tmp_path):
    text = ('# top\n[character]\n# who\npersona = """\nline one\n[not a header]\n"""\n'
            'name = "x"  # trailing\n\n# The model.\n[model]\nbase = "b"\n')
    result = set_keys(text, "character", {"persona": "new\n[still not a header] \"quoted\" \\ back",
                                          "greeting": "hi"}, {"greeting": "the greeting"}, tmp_path / "c.toml")
    parsed = tomllib.loads(result)
    assert parsed["character"] == {"persona": "new\n[still not a header] \"quoted\" \\ back", "name": "x",
                                   "greeting": "hi"}
    assert parsed["model"] == {"base": "b"}
    assert result.index("# the greeting\ngreeting = \"hi\"") < result.index("# The model.")
    assert result.startswith("# top\n[character]\n# who\npersona = ")
    assert set_keys("", "character", {"name": "y"}, {"name": "the name"}, tmp_path / "c.toml") == \
        "[character]\n# the name\nname = \"y\"\n"
