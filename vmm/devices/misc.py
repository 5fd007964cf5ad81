"""Small fixed-function devices: POST code port, i8042 reset line, debug exit.

Owns nothing beyond each device's one or two bytes of state.  None of them
raises interrupts or keeps time.

Invariants:
* ``PostCode`` reads back the last byte written; writes have no other
  effect, so guests may use port 0x80 as an I/O delay.
* ``I8042`` never has data for the guest (output buffer empty, data port
  reads 0); its only effect is the reset line.  Port 0x61 inside its range
  is the system control port B, which belongs to the PIT (channel 2's gate
  and OUT) and is passed to it.
* ``DebugExit`` calls ``exit`` for 8-bit writes only and reads as a port
  nobody claims.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

POST_PORT_COUNT = 1      # port 0x80

I8042_PORT_COUNT = 5     # ports 0x60..0x64
I8042_DATA = 0           # 0x60
I8042_PORT_B = 1         # 0x61: system control port B (the PIT's channel 2 gate and OUT)
I8042_COMMAND = 4        # 0x64: status on read, command on write
I8042_STATUS_SYSTEM = 0x04      # self-test passed
I8042_STATUS_LAST_COMMAND = 0x08  # the last write went to the command port
I8042_STATUS_UNLOCKED = 0x10    # keyboard not inhibited
# 0xF0..0xFF pulse the output-port bits whose command bits are 0; output
# bit 0 is the CPU reset line, so an even command in that range resets.
I8042_PULSE_OUTPUT = 0xF0
I8042_PULSE_RESET_BIT = 0x01

DEBUG_EXIT_PORT_COUNT = 1  # port 0xF4


@dataclass(frozen=True, slots=True)
class PostCodeState:
    value: int


@dataclass(frozen=True, slots=True)
class I8042State:
    last_write_command: bool


@dataclass(frozen=True, slots=True)
class DebugExitState:
    """DebugExit keeps nothing; the state exists so every device snapshots alike."""


class PostCode:
    def __init__(self) -> None:
        self._value = 0

    def read(self, offset: int, size: int) -> int:
        return self._value

    def write(self, offset: int, size: int, value: int) -> None:
        self._value = value & 0xFF

    def state(self) -> PostCodeState:
        return PostCodeState(value=self._value)

    def restore(self, state: PostCodeState) -> None:
        self._value = state.value


class I8042:
    """The keyboard controller, only as far as a PC's reset line needs it.

    Port 0x61 (offset 1) goes to ``port_b_read``/``port_b_write`` (the PIT's
    system control port B); 0x62 and 0x63 read 0 and ignore writes.
    """

    def __init__(self, reset: Callable[[], None], port_b_read: Callable[[], int] = lambda: 0,
                 port_b_write: Callable[[int], None] = lambda value: None) -> None:
        self._reset = reset
        self._port_b_read = port_b_read
        self._port_b_write = port_b_write
        self._last_write_command = True

    def read(self, offset: int, size: int) -> int:
        if offset == I8042_COMMAND:
            return (I8042_STATUS_SYSTEM | I8042_STATUS_UNLOCKED
                    | (I8042_STATUS_LAST_COMMAND if self._last_write_command else 0))
        if offset == I8042_PORT_B:
            return self._port_b_read()
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == I8042_PORT_B:
            self._port_b_write(value)
        elif offset == I8042_DATA:
            self._last_write_command = False
        elif offset == I8042_COMMAND:
            self._last_write_command = True
            if value & I8042_PULSE_OUTPUT == I8042_PULSE_OUTPUT and not value & I8042_PULSE_RESET_BIT:
                self._reset()

    def state(self) -> I8042State:
        return I8042State(last_write_command=self._last_write_command)

    def restore(self, state: I8042State) -> None:
        self._last_write_command = state.last_write_command


class DebugExit:
    """An 8-bit write of V ends the machine with exit status V."""

    def __init__(self, exit: Callable[[int], None]) -> None:
        self._exit = exit

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 1:
            self._exit(value & 0xFF)

    def state(self) -> DebugExitState:
        return DebugExitState()

    def restore(self, state: DebugExitState) -> None:
        """Nothing to put back."""
