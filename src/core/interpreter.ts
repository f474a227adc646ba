import { randomBytes } from 'node:crypto';
import type { AgentClient } from '../agent-protocol/client.js';
import { CladeError } from '../util/errors.js';
import { MAX_CAPTURE_BYTES, OutputCapture } from './capture.js';

export { MAX_CAPTURE_BYTES } from './capture.js';

/** What the interpreter needs of its sandbox: the agent channel, the environment, and where to keep its session. */
export type InterpreterHost = {
  readonly id: string;
  readonly agent: AgentClient;
  readonly env: Record<string, string>;
  readonly alive: boolean;
  interpreter?: InterpreterSession;
  /** Exec id of the persistent interpreter, once started (a fork's child inherits it). */
  interpreterExecId?: number;
  /** Working directory the interpreter starts in (default: the agent's). */
  readonly interpreterCwd?: string;
};

export type CodeResult = {
  /** repr() of the value of the last expression, if it had one (at most 1 Mi characters; longer ones end with a note). */
  value?: string;
  stdout: string;
  stderr: string;
  error?: { name: string; value: string; traceback: string };
  /** Bytes of output left out of `stdout`/`stderr` because they passed the 16 MiB each keeps (the callbacks saw them). */
  truncated?: { stdout: number; stderr: number };
};

export type RunCodeOptions = {
  language?: 'python';
  onStdout?: (data: string) => void;
  onStderr?: (data: string) => void;
  /** Interrupts the code after this long (default 60 s): the interpreter is restarted and its state lost. */
  timeoutMs?: number;
};

const INTERPRETER = ['python3', '-u', '/usr/lib/clade/interpreter.py'];
/** Longest marker payload (the result JSON) accepted; the interpreter caps the fields it puts there well below this. */
export const MAX_MARKER_PAYLOAD = 32 * 1024 * 1024;

const RS = 0x1e;
const NL = 0x0a;

export type MarkerSink = {
  /** User output, in order; the buffers may be views of the pushed chunks. */
  text(data: Buffer): void;
  /** The end-of-request marker for `nonce`, with what followed it on its line. */
  marker(nonce: string, payload: Buffer): void;
  /** A marker's line ran past the payload limit; its bytes up to the newline are dropped. */
  overflow(nonce: string): void;
};

/**
 * Splits one output stream of the interpreter into the user's bytes and the
 * end-of-request marker `\x1eclade:<nonce>:<payload>\n` of the running request.
 *
 * Every byte is looked at a bounded number of times whatever the chunking (a
 * stream that arrives one byte at a time costs the same as one big chunk), no
 * buffer grows with the output, and what is held back between chunks is at
 * most a marker prefix (about 40 bytes) or a marker payload (up to
 * MAX_MARKER_PAYLOAD). Output while no request runs is dropped.
 */
export class MarkerScanner {
  /** Bytes of `prefix` matched at the end of the previous chunk (held back, not yet text). */
  private matched = 0;
  private prefix = Buffer.alloc(0);
  private prefixNonce: string | undefined;
  /** Inside a marker's line: its payload so far, or null once it ran past the limit. */
  private payload: Buffer[] | null | undefined;
  private payloadBytes = 0;

  constructor(
    private readonly sink: MarkerSink,
    private readonly nonce: () => string | undefined,
    private readonly maxPayload = MAX_MARKER_PAYLOAD,
  ) {}

  push(chunk: Buffer): void {
    let i = 0;
    while (i < chunk.length) {
      if (this.payload !== undefined) {
        i = this.takePayload(chunk, i);
        continue;
      }
      const nonce = this.nonce();
      if (nonce === undefined) {
        this.matched = 0;
        return;
      }
      if (nonce !== this.prefixNonce) {
        this.prefixNonce = nonce;
        this.prefix = Buffer.from(`\x1eclade:${nonce}:`, 'latin1');
        this.matched = 0;
      }
      i = this.matched > 0 ? this.continueMatch(chunk) : this.scanText(chunk, i);
    }
  }

  /** A marker prefix held over from the previous chunk: finish it, or give its bytes back as text. */
  private continueMatch(chunk: Buffer): number {
    const prefix = this.prefix;
    let j = 0;
    let m = this.matched;
    while (j < chunk.length && m < prefix.length && chunk[j] === prefix[m]) {
      j++;
      m++;
    }
    if (m === prefix.length) {
      this.matched = 0;
      this.payload = [];
      this.payloadBytes = 0;
      return j;
    }
    if (j === chunk.length) {
      this.matched = m;
      return j;
    }
    // Not a marker. The prefix holds RS only at its start, so no marker begins inside what matched.
    this.sink.text(Buffer.from(prefix.subarray(0, this.matched)));
    this.matched = 0;
    return this.scanText(chunk, 0);
  }

