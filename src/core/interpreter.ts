import { randomBytes } from 'node:crypto';
import { CladeError } from './errors.js';
import type { LiveSandbox } from './sandboxes.js';

export type CodeResult = {
  /** repr() of the value of the last expression, if it had one. */
  value?: string;
  stdout: string;
  stderr: string;
  error?: { name: string; value: string; traceback: string };
};

export type RunCodeOptions = {
  language?: 'python';
  onStdout?: (data: string) => void;
  onStderr?: (data: string) => void;
  /** Interrupts the code after this long (default 60 s): the interpreter is restarted and its state lost. */
  timeoutMs?: number;
};

const INTERPRETER = ['python3', '-u', '/usr/lib/clade/interpreter.py'];
const MAX_CAPTURE = 16 * 1024 * 1024;

type Request = {
  nonce: string;
  stdout: string;
  stderr: string;
  /** The result JSON, once the stdout marker has arrived. */
  result?: string;
  /** Whether the stderr marker has arrived: all of the request's stderr is in. */
  stderrDone: boolean;
  opts: RunCodeOptions;
  resolve: (r: CodeResult) => void;
  reject: (e: CladeError) => void;
};

/**
 * Splits one output stream of the interpreter into the user's text and the
 * end-of-request marker `\x1eclade:<nonce>:<payload>\n`, holding back a tail
 * that could be the start of a marker split across chunks.
 */
class MarkerScanner {
  private buf = '';
  private readonly decoder = new TextDecoder();

  constructor(
    private readonly onText: (text: string) => void,
    private readonly onMarker: (nonce: string, payload: string) => void,
    private readonly nonce: () => string | undefined,
  ) {}

  push(chunk: Buffer): void {
    this.buf += this.decoder.decode(chunk, { stream: true });
    for (;;) {
      const nonce = this.nonce();
      if (nonce === undefined) {
        this.buf = '';
        return;
      }
      const marker = `\x1eclade:${nonce}:`;
      const at = this.buf.indexOf(marker);
      if (at < 0) {
        const cut = this.buf.lastIndexOf('\x1e');
        const keep = cut >= 0 && marker.startsWith(this.buf.slice(cut)) ? cut : this.buf.length;
        this.text(this.buf.slice(0, keep));
        this.buf = this.buf.slice(keep);
        return;
      }
      this.text(this.buf.slice(0, at));
      const nl = this.buf.indexOf('\n', at);
      if (nl < 0) {
        this.buf = this.buf.slice(at);
        return;
      }
      const payload = this.buf.slice(at + marker.length, nl);
      this.buf = this.buf.slice(nl + 1);
      this.onMarker(nonce, payload);
    }
  }

  private text(t: string): void {
    if (t) this.onText(t);
  }
}

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
  private readonly out = new MarkerScanner(
    (t) => this.append('stdout', t),
    (nonce, payload) => this.marked(nonce, 'stdout', payload),
    () => this.current?.nonce,
  );
  private readonly err = new MarkerScanner(
    (t) => this.append('stderr', t),
    (nonce) => this.marked(nonce, 'stderr', ''),
    () => this.current?.nonce,
  );

  constructor(
    private readonly sb: LiveSandbox,
    readonly execId: number,
  ) {}

  onStdout = (chunk: Buffer): void => this.out.push(chunk);
  onStderr = (chunk: Buffer): void => this.err.push(chunk);

  onEnd = (): void => {
    this.detach();
    this.current?.reject(new CladeError('killed', 'the Python interpreter exited; its state is lost (it restarts on the next runCode)'));
    this.current = undefined;
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
        stdout: '',
        stderr: '',
        stderrDone: false,
        opts,
        resolve: (r) => (clearTimeout(timer), resolve(r)),
        reject: (e) => (clearTimeout(timer), reject(e)),
      };
      const line = JSON.stringify({ id: this.nextId++, nonce, ...payload }) + '\n';
      this.sb.agent.writeStdinTo(this.execId, Buffer.from(line)).catch((err: unknown) => this.current?.reject(err as CladeError));
    });
  }

  /** Kills the interpreter: Python cannot be interrupted reliably from outside, and a fresh one is started on demand. */
  private async interrupt(why: string): Promise<void> {
    const req = this.current;
    this.current = undefined;
    this.detach();
    req?.reject(new CladeError('timeout', `${why}; the interpreter was restarted and its state is lost`));
    await this.sb.agent.signalExec(this.execId, 9).catch(() => undefined);
  }

  /** Stops routing new runCode calls here; the next one starts a fresh interpreter. */
  private detach(): void {
    if (this.sb.interpreter === this) {
      this.sb.interpreter = undefined;
      this.sb.interpreterExecId = undefined;
    }
  }

  private append(stream: 'stdout' | 'stderr', text: string): void {
    const req = this.current;
    if (!req) return;
    if (req[stream].length < MAX_CAPTURE) req[stream] += text;
    (stream === 'stdout' ? req.opts.onStdout : req.opts.onStderr)?.(text);
  }

  private marked(nonce: string, stream: 'stdout' | 'stderr', payload: string): void {
    const req = this.current;
    if (!req || req.nonce !== nonce) return;
    if (stream === 'stdout') req.result = payload;
    else req.stderrDone = true;
    if (req.result === undefined || !req.stderrDone) return;
    this.current = undefined;
    try {
      const r = JSON.parse(req.result) as { value?: string | null; error?: CodeResult['error'] };
      req.resolve({ stdout: req.stdout, stderr: req.stderr, ...(r.value != null ? { value: r.value } : {}), ...(r.error ? { error: r.error } : {}) });
    } catch {
      req.reject(new CladeError('protocol_error', 'the interpreter sent a malformed result'));
    }
  }
}

async function startInterpreter(sb: LiveSandbox): Promise<InterpreterSession> {
  let session: InterpreterSession | undefined;
  // Nothing is asked of the interpreter before it exists, so output before then is only noise.
  const handle = await sb.agent.exec(
    { argv: INTERPRETER, stdin: true, env: { ...sb.env, PYTHONUNBUFFERED: '1' } },
    { onStdout: (d) => session?.onStdout(d), onStderr: (d) => session?.onStderr(d) },
  );
  session = new InterpreterSession(sb, handle.id);
  void handle.exited.then(session.onEnd, session.onEnd);
  sb.interpreter = session;
  sb.interpreterExecId = handle.id;
  return session;
}

export async function runCode(sb: LiveSandbox, code: string, opts: RunCodeOptions = {}): Promise<CodeResult> {
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
export async function reseedInterpreter(sb: LiveSandbox, execId: number): Promise<void> {
  const session = attachInterpreter(sb, execId);
  await session.send({ reseed: randomBytes(16).toString('hex') }, { timeoutMs: 30_000 });
}

/** Attaches to an interpreter process already running in the guest (forked, or left by a previous daemon). */
export function attachInterpreter(sb: LiveSandbox, execId: number): InterpreterSession {
  const session = new InterpreterSession(sb, execId);
  sb.agent.adopt(execId, { onStdout: session.onStdout, onStderr: session.onStderr, onExit: session.onEnd, onClose: session.onEnd });
  sb.interpreter = session;
  sb.interpreterExecId = execId;
  return session;
}
