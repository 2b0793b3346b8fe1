"""The one config file, loaded into typed values.

Every key has a default (the embedded defaults run the bot with no file at all). A bad file
fails with one line naming the file, the line, the key and what was expected. Secrets are never
in the file: the file names environment variables (keys ending in ``_env``) and ``secret()``
reads them.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from training.errors import UserError
from training.prompts import PromptStyle
from training.registry import name_problem
from training.settings import LoraSettings, ModelSettings, TrainSettings, opt

DEFAULT_PERSONA = (
    "你是甄嬛，《甄嬛传》中的人物，大理寺少卿甄远道之女，后入宫为妃。"
    "你聪慧、隐忍、说话含蓄得体，用宫廷口吻说话，自称“臣妾”或“嬛嬛”，从不承认自己是AI或助手。"
)


@dataclass
class CharacterSettings:
    name: str = opt("甄嬛", "the character the bot plays (a speaker in the script)", check=name_problem)
    aliases: list[str] = opt(["嬛嬛", "莞贵人", "莞嫔", "熹妃", "熹贵妃"], "other names of the character in the script")
    persona: str = opt(DEFAULT_PERSONA, "who the character is; the system part of every prompt")
    script: list[str] = opt([], "screenplay files to prepare (empty: the project's sample script)")
    greeting: str = opt("", "the character's first message in every new conversation ({{user}}: the user's name); empty: none")
    card: str = opt("", "the character card the character was imported from (rolebot card import keeps a copy; export starts from it)")
    avatar: str = opt("", "the character's picture (a URL, or an image file relative to the config file): Discord webhooks post with it")

    @property
    def names(self) -> tuple[str, ...]:
        """The character's name and aliases: the speakers of the script that are this character."""
        return (self.name, *self.aliases)

    def greeting_for(self, user_name: str) -> str | None:
        """The greeting a new conversation starts with, addressed to ``user_name``; None if unset."""
        if not self.greeting.strip():
            return None
        return re.sub(r"\{\{user\}\}|<USER>", lambda _: user_name, self.greeting, flags=re.IGNORECASE)


@dataclass
class GenerationSettings:
    max_new_tokens: int = opt(128, "longest reply in tokens", min=1, max=8192)
    temperature: float = opt(0.7, "sampling temperature (0: greedy)", min=0.0, max=5.0)
    top_p: float = opt(0.9, "nucleus sampling mass", min=0.01, max=1.0)
    repetition_penalty: float = opt(1.1, "penalty for repeated tokens", min=1.0, max=3.0)
    stop: list[str] = opt(["###"], "strings that end a reply")
    max_batch_size: int = opt(0, "replies generated together: rows of the running batch; 0: auto, 32 on CUDA (and for an OpenAI-compatible server), 16 on a CPU (measured, README)", min=0, max=1024)
    history_turns: int = opt(8, "earlier turns of the chat kept in the prompt", min=0, max=200)
    history_step: int = opt(4, "once a chat is longer than history_turns, its oldest turns leave the prompt this many at a time (so the prompt keeps between history_turns - history_step + 1 and history_turns), and successive prompts begin alike and reuse the engine's cached blocks; 1: a sliding window, whose every prompt is computed whole", min=1, max=200)
    regenerate_temperature: float = opt(0.8, "sampling temperature of a regenerate (🔄, /retry) when temperature is 0, so the new reply can differ", min=0.01, max=5.0)


@dataclass
class CanonSettings:
    k: int = opt(3, "screenplay exchanges most like the message that the prompt holds, after the history (BM25 over the canon index written by rolebot prepare); 0: no canon", min=0, max=64)
    max_tokens: int = opt(384, "most tokens the canon exchanges take in a prompt; when a prompt is over its budget, history goes first, then canon", min=16, max=65536)
    train: bool = opt(False, "rolebot train and retrains build each sample's prompt with its k exchanges too (never from the sample's own scene); the adapter's meta.json records it and serving follows it (off: on the real script it did not lower held-out NLL, README)")


