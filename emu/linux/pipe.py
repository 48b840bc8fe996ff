"""Pipes (the kernel's fs/pipe.c): a bounded buffer with a read end and a write end.

The capacity is the kernel's default, 16 pages (64 KiB). A call that would block raises
`WouldBlockForever`: a read of an empty pipe whose write end is still open sleeps while
other threads live (the syscall layer runs it again when a pipe changes); a write to a full
pipe, or a read with no other thread, can never be woken (in Linux the process sleeps for
ever) and the syscall layer ends the run as a limit (exit 124, as a `timeout` wrapper would
end the hung process) instead of hanging or growing host memory. With O_NONBLOCK the same calls return EAGAIN, as in Linux; writes with no reader
left get EPIPE (and SIGPIPE)."""
from __future__ import annotations

import errno
from collections import deque
from dataclasses import dataclass, field

PAGE = 4096
PIPE_BUF = PAGE                 # writes up to this size are atomic (one page or a top-up)
PIPE_DEF_BUFFERS = 16           # slots of a page: 64 KiB


class WouldBlockForever(Exception):
    """A blocking pipe call that must wait. `what` names the call; `restartable`: it has
    done nothing yet, so a thread may sleep and run it again (a read; a write that does not
    fit has committed part of its data)."""

    def __init__(self, what: str, restartable: bool = False) -> None:
        super().__init__(what)
        self.what = what
        self.restartable = restartable


class PipeError(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(errno.errorcode.get(err, str(err)))
        self.errno = err


@dataclass
class Pipe:
    """A ring of page buffers, as pipe_inode_info: a write first tops up the last page when
    its odd-sized head fits there, then fills fresh pages, one slot each, while a slot is
    free; a read frees a slot only when it empties the page. Attributes: slots (the pages
    in flight), readers / writers (open descriptions of each end), max_slots."""
    slots: deque[bytearray] = field(default_factory=deque)
    readers: int = 0
    writers: int = 0
    max_slots: int = PIPE_DEF_BUFFERS

    def __len__(self) -> int:
        return sum(len(b) for b in self.slots)

    def read(self, n: int, nonblock: bool) -> bytes:
        if not self.slots:
            if self.writers == 0:
                return b""                          # EOF
            if nonblock:
                raise PipeError(errno.EAGAIN)
            raise WouldBlockForever("read of an empty pipe whose write end is open", True)
        out = bytearray()
        while self.slots and len(out) < n:
            head = self.slots[0]
            take = min(n - len(out), len(head))
            out += head[:take]
            del head[:take]
            if not head:
                self.slots.popleft()
        return bytes(out)

    def write(self, data: bytes, nonblock: bool) -> int:
        """Bytes accepted, as pipe_write: a blocking write that does not fit commits what
        fits, then would wait for a reader for ever."""
        if self.readers == 0:
            raise PipeError(errno.EPIPE)
        done, head = 0, len(data) % PAGE
        if head and self.slots and len(self.slots[-1]) + head <= PAGE:
            self.slots[-1] += data[:head]
            done = head
        while done < len(data):
            if len(self.slots) >= self.max_slots:
                if nonblock:
                    if done:
                        return done
                    raise PipeError(errno.EAGAIN)
                raise WouldBlockForever("write to a full pipe with no other thread to read it")
            self.slots.append(bytearray(data[done:done + PAGE]))
            done += len(self.slots[-1])
        return done
