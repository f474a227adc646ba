import { create, type MessageInitShape } from '@bufbuild/protobuf';
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from '@connectrpc/connect';
import { runCommand, type CommandHandle, type CommandResult } from '../core/commands.js';
import type { LiveSandbox } from '../core/sandbox.js';
import { CladeError } from '../util/errors.js';
import { checkUser, connectErrors, pacedStream, targetOf } from './envd-context.js';
import { type ProcessConfig, ProcessConfigSchema, type ProcessEventSchema, type ProcessSelector, Process, Signal } from './gen/process_pb.js';
import { PacedQueue } from './paced.js';
import type { E2bSandbox } from './state.js';

/** Output bytes merged into one data event at most. */
const MAX_MERGED_BYTES = 64 * 1024;
/** E2B processes per sandbox at once (the guest agent runs at most 64 commands). */
const MAX_PROCESSES = 48;

type EventInit = MessageInitShape<typeof ProcessEventSchema>;
type OutputEvent = { stream: 'stdout' | 'stderr'; data: Buffer } | { end: EventInit };

/**
 * A process started through E2B's Start call. It runs until it ends or is
 * signalled, whoever is attached: the stream that started it, streams that
 * connected later (Connect), or none (a client that went away). Each attached
 * stream has its own paced queue; output that arrives while no stream is
 * attached is not kept, as with E2B.
 */
export class E2bProcess {
  readonly subscribers = new Set<PacedQueue<OutputEvent>>();
  handle?: CommandHandle;
  ended = false;

  constructor(
    private readonly sandbox: LiveSandbox,
    readonly config: ProcessConfig,
    readonly tag: string | undefined,
  ) {}

  get pid(): number {
    return this.handle?.pid ?? 0;
  }

  subscribe(): PacedQueue<OutputEvent> {
    const queue = new PacedQueue<OutputEvent>({
      hold: () => this.sandbox.agent.holdReading(),
      merge: (last, next) =>
        'stream' in last && 'stream' in next && last.stream === next.stream && last.data.length < MAX_MERGED_BYTES ? { stream: last.stream, data: Buffer.concat([last.data, next.data]) } : undefined,
    });
    this.subscribers.add(queue);
    return queue;
  }

  unsubscribe(queue: PacedQueue<OutputEvent>): void {
    queue.close();
    this.subscribers.delete(queue);
  }

  output(stream: 'stdout' | 'stderr', data: Buffer): void {
    for (const q of this.subscribers) q.push({ stream, data: Buffer.from(data) });
  }

  finish(end: EventInit): void {
    this.ended = true;
    for (const q of this.subscribers) {
      q.push({ end });
      q.end();
    }
    this.subscribers.clear();
  }
}

/** The E2B processes of one sandbox, by guest pid. */
export class ProcessTable {
  private readonly byPid = new Map<number, E2bProcess>();

  async start(sandbox: LiveSandbox, config: ProcessConfig, tag: string | undefined, keepStdin: boolean): Promise<{ proc: E2bProcess; queue: PacedQueue<OutputEvent> }> {
    if (this.byPid.size >= MAX_PROCESSES) throw new CladeError('unavailable', `this sandbox already runs ${this.byPid.size} processes started through E2B; kill some first`);
    if (tag !== undefined && [...this.byPid.values()].some((p) => p.tag === tag)) throw new CladeError('conflict', `a process with tag ${JSON.stringify(tag)} is already running`);
    const proc = new E2bProcess(sandbox, config, tag);
    // Subscribed before the command starts, so its first output reaches the stream that started it.
    const queue = proc.subscribe();
    const handle = (await runCommand(sandbox, [config.cmd, ...config.args], {
      background: true,
      captureOutput: false,
      timeoutMs: 0, // E2B processes run until they end or are killed; the sandbox's lifetime bounds them
      envs: config.envs,
      ...(config.cwd !== undefined && config.cwd !== '' ? { cwd: config.cwd } : {}),
      ...(keepStdin ? { stdin: true } : {}),
      onStdoutBytes: (d) => proc.output('stdout', d),
      onStderrBytes: (d) => proc.output('stderr', d),
    })) as CommandHandle;
    proc.handle = handle;
    this.byPid.set(handle.pid, proc);
    void handle.wait().then(
      (r) => proc.finish({ event: { case: 'end', value: endOf(r) } }),
      (err: unknown) => proc.finish({ event: { case: 'end', value: { exitCode: -1, exited: false, status: 'unknown', error: err instanceof Error ? err.message : String(err) } } }),
    ).finally(() => {
      if (this.byPid.get(handle.pid) === proc) this.byPid.delete(handle.pid);
    });
    return { proc, queue };
  }

  find(selector: ProcessSelector | undefined): E2bProcess {
    const sel = selector?.selector;
    let proc: E2bProcess | undefined;
    if (sel?.case === 'pid') proc = this.byPid.get(sel.value);
    else if (sel?.case === 'tag') proc = [...this.byPid.values()].find((p) => p.tag === sel.value);
    else throw new ConnectError('a process selector (pid or tag) is required', Code.InvalidArgument);
    if (!proc || proc.ended) throw new ConnectError(`process ${sel.case} ${JSON.stringify(sel.value)} not found (it ended, or was not started through this API)`, Code.NotFound);
    return proc;
  }

  list(): E2bProcess[] {
    return [...this.byPid.values()].filter((p) => !p.ended && p.handle);
  }

