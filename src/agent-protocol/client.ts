import { connect, type Socket } from 'node:net';
import { CladeError, errorMessage } from '../util/errors.js';
import { MessageType, Tag, TOKEN_SIZE } from './constants.js';
import { FieldReader, FieldWriter } from './fields.js';
import { encodeHostFrame, FrameDecoder, type Frame } from './frame.js';

/** Biggest chunk of file data sent in one WRITE_DATA frame (leaves room for the token). */
const WRITE_CHUNK = 512 * 1024;
/** Protocol violations remembered for diagnostics; older ones are only counted. */
const MAX_VIOLATIONS_KEPT = 32;
/** Default wait for a request's reply. */
export const REQUEST_TIMEOUT_MS = 30_000;

/** How long the host waits on the guest; every wait has one of these deadlines. */
export type AgentDeadlines = {
  /** A request's reply, and an EXEC's start. */
  requestMs: number;
  /** The agent must take what the host writes within this long, or it is stuck. */
  writeStallMs: number;
  /** A file read that brings no data for this long is given up. */
  readIdleMs: number;
  /** After a command's own timeout, how long the host waits for its EXIT before killing it itself, and again after that. */
  exitGraceMs: number;
};

export const DEFAULT_DEADLINES: AgentDeadlines = { requestMs: REQUEST_TIMEOUT_MS, writeStallMs: 60_000, readIdleMs: 30_000, exitGraceMs: 5_000 };

export type ExecRequest = {
  argv?: string[];
  shell?: string;
  env?: Record<string, string>;
  cwd?: string;
  timeoutMs?: number;
  stdin?: boolean;
};

export type ExecExit = { exitCode: number; signal?: number; timedOut: boolean };

export type ExecHandlers = {
  onStdout?: (data: Buffer) => void;
  onStderr?: (data: Buffer) => void;
};

export type ReadFileOptions = {
  /** Refuse files bigger than this with `too_large` (the agent checks before sending anything). */
  maxBytes?: number;
  /** Receive the file chunk by chunk instead of as one buffer (the result is then empty). */
  onChunk?: (chunk: Buffer) => void;
  /** Give up when no data arrives for this long (default 30 s; time the host itself holds the channel does not count). */
  idleTimeoutMs?: number;
  /** Stops the read: later data from the guest is dropped. */
  signal?: AbortSignal;
};

/** A running command in the guest. */
export type ExecHandle = {
  id: number;
  pid: number;
  exited: Promise<ExecExit>;
  writeStdin(data: Buffer | string): void;
  closeStdin(): void;
  signal(sig: number): Promise<void>;
};

export type FileEntry = { name: string; type: 'file' | 'dir' | 'symlink' | 'other'; size: number; mode: number; mtimeMs: number };

type Pending = {
  onFrame: (frame: Frame) => void;
  onClose: (err: CladeError) => void;
};

/**
 * The host end of one sandbox's agent channel: a unix socket that QEMU bridges to
 * the guest's virtio-serial port. Requests are multiplexed by id; everything the
 * guest sends is decoded with the protocol's size limits.
 */
export class AgentClient {
  private socket?: Socket;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private closedError?: CladeError;
  private token: Buffer;
  /** The latest protocol violations seen from the guest (at most 32), for diagnostics and tests. */
  readonly violations: string[] = [];
  /** All protocol violations seen, including those no longer in `violations`. */
  violationCount = 0;
  /** Consumers that asked to stop reading from the guest until they catch up. */
  private holds = 0;
  private drainWait?: Promise<void>;
  private readonly decoder = new FrameDecoder({
    frame: (f) => this.dispatch(f),
    violation: (kind, id, detail) => {
      this.noteViolation(`${kind}: ${detail}`);
      const p = this.pending.get(id);
      if (p && id !== 0) p.onClose(new CladeError('protocol_error', `the guest broke the agent protocol: ${detail}`));
    },
  });

  private readonly deadlines: AgentDeadlines;

  constructor(token: Buffer, deadlines: Partial<AgentDeadlines> = {}) {
    if (token.length !== TOKEN_SIZE) throw new CladeError('internal', 'agent token must be 32 bytes');
    this.token = Buffer.from(token);
    this.deadlines = { ...DEFAULT_DEADLINES, ...deadlines };
  }

