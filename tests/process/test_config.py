"""The config contract: defaults, every key, and clear errors naming the key."""

from __future__ import annotations

import os

import pytest

from swapfs import config as cfg
from swapfs.config import DEFAULT_CONFIG_TOML, Config, ConfigError, load_config, parse_config, parse_size

GiB = 1 << 30

FULL = """
[pool]
algorithm = "zstd"
level = 3
max_bytes = "512M"
accept_ratio = 0.75
high_watermark = 0.85
low_watermark = 0.7
dedup = true

[[device]]
name = "swap0"
size = "1G"
writeback = false
swap = true
swap_priority = 5
discard = "pages"

[[device]]
name = "swap1"
size = 8192

[[tier]]
name = "ssd"
kind = "file"
path = "/var/lib/swapfs/ssd.img"
size = "8G"
priority = 100
high_watermark = 0.95
low_watermark = 0.9
preallocate = true
"""

MINIMAL_DEVICE = '[[device]]\nname = "swap0"\nsize = "1G"\n'


def test_default_parses() -> None:
    c = load_config(None)
    assert isinstance(c, Config)
    assert c == parse_config(DEFAULT_CONFIG_TOML)
    assert [d.name for d in c.devices] == ["swap0"]
    assert c.devices[0].size == GiB
    assert c.pool.algorithm == "lz4"
    assert 0 < c.pool.max_bytes < cfg.mem_total_bytes()
    assert c.pool.max_bytes % 4096 == 0
    assert c.tiers == ()


def test_every_key() -> None:
    c = parse_config(FULL)
    p = c.pool
    assert (p.algorithm, p.level, p.max_bytes, p.accept_ratio, p.high_watermark,
            p.low_watermark, p.dedup) == ("zstd", 3, 512 << 20, 0.75, 0.85, 0.7, True)
    d0, d1 = c.devices
    assert (d0.name, d0.size, d0.writeback) == ("swap0", GiB, False)
    assert (d0.swap, d0.swap_priority, d0.discard) == (True, 5, "pages")
    assert (d1.name, d1.size, d1.writeback) == ("swap1", 8192, True)
    assert (d1.swap, d1.swap_priority, d1.discard) == (False, None, "both")
    (t,) = c.tiers
    assert (t.name, t.kind, t.path, t.size, t.priority, t.high_watermark, t.low_watermark,
            t.preallocate) == ("ssd", "file", "/var/lib/swapfs/ssd.img", 8 * GiB, 100, 0.95,
                               0.9, True)


def test_pool_defaults() -> None:
    p = parse_config(MINIMAL_DEVICE).pool
    assert (p.algorithm, p.level, p.accept_ratio, p.high_watermark, p.low_watermark,
            p.dedup) == ("lz4", 1, 0.8, 0.9, 0.8, False)


@pytest.mark.parametrize("value, want", [
    (4096, 4096), ("4K", 4096), ("4k", 4096), ("512M", 512 << 20), ("1G", GiB),
    ("2T", 2 << 40), ("8192", 8192), ("1GiB", GiB), (" 16 M ", 16 << 20),
])
def test_sizes(value: object, want: int) -> None:
    assert parse_size(value, "k") == want