  /** The sandbox is gone: streams end (their processes went with the VM). */
  dropAll(): void {
    for (const p of this.byPid.values()) for (const q of p.subscribers) q.fail(new CladeError('killed', 'the sandbox was killed'));
    this.byPid.clear();
  }
}

/** How E2B reports the end of a process: `exit status N`, or `signal: killed` with exit code -1. */
export function endOf(r: CommandResult): { exitCode: number; exited: boolean; status: string; error?: string } {
  if (r.signal) {
    const status = `signal: ${SIGNAL_NAMES[r.signal] ?? `signal ${r.signal}`}`;
    return { exitCode: -1, exited: false, status, error: status };
  }
  const status = `exit status ${r.exitCode}`;
  return { exitCode: r.exitCode, exited: true, status, ...(r.exitCode !== 0 ? { error: status } : {}) };
}

const SIGNAL_NAMES: Record<number, string> = { 1: 'hangup', 2: 'interrupt', 3: 'quit', 6: 'aborted', 9: 'killed', 13: 'broken pipe', 14: 'alarm clock', 15: 'terminated' };

function tableOf(e2b: E2bSandbox): ProcessTable {
  if (e2b.processes instanceof ProcessTable) return e2b.processes;
  const table = new ProcessTable();
  e2b.processes = table;
  return table;
}

/**
 * The events of one attached stream: `start` first, then output as the
 * queue gives it (keep-alives while quiet), then `end`. Leaving early (the
 * client went away, its deadline passed) detaches the stream; the process
 * runs on.
 */
async function* follow(proc: E2bProcess, queue: PacedQueue<OutputEvent>, ctx: HandlerContext): AsyncGenerator<{ event: EventInit }> {
  try {
    yield { event: { event: { case: 'start', value: { pid: proc.pid } } } };
    for await (const next of pacedStream(queue, ctx)) {
      if (next.idle) {
        yield { event: { event: { case: 'keepalive', value: {} } } };
        continue;
      }
      const item = next.value;
      if ('end' in item) {
        yield { event: item.end };
        return;
      }
      yield { event: { event: { case: 'data', value: { output: { case: item.stream, value: item.data } } } } };
    }
  } finally {
    proc.unsubscribe(queue);
  }
}

/** envd's process service on clade's commands. */
export const processService: Partial<ServiceImpl<typeof Process>> = {
  async *start(req, ctx) {
    const { live, e2b } = targetOf(ctx);
    checkUser(ctx);
    if (req.pty) throw new ConnectError('PTY sessions are not supported by clade (its guest agent has no terminals); run commands with commands.run instead', Code.Unimplemented);
    if (!req.process?.cmd) throw new ConnectError('process.cmd is required', Code.InvalidArgument);
    const config = create(ProcessConfigSchema, req.process);
    const { proc, queue } = await connectErrors(() => tableOf(e2b).start(live, config, req.tag, req.stdin === true));
    yield* follow(proc, queue, ctx);
  },

  async *connect(req, ctx) {
    const { e2b } = targetOf(ctx);
    const proc = tableOf(e2b).find(req.process);
    yield* follow(proc, proc.subscribe(), ctx);
  },

  async list(_req, ctx) {
    const { e2b } = targetOf(ctx);
    return { processes: tableOf(e2b).list().map((p) => ({ pid: p.pid, config: p.config, ...(p.tag !== undefined ? { tag: p.tag } : {}) })) };
  },

  async sendInput(req, ctx) {
    const { e2b } = targetOf(ctx);
    const proc = tableOf(e2b).find(req.process);
    const input = req.input?.input;
    if (input?.case === 'pty') throw new ConnectError('PTY input is not supported by clade (no terminals)', Code.Unimplemented);
    if (input?.case === 'stdin') await connectErrors(() => proc.handle!.sendStdin(input.value));
    return {};
  },

  async streamInput(reqs, ctx) {
    const { e2b } = targetOf(ctx);
    let proc: E2bProcess | undefined;
    for await (const req of reqs) {
      const ev = req.event;
      if (ev.case === 'start') proc = tableOf(e2b).find(ev.value.process);
      else if (ev.case === 'data') {
        if (!proc) throw new ConnectError('the first message of StreamInput must be a start event naming the process', Code.InvalidArgument);
        const input = ev.value.input?.input;
        if (input?.case === 'pty') throw new ConnectError('PTY input is not supported by clade (no terminals)', Code.Unimplemented);
        if (input?.case === 'stdin') await connectErrors(() => proc!.handle!.sendStdin(input.value));
      }
    }
    return {};
  },

  async sendSignal(req, ctx) {
    const { e2b } = targetOf(ctx);
    const proc = tableOf(e2b).find(req.process);
    const sig = req.signal === Signal.SIGTERM ? 15 : req.signal === Signal.SIGKILL ? 9 : undefined;
    if (sig === undefined) throw new ConnectError('signal must be SIGNAL_SIGTERM or SIGNAL_SIGKILL', Code.InvalidArgument);
    const delivered = await connectErrors(() => proc.handle!.kill(sig));
    if (!delivered) throw new ConnectError(`process ${proc.pid} had already ended`, Code.NotFound);
    return {};
  },

  async closeStdin(req, ctx) {
    const { e2b } = targetOf(ctx);
    const proc = tableOf(e2b).find(req.process);
    await connectErrors(() => proc.handle!.closeStdin());
    return {};
  },

  async update(req, ctx) {
    const { e2b } = targetOf(ctx);
    tableOf(e2b).find(req.process);
    if (req.pty) throw new ConnectError('PTY resize is not supported by clade (no terminals)', Code.Unimplemented);
    return {};
  },
};
