# Find the write that lost updates in a recording of examples/build/race.elf.
#
# After `target remote`: run to the end of the recording, watch the shared
# counter, and go backwards from write to write until one moves the counter
# down: a thread that read the counter before a preemption storing its stale
# copy over the other threads' work.
#
# A watchpoint stop in reverse leaves the writing instruction (mov %eax,
# counter) not yet executed: `counter` still holds the value before the
# write and %eax the value about to be stored.

set pagination off
set confirm off
continue
printf "at the end of the recording: counter = %d\n", counter
watch counter
reverse-continue
set $writes = 1
while $eax > counter && $writes < 5000
  reverse-continue
  set $writes = $writes + 1
end
printf "\n%d writes back: this store replaces counter = %d with %d: %d updates lost\n", $writes, counter, $eax, counter + 1 - $eax
backtrace
monitor when
