"""``python3 ptrace_write.py PID FD TEXT``: make process PID write TEXT to its descriptor FD.

What a local user can do to a process of their own that the kernel lets
them trace (no Yama, or ``kernel.yama.ptrace_scope = 0``, and a process
started afresh after its uid changed): attach, run one ``write`` system call
in it, and let it go on as if nothing happened. Standard library only
(ctypes): it runs under the system python3 as the mail user of a live test.
x86-64 Linux only.

The process must be stopped in a system call (a server waiting for its
client is): the ``syscall`` instruction it came from is reused for the
write, and the interrupted call is restarted on the way out.
"""

from __future__ import annotations

import ctypes
import os
import sys

PTRACE_GETREGS, PTRACE_SETREGS = 12, 13
PTRACE_ATTACH, PTRACE_DETACH, PTRACE_SINGLESTEP = 16, 17, 9
WALL = 0x40000000
SYS_WRITE = 1
SYSCALL = b"\x0f\x05"
# struct user_regs_struct, in order.
FIELDS = (
    *("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx"),
    *("rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base"),
    *("ds", "es", "fs", "gs"),
)


class Registers(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulonglong) for name in FIELDS]


libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
libc.ptrace.restype = ctypes.c_long


def ptrace(request: int, pid: int, data: object = None) -> None:
    pointer = ctypes.byref(data) if isinstance(data, ctypes.Structure) else None
    if libc.ptrace(request, pid, None, pointer) == -1:
        error = ctypes.get_errno()
        raise OSError(error, f"ptrace({request}): {os.strerror(error)}")


def inject_write(pid: int, descriptor: int, text: bytes) -> int:
    ptrace(PTRACE_ATTACH, pid)
    os.waitpid(pid, WALL)
    saved = Registers()
    ptrace(PTRACE_GETREGS, pid, saved)
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as memory:
        memory.seek(saved.rip - 2)
        if memory.read(2) != SYSCALL:
            ptrace(PTRACE_DETACH, pid)
            raise RuntimeError("the process is not stopped in a system call")
        # Below the stack pointer and its red zone: unused by the process.
        buffer = (saved.rsp - 4096 - len(text)) & ~0xF
        memory.seek(buffer)
        memory.write(text)
    call = Registers.from_buffer_copy(saved)
    call.rip, call.rax, call.orig_rax = saved.rip - 2, SYS_WRITE, 2**64 - 1  # no restart
    call.rdi, call.rsi, call.rdx = descriptor, buffer, len(text)
    ptrace(PTRACE_SETREGS, pid, call)
    ptrace(PTRACE_SINGLESTEP, pid)
    os.waitpid(pid, WALL)
    done = Registers()
    ptrace(PTRACE_GETREGS, pid, done)
    # Back as it was: the interrupted call restarts when it runs on.
    ptrace(PTRACE_SETREGS, pid, saved)
    ptrace(PTRACE_DETACH, pid)
    written = ctypes.c_longlong(done.rax).value
    if written < 0:
        raise OSError(-written, f"write in {pid}: {os.strerror(-written)}")
    return written


def main() -> int:
    pid, descriptor, text = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    written = inject_write(pid, descriptor, text.encode())
    print(f"wrote {written} bytes to descriptor {descriptor} of {pid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
