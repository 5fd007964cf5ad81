# gdb commands for debugging an rrstub recording of an example kernel.
#
#   rrstub serve race.rrr &                     # listens on 127.0.0.1:1234
#   gdb -x examples/gdb/rrstub.gdb examples/build/race.elf
#
# Connects to rrstub on 127.0.0.1:1234 (edit the target line for another
# address) and adds `rr-goto`, which moves the recording to a marker or an
# instruction number and makes gdb show the state there.

set pagination off
set confirm off
target remote 127.0.0.1:1234

define rr-goto
  monitor goto $arg0
  maint flush register-cache
  frame
end
document rr-goto
Move the recording to a marker (m0, m1, a name given with `monitor marker add`)
or an instruction number, then show where the guest is: rr-goto 120000
end