def test_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "mem_total_bytes", lambda: 24 * GiB)
    assert parse_size("10%", "pool.max_bytes", allow_percent=True) == (24 * GiB // 10) // 4096 * 4096
    c = parse_config('[pool]\nmax_bytes = "50%"\n' + MINIMAL_DEVICE)
    assert c.pool.max_bytes == 12 * GiB
    with pytest.raises(ConfigError, match=r"device\[0\]\.size"):
        parse_config('[[device]]\nname = "a"\nsize = "10%"\n')


def test_real_meminfo() -> None:
    assert cfg.mem_total_bytes() > 0


BAD = [
    # (toml, key named in the message)
    ('bogus = 1\n' + MINIMAL_DEVICE, "bogus"),
    ('[pool]\nbogus = 1\n' + MINIMAL_DEVICE, "pool.bogus"),
    ('[[device]]\nname = "a"\nsize = "1G"\nbogus = 1\n', r"device\[0\]\.bogus"),
    (MINIMAL_DEVICE + '[[tier]]\nname = "t"\npath = "/x"\nsize = "1G"\nbogus = 1\n',
     r"tier\[0\]\.bogus"),
    ('[pool]\nalgorithm = 1\n' + MINIMAL_DEVICE, "pool.algorithm"),
    ('[pool]\nlevel = "3"\n' + MINIMAL_DEVICE, "pool.level"),
    ('[pool]\naccept_ratio = "x"\n' + MINIMAL_DEVICE, "pool.accept_ratio"),
    ('[[device]]\nname = "a"\nsize = "1G"\nwriteback = 1\n', r"device\[0\]\.writeback"),
    ('[[device]]\nname = "a"\nsize = true\n', r"device\[0\]\.size"),
    ('[[device]]\nname = 3\nsize = "1G"\n', r"device\[0\]\.name"),
    ('[[device]]\nname = "a"\nsize = "1G"\ngroup = "x"\n', r"device\[0\]\.group"),
    ('[[device]]\nname = "a"\nsize = "1G"\nswap = 1\n', r"device\[0\]\.swap"),
    ('[[device]]\nname = "a"\nsize = "1G"\nswap_priority = 40000\n', r"device\[0\]\.swap_priority"),
    ('[[device]]\nname = "a"\nsize = "1G"\ndiscard = "always"\n', r"device\[0\]\.discard"),
    ('[[device]]\nname = "' + "n" * 65 + '"\nsize = "1G"\n', r"device\[0\]\.name"),
    ('[[device]]\nname = "a"\nsize = "1M"\n' * 65, r"device: 65 devices"),
    ('[[device]]\nname = "a/b"\nsize = "1G"\n', r"device\[0\]\.name"),
    ('[[device]]\nname = "a"\nsize = -4096\n', r"device\[0\]\.size"),
    ('[[device]]\nname = "a"\nsize = 0\n', r"device\[0\]\.size"),
    ('[[device]]\nname = "a"\nsize = "0G"\n', r"device\[0\]\.size"),
    ('[[device]]\nname = "a"\nsize = 5000\n', r"device\[0\]\.size"),
    ('[[device]]\nname = "a"\nsize = "1X"\n', r"device\[0\]\.size"),
    ('[[device]]\nname = "a"\n', r"device\[0\]\.size"),
    ('[[device]]\nsize = "1G"\n', r"device\[0\]\.name"),
    ('[[device]]\nname = "a"\nsize = "1G"\n[[device]]\nname = "a"\nsize = "1G"\n',
     r"device\[1\]\.name"),
    ('[pool]\nmax_bytes = "1G"\n', "device"),
    ('device = 3\n', "device"),
    ('pool = 3\n' + MINIMAL_DEVICE, "pool"),
    ('[pool]\nalgorithm = "lzma"\n' + MINIMAL_DEVICE, "pool.algorithm"),
    ('[pool]\naccept_ratio = 0\n' + MINIMAL_DEVICE, "pool.accept_ratio"),
    ('[pool]\naccept_ratio = 1.5\n' + MINIMAL_DEVICE, "pool.accept_ratio"),
    ('[pool]\naccept_ratio = -0.5\n' + MINIMAL_DEVICE, "pool.accept_ratio"),
    ('[pool]\nhigh_watermark = 0.5\nlow_watermark = 0.5\n' + MINIMAL_DEVICE,
     "pool.low_watermark"),
    ('[pool]\nhigh_watermark = 0.5\nlow_watermark = 0.7\n' + MINIMAL_DEVICE,
     "pool.low_watermark"),
    ('[pool]\nhigh_watermark = 1.5\n' + MINIMAL_DEVICE, "pool.high_watermark"),
    ('[pool]\ndedup = "yes"\n' + MINIMAL_DEVICE, "pool.dedup"),
    ('[pool]\nalgorithm = "zstd"\nlevel = 0\n' + MINIMAL_DEVICE, "pool.level"),
    ('[pool]\nalgorithm = "zstd"\nlevel = 23\n' + MINIMAL_DEVICE, "pool.level"),
    ('[pool]\nrecompress = "brotli"\n' + MINIMAL_DEVICE, "pool.recompress"),
    ('[pool]\nrecompress = "lz4"\n' + MINIMAL_DEVICE, "pool.recompress"),
    ('[pool]\nrecompress = ""\n' + MINIMAL_DEVICE, "pool.recompress"),
    ('[pool]\nrecompress = "zstd"\nlevel = 30\n' + MINIMAL_DEVICE, "pool.level"),
    ('[pool]\nrecompress_after = "10m"\n' + MINIMAL_DEVICE, "pool.recompress_after"),
    ('[pool]\nrecompress = "zstd"\nrecompress_after = "ten minutes"\n' + MINIMAL_DEVICE,
     "pool.recompress_after"),
    ('[pool]\nrecompress = "zstd"\nrecompress_after = -5\n' + MINIMAL_DEVICE, "pool.recompress_after"),
    ('[pool]\nrecompress = "zstd"\nrecompress_after = true\n' + MINIMAL_DEVICE, "pool.recompress_after"),
    ('[pool]\nmax_bytes = "0%"\n' + MINIMAL_DEVICE, "pool.max_bytes"),
    ('[pool]\nmax_bytes = "150%"\n' + MINIMAL_DEVICE, "pool.max_bytes"),
    ('[pool]\nmax_bytes = -1\n' + MINIMAL_DEVICE, "pool.max_bytes"),
    ('[pool]\nmax_bytes = 1.5\n' + MINIMAL_DEVICE, "pool.max_bytes"),
    (MINIMAL_DEVICE + '[[tier]]\nname = "t"\nkind = "tape"\npath = "/x"\nsize = "1G"\n',
     r"tier\[0\]\.kind"),
    (MINIMAL_DEVICE + '[[tier]]\nname = "t"\nsize = "1G"\n', r"tier\[0\]\.path"),
    (MINIMAL_DEVICE + '[[tier]]\nname = "t"\npath = "/x"\nsize = "1G"\npriority = "high"\n',
     r"tier\[0\]\.priority"),
    (MINIMAL_DEVICE + '[[tier]]\nname = "t"\npath = "/x"\nsize = "1G"\n'
     'high_watermark = 0.8\nlow_watermark = 0.9\n', r"tier\[0\]\.low_watermark"),
    (MINIMAL_DEVICE + '[[tier]]\nname = "t"\npath = "/x"\nsize = "1G"\n'
     '[[tier]]\nname = "t"\npath = "/y"\nsize = "1G"\n', r"tier\[1\]\.name"),
    (MINIMAL_DEVICE + '[[tier]]\nname = "t"\npath = "/x"\nsize = "1G"\npreallocate = "yes"\n',
     r"tier\[0\]\.preallocate"),
]


@pytest.mark.parametrize("text, key", BAD)
def test_malformed_names_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_config(text, "test.toml")


def test_bad_toml() -> None:
    with pytest.raises(ConfigError, match="test.toml: not valid TOML"):
        parse_config("[pool\nalgorithm = ", "test.toml")


def test_parse_size_errors() -> None:
    with pytest.raises(ConfigError, match="pool.max_bytes"):
        parse_size("10%", "pool.max_bytes")
    with pytest.raises(ConfigError, match="k: .*multiple"):
        parse_size(100, "k")
    with pytest.raises(ConfigError, match="k: "):
        parse_size(None, "k")


def test_load_config_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "swapfs.toml"
    p.write_text(FULL)
    assert load_config(str(p)) == parse_config(FULL)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text('[[device]]\nname = "a"\nsize = 5\n')
    with pytest.raises(ConfigError, match=r"bad.toml: device\[0\]\.size"):
        load_config(str(bad))


# -- safety: encryption, relative tier paths, the limits mount would hit --------------------

TIER = '[[tier]]\nname = "{name}"\npath = "{path}"\nsize = "1G"\n'


def test_tier_encrypts_by_default_and_opts_out() -> None:
    (t,) = parse_config(MINIMAL_DEVICE + TIER.format(name="t", path="/x")).tiers
    assert t.encrypt is True
    (t,) = parse_config(MINIMAL_DEVICE + TIER.format(name="t", path="/x") + "encrypt = false\n").tiers
    assert t.encrypt is False
    with pytest.raises(ConfigError, match=r"tier\[0\]\.encrypt"):
        parse_config(MINIMAL_DEVICE + TIER.format(name="t", path="/x") + 'encrypt = "no"\n')


def test_relative_tier_path_means_the_config_files_directory(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    f = conf_dir / "main.toml"
    f.write_text(MINIMAL_DEVICE + TIER.format(name="a", path="ssd.img")
                 + TIER.format(name="b", path="../var/hdd.img")
                 + TIER.format(name="c", path="/abs/c.img"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for path in (str(f), os.path.relpath(f)):  # the file given relative or absolute
        a, b, c = load_config(path).tiers
        assert a.path == str(conf_dir / "ssd.img")
        assert b.path == str(tmp_path / "var" / "hdd.img")
        assert c.path == "/abs/c.img"


def test_relative_tier_path_in_a_string_means_the_current_directory(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    (t,) = parse_config(MINIMAL_DEVICE + TIER.format(name="t", path="x/ssd.img")).tiers
    assert t.path == str(tmp_path / "x" / "ssd.img")
    (t,) = parse_config(MINIMAL_DEVICE + TIER.format(name="t", path="ssd.img"),
                        base_dir="/srv").tiers
    assert t.path == "/srv/ssd.img"


def test_at_most_eight_tiers() -> None:
    eight = "".join(TIER.format(name=f"t{i}", path=f"/t{i}") for i in range(8))
    assert len(parse_config(MINIMAL_DEVICE + eight).tiers) == cfg.MAX_FILE_TIERS == 8
    with pytest.raises(ConfigError, match="tier: 9 tiers configured, at most 8"):
        parse_config(MINIMAL_DEVICE + eight + TIER.format(name="t8", path="/t8"))


@pytest.mark.parametrize("size,ok", [("1M", True), ("1020K", False), ("4K", False),
                                     (1 << 20, True)])
def test_pool_at_least_one_mib(size: object, ok: bool) -> None:
    text = f"[pool]\nmax_bytes = {size!r}\n".replace("'", '"') + MINIMAL_DEVICE
    if ok:
        assert parse_config(text).pool.max_bytes == 1 << 20
    else:
        with pytest.raises(ConfigError, match=r"pool\.max_bytes: .*at least 1 MiB"):
            parse_config(text)


def test_device_size_upper_bound() -> None:
    ok = '[[device]]\nname = "d"\nsize = "16T"\n'
    assert parse_config(ok).devices[0].size == 1 << 44
    with pytest.raises(ConfigError, match=r"device\[0\]\.size: .*more than"):
        parse_config(f'[[device]]\nname = "d"\nsize = {(1 << 44) + 4096}\n')
    with pytest.raises(ConfigError, match=r"device\[0\]\.size"):
        parse_config('[[device]]\nname = "d"\nsize = 4097\n')


@pytest.mark.parametrize("value, seconds", [(30, 30.0), (1.5, 1.5), ('"45s"', 45.0), ('"10m"', 600.0),
                                            ('"2h"', 7200.0), ('"1d"', 86400.0), ('"0"', 0.0)])
def test_recompress_after_durations(value: object, seconds: float) -> None:
    c = parse_config(f'[pool]\nrecompress = "zstd"\nlevel = 3\nrecompress_after = {value}\n'
                     + MINIMAL_DEVICE)
    assert c.pool.recompress == "zstd" and c.pool.level == 3
    assert c.pool.recompress_after == seconds


def test_recompress_is_off_by_default() -> None:
    c = parse_config(MINIMAL_DEVICE)
    assert c.pool.recompress is None and c.pool.recompress_after == 600.0


def test_tier_force_init_is_off_unless_said() -> None:
    (t,) = parse_config(MINIMAL_DEVICE + TIER.format(name="t", path="/x")).tiers
    assert t.force_init is False
    (t,) = parse_config(MINIMAL_DEVICE + TIER.format(name="t", path="/x") + "force_init = true\n").tiers
    assert t.force_init is True
    with pytest.raises(ConfigError, match=r"tier\[0\]\.force_init"):
        parse_config(MINIMAL_DEVICE + TIER.format(name="t", path="/x") + "force_init = 1\n")


# -- what this machine can hold (check-config and mount) ------------------------------------


def test_check_machine_accepts_the_default() -> None:
    cfg.check_machine(parse_config(DEFAULT_CONFIG_TOML))


def test_check_machine_refuses_a_pool_larger_than_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    c = parse_config('[pool]\nmax_bytes = "32G"\n' + MINIMAL_DEVICE)
    monkeypatch.setattr(cfg, "mem_total_bytes", lambda: 16 * GiB)
    with pytest.raises(ConfigError) as ei:
        cfg.check_machine(c)
    assert str(ei.value) == ("pool.max_bytes: 34359738368 bytes (32.0 GiB) is more than this "
                             "machine's memory, 17179869184 bytes (16.0 GiB) (the pool is locked "
                             "in memory)")
    monkeypatch.setattr(cfg, "mem_total_bytes", lambda: 64 * GiB)
    cfg.check_machine(c)


def test_check_machine_16_tib_device_mounts_or_is_refused_with_the_sizes() -> None:
    """The very slot-table reservation is tried: refused with the sizes when the kernel says
    no, never a traceback from mount."""
    c = parse_config('[[device]]\nname = "d"\nsize = "16T"\n')
    try:
        cfg.check_machine(c)
    except ConfigError as e:
        assert str(e).startswith("device[0].size: 17592186044416 bytes (16.0 TiB): the kernel "
                                 "refuses to reserve 68719476736 bytes (64.0 GiB) of address "
                                 "space for its slot table")
    else:
        from swapfs.slots import SlotTable
        SlotTable(1 << 32)  # what mount will make: it must work then


def test_sized() -> None:
    assert cfg.sized(1000) == "1000 bytes"
    assert cfg.sized(2 << 40) == "2199023255552 bytes (2.0 TiB)"


def test_expected_ratio_defaults_to_the_codecs_and_is_checked() -> None:
    assert parse_config(MINIMAL_DEVICE).pool.ratio() == 2.5
    zstd = parse_config('[pool]\nalgorithm = "zstd"\n' + MINIMAL_DEVICE).pool
    assert zstd.ratio() == 3.5
    assert parse_config("[pool]\nexpected_ratio = 4\n" + MINIMAL_DEVICE).pool.ratio() == 4.0
    for bad in ("0.5", "65", '"2"', "true"):
        with pytest.raises(ConfigError, match="pool.expected_ratio"):
            parse_config(f"[pool]\nexpected_ratio = {bad}\n" + MINIMAL_DEVICE)


def test_capacity_warning_says_the_sizes_and_what_fits() -> None:
    """The store holds max_bytes and the file tiers' sizes at the assumed ratio; devices
    beyond that are warned of, devices within it are not."""
    text = ('[pool]\nmax_bytes = "16M"\n[[device]]\nname = "swap0"\nsize = "{size}"\n'
            '[[tier]]\nname = "disk"\npath = "/var/tmp/x.img"\nsize = "32M"\n')
    big = parse_config(text.format(size="1G"))
    assert cfg.store_capacity_bytes(big) == 120 << 20  # (16 MiB + 32 MiB) * 2.5
    (warning,) = cfg.capacity_warnings(big)
    assert "they total 1073741824 bytes (1.0 GiB)" in warning
    assert "the store about 125829120 bytes (120.0 MiB)" in warning
    assert "pool.expected_ratio" in warning and "at most 125829120 bytes" in warning
    assert cfg.capacity_warnings(parse_config(text.format(size="120M"))) == []
    assert cfg.capacity_warnings(parse_config(
        text.format(size="1G").replace("[pool]\n", "[pool]\nexpected_ratio = 64\n"))) == []
