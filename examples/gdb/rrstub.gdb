# gdb commands for debugging an rrstub recording of an example kernel.
#
#   rrstub serve race.rrr &                     # listens on 127.0.0.1:1234
#   gdb -x examples/gdb/rrstub.gdb              # symbols come from the recording
#   gdb -x examples/gdb/rrstub.gdb examples/build/race.elf   # or from this file
#
# Connects to rrstub on 127.0.0.1:1234 (edit the target line for another
# address).  With no file named, gdb reads the kernel embedded in the
# recording from rrstub.  rrstub-hooks.gdb makes gdb reread the state after
# every monitor command, so `monitor goto` shows the new place at once.
# `compare-sections -r` checks that the file gdb uses is the recorded one:
# every read-only section should say "matched".

set pagination off
set confirm off
source examples/gdb/rrstub-hooks.gdb
target remote 127.0.0.1:1234

define rr-goto
  monitor goto $arg0
end
document rr-goto
Move the recording to a marker (m0, m1, a name given with `monitor marker add`)
or an instruction number, and show where the guest is: rr-goto 120000
end
