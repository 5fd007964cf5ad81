# gdb hooks for rrstub: source this before or after `target remote`.
#
# gdb keeps the registers, frames and memory it has read until the target
# resumes, and the remote protocol has no way for a stub to say "the state
# changed" while gdb waits at its prompt (GDB 13's `monitor` only prints what
# the stub answers).  `monitor goto` moves the recording, so after every
# monitor command gdb drops what it cached (`maint flush register-cache`)
# and reports a stop where it now is (`stepi 0` steps zero instructions:
# it moves nothing, prints the frame, and MI front ends get a *stopped
# notification, which is what makes IDEs refresh their views).

define hookpost-monitor
  maint flush register-cache
  stepi 0
end

# After connecting, check that the file gdb reads symbols from is the kernel
# the recording was made with: gdb computes a CRC of each read-only section
# of its file and asks rrstub for the CRC of the guest's memory there (qCRC).
# A file rebuilt since the recording says "MIS-MATCHED!" and gdb warns; then
# start gdb without a file (it gets the recorded kernel from rrstub) or
# write that kernel out with `rrstub info REC --kernel-out FILE`.
define target hookpost-remote
  compare-sections -r
end
