"""A SharedBuffer closed by one thread while another uses it, wrong
arguments to shared_buffer(), and views that must not be written.

The races are made deterministic: the using thread is held at a known point
(a profile hook on its own calls) while another thread closes the buffer and
puts another file at the number of its descriptor; the using thread then
goes on. Real memfds, pooled segments, SegmentLinks and /proc are the
observables.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import subprocess
import sys
import threading
from types import FrameType
from typing import Any, Callable, Iterator

import numpy
import pytest

from conftest import LONG
from vyra_base_ipc import ReceivedBuffers, SharedBuffer, received_buffer, shared_buffer
from vyra_base_ipc._payload import seal_bytes
from vyra_base_ipc._segment_pool import SegmentPool, new_segment, segment_pool
from vyra_base_ipc.ttrpc._frames import HEADER, released_ids
from vyra_base_ipc.ttrpc._segment_link import SegmentLink

KiB = 1024
#: How long the held thread lets the closing thread run: long enough for a
#: close() that does not wait (the bug) to finish first; a close() that waits
#: for the held thread (the fix) is still waiting when it ends, by design.
PAUSE = 0.5

DATA = bytes(range(256)) * 256  # 64 KiB, recognisable


@contextlib.contextmanager
def held_at(point: Callable[..., Any] | str, meanwhile: Callable[[], None]) -> Iterator[threading.Thread]:
    """While in the block, the first time this thread calls ``point`` (a
    builtin such as ``os.dup``, or a Python function of that name) it first
    runs ``meanwhile`` in another thread, and goes on when that finished or
    after :data:`PAUSE` seconds (it may be waiting for this one). The other
    thread must have finished when the block ends."""
    other = threading.Thread(target=meanwhile, name='closer')

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        reached = (event == 'c_call' and arg is point) or \
            (event == 'call' and isinstance(point, str) and frame.f_code.co_name == point)
        if reached and other.ident is None:
            other.start()
            other.join(PAUSE)

    sys.setprofile(hook)
    try:
        yield other
    finally:
        sys.setprofile(None)
        if other.ident is not None:
            other.join(LONG)
    assert other.ident is not None, f'{point} was never reached'
    assert not other.is_alive()


def target(fd: int) -> str:
    return os.readlink(f'/proc/self/fd/{fd}')


def close_and_reuse(buffer: SharedBuffer) -> Callable[[], None]:
    """Close ``buffer``, then put /dev/null at the number its descriptor had:
    what any open() in the process may do once that number is free."""
    number = buffer.fileno()

    def run() -> None:
        buffer.close()
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        if null != number:
            os.dup2(null, number)
            os.close(null)
    return run


def memfd_buffer() -> SharedBuffer:
    """A buffer with a sealed memfd of its own (not pooled): as received, or
    made where pooled segments are unavailable."""
    return SharedBuffer(seal_bytes(DATA), len(DATA), managed=True)


@contextlib.contextmanager
def made(kind: str, link: SegmentLink) -> Iterator[SharedBuffer]:
    """A buffer with a memfd of its own, or one a peer lent (a segment of the
    'peer', mapped through ``link``), as received."""
    if kind == 'memfd':
        with memfd_buffer() as buffer:
            yield buffer
        return
    segment = new_segment(len(DATA), fill=DATA)
    fd = os.dup(segment.fd)
    buffer = SharedBuffer(fd, len(DATA), view=link.receive(fd, len(DATA), 7, 0, 'a lent buffer'),
                          managed=True, lent=True)
    try:
        yield buffer
    finally:
        buffer.close()
        segment.destroy()


@pytest.fixture
def own_pool() -> Iterator[SegmentPool]:
    """This process's pool, keeping every segment returned to it (none is dropped before the test looks)."""
    pool = segment_pool()
    kept = pool.max_free_bytes
    pool.max_free_bytes = 1 << 30
    yield pool
    pool.max_free_bytes = kept


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def assert_not_handed_out_again(segment_inode: int) -> None:
    """The pool does not give the segment of ``segment_inode`` to a new buffer: somebody still reads it."""
    with SharedBuffer.allocate(len(DATA)) as again:
        assert inode(again.fileno()) != segment_inode, 'a segment in use was handed out again'