  /** Connects to the socket QEMU serves, retrying while QEMU is still starting. */
  async connect(path: string, deadline: number, isAlive: () => boolean = () => true): Promise<void> {
    for (;;) {
      try {
        this.attach(await openSocket(path));
        return;
      } catch (err) {
        if (!isAlive()) throw new CladeError('boot_failed', 'the VM process exited before its agent channel opened');
        if (Date.now() > deadline) throw new CladeError('timeout', `could not connect to the agent socket ${path}: ${errorMessage(err)}`);
        await sleep(5);
      }
    }
  }

  /**
   * Moves the channel to another VM process of the same guest (after a fork the
   * parent continues in a new process). Requests in flight stay pending: the
   * guest's replies now come through the new socket.
   */
  async rebind(path: string, deadline: number): Promise<void> {
    const old = this.socket;
    this.socket = undefined;
    old?.removeAllListeners('close');
    old?.destroy();
    await this.connect(path, deadline);
  }

  /** Where the next request id starts; a forked guest's agent may still use lower ones. */
  get idCursor(): number {
    return this.nextId;
  }

  set idCursor(next: number) {
    this.nextId = Math.max(1, next);
  }

  /**
   * Moves the id cursor past the newest id the agent has seen, so a client
   * that takes over a channel (a restarted daemon) never reuses the id of a
   * command its predecessor left running. Ids compare in serial-number order.
   */
  private continueAfter(lastSeen: number | undefined): void {
    if (lastSeen === undefined) return;
    const next = lastSeen + 1 >= 0xffff_fff0 ? 1 : lastSeen + 1;
    if (((next - this.nextId) | 0) > 0) this.nextId = next;
  }

  /** Takes over a command started by an ancestor sandbox (the forked interpreter). */
  adopt(id: number, handlers: ExecHandlers & { onExit?: (e: ExecExit) => void; onClose?: (e: CladeError) => void }): void {
    this.pending.set(id, {
      onFrame: (f) => {
        if (f.type === MessageType.STDOUT) handlers.onStdout?.(f.payload);
        else if (f.type === MessageType.STDERR) handlers.onStderr?.(f.payload);
        else if (f.type === MessageType.EXIT) {
          this.pending.delete(id);
          const r = new FieldReader(f.payload);
          handlers.onExit?.({ exitCode: r.i64(Tag.EXIT_CODE) ?? -1, timedOut: r.u64(Tag.TIMED_OUT) === 1 });
        }
      },
      onClose: (err) => {
        this.pending.delete(id);
        handlers.onClose?.(err);
      },
    });
  }

  /**
   * Hands a frame to the request it answers. A malformed body fails that
   * request only: nothing the guest sends may throw out of the socket handler.
   */
  private dispatch(f: Frame): void {
    const p = this.pending.get(f.id);
    if (!p) return;
    try {
      p.onFrame(f);
    } catch (err) {
      this.noteViolation(`malformed ${f.type.toString(16)} body for request ${f.id}: ${errorMessage(err)}`);
      p.onClose(new CladeError('protocol_error', `the guest sent a malformed reply: ${errorMessage(err)}`));
    }
  }

  private noteViolation(what: string): void {
    this.violationCount++;
    this.violations.push(what.slice(0, 200));
    if (this.violations.length > MAX_VIOLATIONS_KEPT) this.violations.shift();
  }

  /**
   * Stops reading from the guest until the returned function is called (by
   * every holder): a slow consumer of output pauses the channel instead of
   * letting the host buffer without bound. The guest then blocks on its side.
   */
  holdReading(): () => void {
    if (this.holds++ === 0) this.socket?.pause();
    let released = false;
    return () => {
      if (released) return;
      released = true;
      if (--this.holds === 0) this.socket?.resume();
    };
  }

  /** Resolves once everything written to the channel has left this process; a guest that takes nothing for `timeoutMs` is an error. */
  async drained(timeoutMs = 10_000): Promise<void> {
    const s = this.socket;
    if (!s || s.writableLength === 0) return;
    await this.waitDrain(s, timeoutMs);
  }

