import { StdioServerTransport } from '@modelcontextprotocol/sdk/server/stdio.js';
import { daemonPaths, socketAnswers } from '../api/server.js';
import { SdkBackend } from './sdk-backend.js';
import { buildMcpServer } from './tools.js';

/**
 * Where `clade mcp` runs sandboxes: the daemon named by CLADE_DAEMON, else
 * the one on this clade home's socket if it answers, else this process. A
 * running daemon is what a user expects to be used (sandboxes they can also
 * see with `clade ps`, that survive the assistant restarting its tools);
 * without one, the server still works, and its sandboxes end with it.
 */
export async function chooseMcpBackend(): Promise<SdkBackend> {
  const named = process.env.CLADE_DAEMON;
  if (named) return new SdkBackend({ daemon: named, ...(process.env.CLADE_TOKEN ? { token: process.env.CLADE_TOKEN } : {}) });
  const socket = daemonPaths.socket();
  if (await socketAnswers(socket)) return new SdkBackend({ daemon: `unix://${socket}` });
  return new SdkBackend();
}

/** `clade mcp`: the MCP server on stdin/stdout until the client closes it. Nothing else may write to stdout. */
export async function runMcpStdio(): Promise<void> {
  const backend = await chooseMcpBackend();
  const server = buildMcpServer(backend);
  const transport = new StdioServerTransport();
  const closed = new Promise<void>((resolve) => (transport.onclose = resolve));
  process.stdin.once('end', () => void server.close());
  await server.connect(transport);
  process.stderr.write(`clade mcp: serving on stdio; sandboxes run ${backend.where}\n`);
  await closed;
  await backend.close();
}
