"""``python -m featsweep [overrides]`` (add ``-m`` for a sweep)."""

from __future__ import annotations

from pathlib import Path

import hydra

from featsweep.app import task

# Decorate the task itself (no wrapper), so the batched launcher recognises it.
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")
main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")(task)

if __name__ == "__main__":
    main()