# == close racing with use ========================================================================

@pytest.mark.parametrize('kind', ['memfd', 'lent'])
def test_a_buffer_closed_while_it_is_lent_never_sends_the_file_that_took_its_descriptors_number(
        kind: str) -> None:
    link, on = SegmentLink(), SegmentLink()
    try:
        with made(kind, link) as buffer:
            with held_at(os.dup, close_and_reuse(buffer)):
                sent, _, _ = buffer.lend_to(on)
            try:
                assert target(sent).startswith('/memfd:'), f'sent {target(sent)} instead of the buffer'
                assert os.pread(sent, len(DATA), 0) == DATA
                assert buffer.closed
            finally:
                os.close(sent)
    finally:
        on.close()
        link.close()


def test_a_buffer_closed_while_it_is_dup_ed_or_shared_never_gives_out_another_file() -> None:
    buffer = memfd_buffer()
    with held_at(os.dup, close_and_reuse(buffer)):
        mine = buffer.dup()
    try:
        assert target(mine).startswith('/memfd:') and os.pread(mine, 4, 0) == DATA[:4]
    finally:
        os.close(mine)
    buffer = memfd_buffer()
    with held_at(os.dup, close_and_reuse(buffer)):
        shared = buffer.share()
    with shared:
        assert target(shared.fileno()).startswith('/memfd:') and shared.read() == DATA


def test_a_buffer_closed_while_it_is_read_reads_its_own_bytes() -> None:
    buffer = memfd_buffer()
    with held_at(os.pread, close_and_reuse(buffer)):
        data = buffer.read()
    assert data == DATA


def test_a_pooled_buffer_closed_while_it_is_lent_stays_out_of_the_pool_until_given_back(
        own_pool: SegmentPool) -> None:
    link = SegmentLink()
    buffer = SharedBuffer.copy_from(DATA)
    segment_inode = inode(buffer.fileno())
    with held_at('may_lend', buffer.close):
        sent, lend, _ = buffer.lend_to(link)
    try:
        assert lend and inode(sent) == segment_inode
        assert_not_handed_out_again(segment_inode)
        assert os.pread(sent, len(DATA), 0) == DATA
    finally:
        os.close(sent)
        link.close()


@pytest.mark.parametrize('use', ['view', 'share'])
def test_a_pooled_buffer_closed_while_a_view_or_share_is_taken_stays_out_of_the_pool_while_that_lives(
        use: str, own_pool: SegmentPool) -> None:
    buffer = SharedBuffer.copy_from(DATA)
    segment_inode = inode(buffer.fileno())
    # view() and share() take one more use of the segment: held there.
    with held_at('user_view' if use == 'view' else 'use', buffer.close):
        taken = buffer.view() if use == 'view' else buffer.share()
    assert buffer.closed
    assert_not_handed_out_again(segment_inode)
    if isinstance(taken, SharedBuffer):
        assert taken.read() == DATA
        taken.close()
    else:
        assert bytes(taken) == DATA
        del taken


def test_every_use_of_a_closed_buffer_raises_value_error_naming_it() -> None:
    link = SegmentLink()
    for buffer in (memfd_buffer(), SharedBuffer.copy_from(DATA)):
        buffer.close()
        uses: list[Callable[[], object]] = [buffer.view, buffer.read, buffer.dup, buffer.fileno, buffer.share,
                                            functools.partial(buffer.lend_to, None),
                                            functools.partial(buffer.lend_to, link)]
        for use in uses:
            with pytest.raises(ValueError, match='SharedBuffer .* is closed'):
                use()
    link.close()


# == wrong arguments ==============================================================================

@pytest.mark.parametrize('function', [shared_buffer, received_buffer])
def test_shared_buffer_given_something_else_than_a_reference_raises_type_error_naming_it(
        function: Callable[..., Any]) -> None:
    with SharedBuffer.copy_from(DATA) as frame:
        for wrong, named in ((b'abc', 'bytes'), (frame, 'SharedBuffer'), (None, 'NoneType'), (3, 'int')):
            with pytest.raises(TypeError, match=f'SharedBufferRef.* not {named}'):
                function(wrong)
        with pytest.raises(TypeError, match='its view()'):
            function(frame)


