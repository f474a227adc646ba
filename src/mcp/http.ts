import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import type { FastifyInstance } from 'fastify';
import type { DaemonContext } from '../api/context.js';
import { DaemonBackend } from './daemon-backend.js';
import { buildMcpServer } from './tools.js';

/**
 * The MCP endpoint of the daemon (`/mcp`, streamable HTTP), on its unix
 * socket and, behind the same bearer token, its TCP listener. Stateless:
 * each request gets a server and a transport of its own, and the sandboxes
 * live in the daemon, so any request may name any sandbox.
 */
export function mcpRoutes(app: FastifyInstance, ctx: DaemonContext): void {
  const backend = new DaemonBackend(ctx);
  const handle = async (req: import('fastify').FastifyRequest, reply: import('fastify').FastifyReply) => {
    const server = buildMcpServer(backend);
    const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined, enableJsonResponse: true });
    reply.hijack();
    reply.raw.on('close', () => {
      void transport.close();
      void server.close();
    });
    req.raw.socket?.setTimeout(0); // a tool call may boot or fork; its own deadlines bound it
    await server.connect(transport);
    await transport.handleRequest(req.raw, reply.raw, req.body);
  };
  app.post('/mcp', { schema: { tags: ['mcp'], summary: 'MCP over streamable HTTP (JSON-RPC); see docs/mcp.md' } }, handle);
  app.get('/mcp', { schema: { hide: true } }, handle);
  app.delete('/mcp', { schema: { hide: true } }, handle);
}
