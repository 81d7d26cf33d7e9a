"""Same content stored once behind a real mount: 20,000 equal pages written
with ``dd oflag=direct`` hold one pool object."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

pytestmark = pytest.mark.timeout(120)
PAGE = 4096
NPAGES = 20_000

CONFIG = """
[pool]
algorithm = "lz4"
max_bytes = "128M"
dedup = true

[[device]]
name = "swap0"
size = "80M"
"""


@pytest.mark.slow
def test_twenty_thousand_equal_pages_through_the_mount(mount_factory, tmp_path):
    m = mount_factory(CONFIG)
    page = (b"one page, twenty thousand times; not same-filled %d " * 80)[:PAGE]
    src = tmp_path / "pages.bin"
    src.write_bytes(page * NPAGES)
    subprocess.run(["dd", f"if={src}", f"of={m.dev()}", "oflag=direct", "bs=1M",
                    "conv=notrunc", "status=none"], check=True)
    pool = m.stats()["tiers"]["pool"]
    assert pool["stored_pages"] == NPAGES
    assert pool["dedup_pages"] == NPAGES - 1
    assert pool["pool_bytes"] <= 1 << 20
    assert pool["dedup_saved_bytes"] > 0
    back = subprocess.run(["dd", f"if={m.dev()}", "iflag=direct", "bs=1M",
                           f"count={NPAGES * PAGE >> 20}", "status=none"],
                          check=True, capture_output=True).stdout
    tail = NPAGES * PAGE - len(back)
    if tail:
        with open(m.dev(), "rb", buffering=0) as f:
            f.seek(len(back))
            back += f.read(tail)
    assert hashlib.sha256(back).digest() == hashlib.sha256(page * NPAGES).digest()
    # discarding every page frees the object with its last reference
    subprocess.run(["fallocate", "--punch-hole", "--keep-size", "-o", "0", "-l",
                    str(NPAGES * PAGE), str(m.dev())], check=True)
    pool = m.stats()["tiers"]["pool"]
    assert pool["stored_pages"] == 0 and pool["dedup_pages"] == 0
