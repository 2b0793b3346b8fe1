"""Which front-ends start, and what that costs when a platform is off."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_a_platform_without_its_token_is_not_imported(tmp_path):
    """discord.py and python-telegram-bot are loaded only for a platform whose token is set."""
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from bot.config import parse_config
        from bot.platforms import Options, enabled
        text = '[discord]\\ntoken_env = "ROLEBOT_T_NO_DISCORD"\\n[telegram]\\ntoken_env = "ROLEBOT_T_TG"\\n'
        text += '[console]\\nenabled = false\\n'
        config = parse_config(text, Path({str(tmp_path / "config.toml")!r}))
        names = [f.name for f in enabled(config, None, Options())]
        print(names, "discord" in sys.modules, "telegram" in sys.modules)
        os.environ["ROLEBOT_T_TG"] = "123:abc"
        names = [f.name for f in enabled(config, None, Options())]
        print(names, "discord" in sys.modules, "telegram" in sys.modules)
    """)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("ROLEBOT_T_")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    off, on = out.stdout.strip().splitlines()
    assert off == "['web'] False False"
    assert on == "['web', 'telegram'] False True"