@dataclass
class EngineSettings:
    backend: str = opt("local", "local: host the model in this process; openai: an OpenAI-compatible server", choices=["local", "openai"])
    base_url: str = opt("http://127.0.0.1:8000/v1", "the OpenAI-compatible server (backend = openai), e.g. vLLM")
    model: str = opt("", "model name to request from the server (empty: the character's adapter name)")
    api_key_env: str = opt("OPENAI_API_KEY", "env var holding the server's API key (may be unset)")
    timeout: float = opt(120.0, "seconds before a request to the server fails", min=1.0, max=3600.0)
    weights: str = opt("auto", "local, on CUDA: serve the 4-bit base as loaded (4bit), dequantised once to bf16 (same values, ~3x the memory, a cheaper decode step), or auto: bf16 when that copy takes at most a third of the free GPU memory", choices=["auto", "4bit", "bf16"])
    prefix_sharing: bool = opt(True, "local: compute prompt blocks that requests share (the persona, a chat's history) once and keep them cached for later prompts")
    prefill_next: bool = opt(True, "when a chat's next prompt will not begin like this one (its oldest turns leave, [generation] history_step), compute that next start while this reply streams, if the batch has room; local with prefix_sharing, or a server that caches prefixes")
    cuda_graphs: bool = opt(True, "local, on CUDA: replay steps as CUDA graphs, one per step shape (steps carrying long prefills run eagerly)")
    compile_level: int = opt(0, "local, on CUDA: torch.compile the steps (0 off, 1-3 more speed for a longer start)", min=0, max=3)
    kv_cache_tokens: int = opt(0, "local: tokens the paged KV cache holds (0: on CUDA max_seq_length per row of max_batch_size, within a quarter of the free GPU memory; elsewhere 512 per row)", min=0)


@dataclass
class ServiceSettings:
    rate_limit_per_minute: int = opt(12, "messages and commands a user may send per minute", min=1, max=10000)
    rate_limit_per_address: int = opt(60, "messages and commands per minute from one client address without an API key (web page sessions, open local API); loopback clients are not counted", min=1, max=100000)
    max_waiting: int = opt(16, "replies that may wait for a free row beyond the max_batch_size being generated; more get a polite 'busy' (HTTP 503 with Retry-After)", min=0, max=100000)
    max_wait_s: float = opt(60.0, "a reply that has not begun after this many seconds is dropped with a notice", min=1.0, max=3600.0)
    max_reply_s: float = opt(120.0, "admission by measured capacity: a message whose reply would not be whole within this many seconds (a forecast from the engine's recent steps, every reply taken at max_new_tokens), or not begun within max_wait_s, gets a polite 'busy' at once (HTTP 503 with Retry-After); 0: off", min=0.0, max=3600.0)
    max_message_chars: int = opt(4000, "longer messages are cut to this", min=16, max=100000)
    admin_token_env: str = opt("ROLEBOT_ADMIN_TOKEN", "env var holding the web admin API token")
    admins_web: list[str] = opt([], "web identities that are admins: API-key identities (from [web] api_keys_*); a user field a request merely claims never counts. The admin token is always admin")
    admins_discord: list[str] = opt([], "Discord user ids that are admins")
    admins_telegram: list[str] = opt([], "Telegram user ids that are admins")


@dataclass
class StoreSettings:
    path: str = opt("rolebot.db", "SQLite database file (relative to the config file)")


@dataclass
class AdapterSettings:
    dir: str = opt("adapters", "the adapter store (relative to the config file)")


@dataclass
class WebSettings:
    enabled: bool = opt(True, "serve the local web chat and its HTTP API")
    host: str = opt("127.0.0.1", "address to bind")
    port: int = opt(8080, "port to bind", min=0, max=65535)
    api_keys_file: str = opt("", "file of API keys, one 'KEY IDENTITY' or 'sha256:<hex of the key's SHA-256> IDENTITY' per line (rolebot keys add writes the hashed form; only hashes are kept in memory); IDENTITY is a user id, or 'NAME/*' for a key that acts for many end users (their user field becomes NAME/user); read when the bot starts")
    api_keys_env: str = opt("ROLEBOT_API_KEYS", "env var with more API keys in the same form, separated by newlines or commas")
    session_secret: str = opt("web_session.key", "file holding the secret that signs chat page session cookies (relative to the config file; created on first start)")
    session_days: int = opt(30, "a chat page session lasts this many days after its last use: its cookie is re-issued at most once a day while the page is used, so an active browser stays signed in; rolebot sessions revoke ends sessions at once (kept in a .revoked file beside session_secret)", min=1, max=400)
    allowed_hosts: list[str] = opt([], "names besides loopback ones that browsers may reach this server by (the Host header; 'name' or 'name:port', '*' for any): a loopback bind answers no other name, so a DNS-rebinding page cannot read it; set the public name when a reverse proxy passes its own Host on")
    secure_cookies: bool = opt(False, "mark the chat page's session cookie Secure, so browsers send it over HTTPS only: set it when the page is served over HTTPS (e.g. by a TLS proxy in front); a request that came over TLS, or says X-Forwarded-Proto: https, gets a Secure cookie anyway")


