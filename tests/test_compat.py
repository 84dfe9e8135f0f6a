"""Private APIs are reached through ``cp_plugin/compat.py`` only, and unverified versions are announced."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cp_plugin import compat

LIBRARY = Path(compat.__file__).parent
# A private name of torch / diffusers / lightning / accelerate: imported, or reached as an attribute.
PRIVATE = re.compile(
    r"from (torch|diffusers|lightning|accelerate)[\w.]* import [^\n]*\b_[a-zA-Z]"
    r"|import (torch|diffusers|lightning|accelerate)[\w.]*\._"
    r"|\b(torch|aten|funcol|DistributedDataParallel|_AttentionBackendRegistry)(\.\w+)*\._[a-zA-Z]"
    r"|\._(flatten|ddp_kwargs|optimizer|backends|is_accelerate_prepared)\b"
)


def test_private_apis_are_used_only_in_compat() -> None:
    offenders = [
        f"{path.relative_to(LIBRARY)}:{number}: {line.strip()}"
        for path in sorted(LIBRARY.rglob("*.py")) if path.name != "compat.py"
        for number, line in enumerate(path.read_text().splitlines(), 1) if PRIVATE.search(line)
    ]
    assert not offenders, "private APIs outside cp_plugin/compat.py:\n" + "\n".join(offenders)


def test_the_scan_finds_private_uses() -> None:
    for line in ("from torch.distributed.distributed_c10d import _get_default_store",
                 "mesh = root._flatten('cp')", "torch._foreach_norm(grads)", "aten._scaled_dot_product_flash_attention(q)"):
        assert PRIVATE.search(line), line


def test_an_unverified_version_warns_once_naming_what_was_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(compat.VERIFIED, "torch", ("1.0",))
    with pytest.warns(UserWarning, match=r"verified with torch 1\.0\.x; torch 2\.\d+.* is installed.*python -m pytest"):
        given = compat.check_versions()
    assert sum("torch" in message.split(";")[0] for message in given) == 1