  private waitDrain(s: Socket, timeoutMs: number): Promise<void> {
    this.drainWait ??= new Promise<void>((resolve) => {
      const done = () => {
        this.drainWait = undefined;
        s.off('drain', done);
        s.off('close', done);
        resolve();
      };
      s.once('drain', done);
      s.once('close', done);
    });
    const wait = this.drainWait;
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new CladeError('timeout', `the guest agent took no input for ${Math.round(timeoutMs / 1000)} s; it may be stuck (kill the sandbox if this persists)`)), timeoutMs);
      void wait.then(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  /** Signals a command's process group by its exec id. */
  async signalExec(id: number, sig: number): Promise<void> {
    await this.request(MessageType.SIGNAL, new FieldWriter().u64(Tag.TARGET, id).u64(Tag.SIGNAL, sig));
  }

  /** Sends data to a command's stdin by its exec id. */
  async writeStdinTo(id: number, data: Buffer): Promise<void> {
    for (let off = 0; off < data.length; off += WRITE_CHUNK) await this.send(MessageType.STDIN, id, data.subarray(off, off + WRITE_CHUNK));
  }

  private attach(socket: Socket): void {
    this.socket = socket;
    if (this.holds > 0) socket.pause();
    socket.on('data', (chunk: Buffer) => {
      if (this.socket === socket) this.decoder.push(chunk);
    });
    socket.on('error', () => undefined);
    socket.on('close', () => {
      if (this.socket === socket) this.failAll(new CladeError('killed', 'the agent channel closed (the sandbox stopped)'));
    });
  }

  /** Sends HELLO until the agent answers: the sandbox is ready when this resolves. */
  async waitReady(deadline: number, isAlive: () => boolean = () => true): Promise<FieldReader> {
    for (;;) {
      if (!isAlive()) throw new CladeError('boot_failed', 'the VM exited before its agent answered');
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new CladeError('timeout', 'the guest agent did not answer before the boot timeout');
      try {
        const hello = await this.request(MessageType.HELLO, undefined, Math.min(500, remaining));
        this.continueAfter(hello.u64(Tag.LAST_ID));
        return hello;
      } catch (err) {
        if (err instanceof CladeError && err.code === 'timeout') continue;
        throw err;
      }
    }
  }

  setToken(token: Buffer): void {
    this.token = Buffer.from(token);
  }

  /** Sends one request and resolves with the fields of its OK reply. */
  request(type: number, body?: FieldWriter, timeoutMs = this.deadlines.requestMs): Promise<FieldReader> {
    const id = this.allocId();
    const reply = this.awaitReply(id, timeoutMs);
    this.send(type, id, body?.toBuffer()).catch((err) => this.pending.get(id)?.onClose(asCladeError(err)));
    return reply;
  }

  /** Waits for the OK or ERROR that answers request `id`. */
  private awaitReply(id: number, timeoutMs: number): Promise<FieldReader> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new CladeError('timeout', `the agent did not answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, {
        onFrame: (f) => {
          if (f.type !== MessageType.OK && f.type !== MessageType.ERROR) return;
          clearTimeout(timer);
          this.pending.delete(id);
          settleReply(f, resolve, reject);
        },
        onClose: (err) => {
          clearTimeout(timer);
          this.pending.delete(id);
          reject(err);
        },
      });
    });
  }

  async exec(req: ExecRequest, handlers: ExecHandlers = {}, startTimeoutMs = this.deadlines.requestMs): Promise<ExecHandle> {
    const body = new FieldWriter();
    if (req.argv) for (const a of req.argv) body.str(Tag.ARGV, a);
    else if (req.shell !== undefined) body.str(Tag.SHELL, req.shell);
    else throw new CladeError('bad_request', 'exec needs a command');
    for (const [k, v] of Object.entries(req.env ?? {})) {
      if (k.length === 0 || k.includes('=')) throw new CladeError('bad_request', `invalid environment variable name ${JSON.stringify(k)}`);
      body.str(Tag.ENV, `${k}=${v}`);
    }
    if (req.cwd !== undefined) body.str(Tag.CWD, req.cwd);
    if (req.timeoutMs) body.u64(Tag.TIMEOUT_MS, Math.ceil(req.timeoutMs));
    body.u64(Tag.STDIN_OPEN, req.stdin ? 1 : 0);

    const id = this.allocId();
    let resolveExit!: (e: ExecExit) => void;
    let rejectExit!: (e: CladeError) => void;
    const exited = new Promise<ExecExit>((res, rej) => ((resolveExit = res), (rejectExit = rej)));
    exited.catch(() => undefined);
    let exitWatch: NodeJS.Timeout | undefined;
    const started = new Promise<number>((resolveStart, rejectStart) => {
      let pid: number | undefined;
      const startTimer = setTimeout(() => {
        this.pending.delete(id);
        const err = new CladeError('timeout', `the guest agent did not start the command within ${startTimeoutMs} ms`);
        rejectStart(err);
        rejectExit(err);
      }, startTimeoutMs);
      const end = () => {
        clearTimeout(startTimer);
        clearTimeout(exitWatch);
        this.pending.delete(id);
      };
      this.pending.set(id, {
        onFrame: (f) => {
          switch (f.type) {
            case MessageType.OK:
              clearTimeout(startTimer);
              pid = new FieldReader(f.payload).u64(Tag.PID) ?? 0;
              resolveStart(pid);
              if (req.timeoutMs) exitWatch = this.watchExit(id, req.timeoutMs, rejectExit, end);
              break;
            case MessageType.ERROR:
              end();
              rejectStart(agentError(f.payload));
              break;
            case MessageType.STDOUT:
              handlers.onStdout?.(f.payload);
              break;
            case MessageType.STDERR:
              handlers.onStderr?.(f.payload);
              break;
            case MessageType.EXIT: {
              const r = new FieldReader(f.payload);
              const exit = { exitCode: r.i64(Tag.EXIT_CODE) ?? -1, timedOut: r.u64(Tag.TIMED_OUT) === 1, signal: r.u64(Tag.SIGNAL) };
              end();
              resolveExit({ exitCode: exit.exitCode, timedOut: exit.timedOut, ...(exit.signal ? { signal: exit.signal } : {}) });
              break;
            }
          }
        },
        onClose: (err) => {
          end();
          if (pid === undefined) rejectStart(err);
          rejectExit(err);
        },
      });
    });
    started.catch(() => undefined); // a failed send below rejects it too; the send's error is the one thrown
    try {
      await this.send(MessageType.EXEC, id, body.toBuffer());
    } catch (err) {
      this.pending.get(id)?.onClose(asCladeError(err));
      throw err;
    }
    const pid = await started;
    return {
      id,
      pid,
      exited,
      writeStdin: (data) => {
        const buf = typeof data === 'string' ? Buffer.from(data) : data;
        for (let off = 0; off < buf.length; off += WRITE_CHUNK) {
          void this.send(MessageType.STDIN, id, buf.subarray(off, off + WRITE_CHUNK)).catch(() => undefined);
        }
      },
      closeStdin: () => void this.send(MessageType.STDIN, id, Buffer.alloc(0)).catch(() => undefined),
      signal: async (sig) => {
        await this.request(MessageType.SIGNAL, new FieldWriter().u64(Tag.TARGET, id).u64(Tag.SIGNAL, sig));
      },
    };
  }

  /**
   * The guest kills a command at its timeout; if no EXIT comes by the timeout
   * plus a grace period, the host kills the process group itself, and after a
   * second grace period gives up waiting with a timeout error.
   */
  private watchExit(id: number, timeoutMs: number, rejectExit: (e: CladeError) => void, end: () => void): NodeJS.Timeout {
    return setTimeout(() => {
      void this.signalExec(id, 9).catch(() => undefined);
      const last = setTimeout(() => {
        if (!this.pending.has(id)) return;
        end();
        rejectExit(new CladeError('timeout', `the command ran past its ${timeoutMs} ms timeout and the guest did not report its end; it was sent SIGKILL`));
      }, this.deadlines.exitGraceMs);
      last.unref();
    }, timeoutMs + this.deadlines.exitGraceMs).unref();
  }

  async readFile(path: string, opts: ReadFileOptions = {}): Promise<Buffer> {
    const chunks: Buffer[] = [];
    let bytes = 0;
    const idleMs = opts.idleTimeoutMs ?? this.deadlines.readIdleMs;
    const id = this.allocId();
    const body = new FieldWriter().str(Tag.PATH, path);
    if (opts.maxBytes !== undefined) body.u64(Tag.LIMIT, opts.maxBytes);
    const done = new Promise<void>((resolve, reject) => {
      let idle: NodeJS.Timeout;
      const fail = (err: CladeError) => {
        clearTimeout(idle);
        this.pending.delete(id); // frames still on their way are dropped
        reject(err);
      };
      const arm = () => {
        clearTimeout(idle);
        idle = setTimeout(() => (this.holds > 0 ? arm() : fail(new CladeError('timeout', `reading ${path}: no data from the guest for ${Math.round(idleMs / 1000)} s`))), idleMs);
      };
      arm();
      opts.signal?.addEventListener('abort', () => fail(new CladeError('killed', `reading ${path} was cancelled`)), { once: true });
      this.pending.set(id, {
        onFrame: (f) => {
          if (f.type === MessageType.FILE_DATA) {
            bytes += f.payload.length;
            // An agent that ignores LIMIT (or a file that grows) is cut off here.
            if (opts.maxBytes !== undefined && bytes > opts.maxBytes) return fail(tooLarge(path, opts.maxBytes));
            arm();
            if (opts.onChunk) opts.onChunk(f.payload);
            else chunks.push(f.payload);
            return;
          }
          clearTimeout(idle);
          this.pending.delete(id);
          settleReply(f, () => resolve(), (err) => reject(err.code === 'too_large' && opts.maxBytes !== undefined ? tooLarge(path, opts.maxBytes) : err));
        },
        onClose: (err) => fail(err),
      });
    });
    await this.send(MessageType.READ_FILE, id, body.toBuffer());
    await done;
    return Buffer.concat(chunks);
  }

  /**
   * Writes a file from a buffer or a stream of chunks; it appears under its
   * name only when complete. If the source fails, the upload is discarded.
   */
  async writeFile(path: string, data: Buffer | AsyncIterable<Uint8Array>, mode?: number): Promise<number> {
    const open = new FieldWriter().str(Tag.PATH, path);
    if (mode !== undefined) open.u64(Tag.MODE, mode);
    const id = this.allocId();
    const opened = this.awaitReply(id, this.deadlines.requestMs);
    opened.catch(() => undefined); // awaited below, unless the send fails first
    await this.send(MessageType.WRITE_OPEN, id, open.toBuffer());
    await opened;
    let sent = 0;
    try {
      for await (const piece of Buffer.isBuffer(data) ? [data] : data) {
        const buf = Buffer.isBuffer(piece) ? piece : Buffer.from(piece.buffer, piece.byteOffset, piece.byteLength);
        for (let off = 0; off < buf.length; off += WRITE_CHUNK) await this.send(MessageType.WRITE_DATA, id, buf.subarray(off, off + WRITE_CHUNK));
        sent += buf.length;
      }
    } catch (err) {
      const discarded = this.awaitReply(id, this.deadlines.requestMs).catch(() => undefined);
      await this.send(MessageType.WRITE_CLOSE, id, new FieldWriter().u64(Tag.DISCARD, 1).toBuffer()).catch(() => undefined);
      await discarded;
      throw err;
    }
    const closed = this.awaitReply(id, 120_000);
    closed.catch(() => undefined); // awaited below, unless the send fails first
    await this.send(MessageType.WRITE_CLOSE, id);
    return (await closed).u64(Tag.SIZE) ?? sent;
  }

  async list(path: string): Promise<{ entries: FileEntry[]; truncated: boolean }> {
    const r = await this.request(MessageType.LIST, new FieldWriter().str(Tag.PATH, path));
    const entries = r.all(Tag.ENTRY).map((e) => toEntry(new FieldReader(e)));
    return { entries, truncated: r.u64(Tag.TRUNCATED) === 1 };
  }

  async stat(path: string): Promise<FileEntry> {
    return toEntry(await this.request(MessageType.STAT, new FieldWriter().str(Tag.PATH, path)));
  }

  async mkdir(path: string, mode?: number): Promise<boolean> {
    const body = new FieldWriter().str(Tag.PATH, path);
    if (mode !== undefined) body.u64(Tag.MODE, mode);
    return (await this.request(MessageType.MKDIR, body)).u64(Tag.CREATED) === 1;
  }

  async remove(path: string, recursive = false): Promise<void> {
    await this.request(MessageType.REMOVE, new FieldWriter().str(Tag.PATH, path).u64(Tag.RECURSIVE, recursive ? 1 : 0));
  }

  /** Sends raw bytes down the channel; tests use it to check the agent's defences. */
  async sendRaw(bytes: Buffer): Promise<void> {
    await this.write(bytes);
  }

  close(): void {
    this.failAll(new CladeError('killed', 'the sandbox was killed'));
    this.socket?.destroy();
  }

  private allocId(): number {
    const id = this.nextId;
    this.nextId = this.nextId >= 0xffff_fff0 ? 1 : this.nextId + 1;
    return id;
  }

  private async send(type: number, id: number, body?: Buffer): Promise<void> {
    await this.write(encodeHostFrame(type, id, this.token, body));
  }

  private write(bytes: Buffer): Promise<void> {
    if (this.closedError) return Promise.reject(this.closedError);
    const socket = this.socket;
    if (!socket) return Promise.reject(new CladeError('unavailable', 'the agent channel is not connected'));
    return new Promise((resolve, reject) => {
      const ok = socket.write(bytes, (err) => (err ? reject(new CladeError('killed', `agent channel write failed: ${err.message}`)) : undefined));
      if (ok) resolve();
      else this.waitDrain(socket, this.deadlines.writeStallMs).then(resolve, reject);
    });
  }

  private failAll(err: CladeError): void {
    this.closedError ??= err;
    for (const p of [...this.pending.values()]) p.onClose(err);
    this.pending.clear();
  }
}

function settleReply(f: Frame, resolve: (r: FieldReader) => void, reject: (e: CladeError) => void): void {
  try {
    if (f.type === MessageType.OK) resolve(new FieldReader(f.payload));
    else if (f.type === MessageType.ERROR) reject(agentError(f.payload));
    else reject(new CladeError('protocol_error', `agent sent message type ${f.type} where a reply was expected`));
  } catch (err) {
    reject(asCladeError(err));
  }
}

/** Turns an ERROR frame into a CladeError that keeps the agent's code. */
export function agentError(payload: Buffer): CladeError {
  let r: FieldReader;
  try {
    r = new FieldReader(payload);
  } catch {
    return new CladeError('protocol_error', 'agent sent a malformed error reply');
  }
  const agentCode = (r.str(Tag.CODE) ?? 'io').slice(0, 64);
  const message = (r.str(Tag.MESSAGE) ?? 'the agent reported an error').slice(0, 4096);
  const code = agentCode === 'not_found' ? 'not_found' : agentCode === 'auth' ? 'auth' : agentCode === 'too_large' ? 'too_large' : 'agent_error';
  return new CladeError(code, message, { agentCode });
}

const TYPE_NAMES = { 1: 'file', 2: 'dir', 3: 'symlink' } as const;

function toEntry(r: FieldReader): FileEntry {
  const t = r.u64(Tag.TYPE) ?? 4;
  return {
    name: r.str(Tag.NAME) ?? '',
    type: TYPE_NAMES[t as 1 | 2 | 3] ?? 'other',
    size: r.u64(Tag.SIZE) ?? 0,
    mode: r.u64(Tag.MODE) ?? 0,
    mtimeMs: r.u64(Tag.MTIME_MS) ?? 0,
  };
}

function tooLarge(path: string, maxBytes: number): CladeError {
  return new CladeError('too_large', `${path} is larger than the ${maxBytes}-byte limit of this read; read it as a stream without a limit instead (files.read(path, { format: 'stream' }), or GET /v1/sandboxes/<id>/files without maxBytes)`);
}

function asCladeError(err: unknown): CladeError {
  return err instanceof CladeError ? err : new CladeError('internal', errorMessage(err), { cause: err });
}

function openSocket(path: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect(path);
    s.once('connect', () => {
      s.removeAllListeners('error');
      resolve(s);
    });
    s.once('error', reject);
  });
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

