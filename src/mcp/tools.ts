import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { z } from 'zod';
import { CladeError } from '../util/errors.js';
import type { McpBackend } from './backend.js';

/** Characters of one output an assistant gets at most; longer output keeps its start and end, with a note. */
export const MAX_TOOL_OUTPUT_CHARS = 32 * 1024;
/** Bytes read_file returns at most. */
const MAX_READ_BYTES = 1024 * 1024;
export const SERVER_VERSION = '0.1.0';

/** `text` cut to `max` characters, keeping its start and its end (where errors usually are), with a note of what was left out. */
export function truncate(text: string, max = MAX_TOOL_OUTPUT_CHARS): string {
  if (text.length <= max) return text;
  const keep = Math.floor(max / 2);
  const left = text.length - 2 * keep;
  return `${text.slice(0, keep)}\n[clade: ${left} characters left out of ${text.length}; write long output to a file and read parts of it]\n${text.slice(-keep)}`;
}

function textResult(text: string) {
  return { content: [{ type: 'text' as const, text }] };
}

function json(value: unknown) {
  return textResult(JSON.stringify(value, null, 2));
}

const sandboxId = z.string().regex(/^sb-[0-9a-f]{12}$/, 'a sandbox id looks like sb-0123456789ab').describe('the sandbox, as create_sandbox or list_sandboxes gave it');
const timeoutMs = z.number().int().min(0).max(3_600_000).optional();
const env = z.record(z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/), z.string()).optional();
const tag = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/, 'a tag is 1-64 letters, digits, ".", "_" or "-"');

/**
 * The MCP server: clade's sandboxes as tools an assistant can call. Tool
 * inputs are checked against their schemas; failures come back as tool
 * errors with the reason; long output is cut with a note.
 */
