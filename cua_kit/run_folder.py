"""A run folder (`outputs/<experiment>/<trial>/`) belongs to one run at a time.

    run_dir = make_run_dir(cfg)                 # created and writable, or one ConfigError line
"""

from __future__ import annotations

import os
from pathlib import Path

from cua_kit.config import Config, ConfigError


def make_run_dir(cfg: Config) -> Path:
    """Create the run folder and check that it can be written, before any model is loaded or env started."""
    run_dir = cfg.run_dir
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output_dir={cfg.output_dir}: can't write the run folder {run_dir} "
                          f"({exc.strerror or exc}); pick a writable output_dir") from None
    return run_dir
