// Terminal rendering of a guest's console bytes, for #console and #live-console.
//
// The guest writes to a serial port as if to a terminal: \n starts a new line,
// \r returns to column 0 (later characters overwrite), \b goes back one column,
// \t goes to the next multiple of 8, ESC [ ... final-byte (CSI) sequences are
// skipped, every other control character is dropped.  Text made only of
// printable characters and \n renders as itself.  Only the last maxLines lines
// are kept.  feed() may be called with consecutive pieces of the output: a
// sequence cut between two pieces is still understood.

export const MAX_LINES = 2000;

const NORMAL = 0;
const AFTER_ESC = 1;
const IN_CSI = 2;
const CSI_LIMIT = 64;       // a "sequence" longer than this is garbage: stop skipping

export class Terminal {
  constructor(maxLines = MAX_LINES) {
    this.maxLines = maxLines;
    this.lines = [];        // finished lines, oldest first
    this.cur = [];          // the line being written, one character per column
    this.col = 0;
    this.mode = NORMAL;
    this.csiLen = 0;
  }

  feed(text) {
    for (const ch of text) {
      const c = ch.codePointAt(0);
      if (this.mode === IN_CSI) {
        if (c >= 0x40 && c <= 0x7e) { this.mode = NORMAL; continue; }
        if (c >= 0x20) {
          if (++this.csiLen > CSI_LIMIT) this.mode = NORMAL;
          continue;
        }
        // a C0 control inside a sequence still acts (as on a real terminal)
      } else if (this.mode === AFTER_ESC) {
        this.mode = NORMAL;
        if (ch === '[') { this.mode = IN_CSI; this.csiLen = 0; continue; }
        // a lone ESC is dropped; this character is handled as usual
      }
      if (c >= 0x20 && c !== 0x7f && !(c >= 0x80 && c < 0xa0)) {
        this.put(ch);
        continue;
      }
      switch (c) {
        case 0x0a: this.newline(); break;
        case 0x0d: this.col = 0; break;
        case 0x08: if (this.col > 0) this.col--; break;
        case 0x09: this.col = (Math.floor(this.col / 8) + 1) * 8; break;
        case 0x1b: this.mode = AFTER_ESC; break;
        default: break;     // other control characters are dropped
      }
    }
    return this;
  }

  put(ch) {
    const cur = this.cur;
    while (cur.length < this.col) cur.push(' ');
    if (this.col === cur.length) cur.push(ch);
    else cur[this.col] = ch;
    this.col++;
  }

  newline() {
    this.lines.push(this.cur.join(''));
    this.cur = [];
    this.col = 0;
    // trim now and then, not at every line
    if (this.lines.length > this.maxLines + 512) {
      this.lines.splice(0, this.lines.length - this.maxLines);
    }
  }

  // The rendered text: the last maxLines lines joined by \n (an empty line
  // after a final \n is not counted as a line).
  text() {
    const keep = this.cur.length ? this.maxLines - 1 : this.maxLines;
    const start = Math.max(0, this.lines.length - keep);
    const out = this.lines.slice(start);
    out.push(this.cur.join(''));
    return out.join('\n');
  }
}

export function renderTerminal(text, maxLines = MAX_LINES) {
  return new Terminal(maxLines).feed(text).text();
}