  /** Text from `from` on: emitted in one piece up to a marker, or up to a marker prefix the chunk ends in. */
  private scanText(chunk: Buffer, from: number): number {
    const prefix = this.prefix;
    let i = from;
    for (;;) {
      const at = chunk.indexOf(RS, i);
      if (at < 0) {
        this.emit(chunk, from, chunk.length);
        return chunk.length;
      }
      let j = at;
      let m = 0;
      while (j < chunk.length && m < prefix.length && chunk[j] === prefix[m]) {
        j++;
        m++;
      }
      if (m === prefix.length) {
        this.emit(chunk, from, at);
        this.payload = [];
        this.payloadBytes = 0;
        return j;
      }
      if (j === chunk.length) {
        this.emit(chunk, from, at);
        this.matched = m;
        return j;
      }
      i = j; // the bytes after `at` that matched hold no RS
    }
  }

  private takePayload(chunk: Buffer, from: number): number {
    const nl = chunk.indexOf(NL, from);
    const end = nl < 0 ? chunk.length : nl;
    const nonce = this.prefixNonce!;
    if (this.payload) {
      if (this.payloadBytes + (end - from) > this.maxPayload) {
        this.payload = null;
        this.sink.overflow(nonce);
      } else if (end > from) {
        this.payload.push(chunk.subarray(from, end));
        this.payloadBytes += end - from;
      }
    }
    if (nl < 0) return chunk.length;
    const parts = this.payload;
    this.payload = undefined;
    if (parts) this.sink.marker(nonce, Buffer.concat(parts, this.payloadBytes));
    return nl + 1;
  }

  private emit(chunk: Buffer, from: number, to: number): void {
    if (to > from) this.sink.text(chunk.subarray(from, to));
  }
}

type Request = {
  nonce: string;
  stdout: OutputCapture;
  stderr: OutputCapture;
  /** The result JSON, once the stdout marker has arrived: all of the request's stdout is in. */
  result?: Buffer;
  /** Whether the stderr marker has arrived: all of the request's stderr is in. */
  stderrDone: boolean;
  resolve: (r: CodeResult) => void;
  reject: (e: CladeError) => void;
};

/**
 * The host side of a sandbox's persistent Python process: one request at a
 * time over its stdin, user output streamed back, each request ended by a
 * marker line on stdout (carrying the JSON result) and one on stderr. Both
 * are awaited, so all of a request's output has arrived when it resolves.
 */
export class InterpreterSession {
  private current?: Request;
  private queue: Promise<unknown> = Promise.resolve();
  private nextId = 1;
  private readonly out = new MarkerScanner(this.sink('stdout'), () => this.current?.nonce);
  private readonly err = new MarkerScanner(this.sink('stderr'), () => this.current?.nonce);

  constructor(
    private readonly sb: InterpreterHost,
    readonly execId: number,
  ) {}

  onStdout = (chunk: Buffer): void => this.out.push(chunk);
  onStderr = (chunk: Buffer): void => this.err.push(chunk);

  onEnd = (): void => {
    this.detach();
    this.fail(new CladeError('killed', 'the Python interpreter exited; its state is lost (it restarts on the next runCode)'));
  };

  /** Runs requests one after another, as the interpreter does. */
  send(payload: Record<string, unknown>, opts: RunCodeOptions): Promise<CodeResult> {
    const run = this.queue.then(() => this.sendNow(payload, opts));
    this.queue = run.catch(() => undefined);
    return run;
  }

  private sendNow(payload: Record<string, unknown>, opts: RunCodeOptions): Promise<CodeResult> {
    return new Promise<CodeResult>((resolve, reject) => {
      const nonce = randomBytes(12).toString('hex');
      const timeoutMs = opts.timeoutMs ?? 60_000;
      const timer = timeoutMs > 0 ? setTimeout(() => void this.interrupt(`code ran past its ${timeoutMs} ms timeout`), timeoutMs) : undefined;
      this.current = {
        nonce,
        stdout: new OutputCapture(MAX_CAPTURE_BYTES, opts.onStdout),
        stderr: new OutputCapture(MAX_CAPTURE_BYTES, opts.onStderr),
        stderrDone: false,
        resolve: (r) => (clearTimeout(timer), resolve(r)),
        reject: (e) => (clearTimeout(timer), reject(e)),
      };
      const line = JSON.stringify({ id: this.nextId++, nonce, ...payload }) + '\n';
      const req = this.current;
      this.sb.agent.writeStdinTo(this.execId, Buffer.from(line)).catch((err: unknown) => {
        if (this.current === req) this.fail(err instanceof CladeError ? err : new CladeError('killed', `could not send the code to the interpreter: ${String(err)}`));
      });
    });
  }

  /** Kills the interpreter: Python cannot be interrupted reliably from outside, and a fresh one is started on demand. */
  private async interrupt(why: string): Promise<void> {
    this.detach();
    this.fail(new CladeError('timeout', `${why}; the interpreter was restarted and its state is lost`));
    await this.sb.agent.signalExec(this.execId, 9).catch(() => undefined);
  }

  private fail(err: CladeError): void {
    const req = this.current;
    this.current = undefined;
    req?.reject(err);
  }