@dataclass
class ConsoleSettings:
    enabled: bool = opt(True, "chat in the terminal when rolebot serve runs in one")


@dataclass
class DiscordSettings:
    token_env: str = opt("DISCORD_BOT_TOKEN", "env var holding the bot token (unset: Discord off)")
    channels: list[str] | dict[str, str] = opt(
        [], "channels where every message is answered: a list of channel ids (the default character "
        "answers there), or a table of channel id = the cast member who answers there, e.g. "
        "{\"123456789012345678\" = \"华妃\"}; a message naming a cast member is answered by them anywhere",
        expected="a list of channel ids, or a table of channel id = cast member")
    allow_dms: bool = opt(True, "answer direct messages")
    edit_interval: float = opt(1.0, "seconds between streamed edits", min=0.2, max=30.0)


@dataclass
class TelegramSettings:
    token_env: str = opt("TELEGRAM_BOT_TOKEN", "env var holding the bot token (unset: Telegram off)")
    base_url: str = opt("https://api.telegram.org/bot", "Bot API prefix up to /bot (own Bot API servers)")
    allow_groups: bool = opt(False, "answer in groups when mentioned or replied to")
    edit_interval: float = opt(1.0, "seconds between streamed edits", min=0.2, max=30.0)


@dataclass
class SchedulerSettings:
    enabled: bool = opt(True, "retrain on a schedule")
    cron: str = opt("", "crontab expression (e.g. '0 4 * * *'); empty: use interval_hours")
    interval_hours: float = opt(24.0, "hours between scheduled runs", min=0.01, max=10000.0)
    min_new_ratings: int = opt(20, "rated replies needed since the last run", min=0)


@dataclass
class RetrainSettings:
    start_from: str = opt("active", "start from the active adapter or the base", choices=["active", "base"])
    replay_ratio: float = opt(1.0, "original pairs mixed in per rated sample", min=0.0, max=100.0)
    preference: str = opt("none", "preference stage after SFT: kto on 👍/👎 replies, dpo on pairs of regenerated alternatives (kept or 👍 vs swiped away or 👎)", choices=["none", "kto", "dpo"])
    max_steps: int = opt(60, "optimizer steps of a retrain", min=1)
    cpu_max_steps: int = opt(24, "without a GPU: a retrain trains this many steps of one 512-token row instead (a cycle in minutes on 2 cores); 0: the full recipe", min=0)
    nice: int = opt(10, "CPU priority of the training and gate process (0 = the bot's own, 19 = lowest), so serving keeps the CPU", min=0, max=19)
    yield_to_chats: bool = opt(False, "the training pauses (between layers, at most 0.5 s at a time) while chats wait for their first word")
    timeout_minutes: float = opt(60.0, "a retrain running longer is killed", min=0.1)
    nll_tolerance: float = opt(0.02, "allowed relative worsening of held-out NLL", min=0.0, max=1.0)
    hygiene_probes: int = opt(16, "greedy replies the gate asks of both the active adapter and the candidate (half to held-out lines, half to identity probes); the candidate must not be worse on what a user hears (replies in the script's language, scaffolding shown, replies cut short by the filter); 0: no hygiene rule", min=0, max=1000)
    hygiene_tolerance: float = opt(0.0, "how much worse (a share of replies) the candidate may be on each hygiene measure", min=0.0, max=1.0)


def cast_persona(name: str) -> str:
    """The persona of a [[cast]] member that gives none."""
    return f"你是{name}。你用{name}的身份和口吻说话，言语合乎身份，从不承认自己是AI或助手。"