# == views that must not be written ===============================================================

def assert_read_only_all_the_way(view: memoryview) -> None:
    """Neither ``view`` nor the object under it gives a writable buffer: a NumPy
    array over either is read-only (a write over a read-only mapping kills the
    process; over the owner's segment it changes what was sent)."""
    assert view.readonly
    for base in (view, view.obj):
        array = numpy.frombuffer(base, dtype=numpy.uint8)
        assert not array.flags.writeable, f'a writable array over {type(base).__name__}'
        with pytest.raises(TypeError, match='not writable'):
            ctypes.c_char.from_buffer(base)


def test_the_owners_view_of_a_sent_buffer_is_read_only_down_to_the_object_under_it(
        own_pool: SegmentPool) -> None:
    with SharedBuffer.allocate(len(DATA)) as buffer:
        writable = buffer.view()
        writable[:] = DATA
        assert numpy.frombuffer(writable.obj, dtype=numpy.uint8).flags.writeable  # before it is sent
        del writable
        buffer.freeze()
        view = buffer.view()
        assert_read_only_all_the_way(view)
        assert bytes(view) == DATA and len(view) == len(DATA) and view.format == 'B'


@pytest.mark.parametrize('kind', ['memfd', 'lent'])
def test_a_received_buffers_view_is_read_only_down_to_the_object_under_it_and_still_gives_its_lend_back(
        kind: str) -> None:
    link = SegmentLink()
    try:
        with made(kind, link) as buffer:
            received = ReceivedBuffers({buffer.handle: buffer})
            view = shared_buffer(buffer.ref, received)
            assert_read_only_all_the_way(view)
            part = numpy.frombuffer(view, dtype=numpy.uint8)[10:20]
            assert bytes(part) == DATA[10:20]
            del view
        if kind == 'lent':
            assert link.release_frame() == b''  # the array still holds the lend
            del part
            assert released_ids(link.release_frame()[HEADER.size:]) == (7,)
    finally:
        link.close()


# == the end of the process =======================================================================

EXITS = """
from vyra_base_ipc import SharedBuffer
kept = SharedBuffer.copy_from(b'x' * 100)  # left open, as a module's frame buffer would be
closed = SharedBuffer.copy_from(b'y' * 100)
view = closed.view()  # its segment goes back to the pool only as the interpreter ends
closed.close()
"""


def test_a_process_ending_with_pooled_buffers_or_views_still_referenced_exits() -> None:
    # Returned to the pool while the interpreter shuts down, a segment used to
    # start the pool's idle timer: a thread that never runs then, and
    # Thread.start() waited for it for ever.
    try:
        result = subprocess.run([sys.executable, '-W', 'ignore::ResourceWarning', '-c', EXITS],
                                capture_output=True, text=True, timeout=LONG)
    except subprocess.TimeoutExpired:
        pytest.fail(f'the process did not exit within {LONG} s')
    assert (result.returncode, result.stderr) == (0, '')


CYCLES = """
import gc, os
from vyra_base_ipc import SharedBuffer
from vyra_base_ipc._payload import seal_bytes

class Node:
    pass

for round in range(20):
    sent = SharedBuffer.copy_from(b'x' * 100)  # pooled, frozen
    received = SharedBuffer(seal_bytes(b'y' * 100), 100, managed=True)  # as a received one
    views = [sent.view(), received.view()]
    node = Node()  # a cycle made after the views (a traceback, a task): collected by the GC alone
    node.cycle, node.views = node, views
    sent.close()
    received.close()
    del node, views, sent, received
    gc.collect()
print('collected')
"""


def test_read_only_views_caught_in_a_reference_cycle_are_collected_without_killing_the_process() -> None:
    # A read-only view's object is a read-only memoryview holding an export;
    # before Python 3.13 the garbage collector clearing that memoryview first
    # dropped its buffer anyway, and freeing it later killed the process
    # (SIGSEGV) in whatever thread collected.
    result = subprocess.run([sys.executable, '-c', CYCLES], capture_output=True, text=True, timeout=LONG)
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, 'collected', '')
