"""Which Go is on PATH: the real tiers built with Go 1.26+ (Flux's and Argo CD's judges,
VictoriaLogs) skip with one line under an older Go, and fail when that Go is there but the
build is missing."""

from __future__ import annotations

import re
import shutil
import subprocess


def go_1_26_or_newer() -> bool:
    go = shutil.which("go")
    if go is None:
        return False
    version = subprocess.run([go, "version"], check=False, capture_output=True, text=True).stdout
    return re.search(r"go1\.(2[6-9]|[3-9][0-9])", version) is not None
