"""The segment map alone (no file): cleaning's choice of victims, the two logs; and one write of objects spanning segments."""

from __future__ import annotations

import os

from swapfs.memory import StateMemory
from swapfs.tiers.file.segments import CLEANING, HEAD, SEALED, USER, SegmentMap

SEG = 64 * 1024
OBJ = SEG // 16  # 16 objects fill a segment


def segment_map(nsegments: int = 16) -> SegmentMap:
    return SegmentMap("t", nsegments * SEG, SEG, reserve=2, recycle_at_once=True,
                      memory=StateMemory())


def fill(m: SegmentMap, segments: int) -> list[list[int]]:
    """Fill ``segments`` user segments; the handles of each."""
    hs = m.allocate([OBJ] * (16 * segments))
    assert len(hs) == 16 * segments
    return [hs[i:i + 16] for i in range(0, len(hs), 16)]


def free(m: SegmentMap, handles: list[int], n: int) -> None:
    for h in handles[:n]:
        m.free(h, OBJ)


def test_an_old_segment_is_cleaned_before_a_young_emptier_one():
    m = segment_map()
    segs = fill(m, 10)
    m.allocate([OBJ])  # segment 10 becomes the head: 0..9 sealed
    old, young = segs[0][0] // SEG, segs[8][0] // SEG
    assert m.state[old] == m.state[young] == SEALED
    free(m, segs[0], 8)  # u = 0.5, written ten segments ago
    free(m, segs[8], 10)  # u = 0.375, written two segments ago
    # (1 - u) * age / (1 + u): 0.5 * 11 / 1.5 = 3.7 against 0.625 * 3 / 1.375 = 1.4
    assert m.victims(1, 0.75) == [old]
    assert m.victims(2, 0.75) == [old, young]
    m.check_invariants()


def test_segments_of_one_age_go_least_live_first():
    m = segment_map()
    segs = fill(m, 6)
    m.allocate([OBJ])
    free(m, segs[1], 4)
    free(m, segs[2], 12)
    free(m, segs[3], 8)
    assert m.victims(3, 1.0) == [2, 3, 1]  # segments 1..3 differ in age by one
    # after a failover the ages are unknown: all alike, greedy
    m.rebuild((h, OBJ) for i, s in enumerate(segs) for h in s[{1: 4, 2: 12, 3: 8}.get(i, 0):])
    assert m.victims(3, 1.0) == [2, 3, 1]


def test_victims_hold_dead_bytes_and_at_most_max_live():
    m = segment_map()
    segs = fill(m, 4)
    m.allocate([OBJ])
    assert m.victims(4, 1.0) == []  # nothing dead anywhere
    free(m, segs[0], 2)  # 87.5% live
    assert m.victims(4, 0.75) == []
    assert m.victims(4, 1.0) == [0]


def test_survivors_go_to_the_cleaning_head_and_keep_their_age():
    m = segment_map()
    segs = fill(m, 6)
    user = m.allocate([OBJ])[0] // SEG  # the user head
    free(m, segs[0], 12)
    victim = m.victims(1, 0.75)[0]
    assert victim == 0
    moved = m.allocate([OBJ] * 4, cleaning=True, survivors_of=victim)
    cold = {h // SEG for h in moved}
    assert len(cold) == 1 and user not in cold
    (c,) = cold
    assert m.heads == [user, c] and m.state[c] == m.state[user] == HEAD
    assert m.stamp[c] == m.stamp[victim] < m.stamp[user]  # the survivors' age, not now's
    # fresh pages keep to the user head, survivors to theirs
    assert {h // SEG for h in m.allocate([OBJ] * 8)} == {user}
    assert {h // SEG for h in m.allocate([OBJ] * 4, cleaning=True)} == {c}
    m.check_invariants()


def test_the_user_log_leaves_the_reserve_to_cleaning():
    m = segment_map(8)
    fill(m, 6)  # segments 0..5; two left, the reserve
    assert m.allocate([OBJ]) == []
    got = m.allocate([OBJ] * 20, cleaning=True)
    assert len(got) == 20 and {h // SEG for h in got} == {6, 7}
    assert m.heads[USER] == 5 and m.heads[CLEANING] == 7
    m.check_invariants()


def test_an_emptied_cleaning_head_stays_its_head():
    m = segment_map()
    fill(m, 2)
    hs = m.allocate([OBJ] * 3, cleaning=True)
    for h in hs:
        m.free(h, OBJ)
    c = hs[0] // SEG
    assert m.state[c] == HEAD and m.heads[CLEANING] == c
    assert m.allocate([OBJ], cleaning=True)[0] // SEG == c
    m.check_invariants()


def test_one_write_spanning_segments_leaves_other_objects_alone(tmp_path):
    """A write whose objects span segments, a later segment lying just before where another
    write's objects sit: only placement's padding is written as zeros, never the gap between
    the segments (which held the other write's object)."""
    from swapfs.tiers.file.io import write_objects

    path = tmp_path / "t.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 64 * 1024)
        other = b"\xab" * 1000  # another write's object at 8192
        write_objects(fd, [(8192, 1, 7, 1, other)], None, 0)
        before = os.pread(fd, 2000, 8192)
        # one write: an object ending at 8040 (a later segment's first object, before the
        # other write's), and one at 10192 (the rest of an earlier segment)
        write_objects(fd, [(7000, 1, 8, 1, b"\x01" * 1000), (10192, 1, 9, 1, b"\x02" * 500)],
                      None, 0)
        assert os.pread(fd, 2000, 8192) == before
        # padding to the next block boundary is still written in the same call
        write_objects(fd, [(20000, 1, 10, 1, b"\x03" * 100), (20480, 1, 11, 1, b"\x04" * 100)],
                      None, 0)
        got = os.pread(fd, 480 - 140, 20140)
        assert got == bytes(len(got))
    finally:
        os.close(fd)