export function buildMcpServer(backend: McpBackend): McpServer {
  const server = new McpServer(
    { name: 'clade', version: SERVER_VERSION },
    {
      instructions:
        `clade runs Linux microVM sandboxes (${backend.where}) and forks them copy-on-write: create one, warm it up (install, import, load data), ` +
        'then fork it into several copies that each continue from that exact state, to try alternatives side by side. Kill sandboxes when done.',
    },
  );

  server.registerTool(
    'create_sandbox',
    {
      title: 'Create a sandbox',
      description:
        'Boots a new Linux sandbox (Debian, bash, python3 with numpy; or an image of your own), or starts one warm from a template or a snapshot. ' +
        'It has no network unless you give egress or ports: egress "none", "all" or a list of allowed hosts, *.domains and IPv4 CIDRs; ports are guest TCP ports the host reaches (their host addresses come back in ports). Returns its id.',
      inputSchema: {
        image: z.string().max(128).optional().describe('image name (default: the default image)'),
        template: tag.optional().describe('start from this template (clade template create): set up and already running'),
        snapshot: tag.optional().describe('start from this snapshot instead of booting'),
        env,
        timeoutMs: timeoutMs.describe("lifetime in ms; the sandbox is killed after it (default: the daemon's)"),
        egress: z.union([z.enum(['none', 'all']), z.array(z.string().max(253)).max(64)]).optional().describe('where the sandbox may connect (default: nowhere); giving egress or ports gives it a network'),
        ports: z.array(z.number().int().min(1).max(65535)).max(32).optional().describe('guest TCP ports to reach from the host'),
      },
    },
    async (args) => {
      const from = (['image', 'template', 'snapshot'] as const).filter((k) => args[k] !== undefined);
      if (from.length > 1) throw new CladeError('bad_request', `give one of image, template or snapshot, not ${from.join(' and ')}`);
      const network = args.egress !== undefined || args.ports !== undefined ? { ...(args.egress !== undefined ? { egress: args.egress } : {}), ...(args.ports ? { ports: args.ports } : {}) } : undefined;
      if (args.snapshot) {
        if (network) throw new CladeError('bad_request', "a snapshot's sandboxes keep the network it was taken with; leave egress and ports out");
        const [kid] = await backend.fromSnapshot(args.snapshot, 1, args.timeoutMs);
        if (!kid || 'error' in kid) throw new CladeError('boot_failed', kid ? kid.error : 'no sandbox started');
        return json(kid);
      }
      return json(
        await backend.create({
          ...(args.image ? { image: args.image } : {}),
          ...(args.template ? { template: args.template } : {}),
          ...(args.env ? { env: args.env } : {}),
          ...(args.timeoutMs !== undefined ? { timeoutMs: args.timeoutMs } : {}),
          ...(network ? { network } : {}),
        }),
      );
    },
  );

  server.registerTool(
    'run_command',
    {
      title: 'Run a shell command',
      description: 'Runs a command with /bin/sh -c in a sandbox and returns its exit code, stdout and stderr (long output is cut).',
      inputSchema: { sandboxId, command: z.string().min(1).max(256 * 1024), cwd: z.string().max(4096).optional(), env, timeoutMs: timeoutMs.describe('kill the command after this long (default 60000)') },
    },
    async (args) => {
      const r = await backend.run(args.sandboxId, args.command, { ...(args.timeoutMs !== undefined ? { timeoutMs: args.timeoutMs } : {}), ...(args.cwd ? { cwd: args.cwd } : {}), ...(args.env ? { env: args.env } : {}) });
      const parts = [`exit code: ${r.exitCode}${r.timedOut ? ' (killed at its timeout)' : ''}`];
      if (r.stdout) parts.push(`stdout:\n${truncate(r.stdout)}`);
      if (r.stderr) parts.push(`stderr:\n${truncate(r.stderr)}`);
      return { ...textResult(parts.join('\n')), isError: r.exitCode !== 0 };
    },
  );

  server.registerTool(
    'run_code',
    {
      title: 'Run Python',
      description: 'Runs Python in the sandbox\'s persistent interpreter: variables and imports stay between calls (and are copied into forks). Returns the last expression\'s value, output, and any exception.',
      inputSchema: { sandboxId, code: z.string().max(1024 * 1024), timeoutMs: timeoutMs.describe('interrupt after this long (default 60000; the interpreter then restarts and loses its state)') },
    },
    async (args) => {
      const r = await backend.runCode(args.sandboxId, args.code, args.timeoutMs !== undefined ? { timeoutMs: args.timeoutMs } : {});
      const parts: string[] = [];
      if (r.stdout) parts.push(`stdout:\n${truncate(r.stdout)}`);
      if (r.stderr) parts.push(`stderr:\n${truncate(r.stderr)}`);
      if (r.value !== undefined) parts.push(`value: ${truncate(r.value)}`);
      if (r.error) parts.push(`error: ${truncate(r.error.traceback || `${r.error.name}: ${r.error.value}`)}`);
      return { ...textResult(parts.join('\n') || '(no output)'), isError: r.error !== undefined };
    },
  );

  server.registerTool(
    'read_file',
    {
      title: 'Read a file',
      description: `Reads a file from a sandbox (at most ${MAX_READ_BYTES} bytes): as text, or base64 for binary data.`,
      inputSchema: { sandboxId, path: z.string().min(1).max(4096), encoding: z.enum(['utf8', 'base64']).default('utf8') },
    },
    async (args) => {
      const data = Buffer.from(await backend.readFile(args.sandboxId, args.path, MAX_READ_BYTES));
      return textResult(args.encoding === 'base64' ? data.toString('base64') : truncate(data.toString('utf8')));
    },
  );

  server.registerTool(
    'write_file',
    {
      title: 'Write a file',
      description: 'Writes a whole file in a sandbox, creating its parent directories.',
      inputSchema: { sandboxId, path: z.string().min(1).max(4096), content: z.string().max(16 * 1024 * 1024), encoding: z.enum(['utf8', 'base64']).default('utf8') },
    },
    async (args) => {
      const data = args.encoding === 'base64' ? Buffer.from(args.content, 'base64') : Buffer.from(args.content, 'utf8');
      await backend.writeFile(args.sandboxId, args.path, data);
      return textResult(`wrote ${data.length} bytes to ${args.path}`);
    },
  );

  server.registerTool(
    'list_files',
    {
      title: 'List a directory',
      description: 'Lists a directory in a sandbox: name, type, size and modification time of each entry.',
      inputSchema: { sandboxId, path: z.string().min(1).max(4096) },
    },
    async (args) => {
      const entries = await backend.listFiles(args.sandboxId, args.path);
      const lines = entries.map((e) => `${e.type === 'dir' ? 'd' : e.type === 'symlink' ? 'l' : '-'} ${String(e.size).padStart(10)} ${e.modifiedTime.toISOString()} ${e.name}`);
      return textResult(truncate(lines.join('\n') || '(empty directory)'));
    },
  );

  server.registerTool(
    'fork_sandbox',
    {
      title: 'Fork a sandbox',
      description: 'Forks a running sandbox into `count` copies that continue from its exact state (processes, memory, files, interpreter); the original keeps running. Each copy is isolated. Returns one entry per child.',
      inputSchema: { sandboxId, count: z.number().int().min(1).max(100).default(1), timeoutMs: timeoutMs.describe('lifetime of each child in ms') },
    },
    async (args) => json(await backend.fork(args.sandboxId, args.count, args.timeoutMs)),
  );

  server.registerTool(
    'snapshot_sandbox',
    {
      title: 'Snapshot a sandbox',
      description: 'Saves a running sandbox\'s whole state to disk under a tag; start copies of it later with start_from_snapshot. The sandbox keeps running.',
      inputSchema: { sandboxId, tag },
    },
    async (args) => json(await backend.snapshot(args.sandboxId, args.tag)),
  );

  server.registerTool(
    'start_from_snapshot',
    {
      title: 'Start from a snapshot',
      description: 'Starts `count` sandboxes from a snapshot, each continuing from the saved state.',
      inputSchema: { tag, count: z.number().int().min(1).max(100).default(1), timeoutMs: timeoutMs.describe('lifetime of each sandbox in ms') },
    },
    async (args) => json(await backend.fromSnapshot(args.tag, args.count, args.timeoutMs)),
  );

  server.registerTool(
    'list_sandboxes',
    { title: 'List sandboxes', description: 'Lists the running sandboxes with their parent and snapshot, if any.', inputSchema: {} },
    async () => json(await backend.list()),
  );

  server.registerTool(
    'kill_sandbox',
    { title: 'Kill a sandbox', description: 'Kills a sandbox and removes everything in it.', inputSchema: { sandboxId }, annotations: { destructiveHint: true } },
    async (args) => {
      await backend.kill(args.sandboxId);
      return textResult(`killed ${args.sandboxId}`);
    },
  );

  return server;
}