@dataclass
class Config:
    character: CharacterSettings = field(default_factory=CharacterSettings)
    # The characters the bot plays: [character] (if the file has it) and the [[cast]] tables, each
    # with [character]'s keys; empty: [character] alone, a cast of one. ``character`` is the
    # cast's first (``for_character`` gives the others).
    cast: list[CharacterSettings] = field(default_factory=list)
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainSettings = field(default_factory=TrainSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    canon: CanonSettings = field(default_factory=CanonSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    adapters: AdapterSettings = field(default_factory=AdapterSettings)
    web: WebSettings = field(default_factory=WebSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    discord: DiscordSettings = field(default_factory=DiscordSettings)
    telegram: TelegramSettings = field(default_factory=TelegramSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    retrain: RetrainSettings = field(default_factory=RetrainSettings)
    # Where relative paths in the file are resolved from; not a key of the file.
    root: Path = field(default_factory=Path.cwd, metadata={"internal": True})
    # What `auto` values were settled to and why (``settle``), for the start-up log.
    choices: list[str] = field(default_factory=list, metadata={"internal": True})

    @property
    def members(self) -> list[CharacterSettings]:
        """The cast, in the file's order: the [[cast]] tables, or [character] alone."""
        return list(self.cast) or [self.character]

    def member(self, name: str | None) -> CharacterSettings:
        """The cast member called ``name`` (its name or an alias); None: the first."""
        members = self.members
        if name is None or not name.strip():
            return members[0]
        wanted = name.strip()
        for member in members:
            if wanted == member.name:
                return member
        for member in members:
            if wanted in member.aliases:
                return member
        known = ", ".join(m.name for m in members)
        raise UnknownCharacter(f"no character {wanted!r} in the cast — known: {known}")

    def for_character(self, name: str | None) -> Config:
        """This config as one cast member sees it: ``character`` is that member. Everything
        that reads ``config.character`` (prompts, data, adapters, retraining) then works for it."""
        member = self.member(name)
        if member is self.character:
            return self
        return dataclasses.replace(self, character=member, choices=list(self.choices))

    @property
    def first(self) -> bool:
        """Whether ``character`` is the cast's first: the default one, whose conversations and
        runs the store keeps under '' (as before there was a cast)."""
        return self.character is self.members[0] or self.character.name == self.members[0].name

    @property
    def store_key(self) -> str:
        """``character`` as the store names its conversations and runs."""
        return "" if self.first else self.character.name

    def path(self, value: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        return (self.root / os.path.expanduser(value)).resolve()

    @property
    def adapter_root(self) -> Path:
        return self.path(self.adapters.dir)

    @property
    def database(self) -> Path:
        return self.path(self.store.path)

    def prompt_style(self, *, training: bool = False) -> PromptStyle:
        """The prompt format training, evaluation and serving render through; for training,
        canon only when ``[canon] train`` is on."""
        k = self.canon.k if self.canon.train or not training else 0
        fmt = self.model.prompt_format
        if fmt == "auto":  # a Config built in code, not settled by load_config
            from training.builtin import best_format

            fmt = best_format(self.model.base)
        return PromptStyle(fmt, self.character.persona, self.character.name,
                           canon_k=k, canon_max_tokens=self.canon.max_tokens, history_first=self.model.history_first)


class UnknownCharacter(UserError):
    """A character name that is not a member of the cast."""


def secret(env_name: str) -> str | None:
    """The value of a secret's environment variable, or None when unset or blank."""
    value = os.environ.get(env_name, "").strip() if env_name else ""
    return value or None


def find_config(explicit: str | None) -> Path | None:
    """--config, else $ROLEBOT_CONFIG, else ./config.toml if present, else None (defaults)."""
    chosen = explicit or os.environ.get("ROLEBOT_CONFIG")
    if chosen:
        return Path(chosen)
    here = Path("config.toml")
    return here if here.exists() else None


def load_config(explicit: str | None = None) -> Config:
    path = find_config(explicit)
    if path is None:
        return settle(Config())
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found — check --config or $ROLEBOT_CONFIG") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the config file: {exc}") from None
    return settle(parse_config(text, path))


def settle(config: Config) -> Config:
    """Make ``[model] base = "builtin:auto"`` and ``prompt_format = "auto"`` concrete: the base
    and format the character's adapter was trained with, where it has one (an adapter fits only
    its base, and is served in its format), else this machine's builtin choice and the format
    that model scores best with. Every command then sees one concrete model."""
    from training import builtin

    model = config.model
    if model.base != builtin.AUTO and model.prompt_format != "auto":
        return config
    trained = _trained_meta(config)
    base, fmt = model.base, model.prompt_format
    if base == builtin.AUTO:
        choice = builtin.auto_base(trained.get("base_model"))
        base = choice.base
        config.choices.append(f"[model] base = builtin:auto: {base} ({choice.reason})")
    if fmt == "auto":
        recorded = ((trained.get("config") or {}).get("prompt") or {}).get("fmt")
        if trained.get("base_model") == base and recorded in ("alpaca", "chat"):
            fmt, why = recorded, "the format the active adapter was trained with"
        else:
            fmt, why = builtin.best_format(base), f"the one {base} scores best with"
        config.choices.append(f"[model] prompt_format = auto: {fmt} ({why})")
    config.model = dataclasses.replace(model, base=base, prompt_format=fmt)
    return config


def _trained_meta(config: Config) -> dict:
    """meta.json of the character's active adapter version (else its newest), {} if none."""
    from training.registry import Registry

    try:
        registry = Registry(config.adapter_root, config.character.name)
        version = registry.active() or (registry.versions() or [None])[-1]
    except (UserError, OSError, ValueError):
        return {}
    return version.meta if version is not None else {}


def parse_config(text: str, path: Path) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    config = Config(root=path.resolve().parent)
    where = _Locator(text, path)
    sections = {f.name: f for f in dataclasses.fields(Config) if not f.metadata.get("internal")}
    types = typing.get_type_hints(Config)
    for name, table in data.items():
        if name not in sections:
            raise UserError(f"{where(name, None)}: unknown section [{name}]{_suggest(name, sections)}")
        if name == "cast":
            config.cast = _build_cast(table, where)
            continue
        if not isinstance(table, dict):
            raise UserError(f"{where(name, None)}: {name} must be a [{name}] table")
        setattr(config, name, _build(types[name], table, name, where))
    if config.cast:
        if "character" in data:  # [character] is the first of the cast, the [[cast]] tables the others
            config.cast = _distinct([config.character, *config.cast], where)
        if len(config.cast) > 1 and config.training.data:
            raise UserError(f"{where('training', 'data')}: [training] data names one character's pairs, and the cast has "
                            f"{len(config.cast)} characters — leave it empty (each character's script is prepared into "
                            "data/<name>.json) or give each [[cast]] its script")
        config.character = config.cast[0]
    if isinstance(config.discord.channels, dict):
        config.discord.channels = _channel_characters(config, config.discord.channels, where)
    return config


def _channel_characters(config: Config, table: dict[str, str], where) -> dict[str, str]:
    """[discord] channels as a table: each channel's cast member by name (an alias is resolved);
    a channel id that is not a number, or a name that is not in the cast, stops the start."""
    label = f"{where('discord', 'channels')}: [discord] channels"
    characters = {}
    for channel, name in table.items():
        if not channel.strip().isdigit():
            raise UserError(f"{label}: {channel!r} is not a channel id — Discord's ids are numbers "
                            "(Developer Mode on, then right-click the channel → Copy Channel ID)")
        try:
            characters[channel.strip()] = config.member(name).name
        except UnknownCharacter as exc:
            raise UserError(f"{label}: \"{channel}\" = {name!r}: {exc}") from None
    return characters


def _build_cast(tables, where) -> list[CharacterSettings]:
    """The [[cast]] tables: each a [character] table whose name is required; names and aliases
    must tell the characters apart."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise UserError(f"{where('cast', None)}: cast must be [[cast]] tables, one per character")
    cast: list[CharacterSettings] = []
    for number, table in enumerate(tables, 1):
        label = f"{where.nth('cast', number)}: [[cast]] #{number}"
        if "name" not in table:
            raise UserError(f"{label}: name is missing — each [[cast]] table names its character (a speaker in the script)")
        table = {"aliases": [], **table}
        if "persona" not in table and isinstance(table["name"], str):
            table["persona"] = cast_persona(table["name"].strip())
        cast.append(_build(CharacterSettings, table, "cast", lambda section, key, n=number: where.nth(section, n, key)))
    return _distinct(cast, where, offset=0)


def _distinct(cast: list[CharacterSettings], where, offset: int = 1) -> list[CharacterSettings]:
    """``cast`` if every name and alias calls one character; ``offset``: members before the
    [[cast]] tables ([character])."""
    owner: dict[str, str] = {}  # a name or alias -> the character it names
    for index, member in enumerate(cast):
        number = index + 1 - offset
        label = (f"{where.nth('cast', number)}: [[cast]] #{number}" if number >= 1
                 else f"{where('character', None)}: [character]")
        for word in member.names:
            if word in owner:
                what = "name" if word == member.name else "alias"
                other = owner[word]
                clash = "twice in the cast" if other == member.name else f"already names {other!r}"
                raise UserError(f"{label}: {what} {word!r} {clash} — each name and alias must call one "
                                "character, or a message naming it could not tell who answers")
            owner[word] = member.name
    return cast


def check_cast_speaks(member: CharacterSettings, speakers: dict[str, int], script: str) -> None:
    """A cast member who never speaks in ``script`` (``speakers``: lines per speaker) has
    nothing to learn from: one line naming them and the script's main speakers."""
    if not any(speakers.get(name) for name in member.names):
        top = ", ".join(f"{name} ({n})" for name, n in sorted(speakers.items(), key=lambda kv: -kv[1])[:8])
        raise UserError(f"[[cast]] {member.name!r}: never speaks in {script} — name a speaker of the script "
                        f"(its most frequent: {top}) or add the script's name for them to aliases")


def _build(cls, table: dict, section: str, where) -> object:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            raise UserError(f"{where(section, key)}: [{section}] {key}: unknown key{_suggest(key, fields)}")
        values[key] = _check(value, hints[key], fields[key].metadata, f"{where(section, key)}: [{section}] {key}")
    return cls(**values)


def _check(value, hint, meta: dict, label: str):
    expected = _describe(hint, meta)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if ok is None and isinstance(value, dict) and dict[str, str] in typing.get_args(hint):  # a table of strings
        ok = all(isinstance(v, str) for v in value.values())
    elif ok is None:  # list[str]
        ok = isinstance(value, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value)
        if ok:
            value = [str(v) for v in value]
    if not ok:
        raise UserError(f"{label}: expected {expected}, got {value!r}")
    if hint is float:
        value = float(value)
    too_low = "min" in meta and value < meta["min"]
    too_high = "max" in meta and value > meta["max"]
    if too_low or too_high or ("choices" in meta and value not in meta["choices"]):
        raise UserError(f"{label}: expected {expected}, got {value!r}")
    if "check" in meta and (problem := meta["check"](value)):  # a rule beyond type and range
        raise UserError(f"{label}: {problem}")
    return value


def _describe(hint, meta: dict) -> str:
    if "expected" in meta:
        return meta["expected"]
    if "choices" in meta:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    name = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, "a list of strings")
    if "min" in meta and "max" in meta:
        return f"{name} from {meta['min']} to {meta['max']}"
    if "min" in meta:
        return f"{name} >= {meta['min']}"
    return name


def _suggest(word: str, known) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f" — {hint}known: {', '.join(known)}"


class _Locator:
    """Finds the line of a section or key, since tomllib reports no positions for values."""

    def __init__(self, text: str, path: Path):
        self.path = path
        self.lines = text.splitlines()

    def nth(self, section: str, number: int, key: str | None = None) -> str:
        """The line of the ``number``-th ``[[section]]`` table (or of ``key`` within it)."""
        seen = 0
        inside = False
        for line_number, line in enumerate(self.lines, 1):
            if re.match(r"\s*\[", line):
                inside = re.match(rf"\s*\[\[\s*{re.escape(section)}\s*\]\]", line) is not None
                if inside:
                    seen += 1
                    if seen == number and key is None:
                        return f"{self.path}:{line_number}"
            elif inside and seen == number and _assigns(line, key):
                return f"{self.path}:{line_number}"
        return str(self.path)

    def __call__(self, section: str, key: str | None) -> str:
        current = None
        for number, line in enumerate(self.lines, 1):
            header = re.match(r"\s*\[\s*([^\]\s]+)\s*\]", line)
            if header:
                current = header.group(1)
                if key is None and current == section:
                    return f"{self.path}:{number}"
            elif _assigns(line, key) if current == section else (current is None and key is None and _assigns(line, section)):
                return f"{self.path}:{number}"
        return str(self.path)


def _assigns(line: str, key: str | None) -> bool:
    return bool(key) and re.match(rf"\s*\"?{re.escape(key)}\"?\s*=", line) is not None
