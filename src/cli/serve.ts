import { Command, Option } from 'commander';
import { CladeError } from '../util/errors.js';
import { isSameProcess, processStartTicks } from '../util/process.js';
import { daemonPaths, startDaemon, type ServeOptions } from '../api/server.js';
import { DEFAULT_E2B_LISTEN, readApiKeyFile, startE2bListener } from '../e2b/server.js';
import { mcpRoutes } from '../mcp/http.js';

const DEFAULT_SANDBOX_LIFETIME_MS = 30 * 60_000;

type ServeFlags = {
  socket: string;
  listen?: string;
  tokenFile: string;
  stateDir: string;
  maxSandboxes: number;
  maxConcurrentForks: number;
  sandboxTimeout: number;
  stopOnExit?: boolean;
  logLevel: string;
  maxConnections: number;
  e2b?: boolean;
  e2bListen?: string;
  e2bApiKey?: string;
  e2bApiKeyFile?: string;
  ownerPid?: number;
};

export function serveCommand(): Command {
  return new Command('serve')
    .description('run the clade daemon: the HTTP API (docs/api.md) on a unix socket, and optionally on TCP with a bearer token')
    .addOption(new Option('--socket <path>', 'unix socket to listen on (mode 0600; no token needed)').default(daemonPaths.socket(), '$CLADE_HOME/daemon.sock'))
    .option('--listen <host:port>', 'also listen on TCP; every request must then carry the bearer token')
    .addOption(new Option('--token-file <path>', 'bearer token for TCP, created (mode 0600) if missing').default(daemonPaths.token(), '$CLADE_HOME/daemon.token'))
    .addOption(new Option('--state-dir <dir>', 'where sandbox records are kept so a restarted daemon re-adopts running sandboxes').default(daemonPaths.state(), '$CLADE_HOME/daemon'))
    .option('--max-sandboxes <n>', 'most sandboxes this daemon runs at once; more gets 503', positiveInt, 200)
    .option('--max-concurrent-forks <n>', 'forks, snapshots and snapshot starts at once; more gets 503', positiveInt, 4)
    .option('--sandbox-timeout <ms>', 'lifetime of a sandbox whose request sets no timeoutMs (0 = until deleted)', nonNegativeInt, DEFAULT_SANDBOX_LIFETIME_MS)
    .option('--max-connections <n>', 'open connections per listener', positiveInt, 512)
    .option('--owner-pid <pid>', 'belong to process PID: when it ends, kill every sandbox and exit (for a daemon a test run or a program starts for itself)', positiveInt)
    .option('--stop-on-exit', 'kill every sandbox on SIGTERM/SIGINT (default: leave them running for the next daemon to adopt)')
    .option('--e2b', `also serve the E2B API (control plane, envd, code interpreter) for unmodified E2B clients, on ${DEFAULT_E2B_LISTEN.host}:${DEFAULT_E2B_LISTEN.port} unless --e2b-listen says otherwise (docs/e2b.md)`)
    .option('--e2b-listen <host:port>', 'where the E2B listener listens (implies --e2b)')
    .option('--e2b-api-key <key>', 'require this key (E2B_API_KEY) on E2B control-plane requests; default: any key')
    .option('--e2b-api-key-file <path>', 'read the E2B API key from this file instead')
    .option('--log-level <level>', 'pino log level (JSON logs on stdout)', 'info');
}

/** Runs until SIGTERM or SIGINT, then shuts down gracefully. */
export async function runServe(flags: ServeFlags): Promise<void> {
  const ownerTicks = flags.ownerPid !== undefined ? ownerStartTicks(flags.ownerPid) : undefined;
  const daemon = await startDaemon({
    socketPath: flags.socket,
    ...(flags.listen ? { tcp: parseListen(flags.listen) } : {}),
    tokenFile: flags.tokenFile,
    stateDir: flags.stateDir,
    maxSandboxes: flags.maxSandboxes,
    maxConcurrentForks: flags.maxConcurrentForks,
    defaultTimeoutMs: flags.sandboxTimeout,
    stopOnExit: Boolean(flags.stopOnExit),
    logLevel: flags.logLevel,
    maxConnections: flags.maxConnections,
    routes: [mcpRoutes],
    ...e2bListener(flags),
  });
  await new Promise<void>((resolve) => {
    for (const sig of ['SIGTERM', 'SIGINT'] as const) process.once(sig, () => void daemon.close().then(resolve, resolve));
    if (flags.ownerPid !== undefined) watchOwner(flags.ownerPid, ownerTicks!, () => void daemon.close({ stopSandboxes: true }).then(resolve, resolve));
  });
  // Sandboxes left running for the next daemon still hold agent and QMP connections open.
  process.exit(0);
}

function e2bListener(flags: ServeFlags): Pick<ServeOptions, 'listeners'> {
  if (!flags.e2b && !flags.e2bListen) return {};
  if (flags.e2bApiKey && flags.e2bApiKeyFile) throw new CladeError('bad_request', 'give --e2b-api-key or --e2b-api-key-file, not both');
  const apiKey = flags.e2bApiKeyFile ? readApiKeyFile(flags.e2bApiKeyFile) : flags.e2bApiKey;
  const at = flags.e2bListen ? parseListen(flags.e2bListen) : DEFAULT_E2B_LISTEN;
  return { listeners: [{ name: 'e2b', start: (ctx, log) => startE2bListener(ctx, log, { ...at, ...(apiKey ? { apiKey } : {}), maxConnections: flags.maxConnections }) }] };
}

function ownerStartTicks(pid: number): string {
  const ticks = processStartTicks(pid);
  if (ticks === undefined) throw new CladeError('bad_request', `--owner-pid ${pid}: no such process`);
  return ticks;
}

/** Calls `gone` once process `pid` has ended (or its pid was reused by another process). */
function watchOwner(pid: number, ticks: string, gone: () => void): void {
  const timer = setInterval(() => {
    if (isSameProcess(pid, ticks)) return;
    clearInterval(timer);
    gone();
  }, 1000);
  timer.unref();
}

function parseListen(v: string): { host: string; port: number } {
  const m = /^(.+):(\d{1,5})$/.exec(v);
  const port = Number(m?.[2]);
  if (!m || port > 65535) throw new CladeError('bad_request', `--listen wants host:port (e.g. 127.0.0.1:7070), got ${JSON.stringify(v)}`);
  return { host: m[1]!.replace(/^\[(.*)\]$/, '$1'), port };
}

function positiveInt(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new CladeError('bad_request', `expected a positive integer, got ${JSON.stringify(v)}`);
  return n;
}

function nonNegativeInt(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new CladeError('bad_request', `expected a non-negative integer, got ${JSON.stringify(v)}`);
  return n;
}
