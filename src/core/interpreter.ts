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
  opts: RunCodeOptions;
  resolve: (r: CodeResult) => void;
  reject: (e: CladeError) => void;
};

/**
 * The host side of a sandbox's persistent Python process: one request at a
 * time over its stdin, user output streamed back, each request ended by a
 * marker line carrying a per-request nonce and the JSON result.
 */
export class InterpreterSession {
  private buf = '';
  private current?: Request;
  private queue: Promise<unknown> = Promise.resolve();
  private readonly decoder = new TextDecoder();
  private readonly errDecoder = new TextDecoder();
  private nextId = 1;

  constructor(
    private readonly sb: LiveSandbox,
    readonly execId: number,
  ) {}

  onStdout = (chunk: Buffer): void => {
    this.buf += this.decoder.decode(chunk, { stream: true });
    this.scan();
  };

  onStderr = (chunk: Buffer): void => {
    const text = this.errDecoder.decode(chunk, { stream: true });
    const req = this.current;
    if (!req || !text) return;
    if (req.stderr.length < MAX_CAPTURE) req.stderr += text;
    req.opts.onStderr?.(text);
  };

  onEnd = (): void => {
    this.current?.reject(new CladeError('killed', 'the Python interpreter exited; its state is lost (it restarts on the next runCode)'));
    this.current = undefined;
    if (this.sb.interpreter === this) this.sb.interpreter = undefined;
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
        opts,
        resolve: (r) => (clearTimeout(timer), resolve(r)),
        reject: (e) => (clearTimeout(timer), reject(e)),
      };
      const line = JSON.stringify({ id: this.nextId++, nonce, ...payload }) + '\n';
      this.sb.agent.writeStdinTo(this.execId, Buffer.from(line)).catch((err: unknown) => this.current?.reject(err as CladeError));
    });
  }

  private async interrupt(why: string): Promise<void> {
    const req = this.current;
    this.current = undefined;
    req?.reject(new CladeError('timeout', `${why}; the interpreter was restarted and its state is lost`));
    await this.sb.agent.signalExec(this.execId, 9).catch(() => undefined);
    if (this.sb.interpreter === this) this.sb.interpreter = undefined;
  }

  private scan(): void {
    for (;;) {
      const req = this.current;
      if (!req) {
        this.buf = '';
        return;
      }
      const marker = `\x1eclade:${req.nonce}:`;
      const at = this.buf.indexOf(marker);
      if (at >= 0) {
        const nl = this.buf.indexOf('\n', at);
        this.emit(req, this.buf.slice(0, at));
        if (nl < 0) {
          this.buf = this.buf.slice(at);
          return;
        }
        const json = this.buf.slice(at + marker.length, nl);
        this.buf = this.buf.slice(nl + 1);
        this.current = undefined;
        this.finish(req, json);
        continue;
      }
      // Hold back what could be the start of the marker.
      const cut = this.buf.lastIndexOf('\x1e');
      if (cut >= 0 && marker.startsWith(this.buf.slice(cut))) {
        this.emit(req, this.buf.slice(0, cut));
        this.buf = this.buf.slice(cut);
      } else {
        this.emit(req, this.buf);
        this.buf = '';
      }
      return;
    }
  }

  private emit(req: Request, text: string): void {
    if (!text) return;
    if (req.stdout.length < MAX_CAPTURE) req.stdout += text;
    req.opts.onStdout?.(text);
  }

  private finish(req: Request, json: string): void {
    try {
      const r = JSON.parse(json) as { value?: string | null; error?: CodeResult['error'] };
      req.resolve({ stdout: req.stdout, stderr: req.stderr, ...(r.value != null ? { value: r.value } : {}), ...(r.error ? { error: r.error } : {}) });
    } catch {
      req.reject(new CladeError('protocol_error', 'the interpreter sent a malformed result'));
    }
  }
}

async function startInterpreter(sb: LiveSandbox): Promise<InterpreterSession> {
  let session: InterpreterSession | undefined;
  const early: Buffer[] = [];
  const handle = await sb.agent.exec(
    { argv: INTERPRETER, stdin: true, env: { ...sb.env, PYTHONUNBUFFERED: '1' } },
    { onStdout: (d) => (session ? session.onStdout(d) : early.push(d)), onStderr: (d) => session?.onStderr(d) },
  );
  session = new InterpreterSession(sb, handle.id);
  for (const d of early) session.onStdout(d);
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
  const session = new InterpreterSession(sb, execId);
  sb.agent.adopt(execId, { onStdout: session.onStdout, onStderr: session.onStderr, onExit: session.onEnd, onClose: session.onEnd });
  sb.interpreter = session;
  sb.interpreterExecId = execId;
  await session.send({ reseed: randomBytes(16).toString('hex') }, { timeoutMs: 30_000 });
}