  /** Stops routing new runCode calls here; the next one starts a fresh interpreter. */
  private detach(): void {
    if (this.sb.interpreter === this) {
      this.sb.interpreter = undefined;
      this.sb.interpreterExecId = undefined;
    }
  }

  private sink(stream: 'stdout' | 'stderr'): MarkerSink {
    return {
      text: (data) => {
        const req = this.current;
        // After its marker a stream has nothing more for this request.
        if (req && !(stream === 'stdout' ? req.result : req.stderrDone)) req[stream].push(data);
      },
      marker: (nonce, payload) => this.marked(nonce, stream, payload),
      overflow: (nonce) => {
        if (this.current?.nonce === nonce) this.fail(new CladeError('protocol_error', `the interpreter sent a result over ${MAX_MARKER_PAYLOAD} bytes`));
      },
    };
  }

  private marked(nonce: string, stream: 'stdout' | 'stderr', payload: Buffer): void {
    const req = this.current;
    if (!req || req.nonce !== nonce) return;
    if (stream === 'stdout') {
      req.result = payload;
      req.stdout.end();
    } else {
      req.stderrDone = true;
      req.stderr.end();
    }
    if (req.result === undefined || !req.stderrDone) return;
    this.current = undefined;
    const parsed = parseResult(req.result);
    if (!parsed) {
      req.reject(new CladeError('protocol_error', 'the interpreter sent a malformed result'));
      return;
    }
    const dropped = { stdout: req.stdout.dropped, stderr: req.stderr.dropped };
    req.resolve({
      stdout: req.stdout.text(),
      stderr: req.stderr.text(),
      ...parsed,
      ...(dropped.stdout || dropped.stderr ? { truncated: dropped } : {}),
    });
  }
}

/** The interpreter runs in a guest that may be hostile: its result is checked field by field. */
function parseResult(json: Buffer): Pick<CodeResult, 'value' | 'error'> | undefined {
  let r: unknown;
  try {
    r = JSON.parse(json.toString('utf8'));
  } catch {
    return undefined;
  }
  if (typeof r !== 'object' || r === null || Array.isArray(r)) return undefined;
  const { value, error } = r as { value?: unknown; error?: unknown };
  if (value != null && typeof value !== 'string') return undefined;
  const out: Pick<CodeResult, 'value' | 'error'> = value != null ? { value } : {};
  if (error != null) {
    if (typeof error !== 'object' || Array.isArray(error)) return undefined;
    const { name, value: text, traceback } = error as Record<string, unknown>;
    if (typeof name !== 'string' || typeof text !== 'string' || typeof traceback !== 'string') return undefined;
    out.error = { name, value: text, traceback };
  }
  return out;
}

async function startInterpreter(sb: InterpreterHost): Promise<InterpreterSession> {
  let session: InterpreterSession | undefined;
  // Nothing is asked of the interpreter before it exists, so output before then is only noise.
  const handle = await sb.agent.exec(
    { argv: INTERPRETER, stdin: true, env: { ...sb.env, PYTHONUNBUFFERED: '1' }, ...(sb.interpreterCwd !== undefined ? { cwd: sb.interpreterCwd } : {}) },
    { onStdout: (d) => session?.onStdout(d), onStderr: (d) => session?.onStderr(d) },
  );
  session = new InterpreterSession(sb, handle.id);
  void handle.exited.then(session.onEnd, session.onEnd);
  sb.interpreter = session;
  sb.interpreterExecId = handle.id;
  return session;
}

export async function runCode(sb: InterpreterHost, code: string, opts: RunCodeOptions = {}): Promise<CodeResult> {
  if (opts.language && opts.language !== 'python') throw new CladeError('bad_request', `language ${JSON.stringify(opts.language)} is not supported; use "python"`);
  if (typeof code !== 'string') throw new CladeError('bad_request', 'code must be a string');
  if (!sb.alive) throw new CladeError('killed', `sandbox ${sb.id} is not running`);
  const session = sb.interpreter ?? (await startInterpreter(sb));
  return session.send({ code }, opts);
}

/**
 * In a fork, the interpreter process came along with the guest: attach to it
 * and reseed `random` and `numpy.random`, so siblings draw different numbers.
 */
export async function reseedInterpreter(sb: InterpreterHost, execId: number): Promise<void> {
  const session = attachInterpreter(sb, execId);
  await session.send({ reseed: randomBytes(16).toString('hex') }, { timeoutMs: 30_000 });
}

/** Attaches to an interpreter process already running in the guest (forked, or left by a previous daemon). */
export function attachInterpreter(sb: InterpreterHost, execId: number): InterpreterSession {
  const session = new InterpreterSession(sb, execId);
  sb.agent.adopt(execId, { onStdout: session.onStdout, onStderr: session.onStderr, onExit: session.onEnd, onClose: session.onEnd });
  sb.interpreter = session;
  sb.interpreterExecId = execId;
  return session;
}
