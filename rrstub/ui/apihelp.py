"""The JSON API's documentation: served at GET /api and printed by `rrstub ui --help`
(its own module so that building the command line does not import the web server)."""

API_HELP = """\
JSON API (the page uses it; so can scripts).  ID is a recording's id from /api/recordings
(r0, r1, ... in the order given); positions are instruction counts; C is any client name
(a newer state request of the same client cancels its older one: answer 409).
  GET  /api/recordings                      the open recordings (id, path, error)
  POST /api/open {"path"}                   open another recording (from the branch tree): {"id"}
  GET  /api/rec/ID                          markers, labels, first/last position, end, mode
  GET  /api/rec/ID/state?pos=N&client=C     the state at N: console before N, registers,
                                            disassembly with symbols, backtrace, guest time
       &quick=1                             answer at once with the nearest checkpoint's state when N
                                            is far from one (exact: false, position: where it is)
  GET  /api/rec/ID/progress?client=C        how far C's running seek is
  GET  /api/rec/ID/resolve?marker=NAME      a marker's or label's instruction count
  POST /api/rec/ID/markers {"name","pos"}   add a marker, saved in the file as a label
  POST /api/rec/ID/crop {"from","to","output"}  crop between two markers (a job)
  GET  /api/jobs/J                          a crop's state and progress lines
  POST /api/rec/ID/live {"pos","output"}    go live from N into a branch recording
  GET  /api/live/L                          the live run: console text, running, status
  POST /api/live/L/input {"data"}           type into its console
  POST /api/live/L/stop                     stop it (the branch is kept)
  WS   /api/live/L/ws                       its console as it runs: {"type":"output"|"status"|"ended"}
  GET  /api/rec/ID/tree                     the branch tree around the recording
Errors answer {"error": TEXT} with status 400 (bad input), 404, 409 or 422 (a damaged recording:
TEXT is what the CLI prints)."""
